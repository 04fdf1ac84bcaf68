"""The privacy ledger: each kind of composition against dp-accounting alone."""

import json
import math

from absl.testing import parameterized
import dp_accounting
import tensorflow as tf

from dp_fedavg import accounting
from dp_fedavg import sampling

_POISSON = sampling.SamplingScheme.POISSON
_UNIFORM = sampling.SamplingScheme.UNIFORM
_DELTA = 1e-5


def _tightest(event: dp_accounting.DpEvent, count: int = 1,
              relation=dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE):
  """min(RDP, PLD) epsilon of `event` composed `count` times, by dp-accounting
  alone (PLD only where it supports the event)."""
  rdp = dp_accounting.rdp.RdpAccountant(neighboring_relation=relation)
  rdp.compose(event, count)
  epsilons = [rdp.get_epsilon(_DELTA)]
  pld = dp_accounting.pld.PLDAccountant(value_discretization_interval=1e-4)
  if pld.supports(event):
    pld.compose(event, count)
    epsilons.append(pld.get_epsilon(_DELTA))
  return min(epsilons)


def _fixed(event):
  """A ledger whose every state runs `event`."""
  return accounting.SampledRounds(event, lambda state: event)


def _run_level_gaussian(noise_multiplier: float) -> accounting.RunLevel:
  """Independent Gaussian rounds stated at run level: a client that took part
  in k rounds is covered by one Gaussian of multiplier z / sqrt(k)."""
  return accounting.RunLevel(
      lambda participation: dp_accounting.GaussianDpEvent(
          noise_multiplier / math.sqrt(max(participation.max_participations(), 1))
      )
  )


