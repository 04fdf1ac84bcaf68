"""Inner aggregations through TFF's secure sums: the server sees only sums.

* `GridSecureSum`: float records (clipped to L2 norm <= clip) are encoded as
  integers on a grid of K = `levels` steps per clip and summed with
  `tff.aggregators.SecureSumFactory` within [-K, K]. Each client sends
  q = round(u K f / S) for its clipped update u, with the shrink
  f = (1 - sqrt(d) / (2K)) / (1 + 1e-6): rounding moves q by at most
  sqrt(d) / 2 in L2 and float32 clipping overshoots S by less than 1e-6
  relative, so ||q|| <= K and the decoded sum q S / K still has L2
  sensitivity S. A factory adds its noise to that decoded sum, for the same
  guarantee as without the secure sum, and divides by f afterwards
  (`post_noise_scale`, post-processing) to undo the shrink. Every |q_i| <= K,
  so the bounds never clip a value (the count of values they clipped is
  reported as `secure_clipped` beside the other counts); the int32 sum is
  exact below 2^31 / (2K) clients.
* `ModularSecureSum`: integer records already reduced modulo 2^bits (the
  distributed-DP encoding) summed with `tff.aggregators.SecureModularSumFactory`.

Both sum the clients' counts (integers in [0, 1]) with a secure sum too.
Secure intrinsics run only in the context that simulates them
(`dp_fedavg.execution.local_execution(simulate_secure_aggregation=True)`).
"""

import collections
import math

import numpy as np
import tensorflow as tf
import tensorflow_federated as tff

from aggregators import skeleton

# Grid steps per clip, and the cohort its int32 sum holds exactly (each client
# adds at most 2K to the shifted sum).
SECURE_LEVELS = 2**15
MAX_SECURE_CLIENTS = 2**31 // (2 * SECURE_LEVELS)


def _secure_sum(factory, value):
  """Sums CLIENTS-placed `value` with a stateless factory; (sum, measurements)."""
  process = factory.create(value.type_signature.member)
  output = process.next(process.initialize(), value)
  return output.result, output.measurements


def _secure_count_sums(counts):
  return _secure_sum(
      tff.aggregators.SecureSumFactory(
          upper_bound_threshold=1, lower_bound_threshold=0
      ),
      counts,
  )[0]


class GridSecureSum(skeleton.RecordAggregation):
  """Secure sum of clipped float records on an integer grid; see above.

  The grid is relative to the clip: the clients' parameters and the server's
  state carry it as `clip`.
  """

  secure = True

  def __init__(self, levels: int = SECURE_LEVELS):
    self._levels = levels

  def check_cohort(self, expected_clients_per_round: float) -> None:
    """Raises ValueError if sampled cohorts could overflow the exact sum."""
    if 2 * expected_clients_per_round > MAX_SECURE_CLIENTS:
      raise ValueError(
          f'secure sums add at most {MAX_SECURE_CLIENTS} clients exactly; '
          f'expected_clients_per_round={expected_clients_per_round} leaves no '
          'margin for larger sampled cohorts.'
      )

  def _shrink(self, record_type) -> float:
    specs = tf.nest.flatten(tff.types.type_to_tf_tensor_specs(record_type))
    dimension = sum(spec.shape.num_elements() for spec in specs)
    shrink = (1.0 - math.sqrt(dimension) / (2 * self._levels)) / (1.0 + 1e-6)
    if shrink <= 0.5:
      raise ValueError(
          f'secure sum: the update has {dimension} values, too many for a grid '
          f'of {self._levels} steps per clip (rounding would use up more than '
          'half of the clip).'
      )
    return shrink

  def post_noise_scale(self, record_type) -> float:
    return 1.0 / self._shrink(record_type)

  def counts_type(self, counts_type):
    return tff.types.to_type(collections.OrderedDict(
        list(tff.structure.iter_elements(counts_type))
        + [('secure_clipped', tff.TensorType(np.int32))]
    ))

  def aggregate(self, records, counts, params, state, clients):
    del clients
    record_type = records.type_signature.member
    levels, shrink = self._levels, self._shrink(record_type)
    encoded_type = tff.types.to_type(tf.nest.map_structure(
        lambda spec: tff.TensorType(np.int32, spec.shape),
        tff.types.type_to_tf_tensor_specs(record_type),
    ))

    @tff.tensorflow.computation(record_type, params.type_signature.member)
    def encode(clipped, client_params):
      # In float64, so rounding is the only error of the grid.
      step = tf.cast(levels * shrink, tf.float64) / tf.cast(
          client_params['clip'], tf.float64
      )
      return tf.nest.map_structure(
          lambda t: tf.cast(tf.round(tf.cast(t, tf.float64) * step), tf.int32),
          clipped,
      )

    sum_factory = tff.aggregators.SecureSumFactory(
        upper_bound_threshold=levels, lower_bound_threshold=-levels
    )
    encoded_sum, sum_measurements = _secure_sum(
        sum_factory, tff.federated_map(encode, (records, params))
    )
    count_sums = _secure_count_sums(counts)

    @tff.tensorflow.computation(
        encoded_type, sum_measurements.type_signature.member,
        state.type_signature.member,
    )
    def decode(encoded, measurements, server_state):
      unit = server_state['clip'] / levels
      value_sum = tf.nest.map_structure(
          lambda t: tf.cast(t, tf.float32) * unit, encoded
      )
      clipped = (
          measurements['secure_upper_clipped_count']
          + measurements['secure_lower_clipped_count']
      )
      return value_sum, clipped

    value_sum, secure_clipped = tff.federated_map(
        decode, (encoded_sum, sum_measurements, state)
    )

    @tff.tensorflow.computation(
        count_sums.type_signature.member, secure_clipped.type_signature.member
    )
    def with_secure_clipped(sums, clipped):
      return collections.OrderedDict(**sums, secure_clipped=clipped)

    return value_sum, tff.federated_map(
        with_secure_clipped, (count_sums, secure_clipped)
    )


class ModularSecureSum(skeleton.RecordAggregation):
  """Secure sum modulo `modulus` of integer records in [0, modulus)."""

  secure = True

  def __init__(self, modulus: int):
    self._modulus = modulus

  def aggregate(self, records, counts, params, state, clients):
    del params, state, clients
    record_sum, _ = _secure_sum(
        tff.aggregators.SecureModularSumFactory(self._modulus), records
    )
    return record_sum, _secure_count_sums(counts)
