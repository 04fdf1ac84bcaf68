"""The embedded default task: scikit-learn's handwritten digits.

1,797 real 8x8 grey-scale digit images (installed with scikit-learn, so no
download). A held-out fraction of the examples forms the evaluation clients
(IID); the rest is split over `num_clients` training clients, either IID or with
Dirichlet(alpha) label skew (Hsu et al. 2019): for each class, the class's
examples are shared among clients in proportions drawn from Dir(alpha).
Smaller alpha means more skew.
"""

import numpy as np
from sklearn import datasets as sklearn_datasets
import tensorflow as tf
import tensorflow_federated as tff

from dp_fedavg.tasks import base

PARTITIONS = ('iid', 'dirichlet')
_NUM_CLASSES = 10


def _dirichlet_partition(
    labels: np.ndarray, num_clients: int, alpha: float, rng: np.random.Generator
) -> list[np.ndarray]:
  shares = [[] for _ in range(num_clients)]
  for label in range(_NUM_CLASSES):
    members = rng.permutation(np.flatnonzero(labels == label))
    proportions = rng.dirichlet(np.full(num_clients, alpha))
    cuts = (np.cumsum(proportions)[:-1] * len(members)).astype(int)
    for client, part in enumerate(np.split(members, cuts)):
      shares[client].extend(part)
  # Strong skew can leave a client empty; an empty client cannot train, so it
  # takes one example from the largest client.
  for client in range(num_clients):
    if not shares[client]:
      largest = max(range(num_clients), key=lambda c: len(shares[c]))
      shares[client].append(shares[largest].pop())
  return [np.asarray(s, dtype=np.int64) for s in shares]


def _sliced_client_data(
    images: np.ndarray, labels: np.ndarray, shares: list[np.ndarray]
) -> tff.simulation.datasets.ClientData:
  """Client i holds examples shares[i]; its dataset is built when asked for."""
  # Clients' examples laid end to end; a client is a (start, count) slice.
  flat = np.concatenate(shares)
  counts = np.array([len(s) for s in shares], np.int64)
  starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
  all_images = tf.constant(images[flat])
  all_labels = tf.constant(labels[flat])

  def client_dataset(client_id: tf.Tensor) -> tf.data.Dataset:
    index = tf.strings.to_number(client_id, tf.int64)
    start = tf.gather(starts, index)
    end = start + tf.gather(counts, index)
    return tf.data.Dataset.from_tensor_slices(
        (all_images[start:end], all_labels[start:end])
    )

  return tff.simulation.datasets.ClientData.from_clients_and_tf_fn(
      [str(c) for c in range(len(shares))], client_dataset
  )


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
  if partition not in PARTITIONS:
    raise ValueError(f'partition must be one of {PARTITIONS}, got {partition!r}.')
  if not dirichlet_alpha > 0:
    raise ValueError(f'dirichlet_alpha must be > 0, got {dirichlet_alpha}.')
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
  if not 1 <= num_clients <= len(train):
    raise ValueError(
        f'num_clients must be in [1, {len(train)}] for digits, got {num_clients}.'
    )

  if partition == 'iid':
    shares = np.array_split(train, num_clients)
  else:
    local = _dirichlet_partition(labels[train], num_clients, dirichlet_alpha, rng)
    shares = [train[s] for s in local]

  # Held-out clients are IID with as many examples per client as training
  # clients have on average.
  num_heldout_clients = max(1, round(num_heldout * num_clients / len(train)))
  train_data = _sliced_client_data(images, labels, shares)
  eval_data = _sliced_client_data(
      images, labels, np.array_split(heldout, num_heldout_clients)
  )

  def keras_model_fn() -> tf.keras.Model:
    return tf.keras.Sequential([
        tf.keras.layers.InputLayer(input_shape=(64,)),
        tf.keras.layers.Dense(32, activation='relu'),
        tf.keras.layers.Dense(_NUM_CLASSES),
    ])

  return base.FederatedTask(
      name='digits',
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
