"""Laplace mechanism with an L1 clip: pure epsilon-DP per round, user level.

Privacy guarantee. Each client's update is scaled to L1 norm <= `l1_clip`
(over all its tensors at once). An update holding a NaN or an Inf is replaced
by zeros and counted. Adding or removing one client therefore moves the sum by
at most `l1_clip` in L1 norm: the L1 sensitivity, which is what Laplace noise
must be calibrated to. The L2 bound would be the wrong one, and too small:
||v||_1 can be sqrt(d) ||v||_2. Every coordinate of the sum gets independent
Laplace noise of scale b = l1_clip / epsilon_per_round, so each round is
epsilon_per_round-DP (pure, delta = 0). That is
`dp_accounting.LaplaceDpEvent(b / l1_clip)`, whose parameter is the noise scale
relative to the L1 sensitivity. The sum is divided by the expected number of
clients per round, a constant: post-processing. Under Poisson sampling only
the PLD accountant covers this event.
"""

import collections
import dataclasses
from typing import Optional

import dp_accounting
import tensorflow as tf
import tensorflow_federated as tff

from aggregators import checks
from aggregators import clipping
from aggregators import noise_seeds
from aggregators import registry
from aggregators import skeleton
from dp_fedavg import accounting


def laplace_noise(shape, scale: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
  """Laplace(0, scale) by inverse CDF of a seeded uniform draw (float64)."""
  # tf.random has no stateless Laplace sampler.
  uniform = tf.random.stateless_uniform(
      shape, seed=seed, minval=-0.5, maxval=0.5, dtype=tf.float64
  )
  return -tf.cast(scale, tf.float64) * tf.sign(uniform) * tf.math.log1p(
      -2.0 * tf.abs(uniform)
  )


class LaplaceFactory(tff.aggregators.UnweightedAggregationFactory):
  """Clips each client update to an L1 norm and adds Laplace noise to the sum.

  State: `l1_clip` (float32), `epsilon_per_round` (float64) and `noise_seed`
  (int64[2], advanced every round).

  Measurements: `l1_clip`; `noise_scale`, the Laplace scale b on each
  coordinate of the sum; `clipped_count`, finite updates whose L1 norm was
  above `l1_clip`; `nonfinite_count`, updates replaced by zeros.
  """

  def __init__(
      self,
      epsilon_per_round: float,
      l1_clip: float,
      expected_clients_per_round: float,
      noise_seed: Optional[int] = None,
      stacked_users: bool = False,
  ):
    """Initializes the factory.

    Args:
      epsilon_per_round: the pure-DP epsilon of one round, > 0.
      l1_clip: the L1 norm bound of one client's whole update, > 0.
      expected_clients_per_round: the constant denominator of the mean, > 0.
      noise_seed: seed of the noise stream; None draws one at `initialize`.
      stacked_users: each client's value is a stack of users' updates (the
        vectorized engine), and each user is clipped on its own.

    Raises:
      TypeError: if an argument is not a number (or an int seed).
      checks.ArgumentError: if an argument is outside its range.
    """
    self._epsilon_per_round = checks.check_number(
        epsilon_per_round, 'epsilon_per_round', 0, strict=True
    )
    self._l1_clip = checks.check_number(l1_clip, 'l1_clip', 0, strict=True)
    self._expected_clients_per_round = checks.check_number(
        expected_clients_per_round, 'expected_clients_per_round', 0, strict=True
    )
    self._noise_seed = checks.check_seed(noise_seed)
    self._stacked_users = checks.check_bool(stacked_users, 'stacked_users')

  def create(
      self, value_type: tff.types.StructWithPythonType | tff.TensorType
  ) -> tff.templates.AggregationProcess:
    if self._stacked_users:
      value_type = skeleton.unstacked_type(value_type, 'LaplaceFactory')
    value_specs = skeleton.float_value_specs(value_type, 'LaplaceFactory')
    num_tensors = len(tf.nest.flatten(value_specs))

    @tff.tensorflow.computation
    def initial_state():
      return collections.OrderedDict(
          l1_clip=tf.constant(self._l1_clip, tf.float32),
          epsilon_per_round=tf.constant(self._epsilon_per_round, tf.float64),
          noise_seed=noise_seeds.initial_seed(self._noise_seed),
      )

    state_type = initial_state.type_signature.result

    def clip_users(norms, is_finite, l1_clip):
      total = tf.reduce_sum(norms, axis=1)
      # The whole update scaled to L1 norm <= l1_clip.
      scale = clipping.scales_to_bounds(total, l1_clip)
      return (
          tf.broadcast_to(scale[:, tf.newaxis], tf.shape(norms)),
          collections.OrderedDict(
              clipped=tf.cast(tf.logical_and(is_finite, total > l1_clip),
                              tf.int32),
              nonfinite=tf.cast(tf.logical_not(is_finite), tf.int32),
          ),
      )

    get_l1_clip, clip_update = skeleton.clip_from_state(
        state_type, 'l1_clip', clip_users, 1, value_type, self._stacked_users)
    counts_type = clip_update.type_signature.result[1]

    @tff.tensorflow.computation(value_type, counts_type, state_type)
    def add_noise_and_average(value_sum, counts, state):
      scale = tf.cast(state['l1_clip'], tf.float64) / state['epsilon_per_round']
      seeds = tf.random.experimental.stateless_split(
          state['noise_seed'], num=num_tensors + 1
      )
      mean = [
          (s + tf.cast(laplace_noise(tf.shape(s), scale, seeds[j]), s.dtype))
          / self._expected_clients_per_round
          for j, s in enumerate(tf.nest.flatten(value_sum))
      ]
      new_state = collections.OrderedDict(
          l1_clip=state['l1_clip'],
          epsilon_per_round=state['epsilon_per_round'],
          noise_seed=seeds[num_tensors],
      )
      measurements = collections.OrderedDict(
          l1_clip=state['l1_clip'],
          noise_scale=tf.cast(scale, tf.float32),
          clipped_count=counts['clipped'],
          nonfinite_count=counts['nonfinite'],
      )
      return tf.nest.pack_sequence_as(value_specs, mean), new_state, measurements

    return skeleton.clip_aggregate_finish_process(
        initial_state, get_l1_clip, clip_update, add_noise_and_average,
        skeleton.PlainSum(),
    )


def round_dp_event(epsilon_per_round: float) -> dp_accounting.DpEvent:
  """One round: Laplace with scale / L1 sensitivity = 1 / epsilon_per_round."""
  return dp_accounting.LaplaceDpEvent(1.0 / float(epsilon_per_round))


def dp_event_from_state(state) -> dp_accounting.DpEvent:
  """The per-round DpEvent of a `LaplaceFactory` state, before sampling."""
  return round_dp_event(float(state['epsilon_per_round']))


@dataclasses.dataclass(frozen=True)
class LaplaceParams:
  """laplace: pure epsilon per round with an L1 clip."""

  l1_clip: float = registry.parameter(
      1.0, 'L1 norm bound of one client\'s whole update.')
  epsilon_per_round: float = registry.parameter(
      0.5, 'Pure epsilon of one round (noise scale l1_clip / epsilon).')


registry.register(registry.Mechanism(
    name='laplace',
    summary='Laplace noise on the sum of updates clipped to --l1_clip (L1)',
    params_type=LaplaceParams,
    build_factory=lambda params, setting: LaplaceFactory(
        epsilon_per_round=params.epsilon_per_round,
        l1_clip=params.l1_clip,
        expected_clients_per_round=setting.expected_clients_per_round,
        noise_seed=setting.noise_seed,
        stacked_users=setting.stacked_users,
    ),
    build_ledger=lambda params, setting: accounting.SampledRounds(
        round_dp_event(params.epsilon_per_round), dp_event_from_state
    ),
    # The accountant's noise parameter is the Laplace scale over the L1
    # sensitivity, 1 / epsilon_per_round.
    noise=registry.NoiseParameter(
        'epsilon_per_round', to_noise=lambda epsilon: 1.0 / epsilon,
        from_noise=lambda noise: 1.0 / noise,
    ),
))
