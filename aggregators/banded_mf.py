"""Banded matrix factorization: noise correlated across rounds by a strategy C.

Choquette-Choo, Ganesh, McKenna, McMahan, Rush, Thakurta & Xu 2023,
"(Amplified) Banded Matrix Factorization: A unified approach to private
training"; the successor of DP-FTRL's tree in production.

Mechanism. Each client's update is clipped to L2 norm S (flat); an update
holding a NaN or an Inf is replaced by zeros and counted. Round t's sum of
clipped updates is x_t. The strategy C is a T x T lower-triangular matrix
with B bands (C[t, s] = 0 unless 0 <= t - s < B) and a non-zero diagonal.
Round t releases x_t + w_t, divided by the expected cohort n (a constant),
where w = C^-1 z, z_t ~ N(0, (z S)^2) per coordinate. The model then holds
the prefix sums A x + A C^-1 z (A: the lower-triangular ones), which is
the matrix mechanism for the factorization A = (A C^-1) C. Because C is
banded, w streams: w_t = (z_t - sum_{i=1}^{B-1} C[t, t-i] w_{t-i}) / C[t, t],
so the state keeps the last B - 1 noise tensors (B - 1 model-sized
buffers).

Privacy, under zero-out adjacency. The releases x + C^-1 z determine and are
determined by C x + z (C is invertible), so the run is the Gaussian
mechanism C x + z. A client that takes part in rounds at least b >= B apart
touches disjoint rows of C, so its sensitivity^2 is at most the largest sum
of squared column norms over its allowed patterns
(`dp_fedavg.correlated_noise.banded_sensitivity_squared`; after t rounds,
those of C[:t, :t]). The ledger is run-level, from the realised
participation (k participations, min gap b), and refuses b < B.

Strategies:
* `sqrt_toeplitz` (default): the banded square root of the prefix-sum
  matrix, C[t, s] = c_{t-s} for t - s < B with c_0 = 1,
  c_i = c_{i-1} (2i - 1) / (2i) (the series of (1 - x)^-1/2), then every
  column scaled to unit norm, so that sensitivity^2 = k for any k
  participations at least B apart. With B = 1 it is the identity: DP-SGD
  without amplification.
* `optimized`: the B-banded, column-normalised C of least expected
  prefix-sum error (`optimized_strategy`; cached per (T, B)). With unit
  columns the sensitivity is k for every such C, so only the error differs.
* a `.npy` file holding a user's T x T strategy, checked to be
  lower-triangular, B-banded, finite, with a non-zero diagonal; accounted
  with its own column norms.

Amplified banded MF (`--sampling=cyclic_poisson`, Choquette-Choo et al. 2023,
Theorem 4): the population is cut into b >= B groups that take turns, and
in its group's turn each client takes part with probability q. A client's
turns are b >= B rounds apart, so its rows of C x are disjoint across turns,
and each turn is a Poisson-sampled Gaussian mechanism on its own rows with
noise z / max_j ||C[:, j]||: after t rounds, ceil(t / b) of them composed
(`PoissonSampledDpEvent`, dp-accounting's RDP and PLD under add/remove
adjacency; the zeroed-out client is the absent one). jax_privacy's
`amplified_bandmf_event` states the same.

`expected_error` reports a strategy's mean squared prefix-sum error beside
DP-SGD's (C = I) at the same privacy.

Parameters: noise multiplier z (stddev of z_t in units of S), clip S, n,
strategy C (T rounds, B bands), noise seed.
"""

import collections
import dataclasses
import math
import os
from typing import Optional

import dp_accounting
import numpy as np
from scipy import linalg
from scipy import optimize
import tensorflow as tf
import tensorflow_federated as tff

from aggregators import checks
from aggregators import clipping
from aggregators import noise_seeds
from aggregators import registry
from aggregators import skeleton
from dp_fedavg import accounting
from dp_fedavg import correlated_noise
from dp_fedavg import sampling

SQRT_TOEPLITZ = 'sqrt_toeplitz'
OPTIMIZED = 'optimized'


