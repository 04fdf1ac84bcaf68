"""Distributed DP: clients add discrete noise, the server sees a secure sum.

Kairouz, Liu & Steinke 2021 ("The Distributed Discrete Gaussian Mechanism for
Federated Learning with Secure Aggregation", KLS21) and Agarwal, Kairouz & Liu
2021 ("The Skellam Mechanism for Differentially Private Federated Learning").

Each round, every one of the n clients:
1. clips its update to L2 norm c (non-finite updates become zeros), flattens
   it and pads it with zeros to d = 2^k values;
2. rotates it with the randomized Hadamard transform H D (D: random signs from
   the round's public seed). H D is orthonormal, so the norm stays <= c, and
   the coordinates become roughly equal in size, which makes rounding and
   modular wrapping behave;
3. scales it by s and rounds it to integers with conditional stochastic
   rounding: rounding is redrawn until the integer vector's norm is at most
   Delta2 = s * inflated_l2_norm_bound(c, 1/s, beta, d) (KLS21 Theorem 1);
   beta = 0 rounds once, and the bound then holds for every draw;
4. adds its share of noise, integer-valued with variance (z c s)^2 / n:
   discrete Gaussian or Skellam (the difference of two Poissons);
5. reduces the result modulo 2^bits; the vectors are summed with
   `tff.aggregators.SecureModularSumFactory`.
The server maps the modular sum back to [-2^(bits-1), 2^(bits-1)), divides by
s, undoes the rotation, drops the padding and divides by n (the expected
clients per round). Modular reduction is exact as long as the true noisy sum
lies in that range; s is chosen (KLS21 Section 4.4) so that each coordinate
of the sum leaves it with probability at most `modclip_prob` under a
sub-Gaussian model of the rotated sum. A wrapped coordinate is a utility
loss, not a privacy one: the sum modulo 2^bits is a function of the noisy sum.

Privacy guarantee, per round, under replace-one-client adjacency with exactly
n clients each adding noise: the release is a function of the sum of the
integer vectors plus the sum of the n noise shares. Each client's integer
vector has L2 norm <= Delta2 and, being integers, L1 norm <= Delta1 =
min(Delta2^2, sqrt(d) Delta2); replacing one client moves the sum by at most
2 Delta2 (L2) and 2 Delta1 (L1). With local variance v = (z c s)^2 / n:
* discrete Gaussian (KLS21 Proposition 14 with Theorem 1's tau): for
  l2 = 2 Delta2 / sqrt(n v), l1 = 2 Delta1 / sqrt(n v) and
  tau = 10 sum_{k=1}^{n-1} exp(-2 pi^2 v k / (k + 1)), the round is
  (alpha, eps(alpha))-RDP with eps(alpha) = min(alpha/2 l2^2 + tau d,
  alpha/2 (l2^2 + 2 l1 tau + tau^2 d), alpha/2 (l2 + sqrt(d) tau)^2);
* Skellam (Agarwal et al. 2021, Theorem 3.5, with total variance V = n v):
  eps(alpha) = alpha D2^2 / (2V) + min(((2 alpha - 1) D2^2 + 6 D1) / (4 V^2),
  3 D1 / (2V)) for D2 = 2 Delta2, D1 = 2 Delta1.
`DistributedDpEvent` carries these quantities and computes eps(alpha); the
accountant (`dp_fedavg.accounting`) applies sampling without replacement of
n of N clients with the general RDP bound of Wang, Balle & Kasiviswanathan
2019 (Theorem 9) and composes the rounds. Rounding slack is inside Delta2;
modular wrapping costs no privacy (above).

Trust: the server is honest but curious and follows the protocol; secure
aggregation shows it only the modular sum. The guarantee needs the noise
shares: a client that drops out after being sampled (`--dropout_rate`)
sends no share, and neither do clients colluding with the server (they
reveal theirs). With dropout tolerance t each share has variance
(z c s)^2 / (n (1 - t)), so that any m >= (1 - t) n shares still sum to at
least the stated variance (z c s)^2. The round's event is that of the
shares that did arrive: total variance m v, and tau over those m clients
(`dp_event_from_state(state, reporting=m)`); with fewer than (1 - t) n of
them it is weaker than stated, and that weaker event is what the ledger
composes. Collusion is not modelled.
"""

import collections
import dataclasses
import math
from typing import Optional

