"""Builds the DP-FedAvg learning process from a model and an aggregator.

Clients run SGD on their local data (the task's preprocessing sets the local
epochs and batch size); each client's model delta goes through the aggregator
(clip and noise for the DP factories); the server applies the aggregate with
SGD with momentum. Client updates are unweighted: weighting by example count
would make one client's influence depend on its data size, which breaks the
per-client sensitivity bound of user-level DP.
"""

import collections
import contextlib
from typing import Callable, Iterator, Optional

import numpy as np
import tensorflow as tf
import tensorflow_federated as tff
# Turns an unweighted factory into the weighted one compose_learning_process
# requires, as build_unweighted_fed_avg does; not exported at the top level.
from tensorflow_federated.python.aggregators import factory_utils


@contextlib.contextmanager
def tracing_with_grappler(enabled: bool) -> Iterator[None]:
  """Traces TFF computations that the worker runs with or without Grappler.

  A traced function call records the optimizer options in force when it is
  traced, and TFF's worker instantiates (and so optimizes) the client graphs
  again in every round. A profile of the worker put Grappler at 11% of its
  CPU time on the reference MLP round (50 clients), and its rewrites make the
  small matmuls no cheaper. Turning it off saved 16% of that round measured
  in separate processes, 0-6% side by side in `make bench` (BENCHMARKS.md),
  and made no difference on the FEMNIST CNN.
  """
  previous = tf.config.optimizer.get_experimental_options()
  tf.config.optimizer.set_experimental_options(
      {'disable_meta_optimizer': not enabled}
  )
  try:
    yield
  finally:
    tf.config.optimizer.set_experimental_options(
        {'disable_meta_optimizer': previous.get('disable_meta_optimizer', False)}
    )


def check_optimizer_args(
    client_learning_rate: float, server_learning_rate: float,
    server_momentum: float,
) -> None:
  """ValueError unless both learning rates are > 0 and momentum in [0, 1)."""
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


def build_process(
    model_fn: Callable[[], tff.learning.models.VariableModel],
    aggregator: Optional[tff.aggregators.UnweightedAggregationFactory],
    client_learning_rate: float,
    server_learning_rate: float,
    server_momentum: float,
    graph_optimizer: bool = False,
) -> tff.learning.templates.LearningProcess:
  """Returns a `tff.learning` federated averaging process.

  Args:
    model_fn: builds a fresh `tff.learning.models.VariableModel`.
    aggregator: the model-update aggregator; None is the plain unweighted mean
      (no privacy).
    client_learning_rate: SGD step size on the clients, > 0.
    server_learning_rate: server step size, > 0.
    server_momentum: server momentum in [0, 1).
    graph_optimizer: let the worker run Grappler on the round's graphs; off
      by default (see `tracing_with_grappler`).
  """
  check_optimizer_args(
      client_learning_rate, server_learning_rate, server_momentum
  )
  with tracing_with_grappler(graph_optimizer):
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


NONFINITE_CLIENTS = 'nonfinite_clients'


def counting_nonfinite_clients(
    client_work: tff.learning.templates.ClientWorkProcess,
) -> tff.learning.templates.ClientWorkProcess:
  """TFF's model-delta client work (uniform weighting), its train metrics
  also counting the clients whose update was not finite
  (`NONFINITE_CLIENTS`).

  TFF's client work sends such a client's update as zeros with weight 0 and
  drops its metrics, and counts it nowhere (TFF 0.87); under uniform
  weighting every other client has weight 1, so a weight of 0 marks exactly
  the diverged ones.
  """
  next_type = client_work.next.type_signature
  train_type = next_type.result.measurements.member.train

  @tff.tensorflow.computation(next_type.result.result.member)
  def is_nonfinite(result):
    return tf.cast(tf.equal(result.update_weight, 0.0), tf.int32)

  @tff.tensorflow.computation(train_type, tf.int32)
  def with_count(train, count):
    metrics = collections.OrderedDict(train)
    metrics[NONFINITE_CLIENTS] = count
    return metrics

  @tff.federated_computation(*next_type.parameter)
  def next_fn(state, weights, data):
    output = client_work.next(state, weights, data)
    count = tff.federated_sum(tff.federated_map(is_nonfinite, output.result))
    return tff.templates.MeasuredProcessOutput(
        state=output.state,
        result=output.result,
        measurements=tff.federated_zip(collections.OrderedDict(
            train=tff.federated_map(
                with_count, (output.measurements.train, count)))),
    )

  return tff.learning.templates.ClientWorkProcess(
      client_work.initialize, next_fn)


