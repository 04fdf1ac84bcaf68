"""Canary clients: coins, places in the population, directions, statistics."""

from unittest import mock

from absl.testing import absltest
from absl.testing import parameterized
import numpy as np
import tensorflow as tf
import tensorflow_federated as tff

from dp_fedavg import accounting
from dp_fedavg import canaries as canaries_lib
from dp_fedavg import empirical_privacy
from dp_fedavg import process as process_lib

_ADD_REMOVE = accounting.Adjacency.ADD_OR_REMOVE_ONE


class CanariesTest(parameterized.TestCase):

  def test_coins_are_seeded_and_fair(self):
    first = canaries_lib.Canaries(4000, 10, seed=3, adjacency=_ADD_REMOVE)
    again = canaries_lib.Canaries(4000, 10, seed=3, adjacency=_ADD_REMOVE)
    other = canaries_lib.Canaries(4000, 10, seed=4, adjacency=_ADD_REMOVE)
    np.testing.assert_array_equal(first.inserted, again.inserted)
    self.assertFalse(np.array_equal(first.inserted, other.inserted))
    # Binomial(4000, 1/2): 5 standard errors are 5 * sqrt(1000) = 158.
    self.assertBetween(first.inserted.sum(), 2000 - 158, 2000 + 158)

  def test_add_or_remove_puts_only_inserted_canaries_in_the_population(self):
    canaries = canaries_lib.Canaries(50, 7, seed=0, adjacency=_ADD_REMOVE)
    inserted = np.flatnonzero(canaries.inserted)
    self.assertEqual(canaries.population, 7 + len(inserted))
    self.assertIsNone(canaries.canary_of(6))
    self.assertEqual(canaries.update_id(6), -1)
    self.assertEqual([canaries.canary_of(7 + j) for j in range(len(inserted))],
                     inserted.tolist())
    self.assertEqual([canaries.update_id(7 + j) for j in range(len(inserted))],
                     inserted.tolist())

  @parameterized.parameters(accounting.Adjacency.REPLACE_ONE,
                            accounting.Adjacency.ZERO_OUT)
  def test_replacement_keeps_held_out_canaries_as_clients_sending_zeros(
      self, adjacency):
    canaries = canaries_lib.Canaries(50, 7, seed=0, adjacency=adjacency)
    self.assertEqual(canaries.population, 57)
    for c in range(50):
      self.assertEqual(canaries.canary_of(7 + c), c)
      self.assertEqual(canaries.update_id(7 + c),
                       c if canaries.inserted[c] else -1)

  def test_refuses_example_level_and_too_few(self):
    with self.assertRaisesRegex(ValueError, 'user-level DP'):
      canaries_lib.Canaries(
          10, 5, 0, accounting.Adjacency.ADD_OR_REMOVE_ONE_EXAMPLE)
    with self.assertRaisesRegex(ValueError, 'canaries must be >= 2, got 1'):
      canaries_lib.Canaries(1, 5, 0, _ADD_REMOVE)

  def test_directions_are_seeded_unit_vectors(self):
    directions = canaries_lib.canary_directions(
        tf.constant([0, 1, 2, 1]), 5000, seed=7).numpy()
    np.testing.assert_allclose(np.linalg.norm(directions, axis=1), 1, rtol=1e-5)
    np.testing.assert_array_equal(directions[1], directions[3])
    # Independent directions: cosines are about N(0, 1/d); 5 / sqrt(5000).
    self.assertLess(abs(directions[0] @ directions[1]), 5 / np.sqrt(5000))
    other_seed = canaries_lib.canary_directions(
        tf.constant([0]), 5000, seed=8).numpy()
    self.assertLess(abs(directions[0] @ other_seed[0]), 5 / np.sqrt(5000))


class WithCanariesTest(parameterized.TestCase):

  def _client_work(self, stacked):
    """A client work whose update is the sum of its data's elements: one
    slot, or three stacked ones."""
    trainable = tff.StructWithPythonType(
        [tff.TensorType(np.float32, [2, 3]), tff.TensorType(np.float32, [4])],
        list)
    weights_type = tff.StructWithPythonType(
        [('trainable', trainable),
         ('non_trainable', tff.StructWithPythonType([], list))],
        tff.learning.models.ModelWeights)
    data_type = tff.SequenceType(tff.TensorType(np.float32, [None, 10]))

    @tff.tensorflow.computation(weights_type, data_type)
    def train(weights, data):
      del weights
      total = data.reduce(tf.zeros([3 if stacked else 1, 10]),
                          lambda a, b: a + b)
      parts = [tf.reshape(total[:, :6], [-1, 2, 3]), total[:, 6:]]
      if not stacked:
        parts = [p[0] for p in parts]
      return (tff.learning.templates.ClientResult(
          update=parts, update_weight=tf.constant(1.0)),
              tf.constant(0.0))

    work = process_lib.client_work_process(
        train, weights_type, data_type, lambda sums: sums)
    return work, weights_type

  @parameterized.parameters(False, True)
  def test_inserted_slots_send_the_canary_others_keep_their_update(
      self, stacked):
    work, weights_type = self._client_work(stacked)
    wrapped = canaries_lib.with_canaries(
        work, weights_type.trainable, seed=5, stacked_users=stacked)
    self.assertEqual(
        str(wrapped.next.type_signature.parameter[2].member),
        '<data=float32[?,10]*,canaries=int64[?]*>')
    slots = 3 if stacked else 1
    values = np.arange(slots * 10, dtype=np.float32).reshape(slots, 10)
    ids = [4, -1, 9][:slots] if stacked else [4]
    weights = tff.learning.models.ModelWeights(
        [np.zeros([2, 3], np.float32), np.zeros([4], np.float32)], [])
    data = {'data': tf.data.Dataset.from_tensors(values),
            'canaries': canaries_lib.canary_ids_dataset(ids)}
    output = wrapped.next(wrapped.initialize(), [weights], [data])
    update = output.result[0].update
    flat = np.concatenate(
        [np.reshape(update[0], [slots, 6]), np.reshape(update[1], [slots, 4])],
        axis=1)
    expected = -canaries_lib.CANARY_NORM * canaries_lib.canary_directions(
        tf.constant([max(i, 0) for i in ids]), 10, seed=5).numpy()
    for slot, canary in enumerate(ids):
      if canary >= 0:
        np.testing.assert_allclose(flat[slot], expected[slot], rtol=1e-5)
      else:
        np.testing.assert_array_equal(flat[slot], values[slot])