import attr
import dp_accounting
import numpy as np
from scipy import special
import tensorflow as tf
import tensorflow_federated as tff
# TFF's building blocks of its own DistributedDpSumFactory, which it does not
# export. That factory itself is not used: it emits UnsupportedDpEvent (no
# epsilon), and inside build_unweighted_fed_avg it failed here with a protobuf
# DecodeError; so this module composes the pieces in one client computation.
from tensorflow_federated.python.aggregators import discretization
from tensorflow_federated.python.aggregators import hadamard
from tensorflow_privacy.privacy.dp_query import discrete_gaussian_utils

from aggregators import checks
from aggregators import noise_seeds
from aggregators import registry
from aggregators import secure_encoding
from aggregators import skeleton
from dp_fedavg import accounting

MECHANISMS = ('ddgauss', 'skellam')
MIN_BITS, MAX_BITS = 2, 30


def _padded_dimension(dimension: int) -> int:
  return 2 ** math.ceil(math.log2(max(dimension, 1)))


def modclip_stddevs(modclip_prob: float) -> float:
  """k with P(|N(0, 1)| > k) = modclip_prob."""
  return math.sqrt(2) * special.erfcinv(modclip_prob)


def scale_for_bits(
    bits: int,
    clip: float,
    noise_multiplier: float,
    clients: float,
    padded_dimension: int,
    modclip_prob: float,
) -> Optional[float]:
  """s that keeps k stddevs of each coordinate of the sum within 2^bits.

  KLS21 Section 4.4: in the integer domain a coordinate of the sum has
  variance at most s^2 c^2 n^2 / d (the rotated signal, all clients aligned)
  + n / 4 (rounding) + s^2 z^2 c^2 (noise); k of its stddevs must fit in
  2^(bits-1), so s = sqrt(4^bits - n k^2) / (2 k sqrt(c^2 n^2 / d + z^2 c^2)).
  Returns None if no s fits.
  """
  k = modclip_stddevs(modclip_prob)
  room = 2.0 ** (2 * bits) - clients * k**2
  if room <= 0:
    return None
  signal_and_noise = (
      clip**2 * clients**2 / padded_dimension + (noise_multiplier * clip) ** 2
  )
  return math.sqrt(room) / (2 * k * math.sqrt(signal_and_noise))


def _bits_suffice(bits, clip, noise_multiplier, clients, padded_dimension,
                  modclip_prob) -> bool:
  scale = scale_for_bits(
      bits, clip, noise_multiplier, clients, padded_dimension, modclip_prob
  )
  # The grid must be finer than the updates: with s c < sqrt(d) a typical
  # rotated coordinate (c / sqrt(d)) is below one grid step, rounding
  # dominates the signal and inflates the sensitivity.
  return scale is not None and scale * clip >= math.sqrt(padded_dimension)


def check_bits(
    bits: int,
    clip: float,
    noise_multiplier: float,
    clients: float,
    dimension: int,
    modclip_prob: float,
) -> None:
  """Raises ValueError, naming the bits that would do, if `bits` is too few."""
  padded = _padded_dimension(dimension)
  args = (clip, noise_multiplier, clients, padded, modclip_prob)
  if _bits_suffice(bits, *args):
    return
  enough = next(
      (b for b in range(bits + 1, MAX_BITS + 1) if _bits_suffice(b, *args)),
      None,
  )
  advice = (
      f'bits={enough} would suffice' if enough is not None
      else f'no bits up to {MAX_BITS} suffice; lower the clients per round'
  )
  raise ValueError(
      f'bits={bits} is too small for {clients:g} clients per round, clip '
      f'{clip:g}, noise multiplier {noise_multiplier:g} and {dimension} values '
      f'(padded to {padded}): keeping the sum within 2^{bits} with overflow '
      f'probability {modclip_prob:g} per coordinate needs a grid coarser than '
      f'the updates; {advice}.'
  )


def inflated_l2_bound(
    clip: float, scale: float, beta: float, padded_dimension: int
) -> float:
  """Delta2: the integer vector's L2 bound after conditional rounding.

  KLS21 Theorem 1, as `discretization.inflated_l2_norm_bound` computes it,
  in float64, plus leeway for the float32 norm check during rounding.
  """
  gamma_sqrt_d = math.sqrt(padded_dimension) / scale
  bound = clip + gamma_sqrt_d
  if beta > 0:
    squared = (
        clip**2 + 0.25 * gamma_sqrt_d**2
        + math.sqrt(2 * math.log(1 / beta)) / scale * (clip + 0.5 * gamma_sqrt_d)
    )
    bound = min(bound, math.sqrt(squared))
  return scale * bound * (1 + 1e-5) + 1e-3


