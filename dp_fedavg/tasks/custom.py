"""A user's own federated data and Keras model (`--task=custom`).

Data (`data_path`, and optionally `test_data_path`), one example per row:
* TFF's SQLite client data (`.sqlite`, `.db`): the format TFF's own datasets
  ship in, read with `tff.simulation.datasets.load_and_parse_sql_client_data`
  and written by `write_client_data` (through TFF's
  `save_to_sql_client_data`); each example a `tf.train.Example` with the
  feature and label keys;
* a table: `.npz` (equally long arrays `client_id`, the feature key and the
  label key) or `.csv` (a header; a `client_id` column, the label column, and
  every other column a feature, in order).

Features are float32 in the model's input shape (a stored example's values
are reshaped to it). The loss (`loss`) follows from the labels or is named:
* `crossentropy` (what `auto` picks for integer or one-hot labels): labels
  are integer classes in [0, C) for a model with C outputs, or one-hot rows
  of length C; the outputs are logits (a final softmax is refused: the loss
  and the vectorized engine take logits); evaluation reports accuracy;
* `mse` (regression, never picked by `auto`): labels are numbers, as many
  per example as the model has outputs; the loss is their mean squared
  error, and evaluation reports it (no accuracy).
The model (`model`) is a Keras file (`.keras`, its saved weights are the
initial ones) or `module:function` returning an uncompiled Keras model.

Clients are ordered by id, in every format (TFF's SQLite client data lists
them so); the sampler's indices follow that order.

Evaluation runs on `test_data_path`'s clients, or on a seeded tenth of the
clients (at least one), held out and never sampled for training.

Every problem is one line naming the file and what was expected
(`CustomTaskError`).
"""

import csv
import dataclasses
import importlib
import os
import sqlite3
from typing import Callable, Optional

import numpy as np
import tensorflow as tf
import tensorflow_federated as tff

from dp_fedavg.tasks import base
from dp_fedavg.tasks import client_data

CLIENT_ID = 'client_id'
SQLITE_SUFFIXES = ('.sqlite', '.db')
TABLE_SUFFIXES = ('.npz', '.csv')
EVAL_FRACTION = 0.1
LOSSES = ('auto', 'crossentropy', 'mse')


class CustomTaskError(ValueError):
  """The data or the model cannot make a task; the message says why."""


def load_model_fn(model: str) -> Callable[[], tf.keras.Model]:
  """A function building the model `model` names; checked once now.

  Raises:
    CustomTaskError: the file does not load, or the function is missing or
      does not return a Keras model.
  """
  if model.endswith('.keras'):
    if not os.path.isfile(model):
      raise CustomTaskError(f'--model={model}: no such file.')

    def build():
      return tf.keras.models.load_model(model, compile=False)
  else:
    module_name, _, function_name = model.partition(':')
    if not module_name or not function_name:
      raise CustomTaskError(
          f'--model={model}: expected a .keras file or module:function.')
    try:
      build = getattr(importlib.import_module(module_name), function_name)
    except (ImportError, AttributeError) as e:
      raise CustomTaskError(f'--model={model}: {e}') from e
  try:
    built = build()
  except Exception as e:  # pylint: disable=broad-except
    raise CustomTaskError(
        f'--model={model} does not load: {type(e).__name__}: '
        f'{str(e).splitlines()[0] if str(e) else ""}') from e
  if not isinstance(built, tf.keras.Model):
    raise CustomTaskError(
        f'--model={model} gave a {type(built).__name__}, not a Keras model.')
  return build


def _check_logits(model: str, built: tf.keras.Model) -> None:
  last = built.layers[-1] if built.layers else None
  if getattr(last, 'activation', None) is tf.keras.activations.softmax:
    raise CustomTaskError(
        f'--model={model} ends in a softmax: give logits (drop the last '
        'activation); the loss and the vectorized engine take logits.')


