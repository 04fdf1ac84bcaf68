"""Builds the DP-FedAvg learning process from a model and an aggregator.

Clients run SGD on their local data (the task's preprocessing sets the local
epochs and batch size); each client's model delta goes through the aggregator
(clip and noise for the DP factories); the server applies the aggregate with
SGD with momentum. Client updates are unweighted: weighting by example count
would make one client's influence depend on its data size, which breaks the
per-client sensitivity bound of user-level DP.
"""

from typing import Callable, Optional

import tensorflow_federated as tff


def build_process(
    model_fn: Callable[[], tff.learning.models.VariableModel],
    aggregator: Optional[tff.aggregators.UnweightedAggregationFactory],
    client_learning_rate: float,
    server_learning_rate: float,
    server_momentum: float,
) -> tff.learning.templates.LearningProcess:
  """Returns a `tff.learning` federated averaging process.

  Args:
    model_fn: builds a fresh `tff.learning.models.VariableModel`.
    aggregator: the model-update aggregator; None is the plain unweighted mean
      (no privacy).
    client_learning_rate: SGD step size on the clients, > 0.
    server_learning_rate: server step size, > 0.
    server_momentum: server momentum in [0, 1).
  """
  if not client_learning_rate > 0:
    raise ValueError(
        f'client_learning_rate must be > 0, got {client_learning_rate}.'
    )
  if not server_learning_rate > 0:
    raise ValueError(
        f'server_learning_rate must be > 0, got {server_learning_rate}.'
    )
  if not 0 <= server_momentum < 1:
    raise ValueError(f'server_momentum must be in [0, 1), got {server_momentum}.')
  return tff.learning.algorithms.build_unweighted_fed_avg(
      model_fn,
      client_optimizer_fn=tff.learning.optimizers.build_sgdm(
          learning_rate=client_learning_rate
      ),
      server_optimizer_fn=tff.learning.optimizers.build_sgdm(
          learning_rate=server_learning_rate, momentum=server_momentum
      ),
      model_aggregator=aggregator or tff.aggregators.UnweightedMeanFactory(),
  )
