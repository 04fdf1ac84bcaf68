"""What every task provides: a Keras model, federated train data, eval data."""

import dataclasses
import functools
from typing import Callable

import numpy as np
import tensorflow as tf
import tensorflow_federated as tff


# A batch size that holds every example of any client.
_ALL_EXAMPLES = 2**31 - 1


def local_example_order(
    num_examples: tf.Tensor, local_epochs: int, seed
) -> tf.Tensor:
  """Indices of a client's examples in local-training order.

  Each epoch is a fresh uniform permutation (a stateless function of `seed`
  and the epoch), and epochs follow one another.
  """
  keys = tf.random.stateless_uniform(
      tf.stack([local_epochs, num_examples]),
      seed=tf.stack([tf.cast(seed, tf.int64), tf.constant(0, tf.int64)]),
  )
  return tf.reshape(tf.argsort(keys, axis=1, stable=True), [-1])


def all_examples(dataset: tf.data.Dataset):
  """Every example of a client's dataset as one batch; None if it has none.

  One op: an eager iterator would cost 2 ms more per client.
  """
  try:
    return dataset.batch(_ALL_EXAMPLES).get_single_element()
  except tf.errors.InvalidArgumentError:
    if any(True for _ in dataset.take(1)):
      raise
    return None


def client_dataset_options() -> tf.data.Options:
  """tf.data options for client datasets: no graph rewrites, no autotuning.

  TFF's worker rewrites each client's dataset graph with tf.data's default
  optimizations every time it is iterated; batching examples held in memory
  leaves them nothing to fuse or parallelize, and the
  rewrite cost 10-20% of the reference MLP round (BENCHMARKS.md).
  """
  options = tf.data.Options()
  options.experimental_optimization.apply_default_optimizations = False
  options.autotune.enabled = False
  return options


@dataclasses.dataclass(frozen=True)
class FederatedTask:
  """A model plus its federated data.

  Attributes:
    name: the `--task` name.
    keras_model_fn: builds a fresh, uncompiled Keras model (logits out).
    loss_fn: builds the training loss.
    metrics_fn: builds the metrics reported by evaluation.
    train_data: one client per training participant; elements are (x, y)
      examples, unbatched. Datasets are built only for clients that are asked
      for.
    eval_data: evaluation data as clients, never sampled for training: held-out
      clients, or each client's held-out examples; same elements.
    data_files: the files the data was read from, when a run's config
      records their fingerprint (the custom task).
    regression: the model predicts values and the loss is their mean squared
      error: evaluation reports no accuracy, and studies compare the loss.
  """

  name: str
  keras_model_fn: Callable[[], tf.keras.Model]
  loss_fn: Callable[[], tf.keras.losses.Loss]
  metrics_fn: Callable[[], list[tf.keras.metrics.Metric]]
  train_data: tff.simulation.datasets.ClientData
  eval_data: tff.simulation.datasets.ClientData
  data_files: tuple[str, ...] = ()
  regression: bool = False

  def preprocess(
      self, dataset: tf.data.Dataset, local_epochs: int, batch_size: int, seed: int
  ) -> tf.data.Dataset:
    """One client's local training data: shuffled each epoch, then batched.

    The order is `local_example_order`'s, which the vectorized engine uses
    too, so both engines train a user on the same batches. The client's
    examples are read here, eagerly: a dataset that reordered them itself
    would trace a function per client (8x the cost of building it).
    """
    examples = all_examples(dataset)
    if examples is None:  # A client without examples trains on no batch.
      return dataset.batch(batch_size).with_options(client_dataset_options())
    order = local_example_order(
        tf.shape(tf.nest.flatten(examples)[0])[0], local_epochs, seed
    )
    return (
        tf.data.Dataset.from_tensor_slices(
            tf.nest.map_structure(lambda t: tf.gather(t, order), examples)
        )
        .batch(batch_size)
        .with_options(client_dataset_options())
    )

  @functools.cached_property
  def input_spec(self):
    # Derived from the element spec, not from a batched dataset: model_fn runs
    # inside TFF's graph tracing, where an eager dataset cannot be captured.
    return tf.nest.map_structure(
        lambda spec: tf.TensorSpec([None, *spec.shape], spec.dtype),
        self.eval_data.element_type_structure,
    )

  @functools.cached_property
  def update_dimension(self) -> int:
    """How many values a client's model update has (trainable weights)."""
    return sum(
        int(tf.size(weight)) for weight in self.keras_model_fn().trainable_weights
    )

  @functools.cached_property
  def examples_per_client(self) -> np.ndarray:
    """How many training examples each client holds, in `client_ids` order
    (example-level DP accounts every client on its own)."""
    counts = []
    for client_id in self.train_data.client_ids:
      dataset = self.train_data.create_tf_dataset_for_client(client_id)
      count = int(dataset.cardinality())
      if count < 0:  # Unknown or infinite: count the elements.
        count = int(dataset.reduce(np.int64(0), lambda total, _: total + 1))
      counts.append(count)
    return np.asarray(counts, np.int64)

  def model_fn(self) -> tff.learning.models.VariableModel:
    return tff.learning.models.from_keras_model(
        self.keras_model_fn(),
        input_spec=self.input_spec,
        loss=self.loss_fn(),
        # Named here so TFF does not add (and log adding) them itself.
        metrics=self.metrics_fn() + [
            tff.learning.metrics.NumExamplesCounter(),
            tff.learning.metrics.NumBatchesCounter(),
        ],
    )

  def eval_client_datasets(self, batch_size: int = 256) -> list[tf.data.Dataset]:
    """Every held-out client's data, batched for evaluation."""
    return [
        self.eval_data.create_tf_dataset_for_client(client_id)
        .batch(batch_size)
        .with_options(client_dataset_options())
        for client_id in self.eval_data.client_ids
    ]


def unreduced_loss(task: FederatedTask) -> Callable:
  """(labels, outputs) -> the task's training loss without its reduction:
  one value per leading position of the labels (users, batch, time)."""
  loss = task.loss_fn()
  config = loss.get_config()
  config['reduction'] = tf.keras.losses.Reduction.NONE
  return type(loss).from_config(config)


def classification_task(
    name: str,
    keras_model_fn: Callable[[], tf.keras.Model],
    train_data: tff.simulation.datasets.ClientData,
    eval_data: tff.simulation.datasets.ClientData,
) -> FederatedTask:
  """A task whose model maps an example to class logits; integer labels."""
  return FederatedTask(
      name=name,
      keras_model_fn=keras_model_fn,
      loss_fn=lambda: tf.keras.losses.SparseCategoricalCrossentropy(
          from_logits=True
      ),
      metrics_fn=lambda: [
          tf.keras.metrics.SparseCategoricalAccuracy(name='accuracy')
      ],
      train_data=train_data,
      eval_data=eval_data,
  )


def regression_task(
    name: str,
    keras_model_fn: Callable[[], tf.keras.Model],
    train_data: tff.simulation.datasets.ClientData,
    eval_data: tff.simulation.datasets.ClientData,
) -> FederatedTask:
  """A task whose model predicts float labels (as many as it has outputs);
  the loss is their mean squared error, and evaluation reports it."""
  return FederatedTask(
      name=name,
      keras_model_fn=keras_model_fn,
      loss_fn=tf.keras.losses.MeanSquaredError,
      metrics_fn=list,
      train_data=train_data,
      eval_data=eval_data,
      regression=True,
  )
