"""Flags that fix a run's privacy: mechanism, its parameters, sampling, budget.

Shared by `experiments.train`, the studies and `experiments.privacy_report`,
so that the report for a set of flags is the accounting that training with
them does. The mechanism flags are derived from the registry
(`aggregators.registry`): one flag per parameter of any mechanism, with the
parameter's default and help, and the mechanisms that take it. Their values
are checked by the mechanism's own factory (`run_config.mechanism_error`).
"""

import os
import sys
from typing import Any, Callable, Optional

from absl import flags

from aggregators import registry
from dp_fedavg import accounting
from dp_fedavg import run_config
from dp_fedavg import sampling
from dp_fedavg import tasks

AGGREGATOR = flags.DEFINE_string(
    'aggregator', 'gaussian_fixed',
    'The mechanism: ' + '; '.join(
        f'{name}: {registry.get(name).summary}' for name in registry.names()
    ) + '.')
PRIVACY_UNIT = flags.DEFINE_string(
    'privacy_unit', 'user',
    f'One of {run_config.PRIVACY_UNITS}: what (epsilon, delta) protects. '
    'user: a client\'s whole data (the aggregator clips and noises client '
    'updates). example: one example of one client: every client runs DP-SGD '
    f'on its own examples with the parameters of --aggregator='
    f'{run_config.EXAMPLE_MECHANISM} (--noise_multiplier, --clip, '
    '--clipping, per example; Poisson batches of expected size --batch_size) '
    'and the server averages; epsilon is the largest client\'s.')
NUM_CLIENTS = flags.DEFINE_integer(
    'num_clients', None,
    'Training clients in the population (N). digits, cifar10: clients the data '
    f'is split over (default {tasks.DEFAULT_NUM_CLIENTS}); femnist, '
    'shakespeare: use the first N natural clients (default all of them).')
CLIENTS_PER_ROUND = flags.DEFINE_integer(
    'clients_per_round', 20,
    'Clients per round: exact for uniform sampling, expected for Poisson '
    '(rate q = clients_per_round / num_clients); ignored for full.')
SAMPLING_GROUPS = flags.DEFINE_integer(
    'sampling_groups', 0,
    '--sampling=cyclic_poisson: the groups that take turns (b); each member '
    'of the group whose turn it is takes part with probability '
    'clients_per_round / (num_clients // b). Amplified banded MF needs b >= '
    '--mf_bands. 0 for the other samplings.')
SAMPLING = flags.DEFINE_string(
    'sampling', 'poisson',
    f'Client sampling, one of {tuple(s.value for s in sampling.SamplingScheme)}. '
    'Poisson and full give epsilon under add/remove-one-client adjacency, '
    'uniform under replace-one.')
ROUNDS = flags.DEFINE_integer('rounds', 30, 'Training rounds (planned).')
DELTA = flags.DEFINE_float('delta', 1e-5, 'Target delta of (epsilon, delta).')
ACCOUNTANT = flags.DEFINE_string(
    'accountant', 'auto',
    f'One of {tuple(k.value for k in accounting.AccountantKind)}; auto reports '
    'the smaller of the RDP and PLD bounds that support the run.')
TARGET_EPSILON = flags.DEFINE_float(
    'target_epsilon', None,
    'Privacy budget at --delta. With --calibrate=noise the mechanism\'s noise '
    'is chosen to meet it after --rounds; otherwise training stops before the '
    'first round that would exceed it.')
CALIBRATE = flags.DEFINE_string(
    'calibrate', 'none',
    f'One of {run_config.CALIBRATIONS}: noise replaces the mechanism\'s noise '
    'parameter (--noise_multiplier, or --epsilon_per_round for laplace) by the '
    'least private one meeting --target_epsilon.')


def _define(info: registry.ParameterInfo) -> flags.FlagHolder:
  """The flag of one mechanism parameter, typed by its dataclass field."""
  define = {
      float: flags.DEFINE_float, Optional[float]: flags.DEFINE_float,
      int: flags.DEFINE_integer, Optional[int]: flags.DEFINE_integer,
      str: flags.DEFINE_string, bool: flags.DEFINE_bool,
  }[info.type]
  return define(
      info.name, info.default, f'{info.help} [{", ".join(info.mechanisms)}]'
  )


MECHANISM_FLAGS = {info.name: _define(info) for info in registry.parameters()}

# What every privacy run takes, whatever the binary (flag name -> holder).
RUN_FLAGS = {
    holder.name: holder for holder in (
        AGGREGATOR, PRIVACY_UNIT, NUM_CLIENTS, CLIENTS_PER_ROUND, SAMPLING,
        SAMPLING_GROUPS, ROUNDS, DELTA, ACCOUNTANT, TARGET_EPSILON, CALIBRATE,
    )
}


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
      return run_config.out_of_range(holder.name, holder.value, allowed)
  return None


def privacy_values() -> dict[str, Any]:
  """The privacy flags' values, as `RunConfig` fields and parameters."""
  values = {name: holder.value for name, holder in RUN_FLAGS.items()}
  values.update((name, h.value) for name, h in MECHANISM_FLAGS.items())
  return values


def mechanism_defaults() -> dict[str, Any]:
  """The mechanism flags' defaults (a binary may have changed them)."""
  return {name: flags.FLAGS[name].default for name in MECHANISM_FLAGS}


def flag_error(config: run_config.RunConfig) -> Optional[str]:
  """The first problem with the privacy flags of `config`; None if none."""
  error = run_config.range_error(config)
  if error is None and config.num_clients is not None:
    error = run_config.population_error(config, config.num_clients)
  return error or run_config.mechanism_error(config, mechanism_defaults())
