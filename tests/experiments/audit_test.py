"""Audits with canary clients on digits, through every engine and mechanism.

The setup makes canaries easy to see: one round with every client taking
part and a client learning rate so small that the real clients' updates are
negligible next to a canary's clipped one. A canary's statistic is then
clip * (1 + its projection on the other canaries and on the noise): the
noise's projection has stddev z, the other canaries' sqrt(k / d) for k
inserted canaries in d = 2410 dimensions (digits' MLP).
"""

import collections
import csv
import dataclasses
import json
import os

from absl.testing import absltest
from absl.testing import parameterized
import numpy as np
import pytest
import tensorflow_federated as tff

from dp_fedavg import empirical_privacy
from dp_fedavg import run_config
from dp_fedavg import tasks
from experiments import auditing
from tests.experiments import binaries

_TASK = None


def _task():
  global _TASK
  if _TASK is None:
    _TASK = tasks.build_task('digits')
  return _TASK


def _config(**values):
  settings = dict(task='digits', sampling='full', rounds=1, client_lr=1e-4,
                  eval_every=1, seed=0)
  settings.update(values)
  return run_config.with_defaults(**settings)


def _audit(test, config, count, plan_change=None):
  plan, canaries = auditing.plan_with_canaries(config, _task(), count)
  if plan_change is not None:
    plan = plan_change(plan)
  return auditing.run_audit(
      _task(), plan, canaries, 0.95, test.create_tempdir().full_path, {},
  ), canaries


def _ceiling(canaries, confidence=0.95):
  """The lower bound of canaries whose statistics separate perfectly (and
  are distinct: the threshold bound pays for every distinct score)."""
  inserted = int(canaries.inserted.sum())
  perfect = (np.linspace(1, 2, inserted),
             np.linspace(-1, 0, canaries.count - inserted))
  return empirical_privacy.epsilon_lower_bound(
      {'cosine_final': perfect, 'max_cosine_over_rounds': perfect}, 1e-5,
      confidence)[0]


class NoNoiseTest(absltest.TestCase):

  def test_engines_agree_and_the_estimates_reach_their_ceilings(self):
    results = {}
    for engine in ('standard', 'vectorized', 'inprocess'):
      config = _config(engine=engine, noise_multiplier=0.0, clip=1.0)
      results[engine], canaries = _audit(self, config, 100)
    standard = results['standard']
    for engine in ('vectorized', 'inprocess'):
      for name, (inserted, held_out) in standard.statistics.items():
        np.testing.assert_allclose(
            results[engine].statistics[name][0], inserted, atol=1e-5)
        np.testing.assert_allclose(
            results[engine].statistics[name][1], held_out, atol=1e-5)
    self.assertEqual(standard.epsilon_accountant, float('inf'))
    # About 50 inserted canaries: cosine about 1 / sqrt(50) = 0.14, with
    # stddev 0.14 sqrt(50 / 2410) = 0.02 and the null's 1 / sqrt(2410) =
    # 0.02: seven standard errors apart.
    self.assertGreater(standard.epsilon_one_shot_final, 10)
    self.assertGreater(standard.epsilon_one_shot_all_iterates, 10)
    self.assertAlmostEqual(standard.epsilon_lower_bound, _ceiling(canaries))
    inserted, held_out = standard.statistics['cosine_final']
    self.assertLen(inserted, canaries.inserted.sum())
    self.assertLen(held_out, canaries.count - canaries.inserted.sum())

  def test_canaries_do_not_count_in_the_train_metrics(self):
    config = _config(engine='inprocess', noise_multiplier=0.0, clip=1.0)
    output = self.create_tempdir().full_path
    plan, canaries = auditing.plan_with_canaries(config, _task(), 40)
    auditing.run_audit(_task(), plan, canaries, 0.95, output, {})
    from experiments import runner  # pylint: disable=g-import-not-at-top
    plain_plan = runner.PrivacyPlan.build(
        config, len(_task().train_data.client_ids), _task().update_dimension)
    with runner.execution_context(config):
      plain = runner.Runner(_task()).run(
          plain_plan, self.create_tempdir().full_path, {})
    with open(os.path.join(output, 'metrics.csv')) as f:
      audited = list(csv.DictReader(f))
    # The same real clients train from the same model in round 1.
    self.assertAlmostEqual(float(audited[0]['train_loss']),
                           plain.results[0].train_loss, places=5)


class _TenthOfTheDeclaredNoise(tff.aggregators.UnweightedAggregationFactory):
  """A planted bug: the Gaussian factory's process run with a tenth of the
  noise multiplier its state declares (and the ledger reads)."""

  def __init__(self, factory):
    self._factory = factory

  def create(self, value_type):
    process = self._factory.create(value_type)
    state_type = process.initialize.type_signature.result.member

    def scaled(factor):
      @tff.tensorflow.computation(state_type)
      def scale(state):
        state = collections.OrderedDict(state)
        state['noise_multiplier'] = state['noise_multiplier'] * factor
        return state
      return scale

    quieter, declared = scaled(0.1), scaled(10.0)

    @tff.federated_computation(process.next.type_signature.parameter)
    def next_fn(state, value):
      output = process.next(tff.federated_map(quieter, state), value)
      return tff.templates.MeasuredProcessOutput(
          state=tff.federated_map(declared, output.state),
          result=output.result, measurements=output.measurements)

    return tff.templates.AggregationProcess(process.initialize, next_fn)


