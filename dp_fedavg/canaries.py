"""Canary clients for empirical privacy audits (`experiments.audit`).

Following Andrew, Kairouz, Oh, Oprea, McMahan & Suriyakumar (ICLR 2024,
"One-shot Empirical Privacy Estimation for Federated Learning"), a canary is
a client whose model update is a fixed random unit direction u_c (drawn from
the canary's id and the run's seed, over all trainable weights) scaled to
`CANARY_NORM`, far beyond any clip, so the mechanism's clipping makes it
exactly clip * u_c (a flat L2 clip; a per-layer clip keeps each layer's part
of the direction). Its update is sent as a pseudo-gradient (-CANARY_NORM u_c,
the sign of `tff.learning`'s client deltas), so the server's step moves the
model along +u_c.

A fair coin per canary (Steinke, Nasr & Jagielski 2023) decides whether it
is inserted or held out. Canaries take part through the *population*: they
are clients after the real ones, sampled by the run's sampling scheme like
every other client, and the accountant's epsilon is that of the population
they make. Flipping one canary's coin must change the run into a
neighbouring one under the accountant's adjacency:
* add or remove one (Poisson sampling): an inserted canary is a client, a
  held-out one is not in the population;
* replace one, zero out (fixed-size sampling, tree aggregation, matrix
  factorization): every canary is a client of the population; a held-out
  one has no data and sends an update of zeros (TFF's client work on no
  batch), so the two runs differ by one client's data replaced, or by its
  contributions replaced with zeros.

Canaries hold no examples: they add nothing to the train metrics, and the
engines' client work runs on them as on any client with no data before
their update is replaced (`with_canaries`).

The statistics (`CanaryStatistics`) are the cosine between u_c and the final
model delta theta_T - theta_0 (final-model threat model) and the largest
cosine between u_c and one round's model delta theta_t - theta_{t-1} over
the rounds (all-iterates threat model).
"""

import collections
import hashlib
from typing import Callable, Optional

import numpy as np
import tensorflow as tf
import tensorflow_federated as tff

from dp_fedavg import accounting

# Far beyond any clip: every mechanism clips a canary to exactly its clip.
CANARY_NORM = 1e6
# The canary directions are kept in memory up to this size; beyond it they
# are drawn again, in chunks, each time they are needed.
_DIRECTIONS_MEMORY_BYTES = 1 << 30
_NOT_A_CANARY = -1


def _canary_seed(seed: int) -> int:
  """The canaries' own seed stream, apart from every other use of `seed`."""
  digest = hashlib.sha256(f'canaries/{seed}'.encode()).digest()
  return int.from_bytes(digest[:7], 'little')


def canary_directions(canary_ids: tf.Tensor, dimension: int,
                      seed: int) -> tf.Tensor:
  """[k, dimension] float32: the unit direction u_c of each canary id.

  Stateless draws: the same in the engines' graphs and in `CanaryStatistics`.
  """
  canary_seed = tf.constant(_canary_seed(seed), tf.int64)

  def direction(canary_id):
    draw = tf.random.stateless_normal(
        [dimension], seed=tf.stack([canary_seed, tf.cast(canary_id, tf.int64)]))
    return draw / tf.norm(draw)

  return tf.map_fn(direction, tf.cast(canary_ids, tf.int64),
                   fn_output_signature=tf.TensorSpec([dimension], tf.float32))