def sqrt_toeplitz_coefficients(bands: int) -> np.ndarray:
  """c_0..c_{B-1} of the Toeplitz square root of the prefix-sum matrix:
  c_0 = 1, c_i = c_{i-1} (2i - 1) / (2i)."""
  coefficients = np.ones(bands)
  for i in range(1, bands):
    coefficients[i] = coefficients[i - 1] * (2 * i - 1) / (2 * i)
  return coefficients


def sqrt_toeplitz_strategy(rounds: int, bands: int) -> np.ndarray:
  """The column-normalised banded square root of the prefix-sum matrix."""
  if not 1 <= bands <= rounds:
    raise ValueError(f'bands must be in [1, rounds={rounds}], got {bands}.')
  coefficients = sqrt_toeplitz_coefficients(bands)
  lags = np.subtract.outer(np.arange(rounds), np.arange(rounds))
  strategy = np.where((lags >= 0) & (lags < bands),
                      coefficients[np.clip(lags, 0, bands - 1)], 0.0)
  return strategy / np.linalg.norm(strategy, axis=0)


def _prefix_error(band_values: tf.Tensor, rounds: int,
                               bands: int) -> tf.Tensor:
  """||A C^-1||_F^2 of the column-normalised C whose bands are
  `band_values` ([T, B], entry [t, i] = C[t, t - i]; entries before the first
  round are ignored)."""
  strategy = tf.zeros([rounds, rounds], tf.float64)
  for i in range(bands):
    strategy += tf.linalg.diag(band_values[i:, i], k=-i)
  strategy /= tf.norm(strategy, axis=0, keepdims=True)
  inverse = tf.linalg.triangular_solve(
      strategy, tf.eye(rounds, dtype=tf.float64), lower=True)
  return tf.reduce_sum(tf.square(tf.cumsum(inverse, axis=0)))


def optimized_strategy(rounds: int, bands: int,
                       max_iterations: int = 2000) -> np.ndarray:
  """The B-banded, column-normalised C of least expected prefix-sum error.

  With unit columns and participations at least B rounds apart, every
  strategy has sensitivity^2 k (`dp_fedavg.correlated_noise`), so the
  expected error sens^2 ||A C^-1||_F^2 / T is least where ||A C^-1||_F^2 is:
  minimised here over the band entries by L-BFGS (scipy, TF gradients) from
  the square root's. The objective equals tr(A X^-1 A^T) over the banded
  Gram matrices X = C^T C with unit diagonal, convex in X, as in
  Choquette-Choo et al. 2023 and pfl-research's banded MF (which optimise
  over X); a local optimum in C is that optimum.
  """
  start = band_coefficients(sqrt_toeplitz_strategy(rounds, bands), bands)

  @tf.function(input_signature=[tf.TensorSpec([rounds * bands], tf.float64)])
  def value_and_gradient(flat):
    with tf.GradientTape() as tape:
      tape.watch(flat)
      error = _prefix_error(
          tf.reshape(flat, [rounds, bands]), rounds, bands)
    return error, tape.gradient(error, flat)

  def objective(flat):
    error, gradient = value_and_gradient(tf.constant(flat))
    return float(error), gradient.numpy()

  result = optimize.minimize(
      objective, start.ravel(), jac=True, method='L-BFGS-B',
      options=dict(maxiter=max_iterations, gtol=1e-9, ftol=1e-13))
  band = result.x.reshape(rounds, bands)
  strategy = sum(np.diag(band[i:, i], -i) for i in range(bands))
  return strategy / np.linalg.norm(strategy, axis=0)


def cached_optimized_strategy(rounds: int, bands: int) -> np.ndarray:
  """`optimized_strategy`, computed once per (rounds, bands) and kept in
  $DP_FEDAVG_CACHE (default ~/.cache/dp_fedavg)/banded_mf/."""
  directory = os.path.join(
      os.environ.get('DP_FEDAVG_CACHE',
                     os.path.join(os.path.expanduser('~'), '.cache',
                                  'dp_fedavg')), 'banded_mf')
  path = os.path.join(directory, f'optimized_T{rounds}_B{bands}.npy')
  if os.path.exists(path):
    return check_strategy(np.load(path, allow_pickle=False), rounds, bands)
  strategy = optimized_strategy(rounds, bands)
  os.makedirs(directory, exist_ok=True)
  partial = f'{path}.{os.getpid()}.partial.npy'
  np.save(partial, strategy)
  os.replace(partial, path)
  return strategy


