"""Gaussian mechanism with a fixed, flat L2 clip, as a TFF aggregation factory.

Privacy guarantee. Each client's update is clipped to L2 norm `clip`, taken
over all of its tensors at once. An update that holds a NaN or an Inf is
replaced by zeros and counted, never clipped into the sum. Adding or removing
one client therefore moves the sum by at most `clip` in L2 norm. Noise drawn
from N(0, (noise_multiplier * clip)^2) is added to every coordinate of the sum,
so each round is the Gaussian mechanism with noise multiplier
`noise_multiplier` under add/remove-one-client adjacency, which is
`dp_accounting.GaussianDpEvent(noise_multiplier)`. The sum is then divided by
the *expected* number of clients per round. That denominator is a constant: it
does not depend on who was sampled, so the division is post-processing.
Amplification by client sampling is not part of this event; the accountant
wraps the event in the event for the sampling that was actually used.

The noise multiplier is kept in the state as float64, so the event built from
the state carries the exact Python float the factory was given. dp-accounting
0.4.3 mis-composes events with numpy float32 parameters, so
`dp_event_from_state` returns Python floats.
"""

import collections
from typing import Optional

import dp_accounting
import numpy as np
import tensorflow as tf
import tensorflow_federated as tff


def _check_finite_float(value, name: str) -> float:
  """Returns `value` as a Python float; raises TypeError or ValueError."""
  if isinstance(value, bool) or not isinstance(value, (int, float, np.number)):
    raise TypeError(f'{name} must be a number, got {value!r}.')
  value = float(value)
  if not np.isfinite(value):
    raise ValueError(f'{name} must be finite, got {value}.')
  return value


def _all_finite(tensors) -> tf.Tensor:
  return tf.reduce_all(
      [tf.reduce_all(tf.math.is_finite(t)) for t in tf.nest.flatten(tensors)]
  )


