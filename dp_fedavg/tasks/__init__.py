"""Federated learning tasks: a model function plus federated data.

Tasks are looked up by name (`--task`); each module registers a builder.
"""

from typing import Callable

from dp_fedavg.tasks import base
from dp_fedavg.tasks import digits

FederatedTask = base.FederatedTask

_BUILDERS: dict[str, Callable[..., base.FederatedTask]] = {
    'digits': digits.build_task,
}

TASK_NAMES = tuple(sorted(_BUILDERS))


def build_task(name: str, **kwargs) -> base.FederatedTask:
  """Builds the task called `name` with the task's own keyword arguments."""
  if name not in _BUILDERS:
    raise ValueError(f'unknown task {name!r}; known tasks: {", ".join(TASK_NAMES)}')
  return _BUILDERS[name](**kwargs)
