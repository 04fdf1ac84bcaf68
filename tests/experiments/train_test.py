import csv
import json
import os
import re
import math
import subprocess
import time

from absl import flags
from absl.testing import absltest
from absl.testing import flagsaver
from absl.testing import parameterized
import dp_accounting
import numpy as np
import portpicker
import tensorflow as tf
from tensorflow_privacy.privacy.analysis import tree_aggregation_accountant

from aggregators import distributed_dp
from dp_fedavg import accounting
from dp_fedavg import run_config
from dp_fedavg import sampling
from dp_fedavg.tasks import digits
from experiments import train
from experiments import training_flags
from tests.experiments import binaries


def _flag_error():
  """`train`'s flag check of the current flag values, as its main makes it."""
  return train.flag_error(training_flags.config_from_flags())


def _run_train(*args: str) -> subprocess.CompletedProcess:
  return binaries.run('train', *args)


class FlagValidationTest(parameterized.TestCase):

  def test_defaults_are_valid(self):
    with flagsaver.flagsaver(output_dir=self.create_tempdir().full_path):
      self.assertIsNone(_flag_error())

  @parameterized.named_parameters(
      ('negative_clip', dict(clip=-1.0), '--clip=-1.0'),
      ('zero_clip', dict(clip=0.0), '--clip=0.0'),
      ('negative_noise', dict(noise_multiplier=-0.5), '--noise_multiplier'),
      ('negative_rounds', dict(rounds=-3), '--rounds=-3'),
      ('zero_rounds', dict(rounds=0), '--rounds=0'),
      ('unknown_task', dict(task='imagenet'), '--task=imagenet'),
      ('unknown_aggregator', dict(aggregator='skellam'), '--aggregator=skellam'),
      ('unknown_sampling', dict(sampling='shuffle'), '--sampling'),
      ('cohort_above_population',
       dict(clients_per_round=101, num_clients=100), '--clients_per_round=101'),
      ('zero_cohort', dict(clients_per_round=0), '--clients_per_round=0'),
      ('zero_population', dict(num_clients=0), '--num_clients=0'),
      ('delta_one', dict(delta=1.0), '--delta'),
      ('momentum_one', dict(server_momentum=1.0), '--server_momentum'),
      ('zero_batch', dict(batch_size=0), '--batch_size'),
      ('zero_epochs', dict(local_epochs=0), '--local_epochs'),
      ('zero_client_lr', dict(client_lr=0.0), '--client_lr'),
      ('bad_alpha', dict(dirichlet_alpha=0.0), '--dirichlet_alpha'),
      ('unknown_privacy_unit', dict(privacy_unit='record'), '--privacy_unit'),
      ('example_zero_clip', dict(privacy_unit='example', clip=0.0), '--clip'),
      ('unknown_accountant', dict(accountant='gdp'), '--accountant=gdp'),
      ('negative_target', dict(target_epsilon=-1.0), '--target_epsilon'),
      ('unknown_calibration', dict(calibrate='clip'), '--calibrate=clip'),
      ('unknown_clipping', dict(clipping='per_unit'), '--clipping=per_unit'),
      ('quantile_above_one',
       dict(aggregator='gaussian_adaptive', target_quantile=1.5),
       '--target_quantile=1.5'),
      ('negative_clip_rate',
       dict(aggregator='gaussian_adaptive', clip_learning_rate=-1.0),
       '--clip_learning_rate=-1.0'),
      ('zero_initial_clip', dict(aggregator='gaussian_adaptive', initial_clip=0.0),
       '--initial_clip=0.0'),
      ('secure_adaptive_initial_clip',
       dict(aggregator='secure_gaussian', adaptive_clip=True, initial_clip=0.0),
       '--initial_clip=0.0'),
      ('negative_count_noise',
       dict(aggregator='gaussian_adaptive', clipped_count_stddev=-1.0),
       '--clipped_count_stddev=-1.0'),
      ('zero_l1_clip', dict(aggregator='laplace', l1_clip=0.0), '--l1_clip=0.0'),
      ('zero_epsilon_per_round', dict(aggregator='laplace', epsilon_per_round=0.0),
       '--epsilon_per_round=0.0'),
      ('unknown_placement', dict(noise_placement='edge'),
       '--noise_placement=edge'),
      ('too_many_bits', dict(aggregator='distributed_dp', bits=31), '--bits=31'),
      ('beta_one', dict(aggregator='distributed_dp', ddp_beta=1.0),
       '--ddp_beta=1.0'),
      ('unknown_ddp_mechanism',
       dict(aggregator='distributed_dp', ddp_mechanism='laplace'),
       '--ddp_mechanism=laplace'),
      ('unknown_rule', dict(robust_rule='mean'), '--robust_rule=mean'),
      ('trim_half', dict(aggregator='none', robust_rule='trimmed_mean',
                         trim_fraction=0.5), '--trim_fraction=0.5'),
      ('unknown_attack', dict(attack='backdoor', byzantine_fraction=0.1),
       '--attack=backdoor'),
      ('byzantine_fraction_one', dict(attack='alie', byzantine_fraction=1.0),
       '--byzantine_fraction=1.0'),
      ('zero_bucket', dict(robust_preaggregation='bucketing', bucket_size=0),
       '--bucket_size=0'),
  )
  def test_out_of_range_flag_is_named(self, overrides, flag_text):
    overrides.setdefault('output_dir', self.create_tempdir().full_path)
    with flagsaver.flagsaver(**overrides):
      error = _flag_error()
    self.assertIsNotNone(error)
    self.assertIn(flag_text, error)
    self.assertIn('must be', error)
    self.assertNotIn('\n', error)

  @parameterized.named_parameters(
      ('calibrate_without_target', dict(calibrate='noise'), '--target_epsilon'),
      ('target_without_privacy', dict(aggregator='none', target_epsilon=1.0),
       '--aggregator=none'),
      ('laplace_per_layer', dict(aggregator='laplace', clipping='per_layer_uniform'),
       '--clipping=per_layer_uniform'),
      ('client_noise_adaptive',
       dict(aggregator='gaussian_adaptive', noise_placement='client'),
       '--noise_placement=client'),
      ('l1_clip_of_gaussian', dict(l1_clip=3.0), '--l1_clip=3.0'),
      ('noise_of_plain_fedavg', dict(aggregator='none', noise_multiplier=2.0),
       '--noise_multiplier=2.0'),
      ('secure_sum_on_workers',
       dict(aggregator='secure_gaussian', workers=['localhost:5000']),
       '--workers'),
      ('inprocess_on_workers',
       dict(engine='inprocess', workers=['localhost:5000']),
       '--workers needs --engine=standard, vectorized or auto'),
      ('vectorized_distributed_dp',
       dict(aggregator='distributed_dp', engine='vectorized'),
       '--engine=standard'),
      ('median_after_central_noise', dict(robust_rule='median'),
       '--robust_rule=median after central noise is unsound'),
      ('attack_without_byzantine_clients', dict(attack='alie'),
       '--attack=alie needs --byzantine_fraction'),
      ('byzantine_clients_without_attack', dict(byzantine_fraction=0.2),
       'needs --attack'),
      ('robust_laplace', dict(aggregator='laplace', robust_rule='median'),
       'robust rules and attacks run with'),
      ('example_level_laplace', dict(privacy_unit='example', aggregator='laplace'),
       '--aggregator=laplace is user-level only'),
      ('example_level_client_noise',
       dict(privacy_unit='example', noise_placement='client'),
       '--noise_placement applies to user-level DP only'),
      ('example_level_robust', dict(privacy_unit='example', robust_rule='median'),
       'robust rules and simulated attacks are built for user-level DP only'),
      ('custom_without_model', dict(task='custom', data_path='data.npz'),
       '--task=custom needs --model'),
      ('data_path_of_a_built_in_task', dict(data_path='data.npz'),
       '--data_path is for --task=custom'),
      ('loss_of_a_built_in_task', dict(loss='mse'),
       '--loss is for --task=custom'),
      ('custom_with_num_clients',
       dict(task='custom', data_path='data.npz', model='m:f', num_clients=5),
       'drop --num_clients'),
  )
  def test_inconsistent_flags_are_named(self, overrides, flag_text):
    with flagsaver.flagsaver(
        output_dir=self.create_tempdir().full_path, **overrides
    ):
      self.assertIn(flag_text, _flag_error())

  def test_silos_pool_only_what_can_be_pooled(self):
    def error(**values):
      return training_flags._silos_error(  # pylint: disable=protected-access
          run_config.with_defaults(silos=2, **values))
    self.assertIsNone(error(task='digits'))
    self.assertIsNone(error(task='femnist', num_clients=50))
    self.assertIn('drop --num_clients', error(task='digits', num_clients=6))
    self.assertIn('drop --num_clients', error(task='cifar10', partition='dirichlet'))
    self.assertIn('shakespeare', error(task='shakespeare'))

  def test_parameter_of_another_mechanism_names_the_ones_that_take_it(self):
    with flagsaver.flagsaver(
        output_dir=self.create_tempdir().full_path, aggregator='laplace',
        clip=2.0,
    ):
      self.assertEqual(
          _flag_error(),
          '--clip=2.0 is a parameter of --aggregator=banded_mf|'
          'distributed_dp|dp_ftrl_tree|gaussian_fixed|secure_gaussian, not of '
          '--aggregator=laplace, which would ignore it.',
      )

  def test_mechanism_flags_come_from_the_registry(self):
    help_text = flags.FLAGS['epsilon_per_round'].help
    self.assertIn('[laplace]', help_text)
    self.assertEqual(flags.FLAGS['ddp_beta'].default, math.exp(-0.5))
    self.assertIn('distributed_dp', flags.FLAGS['aggregator'].help)

  def test_full_participation_ignores_clients_per_round(self):
    with flagsaver.flagsaver(
        sampling='full', clients_per_round=1000,
        output_dir=self.create_tempdir().full_path,
    ):
      self.assertIsNone(_flag_error())

  def test_cohort_message_states_the_sampling_rate_range(self):
    with flagsaver.flagsaver(
        clients_per_round=200, num_clients=100,
        output_dir=self.create_tempdir().full_path,
    ):
      self.assertIn('(0, 1]', _flag_error())

  def test_existing_results_need_overwrite(self):
    output_dir = self.create_tempdir()
    output_dir.create_file('metrics.csv', 'round\n')
    with flagsaver.flagsaver(output_dir=output_dir.full_path):
      self.assertIn('--overwrite', _flag_error())
    with flagsaver.flagsaver(output_dir=output_dir.full_path, overwrite=True):
      self.assertIsNone(_flag_error())