class PrivacyLedgerTest(tf.test.TestCase, parameterized.TestCase):

  def test_sampled_rounds_under_poisson_sampling(self):
    event = dp_accounting.GaussianDpEvent(1.1)
    ledger = accounting.PrivacyLedger(_fixed(event), _POISSON, 50, 10, _DELTA)
    for _ in range(3):
      ledger.record_round(None, [0, 1])
    self.assertEqual(ledger.composition, 'sampled_rounds')
    self.assertIs(ledger.adjacency, accounting.Adjacency.ADD_OR_REMOVE_ONE)
    self.assertAlmostEqual(
        ledger.epsilon(),
        _tightest(dp_accounting.PoissonSampledDpEvent(0.2, event), 3),
        places=9,
    )

  def test_sampled_rounds_under_uniform_sampling_are_replace_one(self):
    ledger = accounting.PrivacyLedger(
        _fixed(dp_accounting.GaussianDpEvent(1.0)), _UNIFORM, 100, 10, _DELTA
    )
    self.assertIs(ledger.adjacency, accounting.Adjacency.REPLACE_ONE)

  def test_local_rounds_compose_every_round_without_sampling(self):
    event = dp_accounting.GaussianDpEvent(0.7)
    ledger = accounting.PrivacyLedger(
        accounting.LocalRounds(event, lambda state: event), _POISSON, 1000, 10,
        _DELTA,
    )
    for _ in range(4):
      ledger.record_round(None, [3])
    self.assertEqual(ledger.composition, 'local_rounds')
    self.assertIs(ledger.adjacency, accounting.Adjacency.REPLACE_ONE)
    # dp-accounting composes the 4 rounds as one Gaussian PLD of z / 2, the
    # ledger self-composes one round's PLD: the discretizations differ ~1e-8.
    self.assertAlmostEqual(
        ledger.epsilon(),
        _tightest(event, 4, dp_accounting.NeighboringRelation.REPLACE_ONE),
        places=6,
    )

  def test_run_level_event_comes_from_the_realised_participation(self):
    ledger = accounting.PrivacyLedger(
        _run_level_gaussian(2.0), _POISSON, 10, 2, _DELTA
    )
    self.assertEqual(ledger.epsilon(), 0.0)
    for cohort in ([0, 1], [1, 2], [1], [4]):
      ledger.record_round(None, cohort)
    self.assertEqual(ledger.composition, 'run_level')
    self.assertIs(ledger.adjacency, accounting.Adjacency.ZERO_OUT)
    self.assertEqual(ledger.rounds, 4)
    # Client 1 took part in 3 rounds: 3 Gaussian rounds of z = 2, composed by
    # dp-accounting itself (zero-out: dp-accounting's REPLACE_SPECIAL).
    expected = _tightest(
        dp_accounting.GaussianDpEvent(2.0), 3,
        dp_accounting.NeighboringRelation.REPLACE_SPECIAL,
    )
    self.assertAlmostEqual(ledger.epsilon(), expected, places=6)

  def test_run_level_budget_check_uses_the_next_cohort(self):
    ledger = accounting.PrivacyLedger(
        _run_level_gaussian(2.0), _POISSON, 10, 2, _DELTA
    )
    ledger.record_round(None, [0, 1])
    now = ledger.epsilon()
    # A cohort without client 0 or 1 leaves the worst case where it is.
    self.assertAlmostEqual(ledger.epsilon_if_round(None, [5]), now)
    self.assertGreater(ledger.epsilon_if_round(None, [1]), now)
    self.assertEqual(ledger.rounds, 1)  # Peeking composes nothing.
    # Client 1 would reach 2, then 3 participations after 2, then 3 rounds.
    target = sum(
        _tightest(dp_accounting.GaussianDpEvent(2.0), count,
                  dp_accounting.NeighboringRelation.REPLACE_SPECIAL)
        for count in (2, 3)
    ) / 2
    self.assertEqual(
        ledger.rounds_within_budget(
            target, 5, planned_cohorts=[[2], [1], [1], [3], [4]]
        ),
        2,
    )

  def test_run_level_history_survives_json(self):
    ledger = accounting.PrivacyLedger(
        _run_level_gaussian(1.5), _POISSON, 10, 2, _DELTA
    )
    for cohort in ([0, 1], [1]):
      ledger.record_round(None, cohort)
    restored = accounting.PrivacyLedger(
        _run_level_gaussian(1.5), _POISSON, 10, 2, _DELTA
    )
    restored.restore_history(ledger.history_json())
    self.assertEqual(restored.epsilon(), ledger.epsilon())
    self.assertEqual(json.loads(ledger.history_json()),
                     {'cohorts': [[0, 1], [1]]})

  def test_run_level_calibration_meets_the_target_for_the_planned_cohorts(self):
    target = 3.0
    planned = [[0, 1], [1], [1, 2], [1]]  # Client 1: 4 participations.
    noise = accounting.calibrate_noise(
        _run_level_gaussian, _POISSON, 10, 2, _DELTA,
        accounting.AccountantKind.AUTO, target, 4, planned,
    )
    single = dp_accounting.GaussianDpEvent
    relation = dp_accounting.NeighboringRelation.REPLACE_SPECIAL
    self.assertLessEqual(_tightest(single(noise), 4, relation), target + 1e-3)
    self.assertGreater(_tightest(single(0.99 * noise), 4, relation), target)

  def test_sampled_calibration_meets_the_target(self):
    # Per-round ledgers calibrate with PrivacyAccountant's search, tested
    # under each sampling in accounting_test; this checks the delegation.
    scheme, target = _UNIFORM, 2.0
    noise = accounting.calibrate_noise(
        lambda z: _fixed(dp_accounting.GaussianDpEvent(z)), scheme, 1000, 50,
        _DELTA, accounting.AccountantKind.AUTO, target, 20,
    )
    ledger = accounting.PrivacyLedger(
        _fixed(dp_accounting.GaussianDpEvent(noise)), scheme, 1000, 50, _DELTA
    )
    for _ in range(20):
      ledger.record_planned_round([0])
    self.assertBetween(ledger.epsilon(), 0.99 * target, target)

  def test_unsupported_mechanism_is_refused_when_bound(self):
    with self.assertRaisesRegex(ValueError, 'use one of: pld'):
      accounting.PrivacyLedger(
          _fixed(dp_accounting.LaplaceDpEvent(1.0)), _POISSON, 100, 10, _DELTA,
          accounting.AccountantKind.RDP,
      )

  def test_noiseless_run_level_is_infinite(self):
    ledger = accounting.PrivacyLedger(
        _run_level_gaussian(0.0), _POISSON, 10, 2, _DELTA
    )
    ledger.record_round(None, [0])
    self.assertEqual(ledger.epsilon(), math.inf)


if __name__ == '__main__':
  tf.test.main()