class Canaries:
  """The canaries of an audit: their coins and their places in the population.

  Canary c (0 <= c < count) is inserted when its coin says so. Clients
  `num_real_clients + j` are the canaries that take part (`members`), in
  order of their ids: the inserted ones only under add-or-remove adjacency,
  all of them otherwise (module docstring).
  """

  def __init__(self, count: int, num_real_clients: int, seed: int,
               adjacency: accounting.Adjacency):
    if count < 2:
      raise ValueError(f'canaries must be >= 2, got {count}.')
    if adjacency is accounting.Adjacency.ADD_OR_REMOVE_ONE_EXAMPLE:
      raise ValueError(
          'canary clients audit user-level DP: --privacy_unit=example bounds '
          'one example\'s influence, and a canary client changes a whole '
          'client.')
    self.count = count
    self.num_real_clients = num_real_clients
    self.seed = seed
    self.adjacency = adjacency
    coins = np.random.default_rng([seed, 0xCA4A7]).integers(0, 2, count)
    self.inserted = coins.astype(bool)
    self.members = (
        np.flatnonzero(self.inserted)
        if adjacency is accounting.Adjacency.ADD_OR_REMOVE_ONE
        else np.arange(count))

  @property
  def population(self) -> int:
    """The clients the run samples from: the real ones, then the canaries."""
    return self.num_real_clients + len(self.members)

  def canary_of(self, client: int) -> Optional[int]:
    """The canary id of a client index; None for a real client."""
    if client < self.num_real_clients:
      return None
    return int(self.members[client - self.num_real_clients])

  def update_id(self, client: int) -> int:
    """What the client's update is replaced by: its canary id when it is an
    inserted canary, -1 (kept: a real client, or a held-out canary's zeros)
    otherwise."""
    canary = self.canary_of(client)
    if canary is None or not self.inserted[canary]:
      return _NOT_A_CANARY
    return canary


def canary_ids_dataset(ids) -> tf.data.Dataset:
  """The `canaries` part of a TFF client's data: one element, the update id
  of each of its update slots (one, or one per user of a vectorized group)."""
  return tf.data.Dataset.from_tensors(tf.constant(ids, tf.int64, shape=[len(ids)]))


def with_canaries(
    client_work: tff.learning.templates.ClientWorkProcess,
    trainable_type, seed: int, stacked_users: bool,
) -> tff.learning.templates.ClientWorkProcess:
  """`client_work` whose clients' data also says which updates are canaries.

  The client data becomes `<data=D, canaries=int64[slots]*>`: D as before,
  and one element holding each update slot's id (`Canaries.update_id`). A
  slot with id c >= 0 sends -CANARY_NORM * u_c instead of what training
  gave; -1 keeps it. `stacked_users`: the updates have a users axis in front
  (the vectorized engine), one slot per user; otherwise one slot.
  """
  next_type = client_work.next.type_signature
  data_type = tff.StructType([
      ('data', next_type.parameter[2].member),
      ('canaries', tff.SequenceType(tff.TensorType(np.int64, [None]))),
  ])
  result_type = next_type.result.result.member
  specs = tff.types.type_to_tf_tensor_specs(trainable_type)
  sizes = [int(np.prod(spec.shape)) for spec in tf.nest.flatten(specs)]
  dimension = sum(sizes)

  @tff.tensorflow.computation(result_type, data_type['canaries'])
  def insert(result, canaries):
    ids = canaries.get_single_element()
    leaves = tf.nest.flatten(result.update)
    if not stacked_users:
      leaves = [leaf[tf.newaxis] for leaf in leaves]
    slots = tf.shape(ids)[0]
    flat = tf.concat([tf.reshape(leaf, [slots, -1]) for leaf in leaves], 1)
    is_canary = ids >= 0
    directions = canary_directions(tf.maximum(ids, 0), dimension, seed)
    flat = tf.where(is_canary[:, tf.newaxis], -CANARY_NORM * directions, flat)
    pieces = tf.split(flat, sizes, axis=1)
    new_leaves = [
        tf.reshape(piece, tf.shape(leaf)) for piece, leaf in zip(pieces, leaves)]
    if not stacked_users:
      new_leaves = [leaf[0] for leaf in new_leaves]
    return tff.learning.templates.ClientResult(
        update=tf.nest.pack_sequence_as(result.update, new_leaves),
        update_weight=result.update_weight,
    )

  @tff.federated_computation(
      client_work.initialize.type_signature.result,
      next_type.parameter[1],
      tff.FederatedType(data_type, tff.CLIENTS),
  )
  def next_fn(state, weights, data):
    output = client_work.next(state, weights, data.data)
    return tff.templates.MeasuredProcessOutput(
        state=output.state,
        result=tff.federated_map(insert, (output.result, data.canaries)),
        measurements=output.measurements,
    )

  return tff.learning.templates.ClientWorkProcess(
      client_work.initialize, next_fn)