class TrainBinaryTest(absltest.TestCase):

  def test_bad_flag_exits_2_with_one_line(self):
    result = _run_train('--rounds=-3')
    self.assertEqual(result.returncode, 2)
    lines = result.stderr.strip().splitlines()
    self.assertEqual(
        lines[-1], 'train.py: error: --rounds=-3 is out of range: must be an '
        'integer >= 1.'
    )
    self.assertNotIn('round 1/', result.stderr)

  def test_run_writes_metrics_config_and_exact_epsilon(self):
    output_dir = self.create_tempdir().full_path
    label = self.id()
    result = binaries.run(
        'train', f'--output_dir={output_dir}', '--rounds=3', '--eval_every=2',
        '--num_clients=50', '--clients_per_round=10', '--noise_multiplier=1.1',
        '--clip=0.5', '--sampling=poisson', '--delta=1e-4', '--seed=5',
        '--accountant=rdp', label=label,
    )
    self.assertEqual(result.returncode, 0, result.stderr[-3000:])
    self.assertLen(re.findall(r'round \d/3 ', result.stderr), 3, result.stderr)
    self.assertIn('ETA', result.stderr)

    with open(os.path.join(output_dir, 'metrics.csv')) as f:
      rows = list(csv.DictReader(f))
    self.assertLen(rows, 3)
    for column in ('round', 'train_loss', 'eval_accuracy', 'epsilon',
                   'accountant', 'delta', 'seconds', 'aggregator_clipped_count'):
      self.assertIn(column, rows[0])
    self.assertEqual([r['round'] for r in rows], ['1', '2', '3'])
    self.assertEqual(rows[0]['eval_accuracy'], '')  # Evaluated on 2 and 3.
    self.assertBetween(float(rows[2]['eval_accuracy']), 0.0, 1.0)

    accountant = dp_accounting.rdp.RdpAccountant()
    for row in rows:
      accountant.compose(
          dp_accounting.PoissonSampledDpEvent(
              10 / 50, dp_accounting.GaussianDpEvent(1.1)
          )
      )
      self.assertAlmostEqual(
          float(row['epsilon']), accountant.get_epsilon(1e-4), places=10
      )
      self.assertEqual(float(row['delta']), 1e-4)
      self.assertEqual(row['accountant'], 'rdp')

    with open(os.path.join(output_dir, 'config.json')) as f:
      config = json.load(f)
    self.assertEqual(config['noise_multiplier'], 1.1)
    self.assertEqual(config['noise_multiplier_used'], 1.1)
    model = tf.keras.models.load_model(
        os.path.join(output_dir, 'final_model.keras')
    )
    self.assertEqual(model.output_shape, (None, 10))
    self.assertEqual(config['rounds'], 3)
    for name in ('task', 'aggregator', 'clip', 'clients_per_round', 'sampling',
                 'local_epochs', 'batch_size', 'client_lr', 'server_lr',
                 'server_momentum', 'delta', 'seed', 'output_dir'):
      self.assertIn(name, config)
    # Without --checkpoint_every nothing is saved, so --resume has nothing.
    self.assertFalse(os.path.exists(os.path.join(output_dir, 'checkpoints')))
    # The run stopped its TFF worker before exiting.
    self.assertEmpty(binaries.worker_pids(label))

    rerun = _run_train(f'--output_dir={output_dir}', '--rounds=1')
    self.assertEqual(rerun.returncode, 2)
    self.assertIn('--overwrite', rerun.stderr)

  def test_calibrated_run_uses_the_noise_that_meets_the_target(self):
    output_dir = self.create_tempdir().full_path
    result = _run_train(
        f'--output_dir={output_dir}', '--rounds=2', '--eval_every=2',
        '--num_clients=100', '--clients_per_round=10', '--sampling=uniform',
        '--target_epsilon=3', '--calibrate=noise',
    )
    self.assertEqual(result.returncode, 0, result.stderr[-3000:])
    self.assertIn('calibrated noise multiplier', result.stderr)
    with open(os.path.join(output_dir, 'config.json')) as f:
      noise_multiplier = json.load(f)['noise_multiplier_used']
    with open(os.path.join(output_dir, 'metrics.csv')) as f:
      rows = list(csv.DictReader(f))
    self.assertLen(rows, 2)
    self.assertBetween(float(rows[-1]['epsilon']), 0.99 * 3, 3.0)
    self.assertEqual(rows[-1]['accountant'], 'rdp')  # Uniform: RDP only.
    self.assertGreater(noise_multiplier, 1.0)


  def test_example_level_run_reports_every_clients_epsilon(self):
    output_dir = self.create_tempdir().full_path
    result = _run_train(
        f'--output_dir={output_dir}', '--privacy_unit=example', '--silos=3',
        '--rounds=2', '--eval_every=2', '--sampling=poisson',
        '--clients_per_round=2', '--batch_size=64', '--local_epochs=1',
        '--clipping=per_layer_adaptive', '--target_epsilon=4',
        '--calibrate=noise', '--accountant=rdp', '--engine=vectorized',
    )
    self.assertEqual(result.returncode, 0, result.stderr[-3000:])
    self.assertIn('example-level DP-SGD on every client', result.stderr)
    with open(os.path.join(output_dir, 'config.json')) as f:
      config = json.load(f)
    self.assertEqual(config['adjacency'], 'add_or_remove_one_example')
    noise = config['noise_multiplier_used']
    with open(os.path.join(output_dir, 'client_epsilons.csv')) as f:
      clients = list(csv.DictReader(f))
    with open(os.path.join(output_dir, 'metrics.csv')) as f:
      rows = list(csv.DictReader(f))
    self.assertLen(clients, 3)
    for client in clients:
      steps = int(client['steps'])
      n = int(client['examples'])
      self.assertEqual(steps, int(client['rounds']) * math.ceil(n / 64))
      want = dp_accounting.rdp.RdpAccountant().compose(
          dp_accounting.SelfComposedDpEvent(dp_accounting.PoissonSampledDpEvent(
              min(1.0, 64 / n), dp_accounting.GaussianDpEvent(noise)), steps),
      ).get_epsilon(1e-5)
      self.assertAlmostEqual(float(client['epsilon']), want, places=8)
    largest = max(float(client['epsilon']) for client in clients)
    self.assertEqual(float(rows[-1]['epsilon']), largest)
    # Calibrated for every client taking part in both rounds (the plan, with
    # Poisson sampling, assumes the rounds the sampler draws).
    self.assertLessEqual(largest, 4.0)

  def test_missing_data_exits_2_naming_the_path_tried(self):
    missing = os.path.join(self.create_tempdir().full_path, 'nowhere')
    result = _run_train('--task=femnist', f'--data_dir={missing}')
    self.assertEqual(result.returncode, 2)
    last_line = result.stderr.strip().splitlines()[-1]
    self.assertIn(os.path.join(missing, 'femnist_sample.npz'), last_line)
    self.assertIn('--data_dir', last_line)


