"""The study binaries, each on a tiny digits setting, run as a user would."""

import csv
import json
import os

from absl.testing import absltest
import dp_accounting

from tests.experiments import binaries

_TINY = (
    '--task=digits', '--num_clients=6', '--sampling=full', '--rounds=2',
    '--eval_every=2', '--local_epochs=1', '--batch_size=16',
)


def _rows(path):
  with open(path) as f:
    return list(csv.DictReader(f))


def _full_participation_epsilon(noise_multiplier, rounds, delta=1e-5):
  accountant = dp_accounting.pld.PLDAccountant()
  accountant.compose(dp_accounting.GaussianDpEvent(noise_multiplier), rounds)
  return accountant.get_epsilon(delta)


def _tightest_client_epsilon(noise_multiplier, rate, steps, delta=1e-5):
  event = dp_accounting.SelfComposedDpEvent(dp_accounting.PoissonSampledDpEvent(
      rate, dp_accounting.GaussianDpEvent(noise_multiplier)), steps)
  return min(
      dp_accounting.rdp.RdpAccountant().compose(event).get_epsilon(delta),
      dp_accounting.pld.PLDAccountant(value_discretization_interval=1e-4)
      .compose(event).get_epsilon(delta),
  )


class CompareClippingTest(absltest.TestCase):

  def test_user_level_runs_every_strategy_at_every_noise_level(self):
    output_dir = self.create_tempdir().full_path
    result = binaries.run(
        'compare_clipping', f'--output_dir={output_dir}', *_TINY,
        '--privacy_unit=user', '--noise_multipliers=2,0.5',
        '--clippings=flat,per_layer_adaptive',
    )
    self.assertEqual(result.returncode, 0, result.stderr[-3000:])
    self.assertIn('run 4/4 done', result.stderr)
    rows = _rows(os.path.join(output_dir, 'results.csv'))
    self.assertEqual(
        [(r['clipping'], float(r['noise_multiplier'])) for r in rows],
        [('flat', 2.0), ('flat', 0.5), ('per_layer_adaptive', 2.0),
         ('per_layer_adaptive', 0.5)],
    )
    for row in rows:
      self.assertAlmostEqual(
          float(row['epsilon']),
          _full_participation_epsilon(float(row['noise_multiplier']), 2),
          places=6,
      )
      self.assertBetween(float(row['eval_accuracy']), 0.0, 1.0)
    self.assertTrue(os.path.getsize(
        os.path.join(output_dir, 'accuracy_vs_epsilon.png')))
    with open(os.path.join(output_dir, 'flags.json')) as f:
      study_flags = json.load(f)
    self.assertEqual(study_flags['clippings'], ['flat', 'per_layer_adaptive'])
    with open(os.path.join(
        output_dir, 'runs', 'per_layer_adaptive_z0.5', 'config.json')) as f:
      run_config = json.load(f)
    self.assertEqual(run_config['clipping'], 'per_layer_adaptive')
    self.assertEqual(run_config['noise_multiplier'], 0.5)

  def test_default_protocol_is_example_level_on_two_silos(self):
    # The founding study's protocol (example-level DP-SGD in 2 silos), on
    # digits: 1,438 training examples, 719 a silo; batch 256, 3 steps a round.
    output_dir = self.create_tempdir().full_path
    result = binaries.run(
        'compare_clipping', f'--output_dir={output_dir}', '--task=digits',
        '--rounds=2', '--eval_every=2', '--noise_multipliers=1',
        '--clippings=per_layer_uniform',
    )
    self.assertEqual(result.returncode, 0, result.stderr[-3000:])
    self.assertIn('example-level DP-SGD on every client', result.stderr)
    [row] = _rows(os.path.join(output_dir, 'results.csv'))
    self.assertAlmostEqual(
        float(row['epsilon']),
        _tightest_client_epsilon(1.0, 256 / 719, 2 * 3), places=6)
    clients = _rows(os.path.join(
        output_dir, 'runs', 'per_layer_uniform_z1', 'client_epsilons.csv'))
    self.assertEqual([c['examples'] for c in clients], ['719', '719'])

  def test_unknown_strategy_exits_2(self):
    result = binaries.run('compare_clipping', '--clippings=flat,per_unit')
    self.assertEqual(result.returncode, 2)
    self.assertIn('--clippings=flat,per_unit is out of range', result.stderr)