@attr.s(frozen=True, slots=True, auto_attribs=True)
class DistributedDpEvent(dp_accounting.DpEvent):
  """One round of distributed discrete noise on a sum of integer vectors.

  Attributes (integer domain, one client's vector, before sampling):
    mechanism: 'ddgauss' or 'skellam'.
    l2_sensitivity: Delta2, the L2 bound of one client's vector.
    l1_sensitivity: Delta1.
    local_variance: v, the noise variance each client adds per coordinate.
    num_clients: n, the clients adding noise.
    dimension: d, the (padded) vector length.
    replace_one: whether the bounds are already doubled for replace-one.
  """

  mechanism: str
  l2_sensitivity: float
  l1_sensitivity: float
  local_variance: float
  num_clients: int
  dimension: int
  replace_one: bool = False

  def for_replace_one(self) -> 'DistributedDpEvent':
    if self.replace_one:
      return self
    return attr.evolve(
        self, l2_sensitivity=2 * self.l2_sensitivity,
        l1_sensitivity=2 * self.l1_sensitivity, replace_one=True,
    )

  def adds_no_noise(self) -> bool:
    return self.local_variance == 0

  def rdp(self, order: int) -> float:
    """eps(order) of one unsampled round; see the module docstring."""
    if self.local_variance == 0:
      return math.inf
    total_variance = self.num_clients * self.local_variance
    d2, d1 = self.l2_sensitivity, self.l1_sensitivity
    if self.mechanism == 'skellam':
      return order * d2**2 / (2 * total_variance) + min(
          ((2 * order - 1) * d2**2 + 6 * d1) / (4 * total_variance**2),
          3 * d1 / (2 * total_variance),
      )
    tau = 10 * sum(
        math.exp(-2 * math.pi**2 * self.local_variance * k / (k + 1))
        for k in range(1, self.num_clients)
    )
    l2 = d2 / math.sqrt(total_variance)
    l1 = d1 / math.sqrt(total_variance)
    dim = self.dimension
    return min(
        order / 2 * l2**2 + tau * dim,
        order / 2 * (l2**2 + 2 * l1 * tau + tau**2 * dim),
        order / 2 * (l2 + math.sqrt(dim) * tau) ** 2,
    )