def _secure_reference_epsilon(flags_, rounds: int) -> float:
  """Epsilon after `rounds` rounds of the secure test runs (30 clients, 6 per
  round, z = 1, clip 1), accounted apart from the run."""
  if '--aggregator=secure_gaussian' in flags_:
    # Adaptive: the update and the count share z = 1, a Poisson-sampled
    # Gaussian of z = 1 for dp-accounting alone (PLD, the tighter).
    pld = dp_accounting.pld.PLDAccountant(value_discretization_interval=1e-4)
    pld.compose(
        dp_accounting.PoissonSampledDpEvent(
            6 / 30, dp_accounting.GaussianDpEvent(1.0)
        ),
        rounds,
    )
    return pld.get_epsilon(1e-5)
  # Distributed DP: its own RDP curve for the digits model's size, sampled
  # without replacement (replace-one), from the factory's arguments.
  accountant = accounting.PrivacyAccountant(
      sampling.SamplingScheme.UNIFORM, 30, 6, 1e-5
  )
  event = distributed_dp.round_dp_event(
      1.0, 1.0, 6, digits.build_task(num_clients=30).update_dimension,
      mechanism='skellam',
  )
  for _ in range(rounds):
    accountant.compose_round(event)
  return accountant.epsilon()


class SecureAggregatorBinaryTest(parameterized.TestCase):

  @parameterized.named_parameters(
      ('secure_gaussian', ('--aggregator=secure_gaussian', '--adaptive_clip',
                           '--sampling=poisson')),
      ('distributed_dp', ('--aggregator=distributed_dp', '--sampling=uniform',
                          '--ddp_mechanism=skellam')),
  )
  def test_three_rounds_in_the_secure_simulation_with_epsilon(self, flags_):
    output_dir = self.create_tempdir().full_path
    result = _run_train(
        f'--output_dir={output_dir}', '--rounds=3', '--eval_every=3',
        '--num_clients=30', '--clients_per_round=6', *flags_,
    )
    self.assertEqual(result.returncode, 0, result.stderr[-3000:])
    self.assertIn('running in the context that simulates it', result.stderr)
    with open(os.path.join(output_dir, 'metrics.csv')) as f:
      rows = list(csv.DictReader(f))
    self.assertLen(rows, 3)
    for rounds, row in enumerate(rows, start=1):
      self.assertAlmostEqual(
          float(row['epsilon']), _secure_reference_epsilon(flags_, rounds),
          places=6,
      )
    self.assertBetween(float(rows[-1]['eval_accuracy']), 0.0, 1.0)

  def test_too_few_bits_exit_2_naming_the_bits_that_suffice(self):
    result = _run_train(
        '--aggregator=distributed_dp', '--sampling=uniform', '--bits=6',
        f'--output_dir={self.create_tempdir().full_path}',
    )
    self.assertEqual(result.returncode, 2)
    last_line = result.stderr.strip().splitlines()[-1]
    self.assertRegex(last_line, r'bits=6 is too small.*bits=\d+ would suffice')

  def test_distributed_dp_under_poisson_sampling_is_refused(self):
    result = _run_train(
        '--aggregator=distributed_dp', '--sampling=poisson',
        f'--output_dir={self.create_tempdir().full_path}',
    )
    self.assertEqual(result.returncode, 2)
    self.assertIn('--sampling=uniform', result.stderr.strip().splitlines()[-1])


