"""Gaussian mechanism with fixed or adaptive, flat or per-layer clipping.

Privacy guarantee, per round, under add/remove-one-client adjacency:

* Clipping. Each client's update is clipped to total L2 bound S (flat, or per
  layer with sqrt(sum_j S_j^2) = S; see `aggregators.clipping`). An update
  that holds a NaN or an Inf is replaced by zeros and counted. Adding or
  removing one client therefore moves the sum by at most S in L2 norm.
* Fixed clip, server noise. N(0, (z S)^2) is added to every coordinate of the
  sum: the Gaussian mechanism with noise multiplier z,
  `GaussianDpEvent(z)`.
* Adaptive clip (Andrew et al. 2021, "Differentially Private Learning with
  Adaptive Clipping"). Each client also reports b_i = 1 if its update was not
  clipped. The server releases sum_i (b_i - 1/2) + N(0, sigma_b^2). Adding or
  removing one client moves that sum by 1/2, so it is a Gaussian mechanism
  with noise multiplier 2 sigma_b. The unclipped fraction
  b_hat = clip(released / n + 1/2, 0, 1) moves the clip geometrically:
  S <- S exp(-eta (b_hat - gamma)). Both queries act on the same clients, so
  the round is `ComposedDpEvent([GaussianDpEvent(z_update),
  GaussianDpEvent(2 sigma_b)])`. Its effective multiplier is the z requested
  by the caller, because z^-2 = z_update^-2 + (2 sigma_b)^-2. The next round's
  clip is post-processing of released values.
* Client noise (`noise_placement='client'`). Every client adds the full
  N(0, (z S)^2) to its own clipped update before sending it, so the server
  never sees an unnoised update. Each message is a Gaussian mechanism on that
  client's update alone. Under replacement of the update (sensitivity 2S) that
  is `GaussianDpEvent(z / 2)`. The server knows who took part, so sampling
  amplifies nothing: `local_dp_event_from_state` is per participating round,
  composed without sampling. The released sum carries the noise of every
  participant, so the central guarantee is at least the server-noise one.

* Secure sum (`secure_sum=True`). The clipped updates and the counts reach
  the server only through `tff.aggregators.SecureSumFactory` (integer
  bounds, exact sums), so the server never sees one client's update; it adds
  the noise to the sum as above. Each client sends q = round(u K f / S), the
  update u on a grid of K = 2^15 steps per clip, with the shrink
  f = (1 - sqrt(d) / (2K)) / (1 + 1e-6): rounding moves q by at most
  sqrt(d) / 2 in L2 and float32 clipping overshoots S by less than 1e-6
  relative, so ||q|| <= K and the decoded sum q S / K still has sensitivity
  S. The event is therefore the same as without the secure sum; the server
  divides the noised sum by f afterwards (post-processing) to undo the shrink.
  Every |q_i| <= K, so the secure sum's bounds [-K, K] never clip a value
  (`secure_clipped_count` reports it); sums are exact below 32,768 clients
  per round.

The sum is divided by the *expected* number of clients per round, a constant:
that division is post-processing. Noise multipliers are kept in the state as
float64, and events are built from Python floats (dp-accounting 0.4.3
mis-composes numpy float32 parameters).
"""

import collections
import dataclasses
import math
from typing import Optional

import dp_accounting
import numpy as np
import tensorflow as tf
import tensorflow_federated as tff

from aggregators import clipping as clipping_lib
from aggregators import common

NOISE_PLACEMENTS = ('server', 'client')
# Grid steps per clip of the secure-sum encoding, and the cohort its int32 sum
# holds exactly (each client adds at most 2K to the shifted sum).
SECURE_LEVELS = 2**15
MAX_SECURE_CLIENTS = 2**31 // (2 * SECURE_LEVELS)
# The count gets at most this share of the privacy budget (in z^-2 terms) when
# clipped_count_stddev is chosen automatically.
_COUNT_BUDGET_SHARE = 0.01