class DistributedDpFactory(tff.aggregators.UnweightedAggregationFactory):
  """Clients clip, rotate, discretize and noise; a secure modular sum; see above.

  The created process averages client values into
  (decoded noisy sum) / expected_clients_per_round at the server.

  State: `rotation_seed` (int64[2], public, advanced every round) and the
  round's constants for accounting (float64): `l2_sensitivity`,
  `l1_sensitivity`, `local_variance`, `num_clients`, `dimension`, `skellam`
  (1 for Skellam, 0 for discrete Gaussian).

  Measurements: `clip`; `scale` (s); `sum_noise_stddev`, the stddev of the
  summed noise in update units (z c, or more where the discrete Gaussian's
  integer scale rounds up); `clipped_count` and `nonfinite_count` (securely
  summed).
  """

  def __init__(
      self,
      noise_multiplier: float,
      clip: float,
      expected_clients_per_round: int,
      bits: int = 16,
      mechanism: str = 'ddgauss',
      beta: float = math.exp(-0.5),
      modclip_prob: float = 1e-6,
      rotation_seed: Optional[int] = None,
      stacked_users: bool = False,
      dropout_tolerance: float = 0.0,
  ):
    """Initializes the factory.

    Args:
      noise_multiplier: z >= 0, the total noise stddev on the sum in units of
        the clip; each client adds variance (z c s)^2 / n.
      clip: c > 0, the L2 bound of one client's update.
      expected_clients_per_round: n >= 1, the clients adding noise each round
        (use fixed-size sampling so that exactly n take part).
      bits: the secure sum's bit width, in [2, 30].
      mechanism: 'ddgauss' or 'skellam'.
      beta: conditional rounding parameter in [0, 1).
      modclip_prob: the per-coordinate probability, in (0, 1), that the sum
        overflows 2^bits; it sets the scale s.
      rotation_seed: seed of the public rotations; None draws one.
      stacked_users: refused (True): each user must round and noise its own
        update inside the secure sum.
      dropout_tolerance: t in [0, 1): each client adds variance
        (z c s)^2 / (n (1 - t)), so that with up to t n of the n clients
        missing the sum still holds (z c s)^2 (see the module docstring).

    Raises:
      TypeError, checks.ArgumentError: an argument outside its type or range.
      checks.UnsupportedError: stacked users.
    """
    self._noise_multiplier = checks.check_number(
        noise_multiplier, 'noise_multiplier', 0, strict=False
    )
    self._clip = checks.check_number(clip, 'clip', 0, strict=True)
    if isinstance(expected_clients_per_round, bool) or not isinstance(
        expected_clients_per_round, (int, np.integer)
    ) or expected_clients_per_round < 1:
      raise ValueError(
          'expected_clients_per_round must be an integer >= 1 (the clients '
          f'sharing the noise), got {expected_clients_per_round!r}.'
      )
    self._clients = int(expected_clients_per_round)
    self._bits = checks.check_integer(bits, 'bits', MIN_BITS, MAX_BITS)
    self._mechanism = checks.check_choice(mechanism, 'mechanism', MECHANISMS)
    self._beta = checks.check_number(
        beta, 'beta', 0, strict=False, maximum=1, strict_maximum=True
    )
    self._modclip_prob = checks.check_number(
        modclip_prob, 'modclip_prob', 0, strict=True, maximum=1,
        strict_maximum=True,
    )
    self._rotation_seed = checks.check_seed(rotation_seed)
    self._dropout_tolerance = checks.check_number(
        dropout_tolerance, 'dropout_tolerance', 0, strict=False, maximum=1,
        strict_maximum=True)
    # The noise on the sum when every client reports, in units of the clip:
    # what sizes the modular sum.
    self._full_noise_multiplier = self._noise_multiplier / math.sqrt(
        1 - self._dropout_tolerance)
    if checks.check_bool(stacked_users, 'stacked_users'):
      raise checks.UnsupportedError(
          'a secure sum cannot aggregate stacked users: each user rounds and '
          'noises its own update, and a stack puts several users\' updates '
          'in one client.'
      )

  def parameters(self, dimension: int) -> dict[str, float]:
    """Scale, padded dimension, sensitivities and local variance for `dimension`.

    Raises:
      ValueError: if `bits` is too few for `dimension` values (see
        `check_bits`).
    """
    check_bits(
        self._bits, self._clip, self._full_noise_multiplier, self._clients,
        dimension, self._modclip_prob,
    )
    padded = _padded_dimension(dimension)
    scale = scale_for_bits(
        self._bits, self._clip, self._full_noise_multiplier, self._clients,
        padded, self._modclip_prob,
    )
    l2 = inflated_l2_bound(self._clip, scale, self._beta, padded)
    local_stddev = (
        self._full_noise_multiplier * self._clip * scale
        / math.sqrt(self._clients)
    )
    if self._mechanism == 'ddgauss':
      # tensorflow-privacy's exact sampler takes integer scales; rounding up
      # only adds noise (as its DistributedDiscreteGaussianSumQuery does).
      local_stddev = math.ceil(local_stddev)
    return dict(
        scale=scale,
        padded_dimension=padded,
        l2_sensitivity=l2,
        l1_sensitivity=min(l2**2, math.sqrt(padded) * l2),
        local_stddev=local_stddev,
        local_variance=local_stddev**2,
    )

  def create(
      self, value_type: tff.types.StructWithPythonType | tff.TensorType
  ) -> tff.templates.AggregationProcess:
    value_specs = skeleton.float_value_specs(value_type, 'DistributedDpFactory')
    flat_specs = tf.nest.flatten(value_specs)
    sizes = [spec.shape.num_elements() for spec in flat_specs]
    dimension = sum(sizes)
    params = self.parameters(dimension)
    scale, padded = params['scale'], params['padded_dimension']
    modulus = 2**self._bits
    clip, beta, mechanism = self._clip, self._beta, self._mechanism
    local_stddev = params['local_stddev']
    sum_noise_stddev = math.sqrt(self._clients) * local_stddev / scale
    denominator = float(self._clients)

    @tff.tensorflow.computation
    def initial_state():
      return collections.OrderedDict(
          rotation_seed=noise_seeds.initial_seed(self._rotation_seed),
          l2_sensitivity=tf.constant(params['l2_sensitivity'], tf.float64),
          l1_sensitivity=tf.constant(params['l1_sensitivity'], tf.float64),
          local_variance=tf.constant(params['local_variance'], tf.float64),
          num_clients=tf.constant(self._clients, tf.float64),
          dimension=tf.constant(padded, tf.float64),
          skellam=tf.constant(float(mechanism == 'skellam'), tf.float64),
      )

    state_type = initial_state.type_signature.result

    @tff.tensorflow.computation(state_type)
    def client_params(state):
      return collections.OrderedDict(rotation_seed=state['rotation_seed'])

    params_type = client_params.type_signature.result

    def signs(seed):
      return tf.where(
          tf.random.stateless_uniform([padded], seed=seed) < 0.5, -1.0, 1.0
      )

    @tff.tensorflow.computation(value_type, params_type)
    def client_update(value, params):
      flat = tf.concat(
          [tf.reshape(t, [-1]) for t in tf.nest.flatten(value)], axis=0
      )
      is_finite = tf.reduce_all(tf.math.is_finite(flat))
      flat = tf.where(is_finite, flat, tf.zeros_like(flat))
      norm = tf.norm(flat)
      clipped = tf.clip_by_norm(flat, clip)
      padded_vector = tf.pad(clipped, [[0, padded - dimension]])
      rotated = hadamard.fast_walsh_hadamard_transform(
          (padded_vector * signs(params['rotation_seed']))[tf.newaxis]
      )[0]
      # Each client's rounding draws its own randomness.
      rounding_seed = tf.random.uniform(
          [], maxval=tf.int64.max, dtype=tf.int64
      )
      rounded = discretization._stochastic_rounding(  # pylint: disable=protected-access
          rotated * scale,
          l2_norm_bound=tf.constant(clip * scale, tf.float32),
          scale=tf.constant(scale, tf.float32),
          beta=tf.constant(beta, tf.float32),
          seed=rounding_seed,
      )
      if mechanism == 'ddgauss':
        noise = discrete_gaussian_utils.sample_discrete_gaussian(
            tf.constant(local_stddev, tf.int64), [padded], dtype=tf.int64
        )
      else:
        half_variance = local_stddev**2 / 2
        noise = (
            tf.random.poisson([padded], half_variance, dtype=tf.int64)
            - tf.random.poisson([padded], half_variance, dtype=tf.int64)
        )
      noisy = tf.cast(rounded, tf.int64) + noise
      return (
          tf.cast(tf.math.floormod(noisy, modulus), tf.int32),
          collections.OrderedDict(
              clipped=tf.cast(tf.logical_and(is_finite, norm > clip), tf.int32),
              nonfinite=tf.cast(tf.logical_not(is_finite), tf.int32),
          ),
      )

    encoded_type, counts_type = client_update.type_signature.result

    @tff.tensorflow.computation(encoded_type, counts_type, state_type)
    def finish_round(modular_sum, counts, state):
      # Back to [-2^(bits-1), 2^(bits-1)).
      centered = tf.where(
          modular_sum >= modulus // 2, modular_sum - modulus, modular_sum
      )
      rotated = tf.cast(centered, tf.float32) / scale
      unrotated = hadamard.fast_walsh_hadamard_transform(
          rotated[tf.newaxis]
      )[0] * signs(state['rotation_seed'])
      pieces = tf.split(unrotated[:dimension], sizes)
      mean = [
          tf.reshape(piece, spec.shape) / denominator
          for piece, spec in zip(pieces, flat_specs)
      ]
      new_state = collections.OrderedDict(state)
      new_state['rotation_seed'] = tf.random.experimental.stateless_split(
          state['rotation_seed'], num=1
      )[0]
      measurements = collections.OrderedDict(
          clip=tf.constant(clip, tf.float32),
          scale=tf.constant(scale, tf.float32),
          sum_noise_stddev=tf.constant(sum_noise_stddev, tf.float32),
          clipped_count=counts['clipped'],
          nonfinite_count=counts['nonfinite'],
      )
      return (
          tf.nest.pack_sequence_as(value_specs, mean),
          new_state,
          measurements,
      )

    return skeleton.clip_aggregate_finish_process(
        initial_state, client_params, client_update, finish_round,
        secure_encoding.ModularSecureSum(modulus),
    )