def _read_rows(output_dir: str) -> list[dict[str, str]]:
  with open(os.path.join(output_dir, 'metrics.csv')) as f:
    return list(csv.DictReader(f))


def _tightest_gaussian_epsilon(z_eff: float, rdp_event, delta: float) -> float:
  """min(RDP of `rdp_event` under zero-out adjacency, PLD of one Gaussian of
  z_eff): the run-level ledger's report."""
  rdp = dp_accounting.rdp.RdpAccountant(
      neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_SPECIAL)
  rdp.compose(rdp_event)
  pld = dp_accounting.pld.PLDAccountant(value_discretization_interval=1e-4)
  pld.compose(dp_accounting.GaussianDpEvent(z_eff))
  return min(rdp.get_epsilon(delta), pld.get_epsilon(delta))


class CorrelatedNoiseBinaryTest(absltest.TestCase):
  """Cyclic participation: 40 clients in groups of 10, each every 4 rounds;
  5 rounds, so the first group takes part twice."""

  _FLAGS = ('--rounds=5', '--eval_every=5', '--num_clients=40',
            '--clients_per_round=10', '--sampling=cyclic', '--seed=3',
            '--noise_multiplier=2.0')

  def test_restarted_tree_on_both_engines_with_tensorflow_privacys_epsilon(
      self):
    rows = {}
    for engine in ('standard', 'inprocess'):
      output_dir = self.create_tempdir().full_path
      result = _run_train(
          f'--output_dir={output_dir}', f'--engine={engine}',
          '--aggregator=dp_ftrl_tree', '--tree_restart=epoch', *self._FLAGS)
      self.assertEqual(result.returncode, 0, result.stderr[-3000:])
      self.assertIn('cyclic participation: 4 groups of 10', result.stderr)
      rows[engine] = _read_rows(output_dir)
    for standard, in_process in zip(rows['standard'], rows['inprocess']):
      self.assertEqual(in_process['epsilon'], standard['epsilon'])
      self.assertEqual(standard['adjacency'], 'zero_out')
      self.assertAlmostEqual(float(in_process['train_loss']),
                             float(standard['train_loss']), delta=1e-4)
    # Trees of 4 and 1 rounds, no client twice in one: depths 3 + 1.
    orders = dp_accounting.rdp.rdp_privacy_accountant.DEFAULT_RDP_ORDERS
    rdp = tree_aggregation_accountant.compute_rdp_tree_restart(
        2.0, [4, 1], orders)
    rdp_epsilon = dp_accounting.rdp.compute_epsilon(orders, rdp, 1e-5)[0]
    pld = dp_accounting.pld.PLDAccountant(value_discretization_interval=1e-4)
    pld.compose(dp_accounting.GaussianDpEvent(2.0 / math.sqrt(4)))
    self.assertAlmostEqual(
        float(rows['standard'][-1]['epsilon']),
        min(rdp_epsilon, pld.get_epsilon(1e-5)), places=6)

  def test_banded_mf_epsilon_from_the_column_norms(self):
    output_dir = self.create_tempdir().full_path
    result = _run_train(f'--output_dir={output_dir}',
                        '--aggregator=banded_mf', *self._FLAGS)
    self.assertEqual(result.returncode, 0, result.stderr[-3000:])
    self.assertIn('with DP-SGD (C = I', result.stderr)
    # B = 4 bands (the period); all 5 planned rounds ran, so every column
    # has its unit norm, and the first group took part twice, 4 rounds
    # apart: sensitivity^2 2.
    sensitivity = 2.0
    z_eff = 2.0 / math.sqrt(sensitivity)
    self.assertAlmostEqual(
        float(_read_rows(output_dir)[-1]['epsilon']),
        _tightest_gaussian_epsilon(
            z_eff, dp_accounting.GaussianDpEvent(z_eff), 1e-5), places=6)


  def test_amplified_banded_mf_epsilon_is_dp_sgd_over_the_turns(self):
    output_dir = self.create_tempdir().full_path
    flags_ = [f for f in self._FLAGS
              if not f.startswith(('--sampling', '--clients_per_round'))]
    result = _run_train(
        f'--output_dir={output_dir}', '--aggregator=banded_mf',
        '--sampling=cyclic_poisson', '--sampling_groups=4',
        '--clients_per_round=5', *flags_)
    self.assertEqual(result.returncode, 0, result.stderr[-3000:])
    self.assertIn('cyclic_poisson participation: 4 groups of 10',
                  result.stderr)
    rows = _read_rows(output_dir)
    self.assertEqual(rows[-1]['adjacency'], 'add_or_remove_one')
    # 5 rounds over 4 groups: 2 turns, each a Poisson-sampled Gaussian
    # (q = 5 / 10, unit columns).
    turns = dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(
            0.5, dp_accounting.GaussianDpEvent(2.0)), 2)
    epsilons = []
    for accountant in (dp_accounting.rdp.RdpAccountant(),
                       dp_accounting.pld.PLDAccountant(
                           value_discretization_interval=1e-4)):
      accountant.compose(turns)
      epsilons.append(accountant.get_epsilon(1e-5))
    self.assertAlmostEqual(float(rows[-1]['epsilon']), min(epsilons),
                           places=6)


