"""The federated skeleton with inner aggregations that are not sums."""

import collections

import numpy as np
import tensorflow as tf
import tensorflow_federated as tff

from aggregators import checks
from aggregators import gaussian
from aggregators import skeleton

_VALUE = tff.TensorType(np.float32, [3])


class CoordinateMax(skeleton.RecordAggregation):
  """The server gets the coordinate-wise maximum of the records: not a sum."""

  sums = False

  def aggregate(self, records, counts, params, state, clients):
    del params, state, clients
    record_type = records.type_signature.member

    @tff.tensorflow.computation
    def lowest():
      return tf.fill(record_type.shape, tf.float32.min)

    @tff.tensorflow.computation(record_type, record_type)
    def larger(a, b):
      return tf.maximum(a, b)

    @tff.tensorflow.computation(record_type)
    def identity(a):
      return tf.identity(a)

    maximum = tff.federated_aggregate(
        records, lowest(), larger, larger, identity
    )
    return maximum, tff.federated_sum(counts)


def _process(record_aggregation):
  """Clip to L2 norm 1; the server returns the aggregate and the counts."""

  @tff.tensorflow.computation
  def initial_state():
    return tf.constant(1.0)

  @tff.tensorflow.computation(tf.float32)
  def client_params(state):
    return state

  def clip(norms, is_finite, bound):
    total = tf.norm(norms, axis=1)
    scale = tf.math.divide_no_nan(bound, tf.maximum(total, bound))
    clipped = tf.cast(tf.logical_and(is_finite, total > bound), tf.int32)
    return (tf.broadcast_to(scale[:, tf.newaxis], tf.shape(norms)),
            collections.OrderedDict(clipped=clipped))

  client_update = skeleton.client_update_computation(
      clip, 2, _VALUE, tff.TensorType(np.float32), stacked_users=False
  )
  counts_type = client_update.type_signature.result[1]

  @tff.tensorflow.computation(_VALUE, counts_type, tf.float32)
  def finish_round(aggregate, counts, state):
    return aggregate, state, counts

  return skeleton.clip_aggregate_finish_process(
      initial_state, client_params, client_update, finish_round,
      record_aggregation,
  )


class SkeletonTest(tf.test.TestCase):

  def test_records_reach_the_server_unsummed_through_a_non_sum(self):
    process = _process(CoordinateMax())
    values = [np.array([3.0, 4.0, 0.0], np.float32),  # Norm 5: clipped to 1.
              np.array([0.1, -0.5, 0.2], np.float32)]
    output = process.next(process.initialize(), values)
    self.assertAllClose(output.result, [0.6, 0.8, 0.2])
    self.assertEqual(output.measurements['clipped'], 1)

  def test_plain_sum(self):
    process = _process(skeleton.PlainSum())
    values = [np.array([3.0, 4.0, 0.0], np.float32),
              np.array([0.1, -0.5, 0.2], np.float32)]
    output = process.next(process.initialize(), values)
    self.assertAllClose(output.result, [0.7, 0.3, 0.2])

  def test_noise_for_a_sum_is_refused_after_a_non_sum(self):
    with self.assertRaisesRegex(checks.UnsupportedError, 'not a sum'):
      gaussian.GaussianFactory(1.0, 1.0, 2, record_aggregation=CoordinateMax())


if __name__ == '__main__':
  tf.test.main()
