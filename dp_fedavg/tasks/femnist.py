"""FEMNIST: handwritten characters (62 classes), one client per writer.

The default source is the LEAF sample at `../shared/data/femnist_sample/`
(`femnist_sample.npz`: 18,796 28x28 images of 184 writers); `data_dir` points
at another copy. Each writer's examples are split into train and test
(`test_fraction`, seeded): the writer is one training client and its test
examples one evaluation client, so evaluation measures the writers' own
distributions. A writer with fewer than 1 / test_fraction examples keeps them
all for training. With `silos`, every writer's training examples are pooled
and split IID into that many clients (silos: the cross-silo setting of
example-level DP), evaluation still on each writer's held-out examples.

With `data_source='tff'`, TFF's federated EMNIST (3,400 writers, its own
train/test split) is loaded through `tff.simulation.datasets.emnist` into
`data_dir` (downloaded there when absent).
"""

import os
from typing import Optional

import numpy as np
import tensorflow as tf
import tensorflow_federated as tff

from dp_fedavg.tasks import base
from dp_fedavg.tasks import client_data
from dp_fedavg.tasks import models

NUM_CLASSES = 62
FILE_NAME = 'femnist_sample.npz'
_HOW_TO_GET = (
    'pass --data_dir=DIR where DIR holds femnist_sample.npz (arrays pixels, '
    'labels, writer), or --data_source=tff to download TFF\'s federated EMNIST.'
)


def _keras_model_fn() -> tf.keras.Model:
  return models.group_norm_cnn((28, 28, 1), NUM_CLASSES)


def _writer_split(
    writers: np.ndarray, test_fraction: float, rng: np.random.Generator
) -> tuple[list[np.ndarray], list[np.ndarray]]:
  """Per writer: (train positions, test positions) into the example arrays."""
  train, test = [], []
  for writer in np.unique(writers):
    mine = rng.permutation(np.flatnonzero(writers == writer))
    num_test = int(len(mine) * test_fraction)
    test.append(mine[:num_test])
    train.append(mine[num_test:])
  return train, test


def _from_tff(cache_dir: Optional[str], num_clients: Optional[int]):
  train, test = tff.simulation.datasets.emnist.load_data(
      only_digits=False, cache_dir=cache_dir
  )
  if num_clients is not None:
    ids = train.client_ids[:num_clients]
    train = client_data.client_subset(train, ids)
    test = client_data.client_subset(
        test, [c for c in test.client_ids if c in set(ids)]
    )

  def to_example(element):
    return tf.expand_dims(element['pixels'], -1), tf.cast(element['label'], tf.int32)

  def examples(data):
    return data.preprocess(lambda dataset: dataset.map(to_example))

  return examples(train), examples(test)


def build_task(
    data_dir: Optional[str] = None,
    num_clients: Optional[int] = None,
    test_fraction: float = 0.2,
    seed: int = 0,
    data_source: str = 'local',
    silos: Optional[int] = None,
) -> base.FederatedTask:
  """Builds the FEMNIST task.

  Args:
    data_dir: directory holding femnist_sample.npz (local source) or TFF's
      cache (tff source); default: the shared data beside the project.
    num_clients: use only the first this many writers (by id); None: all.
    test_fraction: share of each writer's examples held out, in [0, 1).
    seed: seed of the train/test split.
    data_source: 'local' (the npz) or 'tff'.
    silos: pool the writers' training examples into this many IID clients
      (local source); None: one client per writer.

  Raises:
    DataNotFoundError: the npz is not where `data_dir` says.
    ValueError: an argument out of range.
  """
  client_data.check_source_and_count(data_source, num_clients)
  if not 0 <= test_fraction < 1:
    raise ValueError(f'test_fraction must be in [0, 1), got {test_fraction}.')
  if silos is not None and data_source == 'tff':
    raise ValueError('silos pools the local sample\'s writers; not with '
                     'data_source=tff.')
  if data_source == 'tff':
    train, test = _from_tff(data_dir, num_clients)
    return base.classification_task('femnist', _keras_model_fn, train, test)

  path = client_data.require_file(
      os.path.join(client_data.data_dir_or_shared(data_dir, 'femnist_sample'),
                   FILE_NAME),
      _HOW_TO_GET,
  )
  expected = 'an .npz file with arrays pixels, labels and writer'
  arrays = client_data.load_npz(path, expected)
  with client_data.reading(path, expected):
    pixels, labels, writers = arrays['pixels'], arrays['labels'], arrays['writer']
  if num_clients is not None:
    available = len(np.unique(writers))
    if num_clients > available:
      raise ValueError(
          f'num_clients must be at most the {available} writers in {path}, got '
          f'{num_clients}.'
      )
    keep = np.isin(writers, np.unique(writers)[:num_clients])
    pixels, labels, writers = pixels[keep], labels[keep], writers[keep]
  images = (pixels.astype(np.float32) / 255.0)[..., np.newaxis]
  labels = labels.astype(np.int32)
  train, test = _writer_split(
      writers, test_fraction, np.random.default_rng(seed)
  )
  writer_ids = [str(w) for w in np.unique(writers)]
  tested = [i for i, positions in enumerate(test) if len(positions)]
  train_ids = writer_ids
  if silos is not None:
    pooled = np.concatenate(train)
    train = [pooled[share] for share in client_data.split_examples(
        labels[pooled], silos, 'iid', 1.0, np.random.default_rng(seed))]
    train_ids = [f'silo{i}' for i in range(silos)]
  return base.classification_task(
      'femnist',
      _keras_model_fn,
      client_data.sliced_client_data(train_ids, (images, labels), train),
      client_data.sliced_client_data(
          [writer_ids[i] for i in tested], (images, labels),
          [test[i] for i in tested],
      ),
  )
