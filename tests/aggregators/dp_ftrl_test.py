"""DP-FTRL's tree aggregation: types, clipping, the tree's noise, restarts and
the run-level ledger."""

import collections

from absl.testing import parameterized
import dp_accounting
import numpy as np
import tensorflow as tf
import tensorflow_federated as tff
from tensorflow_privacy.privacy.analysis import tree_aggregation_accountant

from aggregators import checks
from aggregators import dp_ftrl
from aggregators import gaussian
from aggregators import registry
from dp_fedavg import accounting
from dp_fedavg import correlated_noise

_STRUCT = tff.types.to_type(
    collections.OrderedDict(w=(np.float32, [2, 3]), b=(np.float32, [3])))
# Large enough that each coordinate is one sample of the noise.
_WIDE = tff.TensorType(np.float32, [20000])


def _released_noise(factory, rounds: int) -> np.ndarray:
  """[rounds, 20000]: the noise of each round's release, from zero updates
  of one client (times the denominator 1)."""
  process = factory.create(_WIDE)
  state = process.initialize()
  releases = []
  for _ in range(rounds):
    output = process.next(state, [np.zeros(20000, np.float32)])
    state = output.state
    releases.append(output.result)
  return np.array(releases, np.float64)


def _assert_variance(test, samples: np.ndarray, variance: float):
  """Sample variance within 5 standard errors of `variance` (normal data:
  the standard error is variance sqrt(2 / (m - 1)))."""
  standard_error = variance * np.sqrt(2.0 / (samples.size - 1))
  test.assertLess(abs(np.var(samples) - variance), 5 * standard_error)


class TreeAggregationFactoryTest(tf.test.TestCase, parameterized.TestCase):

  def test_type_signature(self):
    process = dp_ftrl.TreeAggregationFactory(1.0, 1.0, 3).create(_STRUCT)
    state_type = process.initialize.type_signature.result.member
    self.assertEqual(
        [name for name, _ in tff.structure.iter_elements(state_type)],
        ['clip', 'noise_multiplier', 'tree', 'previous_noise',
         'rounds_in_tree'])
    # The tree's level buffer grows and shrinks with the levels.
    self.assertEqual(str(state_type['tree'].level_buffer),
                     '<w=float32[?,2,3],b=float32[?,3]>')
    output_type = process.next.type_signature.result
    self.assertTrue(output_type.result.is_equivalent_to(
        tff.FederatedType(_STRUCT, tff.SERVER)))
    self.assertTrue(output_type.measurements.member.is_equivalent_to(
        tff.types.to_type(collections.OrderedDict(
            clip=np.float32, node_noise_stddev=np.float32,
            clipped_count=np.int32, nonfinite_count=np.int32,
            rounds_in_tree=np.int32))))

  @parameterized.named_parameters(
      ('negative_noise', dict(noise_multiplier=-1.0), checks.ArgumentError,
       'noise_multiplier'),
      ('zero_clip', dict(clip=0.0), checks.ArgumentError, 'clip'),
      ('zero_clients', dict(expected_clients_per_round=0), checks.ArgumentError,
       'expected_clients_per_round'),
      ('zero_period', dict(restart_period=0), checks.ArgumentError,
       'restart_period'),
      ('string_efficient', dict(efficient='yes'), TypeError, 'efficient'),
  )
  def test_invalid_arguments_raise(self, overrides, error, message):
    kwargs = dict(noise_multiplier=1.0, clip=1.0, expected_clients_per_round=2)
    kwargs.update(overrides)
    with self.assertRaisesRegex(error, message):
      dp_ftrl.TreeAggregationFactory(**kwargs)

  @parameterized.parameters(False, True)
  def test_no_noise_is_the_clipped_mean(self, stacked_users):
    factory = dp_ftrl.TreeAggregationFactory(
        0.0, 1.0, 4, stacked_users=stacked_users)
    vector = tff.TensorType(np.float32, [3])
    process = factory.create(
        tff.TensorType(np.float32, [None, 3]) if stacked_users else vector)
    updates = [np.array([3.0, 4.0, 0.0], np.float32),  # norm 5: clipped
               np.array([0.1, 0.2, 0.3], np.float32)]
    clients = [np.stack(updates)] if stacked_users else updates
    state = process.initialize()
    for _ in range(3):
      output = process.next(state, clients)
      state = output.state
      self.assertAllClose(
          output.result, (updates[0] / 5.0 + updates[1]) / 4.0, atol=1e-6)
      self.assertEqual(output.measurements['clipped_count'], 1)

  def test_nonfinite_update_is_zeroed_and_counted(self):
    process = dp_ftrl.TreeAggregationFactory(0.0, 1.0, 1).create(
        tff.TensorType(np.float32, [2]))
    output = process.next(process.initialize(), [
        np.array([np.nan, 0.0], np.float32),
        np.array([0.5, 0.0], np.float32)])
    self.assertAllClose(output.result, [0.5, 0.0])
    self.assertEqual(output.measurements['nonfinite_count'], 1)

  def test_plain_tree_prefix_noise_has_one_node_per_binary_digit(self):
    """The noise of s_t, the sum of the first t releases, is the sum of the
    nodes of t's dyadic decomposition: variance popcount(t) (z S)^2."""
    z, clip = 1.5, 2.0
    noise = _released_noise(dp_ftrl.TreeAggregationFactory(
        z, clip, 1, efficient=False, noise_seed=3), rounds=7)
    prefix = np.cumsum(noise, axis=0)
    for t in range(1, 8):
      _assert_variance(self, prefix[t - 1], bin(t).count('1') * (z * clip)**2)

  def test_honakers_estimator_has_less_variance(self):
    """At t = 3 the plain tree sums two nodes (variance 2); Honaker's
    estimator combines more and does better."""
    noise = _released_noise(dp_ftrl.TreeAggregationFactory(
        1.0, 1.0, 1, efficient=True, noise_seed=4), rounds=3)
    variance = np.var(np.sum(noise, axis=0))
    self.assertLess(variance, 2.0 - 5 * 2.0 * np.sqrt(2.0 / 19999))
    self.assertGreater(variance, 0.5)

  def test_restart_starts_a_new_tree(self):
    """Restarting after 3 rounds: s_4 carries the first tree's s_3 (two
    nodes) and the new tree's first leaf: variance 3, where one tree over 4
    rounds has a single node (variance 1). Since the restart, the releases
    of rounds 4..t sum to the new tree's prefix: popcount(t mod 3)."""
    restarted = _released_noise(dp_ftrl.TreeAggregationFactory(
        1.0, 1.0, 1, restart_period=3, efficient=False, noise_seed=5), 5)
    one_tree = _released_noise(dp_ftrl.TreeAggregationFactory(
        1.0, 1.0, 1, efficient=False, noise_seed=5), 4)
    _assert_variance(self, np.sum(restarted[:4], axis=0), 3.0)
    _assert_variance(self, np.sum(one_tree, axis=0), 1.0)
    for t in (4, 5):
      _assert_variance(self, np.sum(restarted[3:t], axis=0),
                       bin(t % 3).count('1'))

  def test_same_seed_same_noise(self):
    first = _released_noise(
        dp_ftrl.TreeAggregationFactory(1.0, 1.0, 1, noise_seed=6), 3)
    second = _released_noise(
        dp_ftrl.TreeAggregationFactory(1.0, 1.0, 1, noise_seed=6), 3)
    np.testing.assert_array_equal(first, second)
    self.assertFalse(np.array_equal(first[0], first[1]))


