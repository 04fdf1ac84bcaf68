"""Banded matrix factorization: strategies, streamed noise C^-1 z, ledger."""

import collections
import math
import os
from unittest import mock

from absl.testing import parameterized
import dp_accounting
import numpy as np
from scipy import linalg
from scipy import optimize
from scipy import special
import tensorflow as tf
import tensorflow_federated as tff

from aggregators import banded_mf
from aggregators import checks
from aggregators import registry
from dp_fedavg import accounting
from dp_fedavg import correlated_noise
from dp_fedavg import sampling

_STRUCT = tff.types.to_type(
    collections.OrderedDict(w=(np.float32, [2, 3]), b=(np.float32, [3])))
_WIDTH = 20000


class SquareRootStrategyTest(parameterized.TestCase):

  def test_coefficients_are_the_central_binomials(self):
    """c_i = C(2i, i) / 4^i, the series of (1 - x)^-1/2."""
    np.testing.assert_allclose(
        banded_mf.sqrt_toeplitz_coefficients(12),
        [special.comb(2 * i, i) / 4**i for i in range(12)], rtol=1e-12)

  def test_unbanded_square_root_squares_to_the_prefix_sums(self):
    rounds = 9
    c = banded_mf.sqrt_toeplitz_coefficients(rounds)
    root = sum(np.diag(np.full(rounds - i, c[i]), -i) for i in range(rounds))
    np.testing.assert_allclose(root @ root, np.tril(np.ones((rounds, rounds))),
                               atol=1e-12)

  @parameterized.parameters((10, 1), (10, 3), (10, 10))
  def test_strategy_is_banded_with_unit_columns(self, rounds, bands):
    strategy = banded_mf.sqrt_toeplitz_strategy(rounds, bands)
    np.testing.assert_allclose(np.linalg.norm(strategy, axis=0), 1.0)
    self.assertIs(banded_mf.check_strategy(strategy, rounds, bands).dtype,
                  np.dtype(np.float64))
    if bands == 1:
      np.testing.assert_array_equal(strategy, np.eye(rounds))

  @parameterized.named_parameters(
      ('shape', np.eye(4)[:3], 'must be 4 x 4'),
      ('upper', np.eye(4) + np.eye(4, k=1), 'lower-triangular'),
      ('bands', np.eye(4) + np.eye(4, k=-2), 'beyond 2 bands'),
      ('diagonal', np.diag([1.0, 0.0, 1.0, 1.0]), 'diagonal'),
      ('nan', np.diag([1.0, np.nan, 1.0, 1.0]), 'NaN'),
  )
  def test_invalid_strategy(self, strategy, message):
    with self.assertRaisesRegex(ValueError, message):
      banded_mf.check_strategy(strategy, 4, 2)

  @parameterized.parameters(1, 3, 9)
  def test_decoder_times_strategy_is_the_prefix_sums(self, bands):
    strategy = banded_mf.sqrt_toeplitz_strategy(9, bands)
    np.testing.assert_allclose(banded_mf.decoder(strategy) @ strategy,
                               np.tril(np.ones((9, 9))), atol=1e-12)

  @parameterized.parameters(1, 2, 4)
  def test_streamed_noise_is_the_dense_solve(self, bands):
    """w_t streamed with B - 1 buffers equals C^-1 z solved at once."""
    rounds = 8
    strategy = banded_mf.sqrt_toeplitz_strategy(rounds, bands)
    band = banded_mf.band_coefficients(strategy, bands)
    draws = np.random.default_rng(bands).standard_normal((rounds, 3))
    previous = np.zeros((bands - 1, 3))
    streamed = []
    for t in range(rounds):
      w = banded_mf.next_noise(tf.constant(band[t]), tf.constant(previous),
                               tf.constant(draws[t])).numpy()
      streamed.append(w)
      previous = np.concatenate([w[None], previous[:bands - 2]])[:bands - 1]
    np.testing.assert_allclose(
        streamed, linalg.solve_triangular(strategy, draws, lower=True),
        rtol=1e-10, atol=1e-12)

  @parameterized.parameters(1, 3)
  def test_dp_sgd_error(self, k):
    rounds = 12
    self.assertAlmostEqual(
        banded_mf.expected_error(np.eye(rounds), k), k * (rounds + 1) / 2)

  def test_square_root_beats_dp_sgd(self):
    rounds, k = 64, 1
    identity = banded_mf.expected_error(np.eye(rounds), k)
    for bands in (2, 8, 64):
      self.assertLess(banded_mf.expected_error(
          banded_mf.sqrt_toeplitz_strategy(rounds, bands), k), identity)