class CanaryStatisticsTest(absltest.TestCase):

  def _weights(self, flat):
    return tff.learning.models.ModelWeights(
        trainable=[flat[:6].reshape(2, 3), flat[6:]], non_trainable=[])

  def _run(self, canaries, snapshots):
    statistics = canaries_lib.CanaryStatistics(canaries, 10)
    for snapshot in snapshots[:-1]:
      statistics.observe(self._weights(snapshot))
    statistics.finish(self._weights(snapshots[-1]))
    return statistics

  def test_cosines_with_final_and_round_deltas(self):
    canaries = canaries_lib.Canaries(6, 3, seed=1, adjacency=_ADD_REMOVE)
    rng = np.random.default_rng(0)
    snapshots = [rng.normal(size=10).astype(np.float32) for _ in range(4)]
    statistics = self._run(canaries, snapshots)
    directions = canaries_lib.canary_directions(
        tf.range(6), 10, seed=1).numpy().astype(np.float64)

    def cosines(delta):
      return directions @ delta / np.linalg.norm(delta)

    np.testing.assert_allclose(
        statistics.final_cosine, cosines(snapshots[-1] - snapshots[0]),
        rtol=1e-5)
    rounds = [cosines(b - a) for a, b in zip(snapshots, snapshots[1:])]
    np.testing.assert_allclose(
        statistics.max_round_cosine, np.max(rounds, axis=0), rtol=1e-5)
    self.assertEqual(statistics.rounds_observed, 3)
    rows = statistics.rows()
    self.assertLen(rows, 6)
    self.assertEqual(rows[2]['inserted'], int(canaries.inserted[2]))

  def test_directions_drawn_in_chunks_give_the_same_statistics(self):
    canaries = canaries_lib.Canaries(6, 3, seed=1, adjacency=_ADD_REMOVE)
    rng = np.random.default_rng(1)
    snapshots = [rng.normal(size=10).astype(np.float32) for _ in range(3)]
    kept = self._run(canaries, snapshots)
    with mock.patch.object(canaries_lib, '_DIRECTIONS_MEMORY_BYTES', 160):
      drawn = self._run(canaries, snapshots)
    self.assertIsNone(drawn._directions)
    np.testing.assert_allclose(drawn.final_cosine, kept.final_cosine,
                               rtol=1e-6)
    np.testing.assert_allclose(drawn.max_round_cosine, kept.max_round_cosine,
                               rtol=1e-6)


class LowerBoundFromScoresTest(absltest.TestCase):

  def test_separated_scores_reach_the_all_correct_bound(self):
    inserted, held_out = np.ones(50), np.zeros(50)
    bound = empirical_privacy.one_run_epsilon_from_scores(
        inserted, held_out, 1e-5, 0.95)
    # All guesses right; the largest r (every canary) gives the most.
    each = 1 - 0.05 / len(empirical_privacy.GUESS_FRACTIONS)
    self.assertAlmostEqual(
        bound,
        empirical_privacy.one_run_epsilon_lower_bound(100, 100, 100, 1e-5,
                                                      each))

  def test_guesses_are_top_half_inserted_bottom_half_held_out(self):
    # Ten canaries, guessing about all: the 5 highest "inserted" (4 right),
    # the 5 lowest "held out" (3 right).
    inserted = [9, 8, 7, 6, 2, 1]
    held_out = [5, 4, 3, 0]
    bound = empirical_privacy.one_run_epsilon_from_scores(
        inserted, held_out, 0.0, 0.5, guess_fractions=(1.0,))
    self.assertAlmostEqual(
        bound,
        empirical_privacy.one_run_epsilon_lower_bound(10, 10, 7, 0.0, 0.5))

  def test_same_distribution_gives_no_evidence(self):
    rng = np.random.default_rng(0)
    bound, parts = empirical_privacy.epsilon_lower_bound(
        {'a': (rng.normal(size=250), rng.normal(size=250))}, 1e-5, 0.95)
    self.assertEqual(set(parts), {'a/one_run', 'a/threshold'})
    self.assertEqual(bound, max(parts.values()))
    self.assertLess(bound, 0.5)


if __name__ == '__main__':
  absltest.main()
