"""Flags that fix a run's privacy: mechanism, sampling, budget, accountant.

Shared by `experiments.train` and `experiments.privacy_report`, so that the
report for a set of flags is the accounting that training with them does.
"""

import math
import os
import sys
from typing import Callable, Optional

from absl import flags
import dp_accounting

from aggregators import clipping
from aggregators import distributed_dp
from aggregators import gaussian
from aggregators import laplace
from dp_fedavg import accounting
from dp_fedavg import sampling
from dp_fedavg import tasks

AGGREGATORS = (
    'none', 'gaussian_fixed', 'gaussian_adaptive', 'laplace', 'secure_gaussian',
    'distributed_dp',
)
# Aggregators whose sums are secure sums: they run only in a context that
# simulates secure aggregation (see dp_fedavg.execution).
SECURE_AGGREGATORS = ('secure_gaussian', 'distributed_dp')
CLIPPINGS = tuple(c.value for c in clipping.Clipping)
SAMPLINGS = tuple(s.value for s in sampling.SamplingScheme)
ACCOUNTANTS = tuple(k.value for k in accounting.AccountantKind)
CALIBRATIONS = ('none', 'noise')

AGGREGATOR = flags.DEFINE_string(
    'aggregator', 'gaussian_fixed',
    f'One of {AGGREGATORS}; none is plain (non-private) FedAvg.')
NOISE_MULTIPLIER = flags.DEFINE_float(
    'noise_multiplier', 1.0,
    'Gaussian aggregators: noise stddev on the sum in units of the clip (the '
    'total z, split with the count for gaussian_adaptive).')
CLIP = flags.DEFINE_float(
    'clip', 1.0, 'gaussian_fixed: L2 norm bound of one client update.')
CLIPPING = flags.DEFINE_string(
    'clipping', 'flat',
    f'Gaussian aggregators: one of {CLIPPINGS} (per layer: each tensor of the '
    'update gets its share of the total bound).')
INITIAL_CLIP = flags.DEFINE_float(
    'initial_clip', 0.5, 'gaussian_adaptive: the clip of round 1.')
TARGET_QUANTILE = flags.DEFINE_float(
    'target_quantile', 0.5,
    'gaussian_adaptive: fraction of client updates to leave unclipped.')
CLIP_LEARNING_RATE = flags.DEFINE_float(
    'clip_learning_rate', 0.2,
    'gaussian_adaptive: eta of the geometric clip update.')
CLIPPED_COUNT_STDDEV = flags.DEFINE_float(
    'clipped_count_stddev', None,
    'gaussian_adaptive: noise stddev on the unclipped count; unset picks '
    'max(0.05 * clients_per_round, 5 * noise_multiplier).')
NOISE_PLACEMENT = flags.DEFINE_string(
    'noise_placement', 'server',
    f'gaussian_fixed: one of {gaussian.NOISE_PLACEMENTS}. server: central DP; '
    'client: every client adds the full noise to its own update (local DP, '
    'epsilon per client taking part in every round).')
L1_CLIP = flags.DEFINE_float(
    'l1_clip', 1.0, 'laplace: L1 norm bound of one client update.')
EPSILON_PER_ROUND = flags.DEFINE_float(
    'epsilon_per_round', 0.5,
    'laplace: pure epsilon of one round (noise scale l1_clip / epsilon).')
ADAPTIVE_CLIP = flags.DEFINE_bool(
    'adaptive_clip', False,
    'secure_gaussian: adapt the clip to --target_quantile as gaussian_adaptive '
    'does (from --initial_clip); otherwise the clip is --clip.')
BITS = flags.DEFINE_integer(
    'bits', 16,
    'distributed_dp: bit width of the secure modular sum, '
    f'[{distributed_dp.MIN_BITS}, {distributed_dp.MAX_BITS}].')
DDP_MECHANISM = flags.DEFINE_string(
    'ddp_mechanism', 'ddgauss',
    f'distributed_dp: the clients\' noise, one of {distributed_dp.MECHANISMS} '
    '(distributed discrete Gaussian or Skellam).')
DDP_BETA = flags.DEFINE_float(
    'ddp_beta', math.exp(-0.5),
    'distributed_dp: conditional rounding parameter beta in [0, 1); 0 rounds '
    'unconditionally (looser norm bound).')
DDP_MODCLIP_PROB = flags.DEFINE_float(
    'ddp_modclip_prob', 1e-6,
    'distributed_dp: per-coordinate probability that the sum overflows the '
    'bit width; sets the scaling.')
