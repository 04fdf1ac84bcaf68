"""CIFAR-10: 32x32 colour images, 10 classes, split over synthetic clients.

Reads the standard `cifar-10-batches-py` directory (pickled `data_batch_1..5`
and `test_batch`, from https://www.cs.toronto.edu/~kriz/cifar.html) given by
`data_dir`. The training images are split over `num_clients` clients, IID or
with Dirichlet label skew; the test images form held-out evaluation clients of
the training clients' mean size. The model is the DP-FL study's GroupNorm/tanh
CNN. TFF ships CIFAR-100 only, so there is no 'tff' source for this task.
"""

import os
import pickle
from typing import Optional

import numpy as np
import tensorflow as tf

from dp_fedavg.tasks import base
from dp_fedavg.tasks import client_data
from dp_fedavg.tasks import models

NUM_CLASSES = 10
TRAIN_FILES = tuple(f'data_batch_{i}' for i in range(1, 6))
TEST_FILE = 'test_batch'
_HOW_TO_GET = (
    'pass --data_dir=DIR where DIR is the extracted cifar-10-batches-py '
    'directory of https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz.'
)


def read_batch(path: str) -> tuple[np.ndarray, np.ndarray]:
  """One pickled CIFAR-10 batch: (uint8 images [n, 32, 32, 3], int32 labels)."""
  with client_data.reading(path, 'a pickled CIFAR-10 batch'), open(
      client_data.require_file(path, _HOW_TO_GET), 'rb') as f:
    batch = pickle.load(f, encoding='bytes')
  try:
    data, labels = batch[b'data'], batch[b'labels']
  except (KeyError, TypeError) as e:
    raise ValueError(
        f'{path} is not a CIFAR-10 batch (a dict with b"data" and b"labels").'
    ) from e
  # Rows are 1024 red, then green, then blue values, each plane row-major.
  images = np.asarray(data, np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
  labels = np.asarray(labels, np.int32)
  if len(images) != len(labels) or not np.all((0 <= labels) & (labels < NUM_CLASSES)):
    raise ValueError(f'{path}: labels must be {len(images)} integers in 0..9.')
  return images, labels


def _scaled(image, label):
  # Kept as uint8 in memory (150 MB for the training set instead of 600 MB).
  return tf.cast(image, tf.float32) / 255.0, label


def build_task(
    data_dir: Optional[str] = None,
    num_clients: int = 100,
    partition: str = 'iid',
    dirichlet_alpha: float = 0.5,
    seed: int = 0,
    data_source: str = 'local',
) -> base.FederatedTask:
  """Builds the CIFAR-10 task.

  Args:
    data_dir: the cifar-10-batches-py directory (required: there is no shared
      copy).
    num_clients: training clients the training images are split over.
    partition: 'iid' or 'dirichlet'.
    dirichlet_alpha: concentration of the label skew, > 0.
    seed: seed of the partition.
    data_source: must be 'local'.

  Raises:
    DataNotFoundError: a batch file is missing.
    ValueError: an argument out of range, or a file that is not a CIFAR batch.
  """
  if data_source != 'local':
    raise ValueError(
        'cifar10 reads local files only (data_source=local): TFF ships '
        'CIFAR-100, not CIFAR-10.'
    )
  if data_dir is None:
    raise client_data.DataNotFoundError('(no --data_dir given)', _HOW_TO_GET)
  train_parts = [read_batch(os.path.join(data_dir, f)) for f in TRAIN_FILES]
  train_images = np.concatenate([images for images, _ in train_parts])
  train_labels = np.concatenate([labels for _, labels in train_parts])
  test_images, test_labels = read_batch(os.path.join(data_dir, TEST_FILE))
  rng = np.random.default_rng(seed)
  shares = client_data.split_examples(
      train_labels, num_clients, partition, dirichlet_alpha, rng
  )
  num_eval_clients = max(
      1, round(len(test_labels) * num_clients / len(train_labels))
  )
  return base.classification_task(
      'cifar10',
      lambda: models.group_norm_cnn((32, 32, 3), NUM_CLASSES),
      client_data.sliced_client_data(
          [str(c) for c in range(num_clients)], (train_images, train_labels),
          shares, element_fn=_scaled,
      ),
      client_data.sliced_client_data(
          [str(c) for c in range(num_eval_clients)], (test_images, test_labels),
          np.array_split(np.arange(len(test_labels)), num_eval_clients),
          element_fn=_scaled,
      ),
  )