def build_process_with_client_work(
    task,
    wrap_client_work: Callable,
    aggregator: Optional[tff.aggregators.UnweightedAggregationFactory],
    client_learning_rate: float,
    server_learning_rate: float,
    server_momentum: float,
) -> tff.learning.templates.LearningProcess:
  """`build_process`'s process, its train metrics counting the clients that
  diverged (`counting_nonfinite_clients`), its client work wrapped.

  `wrap_client_work(client_work, weights_type)` gives the client work the
  process runs from TFF's (the one `build_unweighted_fed_avg` builds), as
  an audit's canaries do (`dp_fedavg.canaries.with_canaries`).
  """
  return compose_process(
      task,
      lambda weights_type: wrap_client_work(
          counting_nonfinite_clients(
              tff.learning.templates.build_model_delta_client_work(
                  task.model_fn,
                  tff.learning.optimizers.build_sgdm(
                      learning_rate=client_learning_rate),
                  client_weighting=tff.learning.ClientWeighting.UNIFORM,
              )),
          weights_type,
      ),
      aggregator or tff.aggregators.UnweightedMeanFactory(),
      lambda trainable_type: trainable_type,
      client_learning_rate, server_learning_rate, server_momentum,
  )


def client_work_process(
    train_client: tff.Computation, weights_type, data_type,
    finalize_metrics: Callable,
) -> tff.learning.templates.ClientWorkProcess:
  """A stateless ClientWorkProcess of an engine's client computation.

  `train_client` maps (weights, data) to (ClientResult, metric sums); the
  round's train metrics are `finalize_metrics` of the sums over clients.
  """

  @tff.tensorflow.computation(train_client.type_signature.result[1])
  def finalize(sums):
    return finalize_metrics(sums)

  @tff.federated_computation
  def init_fn():
    return tff.federated_value((), tff.SERVER)

  @tff.federated_computation(
      init_fn.type_signature.result,
      tff.FederatedType(weights_type, tff.CLIENTS),
      tff.FederatedType(data_type, tff.CLIENTS),
  )
  def next_fn(state, weights, data):
    trained = tff.federated_map(train_client, (weights, data))
    metrics = tff.federated_map(finalize, tff.federated_sum(trained[1]))
    return tff.templates.MeasuredProcessOutput(
        state=state, result=trained[0],
        measurements=tff.federated_zip(collections.OrderedDict(train=metrics)),
    )

  return tff.learning.templates.ClientWorkProcess(init_fn, next_fn)


def compose_process(
    task,
    build_client_work: Callable[[tff.Type], tff.learning.templates.ClientWorkProcess],
    aggregator: tff.aggregators.UnweightedAggregationFactory,
    update_type_of: Callable[[tff.Type], tff.Type],
    client_learning_rate: float,
    server_learning_rate: float,
    server_momentum: float,
) -> tff.learning.templates.LearningProcess:
  """A DP-FedAvg process with the engine's own client work.

  `build_client_work(weights_type)` gives the client work for the model's
  `ModelWeights` type; `aggregator` aggregates its updates, whose type is
  `update_type_of(trainable_type)`; the server steps with SGD with momentum,
  as `build_process` does.
  """
  check_optimizer_args(
      client_learning_rate, server_learning_rate, server_momentum
  )
  with tracing_with_grappler(False):
    # Traced before any other model is built, as build_unweighted_fed_avg
    # does, so a seeded run starts from the standard engine's weights.
    @tff.tensorflow.computation
    def initial_model_weights():
      return tff.learning.models.ModelWeights.from_model(task.model_fn())

    weights_type = initial_model_weights.type_signature.result
    return tff.learning.templates.compose_learning_process(
        initial_model_weights,
        tff.learning.templates.build_broadcast_process(weights_type),
        build_client_work(weights_type),
        factory_utils.as_weighted_aggregator(aggregator).create(
            update_type_of(weights_type.trainable), tff.TensorType(np.float32),
        ),
        tff.learning.templates.build_apply_optimizer_finalizer(
            tff.learning.optimizers.build_sgdm(
                learning_rate=server_learning_rate, momentum=server_momentum
            ),
            weights_type,
        ),
    )


class FederatedEvaluator:
  """Evaluates model weights on held-out clients (`tff.learning` fed_eval).

  Metrics are summed over all clients' examples before they are finalized, so
  accuracy and loss are example-weighted over the held-out clients.
  """

  def __init__(
      self,
      model_fn: Callable[[], tff.learning.models.VariableModel],
      client_datasets: list,
  ):
    if not client_datasets:
      raise ValueError('evaluation needs at least one held-out client dataset.')
    with tracing_with_grappler(False):
      self._process = tff.learning.algorithms.build_fed_eval(model_fn)
    self._client_datasets = client_datasets
    self._state = None

  def __call__(
      self, model_weights: tff.learning.models.ModelWeights
  ) -> dict[str, float]:
    if self._state is None:
      self._state = self._process.initialize()
    state = self._process.set_model_weights(self._state, model_weights)
    output = self._process.next(state, self._client_datasets)
    metrics = output.metrics['client_work']['eval']['current_round_metrics']
    return {name: float(value) for name, value in metrics.items()}
