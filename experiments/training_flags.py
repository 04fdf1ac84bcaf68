"""Flags that choose the task and the local training; the run's configuration.

Shared by `experiments.train` and the study binaries. `config_from_flags`
builds the frozen `RunConfig` that the binary's `main` passes down; nothing
below the binaries reads flags.
"""

import dataclasses
import math
import sys
from typing import Any, Optional

from absl import flags

from dp_fedavg import run_config
from dp_fedavg import tasks
from experiments import privacy_flags
from experiments import robust_flags

TASK = flags.DEFINE_string('task', 'digits', f'One of {tasks.TASK_NAMES}.')
DATA_DIR = flags.DEFINE_string(
    'data_dir', None,
    'Where the task\'s data is. femnist, shakespeare: default the shared data '
    'beside the project (../shared/data/<task dir>); cifar10: the '
    'cifar-10-batches-py directory (required); digits: unused.')
DATA_SOURCE = flags.DEFINE_string(
    'data_source', 'local',
    f'One of {tasks.DATA_SOURCES}: local files, or TFF\'s dataset loaders '
    '(femnist, shakespeare; downloads into --data_dir when not cached).')
PARTITION = flags.DEFINE_string(
    'partition', 'iid',
    f'digits, cifar10: how examples are split over clients: {tasks.PARTITIONS}.')
DIRICHLET_ALPHA = flags.DEFINE_float(
    'dirichlet_alpha', 0.5, 'Label-skew concentration for --partition=dirichlet.')
SILOS = flags.DEFINE_integer(
    'silos', None,
    'Pool the training examples and split them IID into this many clients '
    '(silos, the cross-silo setting of --privacy_unit=example): femnist pools '
    'its writers; digits and cifar10 split as --num_clients=K '
    '--partition=iid; not shakespeare. Unset: the task\'s own clients.')
DATA_PATH = flags.DEFINE_string(
    'data_path', None,
    '--task=custom: the training clients\' examples: TFF SQLite client data '
    '(.sqlite, .db; see dp_fedavg.tasks.custom.write_client_data), or .npz / '
    '.csv with a client_id column.')
MODEL = flags.DEFINE_string(
    'model', None,
    '--task=custom: a Keras model file (.keras) or module:function returning '
    'an uncompiled Keras model with logits out.')
TEST_DATA_PATH = flags.DEFINE_string(
    'test_data_path', None,
    '--task=custom: evaluation clients, in a format of --data_path; default '
    'a seeded tenth of --data_path\'s clients, held out.')
FEATURE_KEY = flags.DEFINE_string(
    'feature_key', 'x', '--task=custom: the examples\' feature key or column.')
LABEL_KEY = flags.DEFINE_string(
    'label_key', 'y', '--task=custom: the examples\' label key or column.')
LOSS = flags.DEFINE_enum(
    'loss', 'auto', tasks.custom.LOSSES,
    '--task=custom: crossentropy (class labels; logits out) or mse '
    '(regression: a number per model output); auto: crossentropy for integer '
    'or one-hot labels.')
LOCAL_EPOCHS = flags.DEFINE_integer(
    'local_epochs', 2, 'Passes over its data each client makes per round.')
BATCH_SIZE = flags.DEFINE_integer('batch_size', 8, 'Client batch size.')
CLIENT_LR = flags.DEFINE_float('client_lr', 0.3, 'Client SGD learning rate.')
SERVER_LR = flags.DEFINE_float('server_lr', 1.0, 'Server learning rate.')
SERVER_MOMENTUM = flags.DEFINE_float(
    'server_momentum', 0.9, 'Server SGD momentum.')
EVAL_EVERY = flags.DEFINE_integer(
    'eval_every', 1, 'Evaluate on the evaluation clients every this many rounds.')
MAX_DIVERGED_ROUNDS = flags.DEFINE_integer(
    'max_diverged_rounds', 3,
    'Stop (exit 1) after this many consecutive rounds in which every '
    'client\'s update was not finite, suggesting a smaller --client_lr; 0: '
    'never stop.')