def check_strategy(strategy, rounds: int, bands: int) -> np.ndarray:
  """`strategy` as float64 if it is a valid T x T, B-banded strategy.

  Raises:
    ValueError: naming what is wrong.
  """
  strategy = np.asarray(strategy, np.float64)
  if strategy.shape != (rounds, rounds):
    raise ValueError(
        f'the strategy must be {rounds} x {rounds} (the rounds), got shape '
        f'{strategy.shape}.')
  if not np.all(np.isfinite(strategy)):
    raise ValueError('the strategy holds a NaN or an Inf.')
  lags = np.subtract.outer(np.arange(rounds), np.arange(rounds))
  if np.any(strategy[lags < 0] != 0):
    raise ValueError('the strategy must be lower-triangular.')
  if np.any(strategy[lags >= bands] != 0):
    raise ValueError(f'the strategy has entries beyond {bands} bands.')
  if np.any(np.diag(strategy) == 0):
    raise ValueError('the strategy\'s diagonal must be non-zero (invertible).')
  return strategy


def band_coefficients(strategy: np.ndarray, bands: int) -> np.ndarray:
  """[T, B]: entry [t, i] is C[t, t - i] (0 before the first round)."""
  rounds = strategy.shape[0]
  band = np.zeros((rounds, bands))
  for i in range(bands):
    band[i:, i] = np.diagonal(strategy, offset=-i)
  return band


def decoder(strategy: np.ndarray) -> np.ndarray:
  """B = A C^-1, so that B C = A (A: the prefix-sum matrix)."""
  rounds = strategy.shape[0]
  prefix = np.tril(np.ones((rounds, rounds)))
  # From C^T B^T = A^T.
  return linalg.solve_triangular(strategy.T, prefix.T, lower=False).T


def expected_error(strategy: np.ndarray, sensitivity_squared: float) -> float:
  """Mean over rounds of the squared prefix-sum error per coordinate, in
  units of (S sigma_eff)^2, where sigma_eff = z / sens fixes the privacy:
  sens^2 ||A C^-1||_F^2 / T. DP-SGD (C = I) with k participations:
  k (T + 1) / 2."""
  return float(sensitivity_squared * np.sum(decoder(strategy)**2)
               / strategy.shape[0])


def next_noise(row: tf.Tensor, previous: tf.Tensor,
               draw: tf.Tensor) -> tf.Tensor:
  """w_t from z_t and w_{t-1}, ..., w_{t-B+1} (`previous`, newest first):
  row t of C w = z solved forward, `row` = C[t, t], C[t, t-1], ...."""
  return (draw - tf.tensordot(row[1:], previous, axes=1)) / row[0]


