"""What every task provides: a Keras model, federated train data, eval data."""

import dataclasses
import functools
from typing import Callable

import tensorflow as tf
import tensorflow_federated as tff


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
    eval_data: the pooled, unbatched examples of the held-out clients. Their
      pooled accuracy equals the example-weighted average over those clients.
  """

  name: str
  keras_model_fn: Callable[[], tf.keras.Model]
  loss_fn: Callable[[], tf.keras.losses.Loss]
  metrics_fn: Callable[[], list[tf.keras.metrics.Metric]]
  train_data: tff.simulation.datasets.ClientData
  eval_data: tf.data.Dataset

  def preprocess(
      self, dataset: tf.data.Dataset, local_epochs: int, batch_size: int, seed: int
  ) -> tf.data.Dataset:
    """One client's local training data: shuffled each epoch, then batched."""
    return (
        dataset.shuffle(1024, seed=seed, reshuffle_each_iteration=True)
        .repeat(local_epochs)
        .batch(batch_size)
    )

  @functools.cached_property
  def input_spec(self):
    # Derived from the element spec, not from a batched dataset: model_fn runs
    # inside TFF's graph tracing, where an eager dataset cannot be captured.
    return tf.nest.map_structure(
        lambda spec: tf.TensorSpec([None, *spec.shape], spec.dtype),
        self.eval_data.element_spec,
    )

  def model_fn(self) -> tff.learning.models.VariableModel:
    return tff.learning.models.from_keras_model(
        self.keras_model_fn(),
        input_spec=self.input_spec,
        loss=self.loss_fn(),
        metrics=self.metrics_fn(),
    )

  def evaluate(
      self, model_weights: tff.learning.models.ModelWeights
  ) -> dict[str, float]:
    """Loss and metrics of `model_weights` on the held-out clients."""
    # A fresh model each time, built eagerly: Keras rewrites the base classes
    # of Sequential/Functional process-wide (keras version_utils.swap_class)
    # to its v1 graph-mode classes whenever TFF builds a model while tracing,
    # so a model kept from earlier would evaluate with the v1 code path.
    model = self.keras_model_fn()
    model.compile(loss=self.loss_fn(), metrics=self.metrics_fn())
    model_weights.assign_weights_to(model)
    results = model.evaluate(
        self.eval_data.batch(512), verbose=0, return_dict=True
    )
    return {name: float(value) for name, value in results.items()}