def round_dp_event(
    noise_multiplier: float,
    clip: float,
    expected_clients_per_round: int,
    dimension: int,
    bits: int = 16,
    mechanism: str = 'ddgauss',
    beta: float = math.exp(-0.5),
    modclip_prob: float = 1e-6,
    dropout_tolerance: float = 0.0,
) -> DistributedDpEvent:
  """The per-round event of a factory with these arguments, before sampling:
  the one it states, with the fewest clients its dropout tolerance allows
  reporting (all of them without tolerance)."""
  params = DistributedDpFactory(
      noise_multiplier, clip, expected_clients_per_round, bits, mechanism,
      beta, modclip_prob, dropout_tolerance=dropout_tolerance,
  ).parameters(dimension)
  return _event(
      mechanism, params['l2_sensitivity'], params['l1_sensitivity'],
      params['local_variance'],
      fewest_reporting(expected_clients_per_round, dropout_tolerance),
      params['padded_dimension'],
  )


def fewest_reporting(clients: int, dropout_tolerance: float) -> int:
  """The fewest of `clients` sampled whose noise shares keep the stated
  epsilon: ceil((1 - t) n)."""
  return math.ceil(round(clients * (1 - dropout_tolerance), 9))


def _event(mechanism, l2, l1, variance, clients, dimension) -> DistributedDpEvent:
  return DistributedDpEvent(
      mechanism=mechanism, l2_sensitivity=float(l2), l1_sensitivity=float(l1),
      local_variance=float(variance), num_clients=int(clients),
      dimension=int(dimension),
  )