def _read_sqlite(path: str, feature_key: str, label_key: str,
                 feature_shape: tuple) -> tuple[np.ndarray, ...]:
  """(client id, features, labels) of every example of a TFF SQLite file."""
  try:
    with sqlite3.connect(f'file:{path}?mode=ro', uri=True) as connection:
      row = connection.execute(
          'SELECT serialized_example_proto FROM examples LIMIT 1').fetchone()
  except sqlite3.Error as e:
    raise CustomTaskError(
        f'{path}: not TFF SQLite client data (table examples with '
        f'client_id and serialized_example_proto): {e}') from e
  if row is None:
    raise CustomTaskError(f'{path}: holds no examples.')
  features = tf.train.Example.FromString(row[0]).features.feature
  for key in (feature_key, label_key):
    if key not in features:
      raise CustomTaskError(
          f'{path}: examples have no {key!r}; they have '
          f'{", ".join(sorted(features))} (--feature_key, --label_key).')
  label = features[label_key]
  label_length = len(label.int64_list.value or label.float_list.value)
  element_spec = {
      feature_key: tf.TensorSpec([int(np.prod(feature_shape))], tf.float32),
      label_key: tf.TensorSpec(
          [label_length], tf.int64 if label.int64_list.value else tf.float32),
  }
  try:
    data = tff.simulation.datasets.load_and_parse_sql_client_data(
        path, element_spec)
    ids, xs, ys = [], [], []
    for client in data.client_ids:
      examples = base.all_examples(data.create_tf_dataset_for_client(client))
      if examples is None:
        raise CustomTaskError(
            f'{path}: client {client!r} has no examples; every client needs '
            'at least one.')
      ids.extend([client] * len(examples[label_key]))
      xs.append(examples[feature_key].numpy())
      ys.append(examples[label_key].numpy())
  except (tf.errors.InvalidArgumentError, ValueError) as e:
    raise CustomTaskError(
        f'{path}: examples do not parse as {feature_key!r} with '
        f'{int(np.prod(feature_shape))} values (the model\'s input '
        f'{feature_shape}) and {label_key!r}: '
        f'{str(e).splitlines()[0]}') from e
  labels = np.concatenate(ys)
  return (np.asarray(ids), np.concatenate(xs),
          labels[:, 0] if label_length == 1 else labels)


def _read_table(path: str, feature_key: str,
                label_key: str) -> tuple[np.ndarray, ...]:
  """(client id, features, labels) of an .npz or .csv table."""
  if path.endswith('.npz'):
    arrays = client_data.load_npz(
        path, f'an .npz file with arrays {CLIENT_ID}, {feature_key} and '
        f'{label_key}')
    missing = [k for k in (CLIENT_ID, feature_key, label_key)
               if k not in arrays]
    if missing:
      raise CustomTaskError(
          f'{path}: no array {", ".join(map(repr, missing))}; it has '
          f'{", ".join(sorted(arrays))} (expected {CLIENT_ID!r}, '
          '--feature_key, --label_key).')
    return (arrays[CLIENT_ID].astype(str), arrays[feature_key],
            arrays[label_key])
  with open(path, newline='') as f:
    rows = list(csv.reader(f))
  if not rows:
    raise CustomTaskError(f'{path}: empty; expected a header row.')
  header, body = rows[0], rows[1:]
  missing = [k for k in (CLIENT_ID, label_key) if k not in header]
  if missing:
    raise CustomTaskError(
        f'{path}: no column {", ".join(map(repr, missing))}; the header has '
        f'{", ".join(header)} (expected {CLIENT_ID!r} and --label_key).')
  id_column, label_column = header.index(CLIENT_ID), header.index(label_key)
  feature_columns = [i for i in range(len(header))
                     if i not in (id_column, label_column)]
  try:
    table = np.array([[row[i] for i in feature_columns] for row in body],
                     np.float32)
    labels = np.array([row[label_column] for row in body], np.float64)
  except (ValueError, IndexError) as e:
    raise CustomTaskError(
        f'{path}: every row needs {len(header)} values, numbers but '
        f'{CLIENT_ID!r}: {e}') from e
  labels = (labels.astype(np.int64) if np.all(labels == np.round(labels))
            else labels)
  return np.array([row[id_column] for row in body]), table, labels


