"""Federated Shakespeare: next-character prediction, one client per role.

The default source is TFF's HDF5 layout at `../shared/data/shakespeare/`
(`shakespeare_{train,test}.h5`, `/examples/<CLIENT_ID>/snippets`: 715 clients,
16,068 train and 2,356 test snippets); `data_dir` points at another copy. Each
client's test snippets form its evaluation client.

Snippets become examples exactly as in TFF's Shakespeare baseline (McMahan et
al. 2017): characters map to TFF's 86-symbol vocabulary (ids 1..86, 0 is
padding, then OOV, BOS and EOS), each snippet is wrapped in BOS/EOS, padded
to a multiple of 81 and cut into 81-token pieces; a piece's first 80 tokens
are the input and its last 80 the target. Tokenizing happens once, in numpy,
when the task is built. Accuracy ignores padding targets; the loss does not
(as in TFF's baseline).

With `data_source='tff'`, `tff.simulation.datasets.shakespeare.load_data` is
used (its SQLite file is downloaded into `data_dir` when absent).
"""

import os
from typing import Optional

import h5py
import numpy as np
import tensorflow as tf
import tensorflow_federated as tff
# TFF's own vocabulary and special tokens, so sequences match its baseline.
from tensorflow_federated.python.simulation.baselines.shakespeare import char_prediction_preprocessing as tff_preprocessing

from dp_fedavg.tasks import base
from dp_fedavg.tasks import client_data

SEQUENCE_LENGTH = 80
PAD, OOV, BOS, EOS = tff_preprocessing.get_special_tokens()
VOCAB_SIZE = EOS + 1
_EXPECTED = 'an HDF5 file in TFF\'s shakespeare layout (examples/<role>/snippets)'
_HOW_TO_GET = (
    'pass --data_dir=DIR where DIR holds shakespeare_train.h5 and '
    'shakespeare_test.h5 (TFF\'s HDF5 layout), or --data_source=tff to download '
    'TFF\'s federated Shakespeare.'
)

# Byte value -> token id; bytes outside the vocabulary are OOV.
_TOKEN_OF_BYTE = np.full(256, OOV, np.int32)
for _token, _char in enumerate(tff_preprocessing.CHAR_VOCAB, start=1):
  _TOKEN_OF_BYTE[ord(_char)] = _token


class MaskedAccuracy(tf.keras.metrics.SparseCategoricalAccuracy):
  """Next-character accuracy over non-padding targets."""

  def update_state(self, y_true, y_pred, sample_weight=None):
    del sample_weight  # The mask is the only weighting.
    mask = tf.cast(tf.not_equal(y_true, PAD), tf.float32)
    return super().update_state(y_true, y_pred, sample_weight=mask)


