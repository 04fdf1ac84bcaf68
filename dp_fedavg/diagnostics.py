"""Diagnostics that look at individual clients: NOT differentially private.

For studying a mechanism (which clip suits which layer), never for a released
model's metrics: the values describe single clients' updates.
"""

import numpy as np
import tensorflow as tf
import tensorflow_federated as tff


class UpdateNormProbe:
  """L2 norm of every tensor of each client's unclipped model update.

  Runs the same local training as `dp_fedavg.process.build_process` (SGD at
  `client_learning_rate` on the client's data) through TFF's model-delta
  client work, from given model weights, and returns the deltas' norms.
  """

  def __init__(self, model_fn, client_learning_rate: float):
    self._client_work = tff.learning.templates.build_model_delta_client_work(
        model_fn,
        tff.learning.optimizers.build_sgdm(learning_rate=client_learning_rate),
        client_weighting=tff.learning.ClientWeighting.UNIFORM,
    )
    self._state = self._client_work.initialize()
    # Built in a fresh graph, where Keras numbers layers from zero again, so
    # names do not depend on how many models the process built before.
    with tf.Graph().as_default():
      self.layer_names = [
          variable.name for variable in model_fn().trainable_variables
      ]

  def __call__(
      self, model_weights: tff.learning.models.ModelWeights, client_datasets: list
  ) -> np.ndarray:
    """[clients, tensors] norms of the updates of `client_datasets`' clients."""
    if not client_datasets:
      return np.zeros((0, len(self.layer_names)))
    output = self._client_work.next(
        self._state, [model_weights] * len(client_datasets), client_datasets
    )
    return np.array([
        [np.linalg.norm(np.asarray(t)) for t in result.update]
        for result in output.result
    ])
