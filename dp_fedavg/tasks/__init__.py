"""Federated learning tasks: a model function plus federated data.

Tasks are looked up by name (`--task`). Every builder takes the options of
`TaskOptions` that apply to it; `build_task` hands each builder its own.
"""

import dataclasses
from typing import Callable, Optional

from dp_fedavg.tasks import base
from dp_fedavg.tasks import cifar10
from dp_fedavg.tasks import client_data
from dp_fedavg.tasks import custom
from dp_fedavg.tasks import digits
from dp_fedavg.tasks import femnist
from dp_fedavg.tasks import shakespeare

FederatedTask = base.FederatedTask
DataNotFoundError = client_data.DataNotFoundError
PARTITIONS = client_data.PARTITIONS
DATA_SOURCES = client_data.DATA_SOURCES
# Tasks whose clients are natural users (a role, a writer): the population is
# theirs, and num_clients only takes the first that many.
NATURAL_TASKS = ('femnist', 'shakespeare')
DEFAULT_NUM_CLIENTS = 100


@dataclasses.dataclass(frozen=True)
class TaskOptions:
  """Everything a task may be built from; each task uses what applies.

  num_clients: clients to split the data over (digits, cifar10; default 100),
    or how many of the natural clients to use (femnist, shakespeare; default
    all). partition / dirichlet_alpha: the split (digits, cifar10). data_dir /
    data_source: where the data is (femnist, shakespeare, cifar10). seed: of
    every split. silos: femnist: pool the writers' training examples into
    this many IID clients. data_path / model / test_data_path /
    feature_key / label_key / loss: the custom task's files, keys and loss
    (`dp_fedavg.tasks.custom`).
  """

  num_clients: Optional[int] = None
  partition: str = 'iid'
  dirichlet_alpha: float = 0.5
  seed: int = 0
  data_dir: Optional[str] = None
  data_source: str = 'local'
  silos: Optional[int] = None
  data_path: Optional[str] = None
  model: Optional[str] = None
  test_data_path: Optional[str] = None
  feature_key: str = 'x'
  label_key: str = 'y'
  loss: str = 'auto'


def _split_num_clients(options: TaskOptions) -> int:
  return options.num_clients or DEFAULT_NUM_CLIENTS


_BUILDERS: dict[str, Callable[[TaskOptions], base.FederatedTask]] = {
    'digits': lambda o: digits.build_task(
        num_clients=_split_num_clients(o), partition=o.partition,
        dirichlet_alpha=o.dirichlet_alpha, seed=o.seed,
    ),
    'cifar10': lambda o: cifar10.build_task(
        data_dir=o.data_dir, num_clients=_split_num_clients(o),
        partition=o.partition, dirichlet_alpha=o.dirichlet_alpha, seed=o.seed,
        data_source=o.data_source,
    ),
    'femnist': lambda o: femnist.build_task(
        data_dir=o.data_dir, num_clients=o.num_clients, seed=o.seed,
        data_source=o.data_source, silos=o.silos,
    ),
    'custom': lambda o: custom.build_task(
        data_path=o.data_path, model=o.model,
        test_data_path=o.test_data_path, feature_key=o.feature_key,
        label_key=o.label_key, seed=o.seed, loss=o.loss,
    ),
    'shakespeare': lambda o: shakespeare.build_task(
        data_dir=o.data_dir, num_clients=o.num_clients,
        data_source=o.data_source,
    ),
}

TASK_NAMES = tuple(sorted(_BUILDERS))


def build_task(name: str, options: TaskOptions = TaskOptions()) -> base.FederatedTask:
  """Builds the task called `name`.

  Raises:
    DataNotFoundError: the task's data is not where the options say.
    ValueError: an unknown task or an option out of the task's range.
  """
  if name not in _BUILDERS:
    raise ValueError(f'unknown task {name!r}; known tasks: {", ".join(TASK_NAMES)}')
  return _BUILDERS[name](options)