class AdaptiveTreeTest(tf.test.TestCase):

  def _factory(self, noise_multiplier, restart_period, count_stddev=0.0):
    return dp_ftrl.TreeAggregationFactory(
        noise_multiplier, 1.0, 1, restart_period=restart_period,
        efficient=False, noise_seed=7,
        adaptive=gaussian.AdaptiveClipping(
            target_quantile=0.5, learning_rate=0.2,
            clipped_count_stddev=count_stddev))

  def test_clip_moves_only_when_the_tree_restarts(self):
    """Every update unclipped, exact counts: the estimate shrinks by
    exp(-0.2 * 0.5) a round, and the clip takes it every third round."""
    process = self._factory(0.0, 3).create(tff.TensorType(np.float32, [2]))
    state = process.initialize()
    clips = []
    for _ in range(7):
      output = process.next(state, [np.array([0.01, 0.0], np.float32)])
      state = output.state
      clips.append(float(output.measurements['clip']))
      self.assertEqual(output.measurements['unclipped_fraction'], 1.0)
    step = np.exp(-0.1)
    np.testing.assert_allclose(
        clips, [1, 1, 1, step**3, step**3, step**3, step**6], rtol=1e-6)

  def test_new_tree_noise_follows_the_new_clip(self):
    """A tree per round (one leaf each): round t's release has variance
    (z clip_t)^2, and the clip of round 2 is exp(-0.1)."""
    z = 2.0
    noise = _released_noise(self._factory(z, 1), rounds=2)
    _assert_variance(self, noise[0], z**2)
    _assert_variance(self, noise[1], (z * np.exp(-0.1))**2)

  def test_needs_restarts(self):
    with self.assertRaisesRegex(checks.UnsupportedError, 'restart'):
      self._factory(1.0, None)

  def test_ledger_adds_the_counts_to_the_trees(self):
    """Trees of 4, 4, 2 rounds (depths 3, 3, 2), the most-used client in 3
    rounds: z_eff^-2 = 8 / z^2 + 3 / (2 sigma_b)^2."""
    cohorts = accounting.Participation([(r % 4,) for r in range(10)])
    event = dp_ftrl.run_event(2.0, 4, cohorts, clipped_count_stddev=5.0)
    self.assertAlmostEqual(event.noise_multiplier,
                           (8 / 4.0 + 3 / 100.0) ** -0.5)
    self.assertIsInstance(
        dp_ftrl.run_event(0.0, 4, cohorts, clipped_count_stddev=5.0),
        dp_accounting.NonPrivateDpEvent)

  def test_registry_builds_the_adaptive_tree(self):
    mechanism = registry.get('dp_ftrl_tree')
    setting = registry.Setting(expected_clients_per_round=5, population=20)
    params = mechanism.params(dict(
        adaptive_clip=True, tree_restart='epoch', noise_multiplier=1.0))
    factory = mechanism.factory(params, setting)
    self.assertEqual(factory.clipped_count_stddev, 5.0)  # max(0.25, 5 z)
    ledger = mechanism.build_ledger(params, setting)
    event = ledger.event_of_participation(accounting.Participation(((0,),)))
    self.assertAlmostEqual(event.noise_multiplier, (1.0 + 1 / 100.0) ** -0.5)
    with self.assertRaisesRegex(checks.UnsupportedError, 'restart'):
      mechanism.check(mechanism.params(dict(adaptive_clip=True)), setting)