DROPOUT_RATE = flags.DEFINE_float(
    'dropout_rate', 0.0,
    'Each sampled client fails to report with this probability (seeded), as '
    'devices going offline do; the mean keeps its constant denominator. '
    'Central DP: epsilon unchanged. distributed_dp: see '
    '--ddp_dropout_tolerance.')
WORKERS = flags.DEFINE_list(
    'workers', [],
    'host:port (or unix:/PATH) of TFF workers (`python -m dp_fedavg.worker`, '
    'best reached through an SSH tunnel to its --socket) to run the rounds '
    'on, clients split among them; empty: one local worker.')
ENGINE = flags.DEFINE_enum(
    'engine', 'auto', list(run_config.ENGINES),
    'Where the rounds run; same training, same privacy. inprocess: the '
    'process\'s TF graphs in this process (no TFF worker; on a GPU when '
    'TensorFlow sees one), users grouped per TFF client as in vectorized when '
    'the mechanism allows. vectorized: many users per TFF client on TFF\'s '
    'worker (not with mechanisms that sum securely). standard: one TFF client '
    'per user on TFF\'s worker. auto: inprocess; standard for mechanisms that '
    'sum securely; vectorized with --workers. The log names the engine and '
    'why.')
USERS_PER_WORKER_CLIENT = flags.DEFINE_integer(
    'users_per_worker_client', None,
    'Users grouped into one TFF client (vectorized process); default '
    'ceil(expected users per round / CPU cores).')
USER_DATA_DIR = flags.DEFINE_string(
    'user_data_dir', None,
    'The vectorized process (see --engine): where each sampled user\'s '
    'examples are written for its graphs to read; default a temporary directory. With --workers on '
    'other hosts, a directory every host sees at the same path.')
SEED = flags.DEFINE_integer(
    'seed', 0, 'Seed of data split, sampling, shuffling, model init and noise.')

_TRAINING_FLAGS = (
    TASK, DATA_DIR, DATA_SOURCE, PARTITION, DIRICHLET_ALPHA, SILOS, DATA_PATH,
    MODEL, TEST_DATA_PATH, FEATURE_KEY, LABEL_KEY, LOSS, LOCAL_EPOCHS,
    BATCH_SIZE, CLIENT_LR, SERVER_LR, SERVER_MOMENTUM, EVAL_EVERY,
    MAX_DIVERGED_ROUNDS, DROPOUT_RATE, WORKERS,
    ENGINE, USERS_PER_WORKER_CLIENT, USER_DATA_DIR, SEED,
) + robust_flags.FLAGS

RANGE_CHECKS = (
    (TASK, lambda v: v in tasks.TASK_NAMES, f'one of {", ".join(tasks.TASK_NAMES)}'),
    (DATA_SOURCE, lambda v: v in tasks.DATA_SOURCES,
     f'one of {", ".join(tasks.DATA_SOURCES)}'),
    (PARTITION, lambda v: v in tasks.PARTITIONS,
     f'one of {", ".join(tasks.PARTITIONS)}'),
    (DIRICHLET_ALPHA, lambda v: v > 0, '> 0'),
    (SILOS, lambda v: v is None or v >= 1, 'an integer >= 1'),
    (LOCAL_EPOCHS, lambda v: v >= 1, 'an integer >= 1'),
    (BATCH_SIZE, lambda v: v >= 1, 'an integer >= 1'),
    (CLIENT_LR, lambda v: 0 < v < math.inf, 'a finite number > 0'),
    (SERVER_LR, lambda v: 0 < v < math.inf, 'a finite number > 0'),
    (SERVER_MOMENTUM, lambda v: 0 <= v < 1, 'in [0, 1)'),
    (EVAL_EVERY, lambda v: v >= 1, 'an integer >= 1'),
    (MAX_DIVERGED_ROUNDS, lambda v: v >= 0, 'an integer >= 0'),
    (DROPOUT_RATE, lambda v: 0 <= v < 1, 'in [0, 1)'),
    (USERS_PER_WORKER_CLIENT, lambda v: v is None or v >= 1,
     'an integer >= 1'),
)


def config_from_flags() -> run_config.RunConfig:
  """The run configuration of the parsed flags (built once, in `main`)."""
  values: dict[str, Any] = privacy_flags.privacy_values()
  values.update((holder.name, holder.value) for holder in _TRAINING_FLAGS)
  values['workers'] = tuple(values['workers'])
  return run_config.with_defaults(**values)