def dp_event_from_state(
    state, reporting: Optional[int] = None) -> DistributedDpEvent:
  """The per-round event of a `DistributedDpFactory` process state: of its n
  clients' noise shares, or of the `reporting` ones that arrived."""
  clients = round(float(state['num_clients'])) if reporting is None else reporting
  # With no share there is no update either: the release depends on no data,
  # and one client's event bounds it.
  clients = max(clients, 1)
  return _event(
      'skellam' if float(state['skellam']) else 'ddgauss',
      state['l2_sensitivity'], state['l1_sensitivity'],
      state['local_variance'], clients, round(float(state['dimension'])),
  )


@dataclasses.dataclass(frozen=True)
class DistributedDpParams:
  """distributed_dp: clients' discrete noise through a secure modular sum."""

  noise_multiplier: float = registry.parameter(
      1.0, 'z: the noise stddev on the sum in units of the clip.')
  clip: float = registry.parameter(1.0, 'L2 norm bound of one client update.')
  bits: int = registry.parameter(
      16, f'Bit width of the secure modular sum, [{MIN_BITS}, {MAX_BITS}].')
  ddp_mechanism: str = registry.parameter(
      'ddgauss', f'The clients\' noise, one of {MECHANISMS} (distributed '
      'discrete Gaussian or Skellam).')
  ddp_beta: float = registry.parameter(
      math.exp(-0.5), 'Conditional rounding parameter beta in [0, 1); 0 '
      'rounds unconditionally (looser norm bound).')
  ddp_modclip_prob: float = registry.parameter(
      1e-6, 'Per-coordinate probability that the sum overflows the bit width; '
      'sets the scaling.')
  ddp_dropout_tolerance: float = registry.parameter(
      0.0, 'Fraction t in [0, 1) of the sampled clients that may drop out '
      '(--dropout_rate) with the stated epsilon kept: each adds variance '
      '1 / (1 - t) times its share.')


def _arguments(params, setting: registry.Setting) -> dict:
  return dict(
      noise_multiplier=params.noise_multiplier, clip=params.clip,
      expected_clients_per_round=int(setting.expected_clients_per_round),
      bits=params.bits, mechanism=params.ddp_mechanism, beta=params.ddp_beta,
      modclip_prob=params.ddp_modclip_prob,
      dropout_tolerance=params.ddp_dropout_tolerance,
  )


def _ledger(params, setting: registry.Setting) -> accounting.SampledRounds:
  if setting.model_dimension is None:
    raise ValueError(
        'distributed_dp\'s epsilon depends on the model\'s size (rounding '
        'and scaling act on every value); account it with experiments.train.'
    )
  return accounting.SampledRounds(
      round_dp_event(
          dimension=setting.model_dimension, **_arguments(params, setting)
      ),
      dp_event_from_state,
      event_of_reporting=dp_event_from_state,
      fewest_reporting=lambda sampled: fewest_reporting(
          sampled, params.ddp_dropout_tolerance),
  )


registry.register(registry.Mechanism(
    name='distributed_dp',
    summary='clients add discrete Gaussian or Skellam noise to a secure '
    'modular sum',
    params_type=DistributedDpParams,
    build_factory=lambda params, setting: DistributedDpFactory(
        rotation_seed=setting.noise_seed, stacked_users=setting.stacked_users,
        **_arguments(params, setting),
    ),
    build_ledger=_ledger,
    noise=registry.NoiseParameter('noise_multiplier'),
    secure_sums=True,
    argument_names=lambda params: {
        'mechanism': 'ddp_mechanism', 'beta': 'ddp_beta',
        'modclip_prob': 'ddp_modclip_prob',
    },
))