def _flat(weights) -> np.ndarray:
  return np.concatenate(
      [np.asarray(w, np.float32).ravel() for w in weights.trainable])


class CanaryStatistics:
  """Each canary's cosines with the final and the per-round model deltas.

  `observe` is called with the model weights before every round (the
  training loop's `inspect_round`), `finish` with the final weights.
  """

  def __init__(self, canaries: Canaries, dimension: int):
    self._canaries = canaries
    self._dimension = dimension
    self._directions = None
    if canaries.count * dimension * 4 <= _DIRECTIONS_MEMORY_BYTES:
      self._directions = self._draw(0, canaries.count)
    self._initial = None
    self._previous = None
    self.max_round_cosine = np.full(canaries.count, -np.inf)
    self.final_cosine = None
    self.rounds_observed = 0

  def _draw(self, start: int, stop: int) -> np.ndarray:
    return canary_directions(
        tf.range(start, stop), self._dimension, self._canaries.seed).numpy()

  def _cosines(self, delta: np.ndarray) -> np.ndarray:
    """cos(u_c, delta) for every canary c."""
    norm = np.linalg.norm(delta)
    if self._directions is not None:
      products = self._directions @ delta
    else:
      chunk = max(1, _DIRECTIONS_MEMORY_BYTES // (8 * self._dimension))
      products = np.concatenate([
          self._draw(start, min(start + chunk, self._canaries.count)) @ delta
          for start in range(0, self._canaries.count, chunk)])
    if norm == 0:
      return np.zeros(self._canaries.count)
    return products.astype(np.float64) / norm

  def observe(self, weights) -> None:
    """The model weights some round starts from."""
    current = _flat(weights)
    if self._previous is None:
      self._initial = current
    else:
      self._add_round(current)
    self._previous = current

  def _add_round(self, current: np.ndarray) -> None:
    self.max_round_cosine = np.maximum(
        self.max_round_cosine, self._cosines(current - self._previous))
    self.rounds_observed += 1

  def finish(self, final_weights) -> None:
    """The weights after the last round."""
    final = _flat(final_weights)
    if self._previous is None:
      raise ValueError('no round was observed.')
    self._add_round(final)
    self.final_cosine = self._cosines(final - self._initial)

  def rows(self) -> list[collections.OrderedDict]:
    """One row per canary, for the audit's CSV."""
    return [
        collections.OrderedDict(
            canary=c, inserted=int(self._canaries.inserted[c]),
            cosine_final=float(self.final_cosine[c]),
            max_cosine_over_rounds=float(self.max_round_cosine[c]))
        for c in range(self._canaries.count)
    ]


def client_data_fn(
    canaries: Canaries,
    inner: Callable[[list[int], int, int], list],
    empty_dataset: Callable[[], tf.data.Dataset],
) -> Callable[[list[int], int, int], list]:
  """The standard engine's client data with canaries: a real client's
  dataset from `inner`, an empty one for a canary, and each client's
  update id."""

  def data(cohort, shuffle_seed, byzantine_count):
    real = [c for c in cohort if canaries.canary_of(c) is None]
    real_data = iter(inner(real, shuffle_seed, byzantine_count))
    return [
        collections.OrderedDict(
            data=next(real_data) if canaries.canary_of(c) is None
            else empty_dataset(),
            canaries=canary_ids_dataset([canaries.update_id(c)]))
        for c in cohort
    ]

  return data
