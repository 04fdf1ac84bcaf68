"""Federated data from in-memory arrays, and where the shared data lives.

Every task keeps its examples in a few numpy arrays and exposes them as a
`tff.simulation.datasets.ClientData` whose datasets are slices built only when a
client is asked for, so memory does not grow with the clients sampled.
"""

import contextlib
import os
import pickle
from typing import Any, Callable, Iterator, Optional
import zipfile

import numpy as np
import tensorflow as tf
import tensorflow_federated as tff

PARTITIONS = ('iid', 'dirichlet', 'sorted')
# Where a task's data comes from: the project's files ('local': the shared
# data or --data_dir) or TFF's own dataset loaders ('tff').
DATA_SOURCES = ('local', 'tff')

# The project's root is two levels above this package; the shared data sits
# beside it (a user's own clone has none and passes --data_dir).
SHARED_DATA_DIR = os.path.normpath(os.path.join(
    os.path.dirname(__file__), '..', '..', '..', 'shared', 'data'
))


class DataNotFoundError(FileNotFoundError):
  """A task's data file is missing; the message says where to get it."""

  def __init__(self, path: str, how_to_get: str):
    super().__init__(f'no data at {path}; {how_to_get}')
    self.path = path


class DataCorruptError(ValueError):
  """A task's data file exists but does not read as what the task expects."""

  def __init__(self, path: str, expected: str, cause: BaseException):
    reason = str(cause).splitlines()[0] if str(cause) else type(cause).__name__
    super().__init__(f'{path} is not {expected}: {reason}')
    self.path = path


# What reading a damaged file raises: h5py and numpy an OSError or a
# ValueError, a damaged .npz (a zip) BadZipFile, a damaged pickle
# UnpicklingError or EOFError, a file without the expected structure KeyError.
_READ_ERRORS = (OSError, ValueError, KeyError, EOFError,
                pickle.UnpicklingError, zipfile.BadZipFile)


@contextlib.contextmanager
def reading(path: str, expected: str) -> Iterator[None]:
  """Turns a failure to read `path` into a one-line `DataCorruptError`
  naming the file and what was `expected` of it."""
  try:
    yield
  except (DataNotFoundError, DataCorruptError):
    raise
  except _READ_ERRORS as e:
    raise DataCorruptError(path, expected, e) from e


def load_npz(path: str, expected: str) -> dict[str, np.ndarray]:
  """Every array of an .npz file (no pickles); a file that is not one is a
  `DataCorruptError` (numpy would say it holds pickled data)."""
  if not zipfile.is_zipfile(path):
    raise DataCorruptError(path, expected, ValueError(
        'not a zip archive, as .npz files are (damaged or truncated?)'))
  with reading(path, expected), np.load(path, allow_pickle=False) as arrays:
    return {name: arrays[name] for name in arrays.files}


def check_source_and_count(data_source: str, num_clients: Optional[int]) -> None:
  """Validates the arguments shared by the natural-client tasks."""
  if data_source not in DATA_SOURCES:
    raise ValueError(
        f'data_source must be one of {DATA_SOURCES}, got {data_source!r}.'
    )
  if num_clients is not None and num_clients < 1:
    raise ValueError(f'num_clients must be >= 1, got {num_clients}.')


def require_file(path: str, how_to_get: str) -> str:
  if not os.path.isfile(path):
    raise DataNotFoundError(path, how_to_get)
  return path


def data_dir_or_shared(data_dir: Optional[str], name: str) -> str:
  return data_dir or os.path.join(SHARED_DATA_DIR, name)


def sliced_client_data(
    client_ids: list[str],
    arrays: tuple[np.ndarray, ...],
    shares: list[np.ndarray],
    element_fn: Optional[Callable[..., Any]] = None,
) -> tff.simulation.datasets.ClientData:
  """Client `client_ids[i]` holds rows `shares[i]` of every array in `arrays`.

  The rows are laid end to end once; a client's dataset is a (start, count)
  slice of them, built in TF when the client is asked for, with `element_fn`
  (if given) mapped over its elements.
  """
  if len(client_ids) != len(shares):
    raise ValueError(
        f'{len(client_ids)} client ids for {len(shares)} client shares.'
    )
  order = np.concatenate(shares).astype(np.int64) if shares else np.zeros(0, np.int64)
  counts = np.array([len(s) for s in shares], np.int64)
  starts = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
  laid_out = tuple(tf.constant(array[order]) for array in arrays)
  index_of = tf.lookup.StaticHashTable(
      tf.lookup.KeyValueTensorInitializer(
          tf.constant(client_ids), tf.range(len(client_ids), dtype=tf.int64)
      ),
      default_value=-1,
  )

  def client_dataset(client_id: tf.Tensor) -> tf.data.Dataset:
    index = index_of.lookup(tf.convert_to_tensor(client_id, tf.string))
    start = tf.gather(starts, index)
    end = start + tf.gather(counts, index)
    dataset = tf.data.Dataset.from_tensor_slices(
        tuple(array[start:end] for array in laid_out)
    )
    return dataset.map(element_fn) if element_fn else dataset

  return tff.simulation.datasets.ClientData.from_clients_and_tf_fn(
      client_ids, client_dataset
  )


def dirichlet_partition(
    labels: np.ndarray,
    num_clients: int,
    alpha: float,
    rng: np.random.Generator,
) -> list[np.ndarray]:
  """Label-skewed split (Hsu et al. 2019): positions into `labels` per client.

  For each class, the class's examples are shared among clients in proportions
  drawn from Dir(alpha); smaller alpha means more skew.
  """
  shares = [[] for _ in range(num_clients)]
  for label in np.unique(labels):
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


def split_examples(
    labels: np.ndarray,
    num_clients: int,
    partition: str,
    dirichlet_alpha: float,
    rng: np.random.Generator,
) -> list[np.ndarray]:
  """Positions into `labels` for each of `num_clients`: 'iid', 'dirichlet' or
  'sorted' (label-sorted consecutive shares)."""
  if partition not in PARTITIONS:
    raise ValueError(f'partition must be one of {PARTITIONS}, got {partition!r}.')
  if not dirichlet_alpha > 0:
    raise ValueError(f'dirichlet_alpha must be > 0, got {dirichlet_alpha}.')
  if not 1 <= num_clients <= len(labels):
    raise ValueError(
        f'num_clients must be in [1, {len(labels)}] (one example each at '
        f'least), got {num_clients}.'
    )
  if partition == 'iid':
    return np.array_split(rng.permutation(len(labels)), num_clients)
  if partition == 'sorted':
    # Karimireddy, He & Jaggi (ICLR 2022): examples sorted by label, then cut
    # into consecutive shares, so most clients hold one or two classes.
    shuffled = rng.permutation(len(labels))
    return np.array_split(
        shuffled[np.argsort(labels[shuffled], kind='stable')], num_clients)
  return dirichlet_partition(labels, num_clients, dirichlet_alpha, rng)



def client_subset(
    data: tff.simulation.datasets.ClientData, client_ids: list[str]
) -> tff.simulation.datasets.ClientData:
  """`data` restricted to `client_ids`, datasets still built on demand."""
  # The lambda keeps `data` alive: some ClientData (TFF's in-memory ones) hold
  # only a weak reference to themselves in their dataset function.
  return tff.simulation.datasets.ClientData.from_clients_and_tf_fn(
      client_ids, lambda client_id: data.serializable_dataset_fn(client_id)
  )