class DropoutStudyTest(absltest.TestCase):

  def test_central_epsilon_holds_and_distributed_pays_past_its_tolerance(self):
    output_dir = self.create_tempdir().full_path
    result = binaries.run(
        'dropouts', f'--output_dir={output_dir}', '--rounds=2',
        '--clients_per_round=10', '--eval_every=2', '--dropout_rates=0,0.6',
        '--ddp_dropout_tolerance=0.1')
    self.assertEqual(result.returncode, 0, result.stderr[-3000:])
    rows = {(r['noise_placement'], float(r['dropout_rate'])): r
            for r in _rows(os.path.join(output_dir, 'results.csv'))}
    self.assertLen(rows, 4)
    self.assertEqual(rows['central', 0.0]['epsilon'],
                     rows['central', 0.6]['epsilon'])
    self.assertGreater(float(rows['central', 0.6]['mean_dropped']), 0)
    self.assertGreater(float(rows['distributed', 0.6]['epsilon']),
                       float(rows['distributed', 0.0]['epsilon']))
    self.assertIn('more than the tolerance allows', result.stderr)
    self.assertTrue(os.path.getsize(
        os.path.join(output_dir, 'accuracy_vs_dropout.png')))


class SweepEpsilonTest(absltest.TestCase):

  def test_calibrated_points_and_baseline(self):
    output_dir = self.create_tempdir().full_path
    result = binaries.run(
        'sweep_epsilon', f'--output_dir={output_dir}', *_TINY,
        '--target_epsilons=4,16',
    )
    self.assertEqual(result.returncode, 0, result.stderr[-3000:])
    self.assertIn('no-DP test accuracy', result.stdout)
    rows = _rows(os.path.join(output_dir, 'results.csv'))
    self.assertLen(rows, 2)
    for row, target in zip(rows, (4.0, 16.0)):
      self.assertBetween(float(row['epsilon']), 0.99 * target, target)
      self.assertAlmostEqual(
          float(row['epsilon']),
          _full_participation_epsilon(float(row['noise']), 2), places=6,
      )
    self.assertGreater(float(rows[0]['noise']), float(rows[1]['noise']))
    self.assertTrue(os.path.exists(
        os.path.join(output_dir, 'runs', 'no_dp', 'metrics.csv')))
    self.assertTrue(os.path.getsize(
        os.path.join(output_dir, 'accuracy_vs_epsilon.png')))

  def test_example_level_points_meet_their_targets(self):
    output_dir = self.create_tempdir().full_path
    result = binaries.run(
        'sweep_epsilon', f'--output_dir={output_dir}', *_TINY,
        '--privacy_unit=example', '--target_epsilons=3',
    )
    self.assertEqual(result.returncode, 0, result.stderr[-3000:])
    [row] = _rows(os.path.join(output_dir, 'results.csv'))
    self.assertBetween(float(row['epsilon']), 0.99 * 3, 3.0)
    # The baseline is plain FedAvg.
    with open(os.path.join(output_dir, 'runs', 'no_dp', 'config.json')) as f:
      self.assertEqual(json.load(f)['privacy_unit'], 'user')

  def test_needs_exactly_one_list(self):
    result = binaries.run('sweep_epsilon', '--target_epsilons=1', '--noise_multipliers=1')
    self.assertEqual(result.returncode, 2)
    self.assertIn('exactly one of', result.stderr)


class LayerNormsTest(absltest.TestCase):

  def test_records_every_layer_of_every_client_each_round(self):
    output_dir = self.create_tempdir().full_path
    result = binaries.run(
        'layer_norms', f'--output_dir={output_dir}', *_TINY,
    )
    self.assertEqual(result.returncode, 0, result.stderr[-3000:])
    rows = _rows(os.path.join(output_dir, 'layer_norms.csv'))
    # digits' model: 2 dense layers, kernel and bias each; 6 clients, 2 rounds.
    self.assertLen(rows, 2 * 6 * 4)
    self.assertEqual(
        {r['layer'] for r in rows},
        {'dense/kernel:0', 'dense/bias:0', 'dense_1/kernel:0', 'dense_1/bias:0'},
    )
    self.assertTrue(all(float(r['norm']) > 0 for r in rows))
    self.assertTrue(os.path.getsize(os.path.join(output_dir, 'layer_norms.png')))


if __name__ == '__main__':
  absltest.main()