def _least_error_over_gram_matrices(rounds: int, bands: int) -> float:
  """min tr(A X^-1 A^T) over banded X with unit diagonal (X = C^T C): the
  same optimum as the optimized strategy, by another route (Nelder-Mead over
  X's bands, infinite outside the positive-definite cone)."""
  prefix = np.tril(np.ones((rounds, rounds)))
  sizes = [rounds - lag for lag in range(1, bands)]

  def error(values):
    gram = np.eye(rounds)
    start = 0
    for lag, size in enumerate(sizes, start=1):
      band = np.diag(values[start:start + size], -lag)
      gram += band + band.T
      start += size
    if np.min(np.linalg.eigvalsh(gram)) <= 1e-9:
      return np.inf
    return float(np.trace(prefix @ np.linalg.solve(gram, prefix.T)))

  result = optimize.minimize(
      error, np.zeros(sum(sizes)), method='Nelder-Mead',
      options=dict(maxiter=200000, maxfev=200000, xatol=1e-10, fatol=1e-12))
  return result.fun


class StrategyTest(parameterized.TestCase):

  def test_optimized_strategy_reaches_the_gram_optimum(self):
    rounds, bands = 6, 3
    strategy = banded_mf.optimized_strategy(rounds, bands)
    banded_mf.check_strategy(strategy, rounds, bands)
    np.testing.assert_allclose(np.linalg.norm(strategy, axis=0), 1.0)
    self.assertAlmostEqual(
        banded_mf.expected_error(strategy, 1) * rounds,
        _least_error_over_gram_matrices(rounds, bands), places=5)

  def test_optimized_strategy_beats_the_square_root(self):
    rounds, bands = 40, 6
    self.assertLess(
        banded_mf.expected_error(
            banded_mf.optimized_strategy(rounds, bands), 1),
        banded_mf.expected_error(
            banded_mf.sqrt_toeplitz_strategy(rounds, bands), 1))

  def test_optimized_strategy_is_cached(self):
    cache = self.create_tempdir().full_path
    with mock.patch.dict(os.environ, {'DP_FEDAVG_CACHE': cache}):
      first = banded_mf.cached_optimized_strategy(10, 3)
      path = os.path.join(cache, 'banded_mf', 'optimized_T10_B3.npy')
      np.testing.assert_array_equal(np.load(path), first)
      with mock.patch.object(banded_mf, 'optimized_strategy') as optimize_:
        np.testing.assert_array_equal(
            banded_mf.cached_optimized_strategy(10, 3), first)
      optimize_.assert_not_called()


def _released_noise(strategy, seed=0) -> np.ndarray:
  """[T, width]: each round's noise w_t from zero updates (one client,
  denominator 1, z = S = 1)."""
  rounds, bands = strategy.shape[0], int(
      np.max(np.subtract.outer(*np.nonzero(strategy))) + 1)
  process = banded_mf.BandedMatrixFactorizationFactory(
      1.0, 1.0, 1, strategy, bands, noise_seed=seed).create(
          tff.TensorType(np.float32, [_WIDTH]))
  state = process.initialize()
  releases = []
  for _ in range(rounds):
    output = process.next(state, [np.zeros(_WIDTH, np.float32)])
    state = output.state
    releases.append(output.result)
  return np.array(releases, np.float64)