class BandedMatrixFactorizationFactory(
    tff.aggregators.UnweightedAggregationFactory):
  """Clips each client update; adds the rows of C^-1 z; see the module
  docstring.

  State: `clip` (float32), `noise_multiplier` (float64), `noise_seed`
  (int64[2], advanced every round), `round` (int32, rounds so far) and
  `previous_noise` (per tensor [B - 1, ...]: w_{t-1}, ..., w_{t-B+1}).

  Measurements: `clip`; `round_noise_stddev`, the stddev of w_t on each
  coordinate of this round's sum (z S sqrt((C^-1 C^-T)[t, t])); `clipped_count`;
  `nonfinite_count`.
  """

  def __init__(
      self,
      noise_multiplier: float,
      clip: float,
      expected_clients_per_round: float,
      strategy: np.ndarray,
      bands: int,
      noise_seed: Optional[int] = None,
      stacked_users: bool = False,
  ):
    """Initializes the factory.

    Args:
      noise_multiplier: z >= 0, the stddev of z_t in units of S.
      clip: the L2 bound S of one client's update, > 0.
      expected_clients_per_round: the constant denominator of the mean, > 0.
      strategy: C, T x T lower-triangular with `bands` bands; the process
        runs at most T rounds.
      bands: B >= 1.
      noise_seed: seed of the noise stream; None draws one.
      stacked_users: each client's value is a stack of users' updates (the
        vectorized engine); each user is clipped on its own.

    Raises:
      TypeError: if an argument is not of its type.
      checks.ArgumentError: if an argument is outside its range.
      ValueError: if the strategy is not a valid B-banded one.
    """
    self._noise_multiplier = checks.check_number(
        noise_multiplier, 'noise_multiplier', 0, strict=False)
    self._clip = checks.check_number(clip, 'clip', 0, strict=True)
    self._expected_clients_per_round = checks.check_number(
        expected_clients_per_round, 'expected_clients_per_round', 0,
        strict=True)
    rounds = np.shape(strategy)[0] if np.ndim(strategy) == 2 else 0
    self._bands = checks.check_integer(bands, 'bands', 1, max(1, rounds))
    self._strategy = check_strategy(strategy, rounds, self._bands)
    self._noise_seed = checks.check_seed(noise_seed)
    self._stacked_users = checks.check_bool(stacked_users, 'stacked_users')

  def create(
      self, value_type: tff.types.StructWithPythonType | tff.TensorType
  ) -> tff.templates.AggregationProcess:
    if self._stacked_users:
      value_type = skeleton.unstacked_type(
          value_type, 'BandedMatrixFactorizationFactory')
    value_specs = skeleton.float_value_specs(
        value_type, 'BandedMatrixFactorizationFactory')
    num_tensors = len(tf.nest.flatten(value_specs))
    bands = self._bands
    rounds = self._strategy.shape[0]
    band = band_coefficients(self._strategy, bands).astype(np.float32)
    inverse = linalg.solve_triangular(
        self._strategy, np.eye(rounds), lower=True)
    # Per round, the stddev of w_t in units of z S.
    noise_scale = np.sqrt(np.sum(inverse**2, axis=1)).astype(np.float32)
    denominator = self._expected_clients_per_round

    @tff.tensorflow.computation
    def initial_state():
      return collections.OrderedDict(
          clip=tf.constant(self._clip, tf.float32),
          noise_multiplier=tf.constant(self._noise_multiplier, tf.float64),
          noise_seed=noise_seeds.initial_seed(self._noise_seed),
          round=tf.constant(0, tf.int32),
          previous_noise=tf.nest.map_structure(
              lambda spec: tf.zeros([bands - 1, *spec.shape], spec.dtype),
              value_specs),
      )

    state_type = initial_state.type_signature.result

    get_clip, clip_update = skeleton.clip_from_state(
        state_type, 'clip', clipping.flat_clip_with_counts, 2, value_type,
        self._stacked_users)
    counts_type = clip_update.type_signature.result[1]

    @tff.tensorflow.computation(value_type, counts_type, state_type)
    def add_correlated_noise(value_sum, counts, state):
      # Every use of the round's index waits for its check.
      with tf.control_dependencies([tf.debugging.assert_less(
          state['round'], rounds,
          message=f'the strategy covers {rounds} rounds')]):
        round_index = tf.identity(state['round'])
      row = tf.gather(tf.constant(band), round_index)
      seeds = tf.random.experimental.stateless_split(
          state['noise_seed'], num=num_tensors + 1)
      stddev = state['clip'] * tf.cast(state['noise_multiplier'], tf.float32)

      def noise_of(spec, seed, previous):
        return next_noise(row, previous, tf.random.stateless_normal(
            spec.shape, seed=seed, stddev=stddev, dtype=spec.dtype))

      flat_previous = tf.nest.flatten(state['previous_noise'])
      noise = [
          noise_of(spec, seeds[j], flat_previous[j])
          for j, spec in enumerate(tf.nest.flatten(value_specs))
      ]
      result = [
          (x + w) / denominator
          for x, w in zip(tf.nest.flatten(value_sum), noise)
      ]
      new_previous = [
          tf.concat([w[tf.newaxis], previous[:bands - 2]], axis=0)
          if bands > 1 else previous
          for w, previous in zip(noise, flat_previous)
      ]
      new_state = collections.OrderedDict(
          clip=state['clip'],
          noise_multiplier=state['noise_multiplier'],
          noise_seed=seeds[num_tensors],
          round=round_index + 1,
          previous_noise=tf.nest.pack_sequence_as(value_specs, new_previous),
      )
      measurements = collections.OrderedDict(
          clip=state['clip'],
          round_noise_stddev=stddev * tf.gather(
              tf.constant(noise_scale), round_index),
          clipped_count=counts['clipped'],
          nonfinite_count=counts['nonfinite'],
      )
      return (tf.nest.pack_sequence_as(value_specs, result), new_state,
              measurements)

    return skeleton.clip_aggregate_finish_process(
        initial_state, get_clip, clip_update, add_correlated_noise,
        skeleton.PlainSum(),
    )