def tokenize(snippet: bytes) -> np.ndarray:
  """One snippet as [pieces, 81] token ids (BOS ... EOS, zero-padded)."""
  tokens = np.concatenate([
      [BOS], _TOKEN_OF_BYTE[np.frombuffer(snippet, np.uint8)], [EOS]
  ]).astype(np.int32)
  piece = SEQUENCE_LENGTH + 1
  padded = np.zeros(-(-len(tokens) // piece) * piece, np.int32)
  padded[:len(tokens)] = tokens
  return padded.reshape(-1, piece)


def _read_h5(path: str, client_ids: Optional[list[str]]):
  """(client ids, per-client [pieces, 81] token arrays) of one h5 file."""
  with client_data.reading(path, _EXPECTED), h5py.File(path, 'r') as f:
    examples = f['examples']
    ids = client_ids if client_ids is not None else sorted(examples.keys())
    pieces = []
    for client_id in ids:
      snippets = examples[client_id]['snippets'][()] if client_id in examples else []
      tokenized = [tokenize(s) for s in snippets]
      pieces.append(
          np.concatenate(tokenized) if tokenized
          else np.zeros((0, SEQUENCE_LENGTH + 1), np.int32)
      )
  return ids, pieces


def _client_data(ids: list[str], pieces: list[np.ndarray]):
  sequences = np.concatenate(pieces)
  shares, start = [], 0
  for client_pieces in pieces:
    shares.append(np.arange(start, start + len(client_pieces)))
    start += len(client_pieces)
  return client_data.sliced_client_data(
      ids, (sequences[:, :-1], sequences[:, 1:]), shares
  )


def _from_tff(cache_dir: Optional[str], num_clients: Optional[int]):
  train, test = tff.simulation.datasets.shakespeare.load_data(cache_dir=cache_dir)
  table = tf.constant(_TOKEN_OF_BYTE)

  def to_examples(dataset):
    def pieces(element):
      tokens = tf.gather(table, tf.cast(
          tf.io.decode_raw(element['snippets'], tf.uint8), tf.int32
      ))
      tokens = tf.concat([[BOS], tokens, [EOS]], 0)
      piece = SEQUENCE_LENGTH + 1
      padded = tf.pad(tokens, [[0, (-tf.shape(tokens)[0]) % piece]])
      return tf.data.Dataset.from_tensor_slices(tf.reshape(padded, [-1, piece]))

    return dataset.flat_map(pieces).map(lambda s: (s[:-1], s[1:]))

  if num_clients is not None:
    ids = train.client_ids[:num_clients]
    train = client_data.client_subset(train, ids)
    test = client_data.client_subset(
        test, [c for c in test.client_ids if c in set(ids)]
    )
  return train.preprocess(to_examples), test.preprocess(to_examples)


def keras_model_fn() -> tf.keras.Model:
  # Sized for CPU: one GRU layer instead of the baseline's two 256-unit LSTMs.
  return tf.keras.Sequential([
      tf.keras.layers.InputLayer(input_shape=(SEQUENCE_LENGTH,), dtype=tf.int32),
      tf.keras.layers.Embedding(VOCAB_SIZE, 8),
      tf.keras.layers.GRU(128, return_sequences=True),
      tf.keras.layers.Dense(VOCAB_SIZE),
  ])


def build_task(
    data_dir: Optional[str] = None,
    num_clients: Optional[int] = None,
    data_source: str = 'local',
) -> base.FederatedTask:
  """Builds the Shakespeare task.

  Args:
    data_dir: directory of shakespeare_{train,test}.h5 (local source) or TFF's
      cache (tff source); default: the shared data beside the project.
    num_clients: use only the first this many clients (sorted ids); None: all.
    data_source: 'local' (the h5 files) or 'tff'.

  Raises:
    DataNotFoundError: an h5 file is not where `data_dir` says.
    ValueError: an argument out of range.
  """
  client_data.check_source_and_count(data_source, num_clients)
  if data_source == 'tff':
    train, test = _from_tff(data_dir, num_clients)
  else:
    directory = client_data.data_dir_or_shared(data_dir, 'shakespeare')
    train_path, test_path = (
        client_data.require_file(
            os.path.join(directory, f'shakespeare_{split}.h5'), _HOW_TO_GET
        )
        for split in ('train', 'test')
    )
    with client_data.reading(train_path, _EXPECTED), h5py.File(
        train_path, 'r') as f:
      all_ids = sorted(f['examples'].keys())
    if num_clients is not None and num_clients > len(all_ids):
      raise ValueError(
          f'num_clients must be at most the {len(all_ids)} clients in '
          f'{train_path}, got {num_clients}.'
      )
    ids, train_pieces = _read_h5(train_path, all_ids[:num_clients])
    _, test_pieces = _read_h5(test_path, ids)
    tested = [i for i, p in enumerate(test_pieces) if len(p)]
    train = _client_data(ids, train_pieces)
    test = _client_data([ids[i] for i in tested], [test_pieces[i] for i in tested])
  return base.FederatedTask(
      name='shakespeare',
      keras_model_fn=keras_model_fn,
      loss_fn=lambda: tf.keras.losses.SparseCategoricalCrossentropy(
          from_logits=True
      ),
      metrics_fn=lambda: [MaskedAccuracy(name='accuracy')],
      train_data=train,
      eval_data=test,
  )
