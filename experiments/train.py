r"""Trains a model with DP-FedAvg and records the privacy it spent.

  python -m experiments.train --task=digits --aggregator=gaussian_fixed \
      --noise_multiplier=1.0 --clip=1.0 --clients_per_round=20 --rounds=30

Each round logs one line (round, loss, accuracy, epsilon so far, seconds, ETA)
and appends a row to OUTPUT_DIR/metrics.csv; OUTPUT_DIR/config.json holds every
flag. Flags are checked before any work: a bad value exits with status 2 and
one line naming the flag and its allowed range.
"""

import math
import os
import sys
from typing import Callable, Optional

from absl import app
from absl import flags
from absl import logging
import dp_accounting
import tensorflow as tf

from aggregators import gaussian
from dp_fedavg import accounting
from dp_fedavg import execution
from dp_fedavg import loop
from dp_fedavg import outputs
from dp_fedavg import process
from dp_fedavg import sampling
from dp_fedavg import tasks

TASKS = tasks.TASK_NAMES
AGGREGATORS = ('none', 'gaussian_fixed')
SAMPLINGS = ('poisson', 'uniform')
PARTITIONS = tasks.digits.PARTITIONS

_TASK = flags.DEFINE_string('task', 'digits', f'One of {TASKS}.')
_NUM_CLIENTS = flags.DEFINE_integer(
    'num_clients', 100, 'Training clients in the population (N).')
_PARTITION = flags.DEFINE_string(
    'partition', 'iid', f'How examples are split over clients: {PARTITIONS}.')
_DIRICHLET_ALPHA = flags.DEFINE_float(
    'dirichlet_alpha', 0.5, 'Label-skew concentration for --partition=dirichlet.')
_AGGREGATOR = flags.DEFINE_string(
    'aggregator', 'gaussian_fixed',
    f'One of {AGGREGATORS}; none is plain (non-private) FedAvg.')
_NOISE_MULTIPLIER = flags.DEFINE_float(
    'noise_multiplier', 1.0, 'Noise stddev on the sum, in units of --clip.')
_CLIP = flags.DEFINE_float(
    'clip', 1.0, 'L2 norm bound of one client update.')
_CLIENTS_PER_ROUND = flags.DEFINE_integer(
    'clients_per_round', 20,
    'Clients per round: exact for uniform sampling, expected for Poisson '
    '(rate q = clients_per_round / num_clients).')
_SAMPLING = flags.DEFINE_string(
    'sampling', 'poisson',
    f'Client sampling, one of {SAMPLINGS}. Poisson gives epsilon under '
    'add/remove-one-client adjacency, uniform under replace-one.')
_ROUNDS = flags.DEFINE_integer('rounds', 30, 'Training rounds.')
_LOCAL_EPOCHS = flags.DEFINE_integer(
    'local_epochs', 2, 'Passes over its data each client makes per round.')
_BATCH_SIZE = flags.DEFINE_integer('batch_size', 8, 'Client batch size.')
_CLIENT_LR = flags.DEFINE_float('client_lr', 0.3, 'Client SGD learning rate.')
_SERVER_LR = flags.DEFINE_float('server_lr', 1.0, 'Server learning rate.')
_SERVER_MOMENTUM = flags.DEFINE_float(
    'server_momentum', 0.9, 'Server SGD momentum.')
_DELTA = flags.DEFINE_float('delta', 1e-5, 'Target delta of (epsilon, delta).')
_EVAL_EVERY = flags.DEFINE_integer(
    'eval_every', 1, 'Evaluate on the held-out clients every this many rounds.')
_SEED = flags.DEFINE_integer(
    'seed', 0, 'Seed of data split, sampling, shuffling, model init and noise.')
_OUTPUT_DIR = flags.DEFINE_string(
    'output_dir', 'runs/train', 'Where metrics.csv and config.json go.')
_OVERWRITE = flags.DEFINE_bool(
    'overwrite', False, 'Replace the metrics.csv of an earlier run in output_dir.')

# (flag, predicate, allowed range in words); the first failing one is reported.
_RANGE_CHECKS: tuple[tuple[flags.FlagHolder, Callable[..., bool], str], ...] = (
    (_TASK, lambda v: v in TASKS, f'one of {", ".join(TASKS)}'),
    (_NUM_CLIENTS, lambda v: v >= 1, 'an integer >= 1'),
    (_PARTITION, lambda v: v in PARTITIONS, f'one of {", ".join(PARTITIONS)}'),
    (_DIRICHLET_ALPHA, lambda v: v > 0, '> 0'),
    (_AGGREGATOR, lambda v: v in AGGREGATORS, f'one of {", ".join(AGGREGATORS)}'),
    (_NOISE_MULTIPLIER, lambda v: 0 <= v < math.inf, 'a finite number >= 0'),
    (_CLIP, lambda v: 0 < v < math.inf, 'a finite number > 0'),
    (_SAMPLING, lambda v: v in SAMPLINGS, f'one of {", ".join(SAMPLINGS)}'),
    (_ROUNDS, lambda v: v >= 1, 'an integer >= 1'),
    (_LOCAL_EPOCHS, lambda v: v >= 1, 'an integer >= 1'),
    (_BATCH_SIZE, lambda v: v >= 1, 'an integer >= 1'),
    (_CLIENT_LR, lambda v: 0 < v < math.inf, 'a finite number > 0'),
    (_SERVER_LR, lambda v: 0 < v < math.inf, 'a finite number > 0'),
    (_SERVER_MOMENTUM, lambda v: 0 <= v < 1, 'in [0, 1)'),
    (_DELTA, lambda v: 0 < v < 1, 'in (0, 1)'),
    (_EVAL_EVERY, lambda v: v >= 1, 'an integer >= 1'),
)