class PlantedBugTest(absltest.TestCase):

  def test_a_tenth_of_the_declared_noise_is_flagged(self):
    # z = 3.3 over one round: the accountant says about 1.1. With z / 10
    # added, a canary stands sqrt(0.33^2 + 250 / 2410) = 0.46 stddevs from
    # zero: the one-run bound finds about 2.7 (simulated).
    config = _config(noise_multiplier=3.3, clip=1.0)
    result, _ = _audit(self, config, 500, lambda plan: dataclasses.replace(
        plan, aggregator=_TenthOfTheDeclaredNoise(plan.aggregator)))
    self.assertBetween(result.epsilon_accountant, 1.0, 1.3)
    self.assertGreater(result.epsilon_lower_bound, result.epsilon_accountant)

  def test_the_same_mechanism_without_the_bug_passes(self):
    result, _ = _audit(self, _config(noise_multiplier=3.3, clip=1.0), 500)
    self.assertBetween(result.epsilon_accountant, 1.0, 1.3)
    self.assertLessEqual(result.epsilon_lower_bound, result.epsilon_accountant)


# Every mechanism, with its noise calibrated to epsilon 2 over the round.
_MECHANISMS = (
    ('gaussian_fixed', 'gaussian_fixed', ()),
    ('gaussian_per_layer', 'gaussian_fixed',
     (('clipping', 'per_layer_uniform'),)),
    ('gaussian_client_noise', 'gaussian_fixed',
     (('noise_placement', 'client'),)),
    ('gaussian_adaptive', 'gaussian_adaptive', ()),
    ('laplace', 'laplace', ()),
    ('dp_ftrl_tree', 'dp_ftrl_tree', ()),
    ('banded_mf', 'banded_mf', ()),
    ('secure_gaussian', 'secure_gaussian', ()),
    # Accounted under fixed-size sampling only: all 600 clients (100 and
    # 500 canaries, all clients under replace-one adjacency) every round.
    ('distributed_dp', 'distributed_dp',
     (('sampling', 'uniform'), ('clients_per_round', 600))),
)


def _calibrated(aggregator, seed, extra):
  return _config(aggregator=aggregator, seed=seed, calibrate='noise',
                 target_epsilon=2.0, **dict(extra))


class _AuditsMechanisms(parameterized.TestCase):

  def _check(self, aggregator, seed, extra):
    result, _ = _audit(self, _calibrated(aggregator, seed, extra), 500)
    self.assertLessEqual(result.epsilon_accountant, 2.0 + 1e-6)
    self.assertLessEqual(result.epsilon_lower_bound, result.epsilon_accountant)


class CorrectMechanismsTest(_AuditsMechanisms):

  @parameterized.named_parameters(*_MECHANISMS)
  def test_lower_bound_stays_below_the_accountant(self, aggregator, extra):
    self._check(aggregator, 0, extra)

  @parameterized.parameters(1, 2)
  def test_gaussian_lower_bound_over_seeds(self, seed):
    self._check('gaussian_fixed', seed, ())


@pytest.mark.slow
class CorrectMechanismsOverSeedsTest(_AuditsMechanisms):

  @parameterized.named_parameters(*_MECHANISMS)
  def test_lower_bound_over_more_seeds(self, aggregator, extra):
    for seed in (1, 2, 3):
      self._check(aggregator, seed, extra)


class AuditBinaryTest(absltest.TestCase):

  def test_writes_the_audit_files(self):
    output_dir = self.create_tempdir().full_path
    result = binaries.run(
        'audit', f'--output_dir={output_dir}', '--canaries=40', '--rounds=2',
        '--noise_multiplier=1.0', '--clip=1.0', '--clients_per_round=20',
    )
    self.assertEqual(result.returncode, 0, result.stderr[-3000:])
    with open(os.path.join(output_dir, auditing.AUDIT_FILE)) as f:
      values = json.load(f)
    for key in ('epsilon_accountant', 'epsilon_one_shot_final',
                'epsilon_one_shot_all_iterates', 'epsilon_lower_bound',
                'confidence', 'canaries_inserted', 'canaries_held_out'):
      self.assertIn(key, values)
    self.assertEqual(values['canaries_inserted'] + values['canaries_held_out'],
                     40)
    for name in ('epsilon_one_shot_final', 'epsilon_one_shot_all_iterates'):
      low, high = values[f'{name}_interval']
      self.assertBetween(values[name], low, high)
    self.assertEqual(values['confidence'], 0.95)
    with open(os.path.join(output_dir, auditing.CANARIES_FILE)) as f:
      rows = list(csv.DictReader(f))
    self.assertLen(rows, 40)
    self.assertEqual(sum(int(r['inserted']) for r in rows),
                     values['canaries_inserted'])
    self.assertGreater(
        os.path.getsize(os.path.join(output_dir, auditing.HISTOGRAM_FILE)), 0)
    self.assertIn('one-shot estimate', result.stderr)

  def test_bad_flags_exit_2_with_one_line(self):
    result = binaries.run('audit', '--canaries=5',
                          f'--output_dir={self.create_tempdir().full_path}')
    self.assertEqual(result.returncode, 2)
    self.assertIn('--canaries=5 is out of range', result.stderr)

  def test_refuses_what_it_cannot_audit(self):
    with self.assertRaisesRegex(ValueError, 'has no privacy to audit'):
      auditing.plan_with_canaries(_config(aggregator='none'), _task(), 100)
    with self.assertRaisesRegex(ValueError, 'canary clients audit user-level'):
      auditing.plan_with_canaries(
          _config(privacy_unit='example'), _task(), 100)


if __name__ == '__main__':
  absltest.main()