class TreeLedgerTest(parameterized.TestCase):

  def _cyclic(self, rounds, groups):
    return accounting.Participation([(r % groups,) for r in range(rounds)])

  def test_no_restart_is_the_realised_tree(self):
    cohorts = self._cyclic(20, 4)  # k = 5, gap 4
    self.assertEqual(
        repr(dp_ftrl.run_event(2.0, None, cohorts)),
        repr(correlated_noise.tree_event(
            2.0, correlated_noise.Schedule(20, 5, 4))))

  def test_restart_every_epoch_matches_tensorflow_privacy(self):
    sigma, orders = 1.7, [2.0, 8.0, 32.0]
    event = dp_ftrl.run_event(sigma, 4, self._cyclic(14, 4))
    accountant = dp_accounting.rdp.RdpAccountant(
        orders, dp_accounting.NeighboringRelation.REPLACE_SPECIAL)
    accountant.compose(event)
    np.testing.assert_allclose(
        accountant._rdp,  # pylint: disable=protected-access
        tree_aggregation_accountant.compute_rdp_tree_restart(
            sigma, [4, 4, 4, 2], orders), rtol=1e-12)

  def test_restarted_trees_with_a_client_twice_sum_their_worst_cases(self):
    # Period 4 but two groups: each client twice per tree, 2 rounds apart.
    event = dp_ftrl.run_event(2.0, 4, self._cyclic(8, 2))
    per_tree = correlated_noise.tree_sensitivity_squared(
        correlated_noise.Schedule(4, 2, 2))
    self.assertEqual(
        repr(event), repr(correlated_noise.gaussian_event(2.0, 2 * per_tree)))

  def test_restarted_trees_pld_is_the_gaussian_of_summed_depths(self):
    """The ledger reports PLD beside RDP for restarts: the Gaussian of
    z / sqrt(sum of depths), never above the RDP bound."""
    ledger = accounting.PrivacyLedger(
        accounting.RunLevel(lambda p: dp_ftrl.run_event(3.0, 4, p)),
        'cyclic', 40, 10, 1e-5)
    for r in range(10):
      ledger.record_round(None, range(10 * (r % 4), 10 * (r % 4) + 10))
    depths = 3 + 3 + 2  # trees of 4, 4 and 2 rounds
    pld = dp_accounting.pld.PLDAccountant(value_discretization_interval=1e-4)
    pld.compose(dp_accounting.GaussianDpEvent(3.0 / np.sqrt(depths)))
    epsilons = ledger.epsilons()
    self.assertAlmostEqual(epsilons['pld'], pld.get_epsilon(1e-5), places=6)
    self.assertLessEqual(epsilons['pld'], epsilons['rdp'])

  def test_registry_entry(self):
    mechanism = registry.get('dp_ftrl_tree')
    setting = registry.Setting(expected_clients_per_round=5, population=20,
                               noise_seed=0)
    params = mechanism.params(dict(noise_multiplier=1.3, tree_restart='epoch'))
    factory = mechanism.factory(params, setting)
    self.assertIsInstance(factory, dp_ftrl.TreeAggregationFactory)
    ledger = mechanism.build_ledger(params, setting)
    self.assertIsInstance(ledger, accounting.RunLevel)
    self.assertIs(ledger.adjacency, accounting.Adjacency.ZERO_OUT)
    # 20 clients in groups of 5: a tree every 4 rounds.
    cohorts = [tuple(range(5 * (r % 4), 5 * (r % 4) + 5)) for r in range(9)]
    self.assertEqual(
        repr(ledger.event_of_participation(accounting.Participation(
            tuple(cohorts)))),
        repr(correlated_noise.tree_restart_event(1.3, [4, 4, 1])))
    self.assertIsNone(mechanism.engine_refusal(params, setting))


if __name__ == '__main__':
  tf.test.main()