@dataclasses.dataclass(frozen=True)
class AdaptiveClipping:
  """Quantile tracking of the clip (Andrew et al. 2021).

  Attributes:
    target_quantile: gamma, the fraction of clients to leave unclipped, [0, 1].
    learning_rate: eta of the geometric update, >= 0.
    clipped_count_stddev: sigma_b, the noise on the unclipped count. None picks
      max(0.05 n, 5 z): the paper's n/20 where the cohort allows, and small
      cohorts still work, with the count taking at most 1% of z^-2.
  """

  target_quantile: float = 0.5
  learning_rate: float = 0.2
  clipped_count_stddev: Optional[float] = None


def adaptive_noise_split(
    noise_multiplier: float,
    expected_clients_per_round: float,
    clipped_count_stddev: Optional[float] = None,
) -> tuple[float, float]:
  """Splits total z into (z_update, sigma_b) with z^-2 = z_update^-2 + (2 sigma_b)^-2.

  Raises:
    ValueError: if sigma_b is too small to leave any budget for the update.
  """
  if noise_multiplier == 0:
    return 0.0, float(clipped_count_stddev or 0.0)
  if clipped_count_stddev is None:
    clipped_count_stddev = max(
        0.05 * expected_clients_per_round,
        noise_multiplier / (2 * math.sqrt(_COUNT_BUDGET_SHARE)),
    )
  if not 2 * clipped_count_stddev > noise_multiplier:
    raise ValueError(
        f'clipped_count_stddev={clipped_count_stddev:g} leaves no privacy '
        f'budget for the update at noise_multiplier={noise_multiplier:g}: it '
        f'must exceed noise_multiplier / 2 = {noise_multiplier / 2:g}. Raise '
        '--clipped_count_stddev (or leave it unset), or lower '
        '--noise_multiplier.'
    )
  update_noise = (noise_multiplier**-2 - (2 * clipped_count_stddev) ** -2) ** -0.5
  return float(update_noise), float(clipped_count_stddev)