def read_examples(path: str, feature_key: str, label_key: str,
                  feature_shape: tuple) -> tuple[np.ndarray, ...]:
  """(client id, features, labels) of every example in `path`.

  Raises:
    CustomTaskError: see the module docstring.
  """
  if not os.path.isfile(path):
    raise CustomTaskError(f'{path}: no such file.')
  if path.endswith(SQLITE_SUFFIXES):
    return _read_sqlite(path, feature_key, label_key, feature_shape)
  if path.endswith(TABLE_SUFFIXES):
    return _read_table(path, feature_key, label_key)
  raise CustomTaskError(
      f'{path}: unknown format; expected one of '
      f'{", ".join(SQLITE_SUFFIXES + TABLE_SUFFIXES)}.')


def _is_classes(labels: np.ndarray) -> bool:
  """Integer labels, or one-hot rows (of any dtype)."""
  if labels.ndim == 2:
    return bool(np.all(np.isin(labels, (0, 1)))
                and np.all(labels.sum(axis=1) == 1))
  return np.issubdtype(labels.dtype, np.integer)


def _regression_labels(path: str, labels: np.ndarray,
                       num_outputs: int) -> np.ndarray:
  """Float32 labels [examples, num_outputs], or a one-line error."""
  if not np.issubdtype(labels.dtype, np.number):
    raise CustomTaskError(
        f'{path}: --loss=mse needs numeric labels, got {labels.dtype}.')
  labels = labels.reshape((len(labels), -1)).astype(np.float32)
  if labels.shape[1] != num_outputs:
    raise CustomTaskError(
        f'{path}: an example has {labels.shape[1]} label values; the model '
        f'has {num_outputs} outputs (--loss=mse needs one per output).')
  if not np.all(np.isfinite(labels)):
    raise CustomTaskError(f'{path}: labels must be finite numbers.')
  return labels


def _checked(path: str, ids, features, labels, feature_shape: tuple,
             num_classes: int, loss: str) -> tuple[np.ndarray, ...]:
  """The examples as (ids, float32 features in the model's shape, int32
  class labels or float32 regression labels), or a one-line error naming
  `path`. `loss` is `crossentropy` or `mse`."""
  if not len(ids):
    raise CustomTaskError(f'{path}: holds no examples.')
  if not len(ids) == len(features) == len(labels):
    raise CustomTaskError(
        f'{path}: {len(ids)} client ids, {len(features)} features and '
        f'{len(labels)} labels; expected one of each per example.')
  features = np.asarray(features, np.float32)
  if int(np.prod(features.shape[1:])) != int(np.prod(feature_shape)):
    raise CustomTaskError(
        f'{path}: an example has {int(np.prod(features.shape[1:]))} feature '
        f'values (shape {features.shape[1:]}); the model\'s input '
        f'{feature_shape} takes {int(np.prod(feature_shape))}.')
  features = features.reshape((len(features), *feature_shape))
  labels = np.asarray(labels)
  if loss == 'mse':
    return (np.asarray(ids).astype(str), features,
            _regression_labels(path, labels, num_classes))
  if labels.ndim == 2:  # One-hot rows.
    if labels.shape[1] != num_classes or not _is_classes(labels):
      raise CustomTaskError(
          f'{path}: label rows must be one-hot of length {num_classes} (the '
          'model\'s outputs).')
    labels = labels.argmax(axis=1)
  if not np.issubdtype(labels.dtype, np.integer):
    raise CustomTaskError(
        f'{path}: labels must be integer classes or one-hot rows, got '
        f'{labels.dtype} values (regression: --loss=mse).')
  if labels.min() < 0 or labels.max() >= num_classes:
    raise CustomTaskError(
        f'{path}: labels span [{labels.min()}, {labels.max()}]; the model '
        f'has {num_classes} outputs, so classes must be in [0, '
        f'{num_classes}).')
  return np.asarray(ids).astype(str), features, labels.astype(np.int32)


