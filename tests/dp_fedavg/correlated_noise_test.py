"""Accounting of tree aggregation and banded MF against published values."""

import itertools
import math

from absl.testing import parameterized
import dp_accounting
import numpy as np
import pytest
from tensorflow_privacy.privacy.analysis import tree_aggregation_accountant

from dp_fedavg import correlated_noise

_ORDERS = [1.5, 2.0, 4.0, 8.0, 16.0, 64.0]
_ZERO_OUT = dp_accounting.NeighboringRelation.REPLACE_SPECIAL


def _rdp(event) -> np.ndarray:
  accountant = dp_accounting.rdp.RdpAccountant(_ORDERS, _ZERO_OUT)
  accountant.compose(event)
  return accountant._rdp  # pylint: disable=protected-access


def _epsilon(kind, event, delta) -> float:
  if kind == 'rdp':
    accountant = dp_accounting.rdp.RdpAccountant(neighboring_relation=_ZERO_OUT)
  else:
    accountant = dp_accounting.pld.PLDAccountant(
        value_discretization_interval=1e-4)
  accountant.compose(event)
  return accountant.get_epsilon(delta)


def _brute_force(norms_squared, rounds, participations, gap) -> float:
  """The largest sum over every pattern of <= k rounds >= gap apart."""
  best = 0.0
  for count in range(1, participations + 1):
    for pattern in itertools.combinations(range(rounds), count):
      if all(b - a >= gap for a, b in zip(pattern, pattern[1:])):
        best = max(best, sum(norms_squared[j] for j in pattern))
  return best


class TreeTest(parameterized.TestCase):

  @parameterized.parameters(
      # (T, k, tensorflow-privacy's min_separation, sens^2): the issue's
      # reference values (tensorflow-privacy's convention).
      (16, 1, 0, 5.0), (1000, 1, 0, 10.0), (16, 2, 7, 12.0),
      (64, 4, 15, 44.0), (256, 4, 63, 52.0),
  )
  def test_worst_case_sensitivity(self, rounds, k, min_separation, expected):
    schedule = correlated_noise.Schedule(rounds, k, min_separation + 1)
    self.assertEqual(schedule.min_separation, min_separation)
    self.assertAlmostEqual(
        correlated_noise.tree_sensitivity_squared(schedule), expected)

  def test_single_epoch_event_rdp_is_depth_alpha_over_2_sigma_squared(self):
    sigma = 3.0
    event = correlated_noise.tree_restart_event(sigma, [1000])
    np.testing.assert_allclose(
        _rdp(event), [10 * a / (2 * sigma**2) for a in _ORDERS], rtol=1e-12)

  def test_restart_every_epoch_matches_tensorflow_privacy(self):
    sigma, epochs = 2.5, [100, 100, 100, 37]
    np.testing.assert_allclose(
        _rdp(correlated_noise.tree_restart_event(sigma, epochs)),
        tree_aggregation_accountant.compute_rdp_tree_restart(
            sigma, epochs, _ORDERS), rtol=1e-12)

  def test_restarted_tree_is_the_gaussian_of_summed_depths(self):
    sigma, epochs = 2.5, [100, 100, 37]
    depths = sum(math.floor(math.log2(s)) + 1 for s in epochs)
    np.testing.assert_allclose(
        _rdp(correlated_noise.tree_restart_event(sigma, epochs)),
        _rdp(correlated_noise.gaussian_event(sigma, depths)), rtol=1e-12)

  @pytest.mark.slow  # tensorflow-privacy's tree search takes ~4 minutes.
  def test_gboard_es_es(self):
    """Xu et al. 2023, Gboard es-ES: sigma 7, T 2000, min_sep 313, k 6."""
    schedule = correlated_noise.Schedule(2000, 6, 314)
    sensitivity = correlated_noise.tree_sensitivity_squared(schedule)
    self.assertAlmostEqual(correlated_noise.zcdp_rho(7.0, sensitivity), 0.81,
                           delta=0.005)
    event = correlated_noise.tree_event(7.0, schedule)
    self.assertAlmostEqual(_epsilon('rdp', event, 1e-10), 8.9, delta=0.05)
    # The exact Gaussian PLD is tighter than the RDP conversion.
    self.assertLess(_epsilon('pld', event, 1e-10), 8.9)

  def test_noise_zero_is_not_private(self):
    self.assertIsInstance(
        correlated_noise.tree_event(0.0, correlated_noise.Schedule(4, 1, 4)),
        dp_accounting.NonPrivateDpEvent)