class GaussianFactory(tff.aggregators.UnweightedAggregationFactory):
  """Clips each client update and adds Gaussian noise; see the module docstring.

  The created process averages client values placed at `tff.CLIENTS` into
  `(sum of clipped updates + noise) / expected_clients_per_round` at
  `tff.SERVER`.

  State: `clip` (float32 S), `layer_shares` (float32[m], S_j / S),
  `noise_multiplier` (float64 z_update), `clipped_count_stddev` (float64
  sigma_b, 0 for a fixed clip) and `noise_seed` (int64[2], advanced every
  round).

  Measurements: `clip` (S used this round); `sum_noise_stddev`, the stddev of
  the noise on each coordinate of the sum (server placement: z S; client:
  z S sqrt(participants)); `clipped_count`, finite updates that were scaled;
  `nonfinite_count`, updates replaced by zeros; `unclipped_fraction`, the
  noised b_hat that moved the clip (adaptive) or the exact fraction (fixed).
  """

  def __init__(
      self,
      noise_multiplier: float,
      clip: float,
      expected_clients_per_round: float,
      clipping: clipping_lib.Clipping | str = clipping_lib.Clipping.FLAT,
      adaptive: Optional[AdaptiveClipping] = None,
      noise_placement: str = 'server',
      noise_seed: Optional[int] = None,
      secure_sum: bool = False,
      stacked_users: bool = False,
  ):
    """Initializes the factory.

    Args:
      noise_multiplier: total z >= 0 (split with the count when adaptive).
      clip: the total L2 bound S (the initial one when adaptive), > 0.
      expected_clients_per_round: the constant denominator of the mean, > 0.
      clipping: 'flat', 'per_layer_uniform' or 'per_layer_adaptive'.
      adaptive: adapt S to a quantile of update norms; None keeps S fixed.
      noise_placement: 'server' (central DP) or 'client' (each client noises
        its own update; requires a fixed clip).
      noise_seed: seed of the server's noise stream; None draws one.
      secure_sum: sum the clipped updates and counts with secure sums (server
        noise only).
      stacked_users: each client's value is a stack of users' updates (the
        vectorized engine); each user is clipped, counted and, with client
        noise, noised on its own.

    Raises:
      TypeError: if an argument is not of its type.
      ValueError: if an argument is outside its range or the noise cannot be
        split between update and count.
    """
    self._noise_multiplier = common.check_number(
        noise_multiplier, 'noise_multiplier', 0, strict=False
    )
    self._clip = common.check_number(clip, 'clip', 0, strict=True)
    self._expected_clients_per_round = common.check_number(
        expected_clients_per_round, 'expected_clients_per_round', 0, strict=True
    )
    self._clipping = clipping_lib.Clipping(clipping)
    if noise_placement not in NOISE_PLACEMENTS:
      raise ValueError(
          f'noise_placement must be one of {NOISE_PLACEMENTS}, got '
          f'{noise_placement!r}.'
      )
    self._noise_placement = noise_placement
    self._noise_seed = common.check_seed(noise_seed)
    if not isinstance(secure_sum, bool):
      raise TypeError(f'secure_sum must be a bool, got {secure_sum!r}.')
    if secure_sum and noise_placement == 'client':
      raise ValueError(
          'secure_sum needs noise_placement=server: Gaussian client noise is '
          'continuous and cannot be summed exactly as integers.'
      )
    if secure_sum and 2 * expected_clients_per_round > MAX_SECURE_CLIENTS:
      raise ValueError(
          f'secure_sum sums at most {MAX_SECURE_CLIENTS} clients exactly; '
          f'expected_clients_per_round={expected_clients_per_round} leaves no '
          'margin for larger sampled cohorts.'
      )
    self._secure_sum = secure_sum
    self._stacked_users = common.check_stacked_users(stacked_users)
    if secure_sum and stacked_users:
      raise ValueError(
          'secure_sum cannot aggregate stacked users: a secure sum protects '
          'each user\'s update from everyone else, and a stack puts several '
          'users\' updates in one client.'
      )
    self._adaptive = adaptive
    if adaptive is None:
      self._update_noise, self._count_stddev = self._noise_multiplier, 0.0
    else:
      if noise_placement == 'client':
        raise ValueError(
            'noise_placement=client needs a fixed clip: the clipped count '
            'would be released without noise from each client.'
        )
      common.check_number(
          adaptive.target_quantile, 'target_quantile', 0, strict=False
      )
      if adaptive.target_quantile > 1:
        raise ValueError(
            f'target_quantile must be <= 1, got {adaptive.target_quantile}.'
        )
      common.check_number(
          adaptive.learning_rate, 'learning_rate', 0, strict=False
      )
      if adaptive.clipped_count_stddev is not None:
        common.check_number(
            adaptive.clipped_count_stddev, 'clipped_count_stddev', 0,
            strict=False,
        )
      self._update_noise, self._count_stddev = adaptive_noise_split(
          self._noise_multiplier, self._expected_clients_per_round,
          adaptive.clipped_count_stddev,
      )

  @property
  def update_noise_multiplier(self) -> float:
    """z_update: the noise on the update sum, in units of S."""
    return self._update_noise

  @property
  def clipped_count_stddev(self) -> float:
    """sigma_b (0 for a fixed clip)."""
    return self._count_stddev

  def create(
      self, value_type: tff.types.StructWithPythonType | tff.TensorType
  ) -> tff.templates.AggregationProcess:
    if self._stacked_users:
      value_type = common.unstacked_type(value_type, 'GaussianFactory')
    value_specs = common.float_value_specs(value_type, 'GaussianFactory')
    num_layers = len(tf.nest.flatten(value_specs))
    secure = self._secure_sum
    dimension = sum(spec.shape.num_elements() for spec in tf.nest.flatten(value_specs))
    secure_shrink = (
        (1.0 - math.sqrt(dimension) / (2 * SECURE_LEVELS)) / (1.0 + 1e-6)
    )
    if secure and secure_shrink <= 0.5:
      raise ValueError(
          f'secure_sum: the update has {dimension} values, too many for a grid '
          f'of {SECURE_LEVELS} steps per clip (rounding would use up more than '
          'half of the clip).'
      )
    post_noise_scale = 1.0 / secure_shrink if secure else 1.0
    clipping = self._clipping
    client_noise = self._noise_placement == 'client'
    adaptive = self._adaptive
    denominator = self._expected_clients_per_round

    @tff.tensorflow.computation
    def initial_state():
      return collections.OrderedDict(
          clip=tf.constant(self._clip, tf.float32),
          layer_shares=clipping_lib.uniform_shares(num_layers),
          noise_multiplier=tf.constant(self._update_noise, tf.float64),
          clipped_count_stddev=tf.constant(self._count_stddev, tf.float64),
          noise_seed=common.initial_seed(self._noise_seed),
      )

    state_type = initial_state.type_signature.result

    @tff.tensorflow.computation(state_type)
    def client_params(state):
      return collections.OrderedDict(
          clip=state['clip'],
          layer_shares=state['layer_shares'],
          client_noise_stddev=state['clip']
          * tf.cast(state['noise_multiplier'], tf.float32)
          if client_noise else tf.constant(0.0),
      )

    params_type = client_params.type_signature.result

    def clip_users(norms, is_finite, params):
      scales, unclipped = clipping_lib.clip_scales(
          norms, params['clip'], params['layer_shares'], clipping
      )
      unclipped = tf.logical_and(is_finite, unclipped)
      return scales, collections.OrderedDict(
          clipped=tf.cast(
              tf.logical_and(is_finite, tf.logical_not(unclipped)), tf.int32
          ),
          nonfinite=tf.cast(tf.logical_not(is_finite), tf.int32),
          unclipped=tf.cast(unclipped, tf.int32),
          participants=tf.ones_like(norms[:, 0], tf.int32),
      )

    def add_client_noise(clipped_sums, params, num_users):
      # Unseeded on purpose: a seed broadcast from the server would give
      # every client the same noise, and the server could subtract it. The
      # sum of num_users users' independent noises is one draw with
      # sqrt(num_users) times the stddev.
      stddev = params['client_noise_stddev'] * tf.sqrt(
          tf.cast(num_users, tf.float32))
      return [
          c + tf.random.normal(tf.shape(c), stddev=stddev, dtype=c.dtype)
          for c in clipped_sums
      ]

    client_update = common.client_update_computation(
        clip_users, 2, value_type, params_type, self._stacked_users,
        client_noise_fn=add_client_noise if client_noise else None,
    )
    counts_type = client_update.type_signature.result[1]
    secure_summing = None
    if secure:
      secure_summing = self._secure_summing(
          value_type, value_specs, params_type, state_type, secure_shrink
      )
      counts_type = tff.types.to_type(collections.OrderedDict(
          list(tff.structure.iter_elements(counts_type))
          + [('secure_clipped', tff.TensorType(np.int32))]
      ))

    @tff.tensorflow.computation(value_type, counts_type, state_type)
    def finish_round(value_sum, counts, state):
      seeds = tf.random.experimental.stateless_split(
          state['noise_seed'], num=num_layers + 2
      )
      clip = state['clip']
      update_stddev = clip * tf.cast(state['noise_multiplier'], tf.float32)
      flat_sum = tf.nest.flatten(value_sum)
      if client_noise:
        noised = flat_sum
        sum_noise_stddev = update_stddev * tf.sqrt(
            tf.cast(counts['participants'], tf.float32)
        )
      else:
        noised = [
            s + tf.random.stateless_normal(
                tf.shape(s), seed=seeds[j], stddev=update_stddev, dtype=s.dtype
            )
            for j, s in enumerate(flat_sum)
        ]
        sum_noise_stddev = update_stddev
      mean = [s * post_noise_scale / denominator for s in noised]

      count_noise = tf.random.stateless_normal(
          [], seed=seeds[num_layers],
          stddev=tf.cast(state['clipped_count_stddev'], tf.float32),
      )
      # sum_i (b_i - 1/2): one client moves it by 1/2.
      unclipped_centered = tf.cast(counts['unclipped'], tf.float32) - 0.5 * tf.cast(
          counts['participants'], tf.float32
      )
      unclipped_fraction = tf.clip_by_value(
          (unclipped_centered + count_noise) / denominator + 0.5, 0.0, 1.0,
      )
      if adaptive is None:
        new_clip = clip
      else:
        new_clip = clip * tf.exp(
            -adaptive.learning_rate
            * (unclipped_fraction - adaptive.target_quantile)
        )
      if clipping is clipping_lib.Clipping.PER_LAYER_ADAPTIVE:
        new_shares = clipping_lib.adaptive_shares(mean, state['layer_shares'])
      else:
        new_shares = state['layer_shares']
      new_state = collections.OrderedDict(
          clip=new_clip,
          layer_shares=new_shares,
          noise_multiplier=state['noise_multiplier'],
          clipped_count_stddev=state['clipped_count_stddev'],
          noise_seed=seeds[num_layers + 1],
      )
      measurements = collections.OrderedDict(
          clip=clip,
          sum_noise_stddev=sum_noise_stddev,
          clipped_count=counts['clipped'],
          nonfinite_count=counts['nonfinite'],
          unclipped_fraction=unclipped_fraction,
      )
      if secure:
        measurements['secure_clipped_count'] = counts['secure_clipped']
      return (
          tf.nest.pack_sequence_as(value_specs, mean),
          new_state,
          measurements,
      )

    return common.clip_sum_noise_process(
        initial_state, client_params, client_update, finish_round,
        secure_summing,
    )

  def _secure_summing(
      self, value_type, value_specs, params_type, state_type, shrink: float
  ) -> common.SecureSumming:
    """Integer encoding of clipped updates for `SecureSumFactory`; see above."""
    levels = SECURE_LEVELS
    encoded_type = tff.types.to_type(tf.nest.map_structure(
        lambda spec: tff.TensorType(np.int32, spec.shape), value_specs
    ))

    @tff.tensorflow.computation(value_type, params_type)
    def encode(clipped, params):
      # In float64, so rounding is the only error of the grid.
      step = tf.cast(levels * shrink, tf.float64) / tf.cast(
          params['clip'], tf.float64
      )
      return tf.nest.map_structure(
          lambda t: tf.cast(tf.round(tf.cast(t, tf.float64) * step), tf.int32),
          clipped,
      )

    sum_factory = tff.aggregators.SecureSumFactory(
        upper_bound_threshold=levels, lower_bound_threshold=-levels
    )
    measurements_type = (
        sum_factory.create(encoded_type)
        .next.type_signature.result.measurements.member
    )

    @tff.tensorflow.computation(encoded_type, measurements_type, state_type)
    def decode(encoded_sum, measurements, state):
      unit = state['clip'] / levels
      value_sum = tf.nest.map_structure(
          lambda t: tf.cast(t, tf.float32) * unit, encoded_sum
      )
      clipped = (
          measurements['secure_upper_clipped_count']
          + measurements['secure_lower_clipped_count']
      )
      return value_sum, clipped

    return common.SecureSumming(
        encode=encode,
        value_factory=sum_factory,
        count_factory=tff.aggregators.SecureSumFactory(
            upper_bound_threshold=1, lower_bound_threshold=0
        ),
        decode=decode,
    )