class BandedLedger:
  """The run-level event of a strategy: the realised schedule's
  sensitivity from the column norms of C[:t, :t] (module docstring)."""

  def __init__(self, strategy: np.ndarray, bands: int):
    self._bands = bands
    # Row-cumulative squares: entry [t - 1, j] is ||C[:t, j]||^2.
    self._cumulative = np.cumsum(np.square(strategy), axis=0)

  def event(self, noise_multiplier: float,
            participation: accounting.Participation) -> dp_accounting.DpEvent:
    rounds = participation.rounds
    if rounds > self._cumulative.shape[0]:
      raise ValueError(
          f'{rounds} rounds, but the strategy covers '
          f'{self._cumulative.shape[0]}.')
    try:
      return correlated_noise.banded_event(
          noise_multiplier, self._cumulative[rounds - 1, :rounds],
          self._bands, participation.schedule())
    except ValueError as e:
      raise ValueError(
          f'{e} Use --sampling=cyclic with num_clients // clients_per_round '
          '>= --mf_bands, or fewer --mf_bands.') from e


@dataclasses.dataclass(frozen=True)
class BandedMfParams:
  """banded_mf: noise C^-1 z correlated across rounds by a banded C."""

  noise_multiplier: float = registry.parameter(
      1.0, registry.NOISE_MULTIPLIER_HELP)
  clip: float = registry.parameter(1.0, registry.CLIP_HELP)
  mf_bands: int = registry.parameter(
      0, 'B, the bands of the strategy (noise buffers kept: B - 1); 0 picks '
      'min(rounds, num_clients // clients_per_round), the most that '
      '--sampling=cyclic allows. 1 is DP-SGD without amplification.')
  mf_strategy: str = registry.parameter(
      SQRT_TOEPLITZ, f'{SQRT_TOEPLITZ} (the column-normalised banded square '
      f'root of the prefix-sum matrix), {OPTIMIZED} (the column-normalised '
      'banded strategy of least expected prefix-sum error, computed once per '
      '(rounds, mf_bands) and cached in $DP_FEDAVG_CACHE, default '
      '~/.cache/dp_fedavg) or the path of a .npy file holding a rounds x '
      'rounds lower-triangular, mf_bands-banded strategy.')