NUM_CLIENTS = flags.DEFINE_integer(
    'num_clients', None,
    'Training clients in the population (N). digits, cifar10: clients the data '
    f'is split over (default {tasks.DEFAULT_NUM_CLIENTS}); femnist, '
    'shakespeare: use the first N natural clients (default all of them).')
CLIENTS_PER_ROUND = flags.DEFINE_integer(
    'clients_per_round', 20,
    'Clients per round: exact for uniform sampling, expected for Poisson '
    '(rate q = clients_per_round / num_clients); ignored for full.')
SAMPLING = flags.DEFINE_string(
    'sampling', 'poisson',
    f'Client sampling, one of {SAMPLINGS}. Poisson and full give epsilon under '
    'add/remove-one-client adjacency, uniform under replace-one.')
ROUNDS = flags.DEFINE_integer('rounds', 30, 'Training rounds (planned).')
DELTA = flags.DEFINE_float('delta', 1e-5, 'Target delta of (epsilon, delta).')
ACCOUNTANT = flags.DEFINE_string(
    'accountant', 'auto',
    f'One of {ACCOUNTANTS}; auto reports the smaller of the RDP and PLD bounds '
    'that support the run.')
TARGET_EPSILON = flags.DEFINE_float(
    'target_epsilon', None,
    'Privacy budget at --delta. With --calibrate=noise the noise multiplier is '
    'chosen to meet it after --rounds; otherwise training stops before the '
    'first round that would exceed it.')
CALIBRATE = flags.DEFINE_string(
    'calibrate', 'none',
    f'One of {CALIBRATIONS}: noise replaces --noise_multiplier by the smallest '
    'one meeting --target_epsilon.')

# (flag, predicate, allowed range in words); the first failing one is reported.
RANGE_CHECKS: tuple[tuple[flags.FlagHolder, Callable[..., bool], str], ...] = (
    (AGGREGATOR, lambda v: v in AGGREGATORS, f'one of {", ".join(AGGREGATORS)}'),
    (NOISE_MULTIPLIER, lambda v: 0 <= v < math.inf, 'a finite number >= 0'),
    (CLIP, lambda v: 0 < v < math.inf, 'a finite number > 0'),
    (CLIPPING, lambda v: v in CLIPPINGS, f'one of {", ".join(CLIPPINGS)}'),
    (INITIAL_CLIP, lambda v: 0 < v < math.inf, 'a finite number > 0'),
    (TARGET_QUANTILE, lambda v: 0 <= v <= 1, 'in [0, 1]'),
    (CLIP_LEARNING_RATE, lambda v: 0 <= v < math.inf, 'a finite number >= 0'),
    (CLIPPED_COUNT_STDDEV, lambda v: v is None or 0 <= v < math.inf,
     'a finite number >= 0'),
    (NOISE_PLACEMENT, lambda v: v in gaussian.NOISE_PLACEMENTS,
     f'one of {", ".join(gaussian.NOISE_PLACEMENTS)}'),
    (L1_CLIP, lambda v: 0 < v < math.inf, 'a finite number > 0'),
    (EPSILON_PER_ROUND, lambda v: 0 < v < math.inf, 'a finite number > 0'),
    (NUM_CLIENTS, lambda v: v is None or v >= 1, 'an integer >= 1'),
    (CLIENTS_PER_ROUND, lambda v: v >= 1, 'an integer >= 1'),
    (SAMPLING, lambda v: v in SAMPLINGS, f'one of {", ".join(SAMPLINGS)}'),
    (ROUNDS, lambda v: v >= 1, 'an integer >= 1'),
    (DELTA, lambda v: 0 < v < 1, 'in (0, 1)'),
    (ACCOUNTANT, lambda v: v in ACCOUNTANTS, f'one of {", ".join(ACCOUNTANTS)}'),
    (TARGET_EPSILON, lambda v: v is None or 0 < v < math.inf,
     'a finite number > 0'),
    (CALIBRATE, lambda v: v in CALIBRATIONS, f'one of {", ".join(CALIBRATIONS)}'),
    (BITS, lambda v: distributed_dp.MIN_BITS <= v <= distributed_dp.MAX_BITS,
     f'an integer in [{distributed_dp.MIN_BITS}, {distributed_dp.MAX_BITS}]'),
    (DDP_MECHANISM, lambda v: v in distributed_dp.MECHANISMS,
     f'one of {", ".join(distributed_dp.MECHANISMS)}'),
    (DDP_BETA, lambda v: 0 <= v < 1, 'in [0, 1)'),
    (DDP_MODCLIP_PROB, lambda v: 0 < v < 1, 'in (0, 1)'),
)