class EngineBinaryTest(parameterized.TestCase):

  def test_same_losses_and_epsilon_as_the_standard_engine(self):
    """Same noise stream, same batches: rows agree up to float32 rounding;
    the in-process engine runs the vectorized process's own graphs."""
    run_flags = (
        '--rounds=3', '--eval_every=3', '--num_clients=40',
        '--clients_per_round=8', '--aggregator=gaussian_adaptive', '--seed=2',
    )
    rows = {}
    for engine in ('standard', 'vectorized', 'inprocess'):
      output_dir = self.create_tempdir().full_path
      result = _run_train(
          f'--output_dir={output_dir}', f'--engine={engine}',
          '--users_per_worker_client=3', *run_flags,
      )
      self.assertEqual(result.returncode, 0, result.stderr[-3000:])
      self.assertIn(f'engine {engine} (--engine={engine})', result.stderr)
      self.assertEqual('started a TFF worker' in result.stderr,
                       engine != 'inprocess', engine)
      with open(os.path.join(output_dir, 'metrics.csv')) as f:
        rows[engine] = list(csv.DictReader(f))
    self.assertIn('3 users per TFF client (the vectorized process)',
                  result.stderr)
    self.assertLen(rows['inprocess'], 3)
    for standard, vectorized, in_process in zip(
        rows['standard'], rows['vectorized'], rows['inprocess']):
      for fast in (vectorized, in_process):
        self.assertEqual(fast['epsilon'], standard['epsilon'])
        self.assertEqual(fast['aggregator_clipped_count'],
                         standard['aggregator_clipped_count'])
        self.assertAlmostEqual(float(fast['train_loss']),
                               float(standard['train_loss']), delta=1e-4)
      self.assertAlmostEqual(float(in_process['train_loss']),
                             float(vectorized['train_loss']), delta=1e-6)
    for fast in ('vectorized', 'inprocess'):
      self.assertAlmostEqual(float(rows[fast][-1]['eval_accuracy']),
                             float(rows['standard'][-1]['eval_accuracy']),
                             delta=0.01)

  @parameterized.named_parameters(
      ('default', (), 'engine inprocess (--engine=auto: the fastest)'),
      ('secure_sums', ('--aggregator=secure_gaussian',),
       'engine standard (--engine=auto: the standard engine, since a secure '
       'sum cannot aggregate stacked users'),
  )
  def test_auto_names_the_engine_and_why(self, args, logged):
    result = _run_train(
        '--rounds=1', '--num_clients=20', '--clients_per_round=5', *args,
        f'--output_dir={self.create_tempdir().full_path}')
    self.assertEqual(result.returncode, 0, result.stderr[-3000:])
    self.assertIn(logged, result.stderr)

  @parameterized.named_parameters(
      ('secure_aggregator', 'train', ('--aggregator=secure_gaussian',)),
      ('layer_norms_study', 'layer_norms', ()),
  )
  def test_refused_with_advice_to_use_the_standard_engine(self, module, args):
    result = binaries.run(
        module, '--engine=vectorized', *args,
        f'--output_dir={self.create_tempdir().full_path}',
    )
    self.assertEqual(result.returncode, 2)
    self.assertIn('--engine=standard', result.stderr.strip().splitlines()[-1])


