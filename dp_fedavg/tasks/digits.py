"""The embedded default task: scikit-learn's handwritten digits.

1,797 real 8x8 grey-scale digit images (installed with scikit-learn, so no
download). A held-out fraction of the examples forms the evaluation clients
(IID); the rest is split over `num_clients` training clients, IID or with
Dirichlet(alpha) label skew (see `client_data.dirichlet_partition`).
"""

import numpy as np
from sklearn import datasets as sklearn_datasets
import tensorflow as tf

from dp_fedavg.tasks import base
from dp_fedavg.tasks import client_data

_NUM_CLASSES = 10


def keras_model() -> tf.keras.Model:
  """The digits MLP (logits out); also `--model=dp_fedavg.tasks.digits:
  keras_model` for the custom task."""
  return tf.keras.Sequential([
      tf.keras.layers.InputLayer(input_shape=(64,)),
      tf.keras.layers.Dense(32, activation='relu'),
      tf.keras.layers.Dense(_NUM_CLASSES),
  ])


def build_task(
    num_clients: int = 100,
    partition: str = 'iid',
    dirichlet_alpha: float = 0.5,
    heldout_fraction: float = 0.2,
    seed: int = 0,
) -> base.FederatedTask:
  """Builds the digits task.

  Args:
    num_clients: training clients, 1..number of training examples.
    partition: 'iid' or 'dirichlet'.
    dirichlet_alpha: concentration of the label skew, > 0.
    heldout_fraction: share of examples held out for evaluation, in (0, 1).
    seed: seed of the held-out split and the partition.

  Returns:
    The `FederatedTask`.
  """
  if not 0 < heldout_fraction < 1:
    raise ValueError(
        f'heldout_fraction must be in (0, 1), got {heldout_fraction}.'
    )
  images, labels = sklearn_datasets.load_digits(return_X_y=True)
  images = (images / 16.0).astype(np.float32)
  labels = labels.astype(np.int32)
  rng = np.random.default_rng(seed)
  order = rng.permutation(len(labels))
  num_heldout = int(round(heldout_fraction * len(labels)))
  heldout, train = order[:num_heldout], order[num_heldout:]
  shares = client_data.split_examples(
      labels[train], num_clients, partition, dirichlet_alpha, rng
  )
  # Held-out clients are IID with as many examples per client as training
  # clients have on average.
  num_heldout_clients = max(1, round(num_heldout * num_clients / len(train)))
  eval_shares = np.array_split(heldout, num_heldout_clients)

  return base.classification_task(
      'digits',
      keras_model,
      client_data.sliced_client_data(
          [str(c) for c in range(num_clients)],
          (images, labels), [train[s] for s in shares],
      ),
      client_data.sliced_client_data(
          [str(c) for c in range(num_heldout_clients)],
          (images, labels), eval_shares,
      ),
  )