def exit_with_usage_error(message: str) -> None:
  """Exits with status 2 after one line naming the problem."""
  print(f'{os.path.basename(sys.argv[0])}: error: {message}', file=sys.stderr)
  sys.exit(2)


def check_no_arguments(argv: list[str]) -> None:
  if len(argv) > 1:
    exit_with_usage_error(f'unexpected arguments: {" ".join(argv[1:])}')


def range_error(
    checks: tuple[tuple[flags.FlagHolder, Callable[..., bool], str], ...],
) -> Optional[str]:
  """The first flag outside its range, as one line; None if all are in range."""
  for holder, is_allowed, allowed in checks:
    if not is_allowed(holder.value):
      return f'--{holder.name}={holder.value} is out of range: must be {allowed}.'
  return None


def flag_error() -> Optional[str]:
  """The first problem with the privacy flags, as one line; None if none."""
  error = range_error(RANGE_CHECKS)
  if error:
    return error
  if NUM_CLIENTS.value is not None:
    error = population_error(NUM_CLIENTS.value)
    if error:
      return error
  if AGGREGATOR.value == 'laplace' and CLIPPING.value != 'flat':
    return (
        f'--clipping={CLIPPING.value} applies to the Gaussian aggregators; '
        'laplace clips the whole update to --l1_clip.'
    )
  if AGGREGATOR.value == 'distributed_dp' and CLIPPING.value != 'flat':
    return (
        f'--clipping={CLIPPING.value} applies to the central Gaussian '
        'aggregators; distributed_dp clips the whole update to --clip.'
    )
  if NOISE_PLACEMENT.value == 'client' and AGGREGATOR.value != 'gaussian_fixed':
    return (
        '--noise_placement=client needs --aggregator=gaussian_fixed (an '
        'adaptive clip would release each client\'s clipped bit unnoised).'
    )
  if CALIBRATE.value == 'noise' and TARGET_EPSILON.value is None:
    return '--calibrate=noise needs --target_epsilon.'
  if AGGREGATOR.value == 'none' and TARGET_EPSILON.value is not None:
    return (
        '--target_epsilon needs a private --aggregator; --aggregator=none '
        'spends an infinite epsilon.'
    )
  return None


def population_error(num_clients: int) -> Optional[str]:
  """A cohort that does not fit the population of `num_clients`, as one line."""
  if SAMPLING.value != 'full' and not 1 <= CLIENTS_PER_ROUND.value <= num_clients:
    return (
        f'--clients_per_round={CLIENTS_PER_ROUND.value} is out of range: must '
        f'be in [1, num_clients={num_clients}] (sampling rate q = '
        'clients_per_round / num_clients must lie in (0, 1]).'
    )
  return None


def uses_secure_aggregation() -> bool:
  return AGGREGATOR.value in SECURE_AGGREGATORS


def _is_adaptive() -> bool:
  return AGGREGATOR.value == 'gaussian_adaptive' or (
      AGGREGATOR.value == 'secure_gaussian' and ADAPTIVE_CLIP.value
  )


def _adaptive() -> gaussian.AdaptiveClipping:
  return gaussian.AdaptiveClipping(
      target_quantile=TARGET_QUANTILE.value,
      learning_rate=CLIP_LEARNING_RATE.value,
      clipped_count_stddev=CLIPPED_COUNT_STDDEV.value,
  )


def event_for_noise_multiplier(
    expected_clients_per_round: float,
    model_dimension: Optional[int] = None,
) -> Callable[[float], dp_accounting.DpEvent]:
  """The chosen aggregator's per-round DpEvent as a function of its noise.

  The noise parameter is z for the Gaussian aggregators, and for laplace the
  Laplace scale over the L1 bound, 1 / epsilon_per_round. distributed_dp's
  event depends on the model's number of values, `model_dimension`.

  Raises:
    ValueError: distributed_dp without `model_dimension`.
  """
  if AGGREGATOR.value == 'none':
    return lambda z: dp_accounting.NonPrivateDpEvent()
  if AGGREGATOR.value == 'laplace':
    return dp_accounting.LaplaceDpEvent
  if AGGREGATOR.value == 'distributed_dp':
    if model_dimension is None:
      raise ValueError(
          'distributed_dp\'s epsilon depends on the model\'s size (rounding '
          'and scaling act on every value); account it with experiments.train.'
      )
    return lambda z: distributed_dp.round_dp_event(
        z, CLIP.value, int(expected_clients_per_round), model_dimension,
        BITS.value, DDP_MECHANISM.value, DDP_BETA.value, DDP_MODCLIP_PROB.value,
    )
  if NOISE_PLACEMENT.value == 'client':
    return lambda z: dp_accounting.GaussianDpEvent(z / 2.0)
  adaptive = _adaptive() if _is_adaptive() else None
  return lambda z: gaussian.round_dp_event(
      z, expected_clients_per_round, adaptive
  )