class ResumeTest(absltest.TestCase):

  def test_killed_run_resumes_to_the_uninterrupted_model_and_epsilon(self):
    run_flags = (
        '--rounds=5', '--checkpoint_every=2', '--num_clients=40',
        '--clients_per_round=8', '--eval_every=5', '--seed=3',
        '--aggregator=gaussian_adaptive',
    )
    whole = self.create_tempdir().full_path
    interrupted = self.create_tempdir().full_path
    killed = binaries.start('train', f'--output_dir={interrupted}', *run_flags)
    checkpoint = os.path.join(interrupted, 'checkpoints', 'program_state_2')
    deadline = time.monotonic() + 240
    while not os.path.isdir(checkpoint) and time.monotonic() < deadline:
      time.sleep(0.05)
    killed.kill()
    killed.communicate()
    # Killed while training, not after it finished.
    self.assertEqual(killed.returncode, -9)
    self.assertFalse(
        os.path.exists(os.path.join(interrupted, 'final_model.keras'))
    )

    completed = _run_train(f'--output_dir={whole}', *run_flags)
    self.assertEqual(completed.returncode, 0, completed.stderr[-3000:])
    resumed = _run_train(f'--output_dir={interrupted}', '--resume', *run_flags)
    self.assertEqual(resumed.returncode, 0, resumed.stderr[-3000:])
    self.assertIn('resumed after round', resumed.stderr)

    def metrics(output_dir):
      with open(os.path.join(output_dir, 'metrics.csv')) as f:
        return list(csv.DictReader(f))

    rows_whole, rows_resumed = metrics(whole), metrics(interrupted)
    self.assertEqual([r['round'] for r in rows_resumed], ['1', '2', '3', '4', '5'])
    for column in ('epsilon', 'train_loss', 'aggregator_clip', 'eval_accuracy'):
      self.assertEqual(
          [r[column] for r in rows_whole], [r[column] for r in rows_resumed]
      )
    models = [
        tf.keras.models.load_model(os.path.join(d, 'final_model.keras'))
        for d in (whole, interrupted)
    ]
    for a, b in zip(models[0].get_weights(), models[1].get_weights()):
      np.testing.assert_array_equal(a, b)

  def test_run_on_workers_fails_clearly_when_one_dies_and_resumes(self):
    ports = [portpicker.pick_unused_port() for _ in range(2)]
    workers = [binaries.start_worker(port) for port in ports]
    output_dir = self.create_tempdir().full_path
    log = os.path.join(self.create_tempdir().full_path, 'stderr.txt')
    run_flags = (
        f'--output_dir={output_dir}', '--rounds=4', '--checkpoint_every=1',
        '--num_clients=20', '--clients_per_round=4', '--sampling=uniform',
        '--eval_every=4', '--workers=' + ','.join(f'localhost:{p}' for p in ports),
    )
    try:
      run = binaries.start('train', *run_flags, stderr_path=log)
      checkpoint = os.path.join(output_dir, 'checkpoints', 'program_state_1')
      deadline = time.monotonic() + 240
      while not os.path.isdir(checkpoint) and time.monotonic() < deadline:
        time.sleep(0.05)
      workers[1].kill()
      workers[1].wait()
      self.assertEqual(run.wait(timeout=120), 1)
      with open(log) as f:
        last_line = f.read().strip().splitlines()[-1]
      self.assertIn(f'localhost:{ports[1]} failed or became unreachable', last_line)
      self.assertIn('--resume', last_line)

      workers[1] = binaries.start_worker(ports[1])
      resumed = _run_train(*run_flags, '--resume')
      self.assertEqual(resumed.returncode, 0, resumed.stderr[-3000:])
      self.assertIn('running rounds on 2 TFF workers', resumed.stderr)
      with open(os.path.join(output_dir, 'metrics.csv')) as f:
        self.assertEqual(
            [r['round'] for r in csv.DictReader(f)], ['1', '2', '3', '4']
        )
    finally:
      for worker in workers:
        worker.kill()
        worker.wait()

  def test_resume_needs_the_same_flags(self):
    output_dir = self.create_tempdir()
    output_dir.create_file('config.json', '{"rounds": 7, "seed": 3}')
    with flagsaver.flagsaver(output_dir=output_dir.full_path, resume=True):
      error = _flag_error()
    self.assertIn('--seed (run: 3, now: 0)', error)
    # --rounds may change: a resumed run may extend the run.
    self.assertNotIn('--rounds', error.split('these differ')[1])

  def test_resume_without_a_run_is_an_error(self):
    with flagsaver.flagsaver(
        output_dir=self.create_tempdir().full_path, resume=True
    ):
      self.assertIn('no run to resume', _flag_error())


if __name__ == '__main__':
  absltest.main()