class BandedFactoryTest(tf.test.TestCase, parameterized.TestCase):

  def test_type_signature(self):
    strategy = banded_mf.sqrt_toeplitz_strategy(6, 3)
    process = banded_mf.BandedMatrixFactorizationFactory(
        1.0, 1.0, 3, strategy, 3).create(_STRUCT)
    state = tff.types.to_type(collections.OrderedDict(
        clip=np.float32, noise_multiplier=np.float64,
        noise_seed=(np.int64, [2]), round=np.int32,
        previous_noise=collections.OrderedDict(
            w=(np.float32, [2, 2, 3]), b=(np.float32, [2, 3]))))
    self.assertTrue(process.initialize.type_signature.result.member
                    .is_equivalent_to(state))
    output_type = process.next.type_signature.result
    self.assertTrue(output_type.result.is_equivalent_to(
        tff.FederatedType(_STRUCT, tff.SERVER)))
    self.assertTrue(output_type.measurements.member.is_equivalent_to(
        tff.types.to_type(collections.OrderedDict(
            clip=np.float32, round_noise_stddev=np.float32,
            clipped_count=np.int32, nonfinite_count=np.int32))))

  @parameterized.named_parameters(
      ('negative_noise', dict(noise_multiplier=-1.0), checks.ArgumentError,
       'noise_multiplier'),
      ('zero_clip', dict(clip=0.0), checks.ArgumentError, 'clip'),
      ('zero_bands', dict(bands=0), checks.ArgumentError, 'bands'),
      ('too_many_bands', dict(bands=5), checks.ArgumentError, 'bands'),
      ('not_banded', dict(strategy=np.tril(np.ones((4, 4)))), ValueError,
       'beyond 2 bands'),
  )
  def test_invalid_arguments_raise(self, overrides, error, message):
    kwargs = dict(noise_multiplier=1.0, clip=1.0, expected_clients_per_round=2,
                  strategy=banded_mf.sqrt_toeplitz_strategy(4, 2), bands=2)
    kwargs.update(overrides)
    with self.assertRaisesRegex(error, message):
      banded_mf.BandedMatrixFactorizationFactory(**kwargs)

  @parameterized.parameters(False, True)
  def test_no_noise_is_the_clipped_mean(self, stacked_users):
    factory = banded_mf.BandedMatrixFactorizationFactory(
        0.0, 1.0, 4, banded_mf.sqrt_toeplitz_strategy(3, 2), 2,
        stacked_users=stacked_users)
    process = factory.create(tff.TensorType(
        np.float32, [None, 3] if stacked_users else [3]))
    updates = [np.array([3.0, 4.0, 0.0], np.float32),
               np.array([0.1, 0.2, 0.3], np.float32)]
    clients = [np.stack(updates)] if stacked_users else updates
    state = process.initialize()
    for _ in range(3):
      output = process.next(state, clients)
      state = output.state
      self.assertAllClose(
          output.result, (updates[0] / 5.0 + updates[1]) / 4.0, atol=1e-6)
    with self.assertRaisesRegex(Exception, 'the strategy covers 3 rounds'):
      process.next(state, clients)

  @parameterized.parameters(1, 3, 8)
  def test_noise_is_the_inverse_strategy_of_white_noise(self, bands):
    """C w is i.i.d. N(0, 1): unit variance per round and uncorrelated
    rounds (5 standard errors: sqrt(2 / m) and 1 / sqrt(m))."""
    rounds = 8
    strategy = banded_mf.sqrt_toeplitz_strategy(rounds, bands)
    white = strategy @ _released_noise(strategy)
    covariance = white @ white.T / _WIDTH
    np.testing.assert_array_less(
        np.abs(np.diag(covariance) - 1.0), 5 * np.sqrt(2.0 / _WIDTH))
    off_diagonal = covariance[~np.eye(rounds, dtype=bool)]
    np.testing.assert_array_less(np.abs(off_diagonal), 5 / np.sqrt(_WIDTH))

  def test_measured_stddev_is_that_of_the_inverse_rows(self):
    strategy = banded_mf.sqrt_toeplitz_strategy(5, 3)
    inverse = np.linalg.inv(strategy)
    process = banded_mf.BandedMatrixFactorizationFactory(
        2.0, 0.5, 1, strategy, 3, noise_seed=1).create(
            tff.TensorType(np.float32, [2]))
    state = process.initialize()
    for t in range(5):
      output = process.next(state, [np.zeros(2, np.float32)])
      state = output.state
      self.assertAllClose(output.measurements['round_noise_stddev'],
                          np.linalg.norm(inverse[t]), rtol=1e-5)