class BandedTest(parameterized.TestCase):

  @parameterized.parameters(1, 2, 5)
  def test_identity_strategy_is_dp_sgd(self, k):
    """B = 1 (C = I): sens^2 = k, rho = k / (2 sigma^2)."""
    rounds, sigma = 20, 1.3
    norms = correlated_noise.column_norms_squared(np.eye(rounds))
    sensitivity = correlated_noise.banded_sensitivity_squared(
        norms, 1, correlated_noise.Schedule(rounds, k, 4))
    self.assertEqual(sensitivity, k)
    self.assertAlmostEqual(correlated_noise.zcdp_rho(sigma, sensitivity),
                           k / (2 * sigma**2))

  def test_column_normalised_strategy_has_sensitivity_k(self):
    rng = np.random.default_rng(0)
    rounds, bands = 30, 4
    strategy = np.tril(rng.uniform(0.1, 1.0, (rounds, rounds)))
    strategy *= np.tri(rounds, rounds, 0) - np.tri(rounds, rounds, -bands)
    strategy /= np.linalg.norm(strategy, axis=0)
    for k in (1, 2, 3):
      self.assertAlmostEqual(
          correlated_noise.banded_sensitivity_squared(
              correlated_noise.column_norms_squared(strategy), bands,
              correlated_noise.Schedule(rounds, k, 10)), k)

  def test_pt_br_launch(self):
    """Gboard pt-BR: B = 1000, sigma = 8.35, k = 2 (column-normalised)."""
    schedule = correlated_noise.Schedule(2000, 2, 1000)
    sensitivity = correlated_noise.banded_sensitivity_squared(
        np.ones(2000), 1000, schedule)
    self.assertAlmostEqual(correlated_noise.zcdp_rho(8.35, sensitivity),
                           0.014343, places=6)
    event = correlated_noise.banded_event(8.35, np.ones(2000), 1000, schedule)
    self.assertAlmostEqual(_epsilon('pld', event, 1e-10), 0.9936, delta=1e-3)

  @parameterized.parameters((9, 1, 1), (9, 2, 3), (10, 3, 2), (12, 4, 3),
                            (9, 3, 4))
  def test_dynamic_program_matches_every_pattern(self, rounds, k, gap):
    rng = np.random.default_rng(rounds * 100 + k * 10 + gap)
    norms = rng.uniform(0.0, 2.0, rounds)
    self.assertAlmostEqual(
        correlated_noise.banded_sensitivity_squared(
            norms, 1, correlated_noise.Schedule(rounds, k, gap)),
        _brute_force(norms, rounds, k, gap))

  def test_participations_closer_than_the_bands_are_refused(self):
    with self.assertRaisesRegex(ValueError, 'min gap >= bands'):
      correlated_noise.banded_sensitivity_squared(
          np.ones(20), 5, correlated_noise.Schedule(20, 2, 4))


class ScheduleTest(parameterized.TestCase):

  def test_realised_cyclic_schedule(self):
    # 6 clients in groups of 2 taking turns: each every 3 rounds.
    cohorts = [(0, 1), (2, 3), (4, 5)] * 3 + [(0, 1)]
    self.assertEqual(correlated_noise.realised_schedule(cohorts),
                     correlated_noise.Schedule(10, 4, 3))

  def test_no_client_twice(self):
    self.assertEqual(correlated_noise.realised_schedule([(0,), (1,), (2,)]),
                     correlated_noise.Schedule(3, 1, 3))

  @parameterized.parameters(
      (0, 1, 1, 'rounds'), (5, 0, 1, 'max_participations'),
      (5, 1, 0, 'min_gap'), (5, 3, 3, 'do not fit'),
  )
  def test_invalid(self, rounds, k, gap, message):
    with self.assertRaisesRegex(ValueError, message):
      correlated_noise.Schedule(rounds, k, gap)


if __name__ == '__main__':
  from absl.testing import absltest
  absltest.main()