def flag_error() -> Optional[str]:
  """The first problem with the parsed flags, as one line; None if none."""
  for holder, is_allowed, allowed in _RANGE_CHECKS:
    if not is_allowed(holder.value):
      return f'--{holder.name}={holder.value} is out of range: must be {allowed}.'
  num_clients = _NUM_CLIENTS.value
  if not 1 <= _CLIENTS_PER_ROUND.value <= num_clients:
    return (
        f'--clients_per_round={_CLIENTS_PER_ROUND.value} is out of range: must '
        f'be in [1, --num_clients={num_clients}] (sampling rate q = '
        'clients_per_round / num_clients must lie in (0, 1]).'
    )
  metrics_path = os.path.join(_OUTPUT_DIR.value, 'metrics.csv')
  if os.path.exists(metrics_path) and not _OVERWRITE.value:
    return (
        f'--output_dir={_OUTPUT_DIR.value} already holds metrics.csv: choose '
        'another --output_dir or pass --overwrite.'
    )
  return None


def _exit_with_usage_error(message: str) -> None:
  print(f'{os.path.basename(sys.argv[0])}: error: {message}', file=sys.stderr)
  sys.exit(2)


def main(argv):
  if len(argv) > 1:
    _exit_with_usage_error(f'unexpected arguments: {" ".join(argv[1:])}')
  error = flag_error()
  if error:
    _exit_with_usage_error(error)

  tf.keras.utils.set_random_seed(_SEED.value)
  try:
    task = tasks.build_task(
        _TASK.value,
        num_clients=_NUM_CLIENTS.value,
        partition=_PARTITION.value,
        dirichlet_alpha=_DIRICHLET_ALPHA.value,
        seed=_SEED.value,
    )
  except ValueError as e:
    _exit_with_usage_error(f'--task={_TASK.value}: {e}')

  if _AGGREGATOR.value == 'none':
    aggregator = None
    dp_event_fn = lambda state: dp_accounting.NonPrivateDpEvent()
  else:
    aggregator = gaussian.GaussianFixedClipFactory(
        noise_multiplier=_NOISE_MULTIPLIER.value,
        clip=_CLIP.value,
        expected_clients_per_round=_CLIENTS_PER_ROUND.value,
        noise_seed=_SEED.value,
    )
    dp_event_fn = gaussian.dp_event_from_state

  scheme = sampling.SamplingScheme(_SAMPLING.value)
  run_outputs = outputs.RunOutputs(_OUTPUT_DIR.value, overwrite=_OVERWRITE.value)
  run_outputs.write_config(
      {name: flags.FLAGS[name].value for name in _flag_names()}
  )
  accountant = accounting.PrivacyAccountant(
      scheme, _NUM_CLIENTS.value, _CLIENTS_PER_ROUND.value, _DELTA.value
  )
  logging.info(
      'task %s, %d clients, %s aggregator, %s sampling of %d per round; '
      'epsilon by RDP under %s adjacency at delta=%g',
      task.name, _NUM_CLIENTS.value, _AGGREGATOR.value, scheme.value,
      _CLIENTS_PER_ROUND.value, accountant.neighboring_relation.name,
      _DELTA.value,
  )
  with execution.local_execution():
    learning_process = process.build_process(
        task.model_fn,
        aggregator,
        client_learning_rate=_CLIENT_LR.value,
        server_learning_rate=_SERVER_LR.value,
        server_momentum=_SERVER_MOMENTUM.value,
    )
    evaluator = process.FederatedEvaluator(
        task.model_fn, task.eval_client_datasets()
    )
    loop.run_training(
        learning_process,
        task,
        sampling.ClientSampler(
            scheme, _NUM_CLIENTS.value, _CLIENTS_PER_ROUND.value, _SEED.value
        ),
        accountant,
        dp_event_fn,
        evaluator,
        rounds=_ROUNDS.value,
        local_epochs=_LOCAL_EPOCHS.value,
        batch_size=_BATCH_SIZE.value,
        eval_every=_EVAL_EVERY.value,
        seed=_SEED.value,
        on_round=run_outputs.release_round,
    )
  logging.info(
      'done: epsilon %.4g at delta %g after %d rounds; results in %s',
      accountant.epsilon(), _DELTA.value, _ROUNDS.value, _OUTPUT_DIR.value,
  )


def _flag_names() -> list[str]:
  return sorted(
      holder.name for holder in globals().values()
      if isinstance(holder, flags.FlagHolder)
  )


if __name__ == '__main__':
  app.run(main)