class BandedLedgerTest(parameterized.TestCase):

  def _setting(self, rounds=12, population=40, cohort=10):
    return registry.Setting(expected_clients_per_round=cohort, rounds=rounds,
                            population=population, noise_seed=0)

  def test_default_bands_are_the_cyclic_period(self):
    mechanism = registry.get('banded_mf')
    params = mechanism.params({})
    self.assertEqual(banded_mf.bands_of(params, self._setting()), 4)
    self.assertEqual(
        banded_mf.bands_of(params, self._setting(rounds=3)), 3)

  def test_cyclic_schedule_has_sensitivity_k(self):
    """Unit columns and participations B rounds apart: sens^2 = k, one
    Gaussian of z / sqrt(k)."""
    mechanism = registry.get('banded_mf')
    params = mechanism.params(dict(noise_multiplier=2.0))
    ledger = mechanism.build_ledger(params, self._setting())
    self.assertIs(ledger.adjacency, accounting.Adjacency.ZERO_OUT)
    # All 12 planned rounds (k = 3): every column's norm is complete.
    cohorts = tuple(tuple(range(10 * (r % 4), 10 * (r % 4) + 10))
                    for r in range(12))
    event = ledger.event_of_participation(accounting.Participation(cohorts))
    self.assertAlmostEqual(event.noise_multiplier, 2.0 / math.sqrt(3))

  def test_column_norms_are_those_of_the_rounds_so_far(self):
    strategy = banded_mf.sqrt_toeplitz_strategy(6, 3)
    ledger = banded_mf.BandedLedger(strategy, 3)
    cohorts = accounting.Participation([(0,), (1,), (2,), (0,)])
    expected = correlated_noise.banded_event(
        1.0, np.sum(strategy[:4, :4]**2, axis=0), 3,
        correlated_noise.Schedule(4, 2, 3))
    self.assertEqual(repr(ledger.event(1.0, cohorts)), repr(expected))

  def test_participations_closer_than_the_bands_are_refused(self):
    ledger = banded_mf.BandedLedger(banded_mf.sqrt_toeplitz_strategy(6, 3), 3)
    with self.assertRaisesRegex(ValueError, '--sampling=cyclic'):
      ledger.event(1.0, accounting.Participation([(0,), (1,), (0,)]))

  def test_amplified_banded_mf_is_dp_sgd_over_the_turns(self):
    """Poisson sampling within 5 groups (Choquette-Choo et al. 2023, Thm 4;
    jax_privacy's amplified_bandmf_event): 12 rounds are ceil(12 / 5) = 3
    Poisson-sampled Gaussians of z (unit columns), add/remove adjacency."""
    mechanism = registry.get('banded_mf')
    setting = registry.Setting(
        expected_clients_per_round=10, rounds=12, population=503,
        sampling=sampling.SamplingScheme.CYCLIC_POISSON, sampling_groups=5)
    params = mechanism.params(dict(noise_multiplier=1.3))
    self.assertEqual(banded_mf.bands_of(params, setting), 5)
    ledger = mechanism.build_ledger(params, setting)
    self.assertIs(ledger.adjacency, accounting.Adjacency.ADD_OR_REMOVE_ONE)
    event = ledger.event_of_participation(
        accounting.Participation(((0,),) * 12))
    expected = dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(
            10 / 100, dp_accounting.GaussianDpEvent(1.3)), 3)
    for new_accountant in (dp_accounting.rdp.RdpAccountant,
                           dp_accounting.pld.PLDAccountant):
      ours, reference = new_accountant(), new_accountant()
      ours.compose(event)
      reference.compose(expected)
      self.assertAlmostEqual(ours.get_epsilon(1e-6),
                             reference.get_epsilon(1e-6), places=9)

  def test_amplified_banded_mf_needs_as_many_groups_as_bands(self):
    mechanism = registry.get('banded_mf')
    setting = registry.Setting(
        expected_clients_per_round=10, rounds=12, population=500,
        sampling=sampling.SamplingScheme.CYCLIC_POISSON, sampling_groups=3)
    with self.assertRaisesRegex(ValueError, '--sampling_groups >= --mf_bands'):
      mechanism.build_ledger(mechanism.params(dict(mf_bands=4)), setting)

  def test_user_strategy_file(self):
    path = self.create_tempfile('strategy.npy').full_path
    strategy = 2.0 * banded_mf.sqrt_toeplitz_strategy(12, 2)
    np.save(path, strategy)
    mechanism = registry.get('banded_mf')
    params = mechanism.params(dict(mf_strategy=path, mf_bands=2))
    np.testing.assert_array_equal(
        banded_mf.strategy_of(params, self._setting()), strategy)
    self.assertIsInstance(mechanism.factory(params, self._setting()),
                          banded_mf.BandedMatrixFactorizationFactory)
    np.save(path, strategy[:6, :6])
    with self.assertRaisesRegex(ValueError, 'strategy.npy: the strategy must '
                                'be 12 x 12'):
      banded_mf.strategy_of(params, self._setting())

  @parameterized.named_parameters(
      ('not_npy', 'strategy.txt', 'sqrt_toeplitz, optimized or the path of'),
      ('missing', '/nonexistent/strategy.npy', 'an existing .npy file'),
  )
  def test_bad_strategy_flag(self, value, message):
    mechanism = registry.get('banded_mf')
    with self.assertRaisesRegex(checks.ArgumentError, message):
      mechanism.check(mechanism.params(dict(mf_strategy=value)),
                      self._setting())


if __name__ == '__main__':
  tf.test.main()