def composed_event(
    update_noise_multiplier: float, clipped_count_stddev: float
) -> dp_accounting.DpEvent:
  """One central round: the update sum, and the count when it is noised."""
  update = dp_accounting.GaussianDpEvent(float(update_noise_multiplier))
  if clipped_count_stddev == 0:
    return update
  return dp_accounting.ComposedDpEvent(
      [update, dp_accounting.GaussianDpEvent(2.0 * float(clipped_count_stddev))]
  )


def round_dp_event(
    noise_multiplier: float,
    expected_clients_per_round: float = 1.0,
    adaptive: Optional[AdaptiveClipping] = None,
) -> dp_accounting.DpEvent:
  """One central round for total noise multiplier z, before sampling."""
  if adaptive is None:
    return composed_event(noise_multiplier, 0.0)
  return composed_event(*adaptive_noise_split(
      float(noise_multiplier), expected_clients_per_round,
      adaptive.clipped_count_stddev,
  ))


def dp_event_from_state(state) -> dp_accounting.DpEvent:
  """The central per-round DpEvent of a `GaussianFactory` process state.

  Args:
    state: the state of the aggregation process (for a `tff.learning` process,
      `learning_state.aggregator`).

  Returns:
    The event with Python-float parameters, before sampling.
  """
  return composed_event(
      float(state['noise_multiplier']), float(state['clipped_count_stddev'])
  )


def local_dp_event_from_state(state) -> dp_accounting.DpEvent:
  """Client placement: one participating client's message, replace-one."""
  return dp_accounting.GaussianDpEvent(float(state['noise_multiplier']) / 2.0)
