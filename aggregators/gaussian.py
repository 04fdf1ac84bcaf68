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

* Secure sum (`secure_gaussian`: the inner aggregation
  `secure_encoding.GridSecureSum`). The clipped updates and the counts reach
  the server only as secure sums of an integer encoding whose decoded sum
  still has L2 sensitivity S (see `aggregators.secure_encoding`), so the
  server never sees one client's update; it adds the noise to the sum as
  above, and the event is the same as without the secure sum.

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

from aggregators import checks
from aggregators import clipping as clipping_lib
from aggregators import noise_seeds
from aggregators import registry
from aggregators import robust
from aggregators import secure_encoding
from aggregators import skeleton
from dp_fedavg import accounting

NOISE_PLACEMENTS = ('server', 'client')
CLIPPINGS = tuple(c.value for c in clipping_lib.Clipping)
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

  def next_clip(self, clip: tf.Tensor, unclipped_fraction: tf.Tensor):
    """S exp(-eta (b_hat - gamma)): the clip moved toward the quantile."""
    return clip * tf.exp(
        -self.learning_rate * (unclipped_fraction - self.target_quantile))


def noised_unclipped_fraction(counts, count_noise: tf.Tensor,
                              denominator: float) -> tf.Tensor:
  """b_hat = clip((sum_i (b_i - 1/2) + noise) / n + 1/2, 0, 1), from the
  counts' `unclipped` and `participants` sums."""
  # sum_i (b_i - 1/2): one client moves it by 1/2.
  unclipped_centered = tf.cast(counts['unclipped'], tf.float32) - 0.5 * tf.cast(
      counts['participants'], tf.float32
  )
  return tf.clip_by_value(
      (unclipped_centered + count_noise) / denominator + 0.5, 0.0, 1.0,
  )


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
  round); with centered clipping (central, or the server rule) `center`
  (float32[D], the previous round's result, flattened); and the inner
  aggregation's own fields (`byzantine_count` for a simulated attack, also
  measured).

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
      record_aggregation: Optional[skeleton.RecordAggregation] = None,
      stacked_users: bool = False,
      centered: bool = False,
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
      record_aggregation: how the clipped updates and counts reach the server;
        None is a plain sum (`skeleton.PlainSum`). A secure one
        (`secure_encoding.GridSecureSum`) takes server noise only.
      stacked_users: each client's value is a stack of users' updates (the
        vectorized engine); each user is clipped, counted and, with client
        noise, noised on its own.
      centered: centered clipping with central DP (`aggregators.robust`):
        every client clips its update's difference from the previous round's
        released mean, and the server adds it back. Needs a fixed clip and
        server noise.

    Raises:
      TypeError: if an argument is not of its type.
      checks.ArgumentError: if an argument is outside its range.
      checks.UnsupportedError: if arguments cannot go together.
      ValueError: if the noise cannot be split between update and count.
    """
    self._noise_multiplier = checks.check_number(
        noise_multiplier, 'noise_multiplier', 0, strict=False
    )
    self._clip = checks.check_number(clip, 'clip', 0, strict=True)
    self._expected_clients_per_round = checks.check_number(
        expected_clients_per_round, 'expected_clients_per_round', 0, strict=True
    )
    if isinstance(clipping, clipping_lib.Clipping):
      clipping = clipping.value
    self._clipping = clipping_lib.Clipping(
        checks.check_choice(clipping, 'clipping', CLIPPINGS)
    )
    self._noise_placement = checks.check_choice(
        noise_placement, 'noise_placement', NOISE_PLACEMENTS
    )
    self._noise_seed = checks.check_seed(noise_seed)
    self._records = record_aggregation or skeleton.PlainSum()
    if not isinstance(self._records, skeleton.RecordAggregation):
      raise TypeError(
          'record_aggregation must be a skeleton.RecordAggregation, got '
          f'{record_aggregation!r}.'
      )
    if not self._records.sums and noise_placement == 'server':
      raise checks.UnsupportedError(
          'server noise is calibrated to the sensitivity of a sum of clipped '
          f'updates; {type(self._records).__name__} is not a sum (with '
          'noise_placement=client the clients noise their own updates).'
      )
    if self._records.secure and noise_placement == 'client':
      raise checks.UnsupportedError(
          'a secure sum needs noise_placement=server: Gaussian client noise is '
          'continuous and cannot be summed exactly as integers.'
      )
    self._records.check_cohort(self._expected_clients_per_round)
    self._stacked_users = checks.check_bool(stacked_users, 'stacked_users')
    if self._records.secure and stacked_users:
      raise checks.UnsupportedError(
          'a secure sum cannot aggregate stacked users: it protects each '
          'user\'s update from everyone else, and a stack puts several users\' '
          'updates in one client.'
      )
    self._centered = checks.check_bool(centered, 'centered')
    if centered and (noise_placement == 'client' or adaptive is not None):
      raise checks.UnsupportedError(
          'centered clipping in its central-DP form needs server noise and a '
          'fixed clip (with client noise the server applies the '
          'centered_clipping rule to the noised records).'
      )
    self._adaptive = adaptive
    if adaptive is None:
      self._update_noise, self._count_stddev = self._noise_multiplier, 0.0
    else:
      if noise_placement == 'client':
        raise checks.UnsupportedError(
            'noise_placement=client needs a fixed clip: the clipped count '
            'would be released without noise from each client.'
        )
      checks.check_number(
          adaptive.target_quantile, 'target_quantile', 0, strict=False,
          maximum=1,
      )
      checks.check_number(
          adaptive.learning_rate, 'learning_rate', 0, strict=False
      )
      if adaptive.clipped_count_stddev is not None:
        checks.check_number(
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
      value_type = skeleton.unstacked_type(value_type, 'GaussianFactory')
    value_specs = skeleton.float_value_specs(value_type, 'GaussianFactory')
    num_layers = len(tf.nest.flatten(value_specs))
    records = self._records
    post_noise_scale = records.post_noise_scale(value_type)
    clipping = self._clipping
    client_noise = self._noise_placement == 'client'
    adaptive = self._adaptive
    denominator = self._expected_clients_per_round
    centered = self._centered
    dimension = skeleton.flat_dimension(value_type)
    # The previous release: the centre of centered clipping, on the clients
    # (central DP) or in the server's rule.
    keeps_center = centered or records.reads_center

    @tff.tensorflow.computation
    def initial_state():
      state = collections.OrderedDict(
          clip=tf.constant(self._clip, tf.float32),
          layer_shares=clipping_lib.uniform_shares(num_layers),
          noise_multiplier=tf.constant(self._update_noise, tf.float64),
          clipped_count_stddev=tf.constant(self._count_stddev, tf.float64),
          noise_seed=noise_seeds.initial_seed(self._noise_seed),
      )
      if keeps_center:
        state['center'] = tf.zeros([dimension], tf.float32)
      state.update(records.state_fields())
      return state

    state_type = initial_state.type_signature.result

    @tff.tensorflow.computation(state_type)
    def client_params(state):
      params = collections.OrderedDict(
          clip=state['clip'],
          layer_shares=state['layer_shares'],
          client_noise_stddev=state['clip']
          * tf.cast(state['noise_multiplier'], tf.float32)
          if client_noise else tf.constant(0.0),
      )
      if centered:
        params['center'] = state['center']
      return params

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

    client_step = skeleton.ClientStep(
        clip_users, 2, value_type, params_type, self._stacked_users,
        client_noise_fn=add_client_noise if client_noise else None,
        centered=centered,
    )
    client_update = client_step.computation(gather=records.gathers)
    counts_type = records.counts_type(client_update.type_signature.result[1])
    reports_secure_clipped = 'secure_clipped' in dict(
        tff.structure.iter_elements(counts_type)
    )
    aggregate_type = (
        tff.TensorType(np.float32, [dimension]) if records.gathers
        else value_type
    )
    record_fields = list(records.state_fields())

    @tff.tensorflow.computation(aggregate_type, counts_type, state_type)
    def finish_round(value_sum, counts, state):
      if records.gathers:
        value_sum = skeleton.unflatten(value_sum, value_specs)
      seeds = tf.random.experimental.stateless_split(
          state['noise_seed'], num=num_layers + 2
      )
      clip = state['clip']
      update_stddev = clip * tf.cast(state['noise_multiplier'], tf.float32)
      flat_sum = tf.nest.flatten(value_sum)
      # An aggregate that is not a sum follows client noise only (refused
      # otherwise in __init__).
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
      if records.sums:
        mean = [s * post_noise_scale / denominator for s in noised]
      else:  # Already the round's estimate of the mean.
        mean = noised
      if centered:
        # The clients clipped their differences from the centre.
        centers = tf.nest.flatten(
            skeleton.unflatten(state['center'], value_specs))
        mean = [m + c for m, c in zip(mean, centers)]

      count_noise = tf.random.stateless_normal(
          [], seed=seeds[num_layers],
          stddev=tf.cast(state['clipped_count_stddev'], tf.float32),
      )
      unclipped_fraction = noised_unclipped_fraction(
          counts, count_noise, denominator)
      if adaptive is None:
        new_clip = clip
      else:
        new_clip = adaptive.next_clip(clip, unclipped_fraction)
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
      if keeps_center:
        new_state['center'] = tf.concat(
            [tf.reshape(m, [-1]) for m in mean], axis=0)
      for name in record_fields:
        new_state[name] = state[name]
      measurements = collections.OrderedDict(
          clip=clip,
          sum_noise_stddev=sum_noise_stddev,
          clipped_count=counts['clipped'],
          nonfinite_count=counts['nonfinite'],
          unclipped_fraction=unclipped_fraction,
      )
      if reports_secure_clipped:
        measurements['secure_clipped_count'] = counts['secure_clipped']
      if 'byzantine_count' in record_fields:
        measurements['byzantine_count'] = state['byzantine_count']
      return (
          tf.nest.pack_sequence_as(value_specs, mean),
          new_state,
          measurements,
      )

    return skeleton.clip_aggregate_finish_process(
        initial_state, client_params, client_step, finish_round, records
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


def local_round_dp_event(noise_multiplier: float) -> dp_accounting.DpEvent:
  """Client placement: one participating client's message, replace-one
  (sensitivity 2 S for noise z S)."""
  return dp_accounting.GaussianDpEvent(float(noise_multiplier) / 2.0)


def local_dp_event_from_state(state) -> dp_accounting.DpEvent:
  """`local_round_dp_event` of a client-noise `GaussianFactory` state."""
  return local_round_dp_event(float(state['noise_multiplier']))



# The registry's entries: gaussian_fixed, gaussian_adaptive, secure_gaussian.
_CLIPPING_HELP = (
    f'One of {CLIPPINGS} (per layer: each tensor of the update gets its share '
    'of the total bound).'
)


@dataclasses.dataclass(frozen=True)
class GaussianFixedParams:
  """gaussian_fixed: the Gaussian mechanism with a fixed clip."""

  noise_multiplier: float = registry.parameter(1.0, registry.NOISE_MULTIPLIER_HELP)
  clip: float = registry.parameter(1.0, registry.CLIP_HELP)
  clipping: str = registry.parameter('flat', _CLIPPING_HELP)
  noise_placement: str = registry.parameter(
      'server',
      f'One of {NOISE_PLACEMENTS}. server: central DP; client: every client '
      'adds the full noise to its own update (local DP, epsilon per client '
      'taking part in every round).')


ADAPTIVE_HELP = dict(
    initial_clip=(0.5, 'The clip of round 1 (adaptive).'),
    target_quantile=(
        0.5, 'gamma: fraction of client updates to leave unclipped (adaptive).'),
    clip_learning_rate=(0.2, 'eta of the geometric clip update (adaptive).'),
    clipped_count_stddev=(
        None, 'sigma_b: noise stddev on the unclipped count (adaptive); unset '
        'picks max(0.05 * clients_per_round, 5 * noise_multiplier).'),
)


ADAPTIVE_CLIP_HELP = (
    'Adapt the clip to --target_quantile as gaussian_adaptive does (from '
    '--initial_clip; dp_ftrl_tree changes it only when its tree restarts); '
    'otherwise the clip is --clip.'
)


def adaptive_field(name: str):
  """A fresh field (dataclasses take each field object once)."""
  return registry.parameter(*ADAPTIVE_HELP[name])


@dataclasses.dataclass(frozen=True)
class GaussianAdaptiveParams:
  """gaussian_adaptive: the clip follows a quantile of the update norms."""

  noise_multiplier: float = registry.parameter(1.0, registry.NOISE_MULTIPLIER_HELP)
  initial_clip: float = adaptive_field('initial_clip')
  target_quantile: float = adaptive_field('target_quantile')
  clip_learning_rate: float = adaptive_field('clip_learning_rate')
  clipped_count_stddev: Optional[float] = adaptive_field('clipped_count_stddev')
  clipping: str = registry.parameter('flat', _CLIPPING_HELP)


@dataclasses.dataclass(frozen=True)
class SecureGaussianParams:
  """secure_gaussian: server noise on a secure sum, fixed or adaptive clip."""

  noise_multiplier: float = registry.parameter(1.0, registry.NOISE_MULTIPLIER_HELP)
  clip: float = registry.parameter(1.0, 'L2 norm bound S (a fixed clip).')
  clipping: str = registry.parameter('flat', _CLIPPING_HELP)
  adaptive_clip: bool = registry.parameter(False, ADAPTIVE_CLIP_HELP)
  initial_clip: float = adaptive_field('initial_clip')
  target_quantile: float = adaptive_field('target_quantile')
  clip_learning_rate: float = adaptive_field('clip_learning_rate')
  clipped_count_stddev: Optional[float] = adaptive_field('clipped_count_stddev')


def _adaptive_of(params) -> Optional[AdaptiveClipping]:
  """The quantile tracking of `params`; None for a fixed clip."""
  if isinstance(params, GaussianFixedParams) or (
      isinstance(params, SecureGaussianParams) and not params.adaptive_clip
  ):
    return None
  return AdaptiveClipping(
      target_quantile=params.target_quantile,
      learning_rate=params.clip_learning_rate,
      clipped_count_stddev=params.clipped_count_stddev,
  )


def _build(params, setting: registry.Setting) -> GaussianFactory:
  adaptive = _adaptive_of(params)
  secure = isinstance(params, SecureGaussianParams)
  placement = getattr(params, 'noise_placement', 'server')
  records = secure_encoding.GridSecureSum() if secure else None
  centered = False
  if setting.robust:
    robust_records, centered = robust.gaussian_composition(
        setting.robustness, client_noise=placement == 'client', secure=secure,
        adaptive=adaptive is not None,
    )
    records = robust_records or records
  return GaussianFactory(
      noise_multiplier=params.noise_multiplier,
      clip=params.clip if adaptive is None else params.initial_clip,
      expected_clients_per_round=setting.expected_clients_per_round,
      clipping=params.clipping,
      adaptive=adaptive,
      noise_placement=placement,
      noise_seed=setting.noise_seed,
      record_aggregation=records,
      stacked_users=setting.stacked_users,
      centered=centered,
  )


def _ledger(params, setting: registry.Setting) -> accounting.MechanismLedger:
  if getattr(params, 'noise_placement', 'server') == 'client':
    return accounting.LocalRounds(
        local_round_dp_event(params.noise_multiplier), local_dp_event_from_state
    )
  return accounting.SampledRounds(
      round_dp_event(
          params.noise_multiplier, setting.expected_clients_per_round,
          _adaptive_of(params),
      ),
      dp_event_from_state,
  )


def _argument_names(params) -> dict[str, str]:
  names = {'learning_rate': 'clip_learning_rate'}
  if _adaptive_of(params) is not None:
    names['clip'] = 'initial_clip'
  return names


_NOISE = registry.NoiseParameter('noise_multiplier')
registry.register(registry.Mechanism(
    name='gaussian_fixed',
    summary='Gaussian noise on the sum of updates clipped to --clip',
    params_type=GaussianFixedParams, build_factory=_build,
    build_ledger=_ledger, noise=_NOISE, argument_names=_argument_names,
    robust=True,
))
registry.register(registry.Mechanism(
    name='gaussian_adaptive',
    summary='Gaussian noise, the clip adapted to --target_quantile of the norms',
    params_type=GaussianAdaptiveParams, build_factory=_build,
    build_ledger=_ledger, noise=_NOISE, argument_names=_argument_names,
))
registry.register(registry.Mechanism(
    name='secure_gaussian',
    summary='Gaussian server noise on a secure sum of the clipped updates',
    params_type=SecureGaussianParams, build_factory=_build,
    build_ledger=_ledger, noise=_NOISE, secure_sums=True,
    argument_names=_argument_names, robust=True,
))
