"""Flags that fix a run's privacy: mechanism, sampling, budget, accountant.

Shared by `experiments.train` and `experiments.privacy_report`, so that the
report for a set of flags is the accounting that training with them does.
"""

import math
from typing import Callable, Optional

from absl import flags
import dp_accounting

from aggregators import gaussian
from dp_fedavg import accounting
from dp_fedavg import sampling

AGGREGATORS = ('none', 'gaussian_fixed')
SAMPLINGS = tuple(s.value for s in sampling.SamplingScheme)
ACCOUNTANTS = tuple(k.value for k in accounting.AccountantKind)
CALIBRATIONS = ('none', 'noise')

AGGREGATOR = flags.DEFINE_string(
    'aggregator', 'gaussian_fixed',
    f'One of {AGGREGATORS}; none is plain (non-private) FedAvg.')
NOISE_MULTIPLIER = flags.DEFINE_float(
    'noise_multiplier', 1.0, 'Noise stddev on the sum, in units of --clip.')
CLIP = flags.DEFINE_float('clip', 1.0, 'L2 norm bound of one client update.')
NUM_CLIENTS = flags.DEFINE_integer(
    'num_clients', 100, 'Training clients in the population (N).')
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
    (NUM_CLIENTS, lambda v: v >= 1, 'an integer >= 1'),
    (SAMPLING, lambda v: v in SAMPLINGS, f'one of {", ".join(SAMPLINGS)}'),
    (ROUNDS, lambda v: v >= 1, 'an integer >= 1'),
    (DELTA, lambda v: 0 < v < 1, 'in (0, 1)'),
    (ACCOUNTANT, lambda v: v in ACCOUNTANTS, f'one of {", ".join(ACCOUNTANTS)}'),
    (TARGET_EPSILON, lambda v: v is None or 0 < v < math.inf,
     'a finite number > 0'),
    (CALIBRATE, lambda v: v in CALIBRATIONS, f'one of {", ".join(CALIBRATIONS)}'),
)


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
  if SAMPLING.value != 'full' and not (
      1 <= CLIENTS_PER_ROUND.value <= NUM_CLIENTS.value
  ):
    return (
        f'--clients_per_round={CLIENTS_PER_ROUND.value} is out of range: must '
        f'be in [1, --num_clients={NUM_CLIENTS.value}] (sampling rate q = '
        'clients_per_round / num_clients must lie in (0, 1]).'
    )
  if CALIBRATE.value == 'noise' and TARGET_EPSILON.value is None:
    return '--calibrate=noise needs --target_epsilon.'
  if AGGREGATOR.value == 'none' and TARGET_EPSILON.value is not None:
    return (
        '--target_epsilon needs a private --aggregator; --aggregator=none '
        'spends an infinite epsilon.'
    )
  return None


def event_for_noise_multiplier() -> Callable[[float], dp_accounting.DpEvent]:
  """The chosen aggregator's per-round DpEvent as a function of z."""
  if AGGREGATOR.value == 'none':
    return lambda z: dp_accounting.NonPrivateDpEvent()
  return gaussian.round_dp_event


def build_accountant() -> accounting.PrivacyAccountant:
  return accounting.PrivacyAccountant(
      sampling.SamplingScheme(SAMPLING.value),
      NUM_CLIENTS.value,
      CLIENTS_PER_ROUND.value,
      DELTA.value,
      accounting.AccountantKind(ACCOUNTANT.value),
  )


def noise_multiplier(accountant: accounting.PrivacyAccountant) -> float:
  """--noise_multiplier, or the calibrated one under --calibrate=noise.

  Raises:
    ValueError: if calibration cannot meet --target_epsilon.
  """
  if CALIBRATE.value != 'noise':
    return NOISE_MULTIPLIER.value
  return accountant.calibrate_noise_multiplier(
      event_for_noise_multiplier(), TARGET_EPSILON.value, ROUNDS.value
  )