class GaussianFixedClipFactory(tff.aggregators.UnweightedAggregationFactory):
  """Clips each client update to a flat L2 norm and adds Gaussian noise.

  The created process averages client values placed at `tff.CLIENTS`:
  `(sum of clipped updates + N(0, (z * clip)^2 I)) / expected_clients_per_round`
  placed at `tff.SERVER`.

  State: `clip` (float32), `noise_multiplier` (float64, the z above) and
  `noise_seed` (int64[2], advanced every round, so a fixed seed gives a
  reproducible run).

  Measurements: `clip`; `sum_noise_stddev`, the stddev added to each coordinate
  of the sum (divide by `expected_clients_per_round` for the mean);
  `clipped_count`, how many finite updates had a norm above `clip`;
  `nonfinite_count`, how many updates held a NaN or Inf and were replaced by
  zeros.
  """

  def __init__(
      self,
      noise_multiplier: float,
      clip: float,
      expected_clients_per_round: float,
      noise_seed: Optional[int] = None,
  ):
    """Initializes the factory.

    Args:
      noise_multiplier: z >= 0; the noise stddev on the sum is `z * clip`.
      clip: the L2 norm bound of one client's whole update, > 0.
      expected_clients_per_round: the constant denominator of the mean, > 0.
      noise_seed: seed of the noise stream; None draws one at `initialize`.

    Raises:
      TypeError: if an argument is not a number (or an int seed).
      ValueError: if an argument is outside its range.
    """
    noise_multiplier = _check_finite_float(noise_multiplier, 'noise_multiplier')
    if noise_multiplier < 0:
      raise ValueError(
          f'noise_multiplier must be >= 0, got {noise_multiplier}.'
      )
    clip = _check_finite_float(clip, 'clip')
    if clip <= 0:
      raise ValueError(f'clip must be > 0, got {clip}.')
    expected_clients_per_round = _check_finite_float(
        expected_clients_per_round, 'expected_clients_per_round'
    )
    if expected_clients_per_round <= 0:
      raise ValueError(
          'expected_clients_per_round must be > 0, got '
          f'{expected_clients_per_round}.'
      )
    if noise_seed is not None and (
        isinstance(noise_seed, bool) or not isinstance(noise_seed, int)
    ):
      raise TypeError(f'noise_seed must be an int or None, got {noise_seed!r}.')
    self._noise_multiplier = noise_multiplier
    self._clip = clip
    self._expected_clients_per_round = expected_clients_per_round
    self._noise_seed = noise_seed

  def create(
      self, value_type: tff.types.StructWithPythonType | tff.TensorType
  ) -> tff.templates.AggregationProcess:
    if not tff.types.is_structure_of_floats(value_type):
      raise TypeError(
          'GaussianFixedClipFactory aggregates structures of float tensors; '
          f'got {value_type}.'
      )
    value_specs = tff.types.type_to_tf_tensor_specs(value_type)

    @tff.tensorflow.computation
    def initial_state():
      if self._noise_seed is None:
        # No graph seed is set, so this draws a fresh seed at every initialize.
        seed = tf.random.uniform(
            [2], minval=tf.int64.min, maxval=tf.int64.max, dtype=tf.int64
        )
      else:
        seed = tf.constant([self._noise_seed, 0], tf.int64)
      return collections.OrderedDict(
          clip=tf.constant(self._clip, tf.float32),
          noise_multiplier=tf.constant(self._noise_multiplier, tf.float64),
          noise_seed=seed,
      )

    state_type = initial_state.type_signature.result

    @tff.tensorflow.computation(value_type, tf.float32)
    def clip_update(value, clip):
      # tensorflow_privacy's GaussianSumQuery clips the same way, but it would
      # turn a NaN update into a NaN sum, and its noise comes from an unseeded
      # initializer (irreproducible) with a DpEvent built from float32 tensors
      # (the dp-accounting trap); so clip, check and noise here instead.
      is_finite = _all_finite(value)
      clipped, norm = tf.clip_by_global_norm(tf.nest.flatten(value), clip)
      clipped = [
          tf.where(is_finite, c, tf.zeros_like(c)) for c in clipped
      ]
      was_clipped = tf.logical_and(is_finite, norm > clip)
      return (
          tf.nest.pack_sequence_as(value, clipped),
          tf.cast(was_clipped, tf.int32),
          tf.cast(tf.logical_not(is_finite), tf.int32),
      )

    @tff.tensorflow.computation(state_type)
    def get_clip(state):
      return state['clip']

    @tff.tensorflow.computation(value_type, state_type)
    def add_noise_and_average(value_sum, state):
      stddev = state['clip'] * tf.cast(state['noise_multiplier'], tf.float32)
      flat_sum = tf.nest.flatten(value_sum)
      seeds = tf.random.experimental.stateless_split(
          state['noise_seed'], num=len(flat_sum) + 1
      )
      noised_mean = [
          (s + tf.random.stateless_normal(
              tf.shape(s), seed=seeds[i], stddev=stddev, dtype=s.dtype
          )) / self._expected_clients_per_round
          for i, s in enumerate(flat_sum)
      ]
      new_state = collections.OrderedDict(
          clip=state['clip'],
          noise_multiplier=state['noise_multiplier'],
          noise_seed=seeds[-1],
      )
      return (
          tf.nest.pack_sequence_as(value_specs, noised_mean),
          new_state,
          stddev,
      )

    @tff.federated_computation
    def init_fn():
      return tff.federated_eval(initial_state, tff.SERVER)

    @tff.federated_computation(
        init_fn.type_signature.result, tff.FederatedType(value_type, tff.CLIENTS)
    )
    def next_fn(state, value):
      clip = tff.federated_broadcast(tff.federated_map(get_clip, state))
      clipped, was_clipped, was_nonfinite = tff.federated_map(
          clip_update, (value, clip)
      )
      noised_mean, new_state, stddev = tff.federated_map(
          add_noise_and_average, (tff.federated_sum(clipped), state)
      )
      measurements = tff.federated_zip(
          collections.OrderedDict(
              clip=tff.federated_map(get_clip, state),
              sum_noise_stddev=stddev,
              clipped_count=tff.federated_sum(was_clipped),
              nonfinite_count=tff.federated_sum(was_nonfinite),
          )
      )
      return tff.templates.MeasuredProcessOutput(
          state=new_state, result=noised_mean, measurements=measurements
      )

    return tff.templates.AggregationProcess(init_fn, next_fn)


def round_dp_event(noise_multiplier: float) -> dp_accounting.DpEvent:
  """One round of the mechanism with noise multiplier z, before sampling."""
  return dp_accounting.GaussianDpEvent(float(noise_multiplier))


def dp_event_from_state(state) -> dp_accounting.DpEvent:
  """The per-round DpEvent of a `GaussianFixedClipFactory` process state.

  Args:
    state: the state of the aggregation process (for a `tff.learning` process,
      `learning_state.aggregator`).

  Returns:
    `GaussianDpEvent` with a Python-float noise multiplier, before sampling.
  """
  return round_dp_event(state['noise_multiplier'])