def build_accountant(num_clients: int) -> accounting.PrivacyAccountant:
  """The accountant of the flags for a population of `num_clients`."""
  return accounting.PrivacyAccountant(
      sampling.SamplingScheme(SAMPLING.value),
      num_clients,
      CLIENTS_PER_ROUND.value,
      DELTA.value,
      accounting.AccountantKind(ACCOUNTANT.value),
      local_dp=NOISE_PLACEMENT.value == 'client',
  )


def noise_parameter(
    accountant: accounting.PrivacyAccountant,
    model_dimension: Optional[int] = None,
) -> float:
  """The aggregator's noise: from the flags, or calibrated (--calibrate=noise).

  Raises:
    ValueError: if the mechanism cannot be accounted under the sampling, or
      calibration cannot meet --target_epsilon.
  """
  event_for_noise = event_for_noise_multiplier(
      accountant.clients_per_round, model_dimension
  )
  if AGGREGATOR.value == 'laplace':
    from_flags = 1.0 / EPSILON_PER_ROUND.value
  else:
    from_flags = NOISE_MULTIPLIER.value
  # Building the event also checks that z can be split (adaptive).
  accountant.check_supported(event_for_noise(from_flags))
  if CALIBRATE.value != 'noise':
    return from_flags
  return accountant.calibrate_noise_multiplier(
      event_for_noise, TARGET_EPSILON.value, ROUNDS.value
  )


def build_aggregator(
    noise: float, expected_clients_per_round: float, seed: int,
    stacked_users: bool = False,
) -> tuple[Optional[object], Callable[[object], dp_accounting.DpEvent]]:
  """The aggregator factory for the flags and its state -> DpEvent function.

  Args:
    noise: from `noise_parameter`.
    expected_clients_per_round: the mean's denominator.
    seed: the noise seed.
    stacked_users: the factory takes stacks of users' updates (the vectorized
      engine) and clips each user.

  Returns:
    (factory, or None for plain FedAvg; per-round DpEvent of its state).

  Raises:
    ValueError: `stacked_users` with an aggregator that models each user's
      trust boundary (secure sums), which a stack of users would break.
  """
  if stacked_users and AGGREGATOR.value in SECURE_AGGREGATORS:
    raise ValueError(
        f'--aggregator={AGGREGATOR.value} keeps each user\'s update from '
        'everyone else, and --engine=vectorized puts many users in one TFF '
        'client; use --engine=standard.'
    )
  if AGGREGATOR.value == 'none':
    return None, lambda state: dp_accounting.NonPrivateDpEvent()
  if AGGREGATOR.value == 'laplace':
    return (
        laplace.LaplaceFactory(
            epsilon_per_round=1.0 / noise,
            l1_clip=L1_CLIP.value,
            expected_clients_per_round=expected_clients_per_round,
            noise_seed=seed,
            stacked_users=stacked_users,
        ),
        laplace.dp_event_from_state,
    )
  if AGGREGATOR.value == 'distributed_dp':
    return (
        distributed_dp.DistributedDpFactory(
            noise_multiplier=noise,
            clip=CLIP.value,
            expected_clients_per_round=int(expected_clients_per_round),
            bits=BITS.value,
            mechanism=DDP_MECHANISM.value,
            beta=DDP_BETA.value,
            modclip_prob=DDP_MODCLIP_PROB.value,
            rotation_seed=seed,
        ),
        distributed_dp.dp_event_from_state,
    )
  adaptive = _is_adaptive()
  return (
      gaussian.GaussianFactory(
          noise_multiplier=noise,
          clip=INITIAL_CLIP.value if adaptive else CLIP.value,
          expected_clients_per_round=expected_clients_per_round,
          clipping=CLIPPING.value,
          adaptive=_adaptive() if adaptive else None,
          noise_placement=NOISE_PLACEMENT.value,
          noise_seed=seed,
          secure_sum=AGGREGATOR.value == 'secure_gaussian',
          stacked_users=stacked_users,
      ),
      gaussian.local_dp_event_from_state
      if NOISE_PLACEMENT.value == 'client' else gaussian.dp_event_from_state,
  )