def bands_of(params: BandedMfParams, setting: registry.Setting) -> int:
  """B: `mf_bands`, or for 0 the most a cyclic schedule allows."""
  rounds = _rounds_of(setting)
  if params.mf_bands:
    checks.check_integer(params.mf_bands, 'mf_bands', 1, rounds)
    return params.mf_bands
  if setting.sampling is sampling.SamplingScheme.CYCLIC_POISSON:
    return max(1, min(rounds, setting.sampling_groups))
  if setting.population is None:
    return rounds
  period = int(setting.population // setting.expected_clients_per_round)
  return max(1, min(rounds, period))


def _rounds_of(setting: registry.Setting) -> int:
  if setting.rounds is None:
    raise ValueError('banded_mf plans its noise for the run\'s rounds; the '
                     'Setting has none.')
  return setting.rounds


def strategy_of(params: BandedMfParams, setting: registry.Setting) -> np.ndarray:
  """C for the run (checked)."""
  rounds, bands = _rounds_of(setting), bands_of(params, setting)
  if params.mf_strategy == SQRT_TOEPLITZ:
    return sqrt_toeplitz_strategy(rounds, bands)
  if params.mf_strategy == OPTIMIZED:
    return cached_optimized_strategy(rounds, bands)
  path = params.mf_strategy
  if not path.endswith('.npy'):
    raise checks.ArgumentError(
        'mf_strategy', path,
        f'{SQRT_TOEPLITZ}, {OPTIMIZED} or the path of a .npy file')
  if not os.path.isfile(path):
    raise checks.ArgumentError('mf_strategy', path, 'an existing .npy file')
  try:
    strategy = np.load(path, allow_pickle=False)
  except (ValueError, OSError) as e:
    raise ValueError(f'{path} is not a readable .npy array: {e}') from e
  try:
    return check_strategy(strategy, rounds, bands)
  except ValueError as e:
    raise ValueError(f'{path}: {e}') from e


def _build(params: BandedMfParams, setting: registry.Setting):
  return BandedMatrixFactorizationFactory(
      noise_multiplier=params.noise_multiplier,
      clip=params.clip,
      expected_clients_per_round=setting.expected_clients_per_round,
      strategy=strategy_of(params, setting),
      bands=bands_of(params, setting),
      noise_seed=setting.noise_seed,
      stacked_users=setting.stacked_users,
  )


def amplified_event(noise_multiplier: float, strategy: np.ndarray,
                    rounds: int, groups: int,
                    sampling_probability: float) -> dp_accounting.DpEvent:
  """Amplified BandMF after `rounds` rounds (module docstring): ceil(rounds /
  groups) Poisson-sampled Gaussians of z / (largest column norm)."""
  if noise_multiplier == 0:
    return dp_accounting.NonPrivateDpEvent()
  largest = float(np.max(np.linalg.norm(strategy[:rounds, :rounds], axis=0)))
  return dp_accounting.SelfComposedDpEvent(
      dp_accounting.PoissonSampledDpEvent(
          float(sampling_probability),
          dp_accounting.GaussianDpEvent(float(noise_multiplier) / largest)),
      math.ceil(rounds / groups))


def _ledger(params: BandedMfParams, setting: registry.Setting):
  strategy, bands = strategy_of(params, setting), bands_of(params, setting)
  if setting.sampling is not sampling.SamplingScheme.CYCLIC_POISSON:
    ledger = BandedLedger(strategy, bands)
    return accounting.RunLevel(
        lambda participation: ledger.event(
            params.noise_multiplier, participation))
  groups = setting.sampling_groups
  if bands > groups:
    raise ValueError(
        f'amplified banded MF needs --sampling_groups >= --mf_bands: with '
        f'{groups} groups a client\'s turns are {groups} rounds apart, closer '
        f'than the {bands} bands.')
  probability = setting.expected_clients_per_round / (
      setting.population // groups)
  return accounting.RunLevel(
      lambda participation: amplified_event(
          params.noise_multiplier, strategy, participation.rounds,
          groups, probability),
      adjacency=accounting.Adjacency.ADD_OR_REMOVE_ONE)


def _utility_notes(params: BandedMfParams, setting: registry.Setting,
                   planned: accounting.Participation) -> list[str]:
  """The strategy's expected error beside DP-SGD's at the same privacy."""
  strategy, bands = strategy_of(params, setting), bands_of(params, setting)
  schedule = planned.schedule()
  rounds = schedule.rounds
  sensitivity = correlated_noise.banded_sensitivity_squared(
      np.sum(np.square(strategy[:rounds, :rounds]), axis=0), bands, schedule)
  error = expected_error(strategy[:rounds, :rounds], sensitivity)
  dp_sgd = expected_error(np.eye(rounds), schedule.max_participations)
  return [
      f'expected squared error of the prefix sums, mean over {rounds} '
      f'rounds, in units of (clip x effective noise)^2: {error:.4g} with '
      f'this strategy ({bands} bands, sensitivity^2 {sensitivity:.4g}), '
      f'{dp_sgd:.4g} with DP-SGD (C = I, sensitivity^2 '
      f'{schedule.max_participations}): {error / dp_sgd:.3g}x',
  ]


registry.register(registry.Mechanism(
    name='banded_mf',
    summary='banded matrix factorization: noise correlated across rounds by '
    'a B-banded strategy (participations >= B rounds apart; zero-out '
    'adjacency)',
    params_type=BandedMfParams,
    build_factory=_build,
    build_ledger=_ledger,
    noise=registry.NoiseParameter('noise_multiplier'),
    argument_names=lambda params: {'bands': 'mf_bands'},
    utility_notes=_utility_notes,
))