def _workers_error() -> Optional[str]:
  for address in WORKERS.value:
    if address.startswith('unix:/'):  # A worker's --socket on this host.
      continue
    host, _, port = address.rpartition(':')
    if not host or not port.isdigit() or not 1 <= int(port) <= 65535:
      return (
          f'--workers: {address!r} is not host:port (a port in [1, 65535]) '
          'or unix:/PATH.'
      )
  return None


def _custom_task_error(config: run_config.RunConfig) -> Optional[str]:
  custom_flags = ('data_path', 'model', 'test_data_path')
  if config.task != 'custom':
    given = [name for name in custom_flags if getattr(config, name)]
    if config.loss != 'auto':
      given.append('loss')
    if given:
      return (f'--{given[0]} is for --task=custom; --task={config.task} reads '
              'its own data and model, with its own loss.')
    return None
  for name in ('data_path', 'model'):
    if not getattr(config, name):
      return f'--task=custom needs --{name} (see --helpfull).'
  if config.num_clients is not None or config.silos is not None:
    return ('--task=custom: its clients are those of --data_path; drop '
            '--num_clients and --silos.')
  return None


def flag_error(config: run_config.RunConfig) -> Optional[str]:
  """The first problem with the task, training and privacy flags; None if none."""
  return (
      privacy_flags.range_error(RANGE_CHECKS) or _workers_error()
      or _custom_task_error(config) or privacy_flags.flag_error(config)
  )


def start_or_exit(argv: list[str], error: Optional[str],
                  config: run_config.RunConfig):
  """A binary's start: exits (status 2, one line) on extra arguments or
  `error`, else returns the task of `config`."""
  privacy_flags.check_no_arguments(argv)
  if error:
    privacy_flags.exit_with_usage_error(error)
  return build_task_or_exit(config)


def _silos_error(config: run_config.RunConfig) -> Optional[str]:
  if config.task == 'shakespeare':
    return ('--silos pools examples into IID clients; shakespeare\'s '
            'examples are pieces of its roles\' lines: use its roles.')
  if config.task not in tasks.NATURAL_TASKS and (
      config.num_clients not in (None, config.silos)
      or config.partition != 'iid'):
    return (f'--silos={config.silos} splits --task={config.task} IID into '
            f'{config.silos} clients; drop --num_clients and --partition.')
  return None


def build_task_or_exit(config: run_config.RunConfig) -> tasks.FederatedTask:
  """The task of `config`; a missing file or bad option exits with one line."""
  options = tasks.TaskOptions(
      num_clients=config.num_clients,
      partition=config.partition,
      dirichlet_alpha=config.dirichlet_alpha,
      seed=config.seed,
      data_dir=config.data_dir,
      data_source=config.data_source,
      silos=config.silos,
      data_path=config.data_path,
      model=config.model,
      test_data_path=config.test_data_path,
      feature_key=config.feature_key,
      label_key=config.label_key,
      loss=config.loss,
  )
  if config.silos is not None:
    error = _silos_error(config)
    if error:
      privacy_flags.exit_with_usage_error(error)
    if config.task not in tasks.NATURAL_TASKS:
      options = dataclasses.replace(
          options, num_clients=config.silos, silos=None)
  try:
    task = tasks.build_task(config.task, options)
  except (ValueError, tasks.DataNotFoundError) as e:
    privacy_flags.exit_with_usage_error(f'--task={config.task}: {e}')
  error = run_config.population_error(config, len(task.train_data.client_ids))
  if error:
    privacy_flags.exit_with_usage_error(error)
  return task


def flag_values(*modules) -> dict[str, Any]:
  """{name: value} of every flag defined in `modules` and the shared ones
  (what config.json and flags.json hold)."""
  holders = [
      holder
      for module in (
          privacy_flags, robust_flags, sys.modules[__name__], *modules)
      for holder in vars(module).values()
      if isinstance(holder, flags.FlagHolder)
  ]
  holders.extend(privacy_flags.MECHANISM_FLAGS.values())
  return {holder.name: holder.value for holder in holders}