def _client_data(ids, features, labels) -> tff.simulation.datasets.ClientData:
  """Clients in the order of their ids (as TFF's SQLite client data lists
  them), each with its examples in file order."""
  clients, first = np.unique(ids, return_inverse=True)
  order = np.argsort(first, kind='stable')
  shares = np.split(order, np.cumsum(np.bincount(first))[:-1])
  return client_data.sliced_client_data(
      clients.tolist(), (features, labels), shares)


def build_task(
    data_path: str,
    model: str,
    test_data_path: Optional[str] = None,
    feature_key: str = 'x',
    label_key: str = 'y',
    seed: int = 0,
    loss: str = 'auto',
) -> base.FederatedTask:
  """The custom task (module docstring).

  Raises:
    CustomTaskError: a file that does not load or does not fit the model.
  """
  if loss not in LOSSES:
    raise CustomTaskError(
        f'--loss={loss}: expected one of {", ".join(LOSSES)}.')
  keras_model_fn = load_model_fn(model)
  probe = keras_model_fn()
  feature_shape = tuple(probe.input_shape[1:])
  num_classes = int(probe.output_shape[-1])
  if None in feature_shape:
    raise CustomTaskError(
        f'--model={model}: its input shape {probe.input_shape} must be fixed '
        'but for the batch.')
  examples = read_examples(data_path, feature_key, label_key, feature_shape)
  if loss == 'auto':
    if not _is_classes(np.asarray(examples[2])):
      raise CustomTaskError(
          f'{data_path}: labels are not integer classes or one-hot rows; for '
          'regression pass --loss=mse.')
    loss = 'crossentropy'
  if loss == 'crossentropy':
    _check_logits(model, probe)
  train = _checked(data_path, *examples, feature_shape, num_classes, loss)
  if test_data_path:
    test = _checked(test_data_path, *read_examples(
        test_data_path, feature_key, label_key, feature_shape), feature_shape,
                    num_classes, loss)
  else:
    clients = np.unique(train[0])
    if len(clients) < 2:
      raise CustomTaskError(
          f'{data_path}: one client; hold-out evaluation needs two or more, '
          'or pass --test_data_path.')
    held_out = np.random.default_rng(seed).choice(
        clients, max(1, round(EVAL_FRACTION * len(clients))), replace=False)
    in_test = np.isin(train[0], held_out)
    test = tuple(array[in_test] for array in train)
    train = tuple(array[~in_test] for array in train)
  make_task = (base.regression_task if loss == 'mse'
               else base.classification_task)
  task = make_task(
      'custom', keras_model_fn, _client_data(*train), _client_data(*test))
  return dataclasses.replace(task, data_files=tuple(
      path for path in (data_path, test_data_path) if path))


def write_client_data(path: str, client_ids, features, labels,
                      feature_key: str = 'x', label_key: str = 'y',
                      overwrite: bool = False) -> None:
  """Writes examples (one client id, feature array and label each) as TFF's
  SQLite client data, for `--task=custom --data_path=path`.

  Raises:
    FileExistsError: `path` exists and not `overwrite`.
    ValueError: arrays of different lengths.
  """
  client_ids = np.asarray(client_ids).astype(str)
  features = np.asarray(features, np.float32)
  labels = np.asarray(labels)
  if not len(client_ids) == len(features) == len(labels):
    raise ValueError(
        f'{len(client_ids)} client ids, {len(features)} features and '
        f'{len(labels)} labels: expected one of each per example.')
  label_dtype = (tf.int64 if np.issubdtype(labels.dtype, np.integer)
                 else tf.float32)
  flat = features.reshape((len(features), -1))
  labels = labels.reshape((len(labels), -1))

  def dataset_fn(client):
    mine = client_ids == client
    return tf.data.Dataset.from_tensor_slices({
        feature_key: tf.constant(flat[mine]),
        label_key: tf.cast(labels[mine], label_dtype),
    })

  tff.simulation.datasets.save_to_sql_client_data(
      list(dict.fromkeys(client_ids.tolist())), dataset_fn, path,
      allow_overwrite=overwrite)
