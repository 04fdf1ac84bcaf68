"""The federated skeleton every factory here shares: clip, aggregate, finish.

Each round of a factory's process:
1. the server's state gives the clients' parameters (`client_params`), which
   are broadcast;
2. every client clips its value (`client_update_computation`): the record it
   sends and its counts (clipped, non-finite, ...);
3. an inner `RecordAggregation` brings the records and the counts to the
   server: a plain sum, a secure sum of an integer encoding, or a secure
   modular sum (`aggregators.secure_encoding`). It decides only how records
   cross to the server; an aggregation that is not a sum (a robust rule that
   sees every record) is another `RecordAggregation`;
4. the server finishes the round (`finish_round`): noise, the mean, the next
   state and the measurements.
The factory composes its pieces with an inner aggregation instead of
branching on it, as TFF's `DifferentiallyPrivateFactory` takes its inner sum.
"""

import abc
import dataclasses
from typing import Optional

import numpy as np
import tensorflow as tf
import tensorflow_federated as tff


def float_value_specs(value_type, factory_name: str):
  """The TensorSpecs of `value_type`; TypeError unless it is all floats."""
  if not tff.types.is_structure_of_floats(value_type):
    raise TypeError(
        f'{factory_name} aggregates structures of float tensors; got '
        f'{value_type}.'
    )
  return tff.types.type_to_tf_tensor_specs(value_type)


def stacked_type(value_type):
  """`value_type` with a leading users axis, of unknown size, on every tensor."""
  return tff.types.to_type(tf.nest.map_structure(
      lambda spec: tff.TensorType(spec.dtype.as_numpy_dtype, [None, *spec.shape]),
      tff.types.type_to_tf_tensor_specs(value_type),
  ))


def unstacked_type(value_type, factory_name: str):
  """One user's update type from a stack of users' updates (leading axis)."""
  specs = float_value_specs(value_type, factory_name)
  for spec in tf.nest.flatten(specs):
    if spec.shape.rank is None or spec.shape.rank < 1 or spec.shape[0] is not None:
      raise TypeError(
          f'{factory_name}(stacked_users=True) aggregates stacks of users\' '
          f'updates, tensors with a leading users axis of unknown size; got '
          f'{value_type}.'
      )
  return tff.types.to_type(tf.nest.map_structure(
      lambda spec: tff.TensorType(spec.dtype.as_numpy_dtype, spec.shape[1:]),
      specs,
  ))


def _user_norms(flat_tensors: list[tf.Tensor], norm_order: int) -> tf.Tensor:
  """[users, tensors]: each user's L1 or L2 norm of each tensor."""
  if norm_order == 2:
    # One pass, no squared temporary, unlike reduce_sum(square(.)).
    norms = [tf.math.reduce_euclidean_norm(t, axis=1) for t in flat_tensors]
  else:
    norms = [tf.reduce_sum(tf.abs(t), axis=1) for t in flat_tensors]
  return tf.stack(norms, axis=1)


def _users_all_finite(flat_tensors: list[tf.Tensor]) -> tf.Tensor:
  """[users] bool: whether all of each user's values are finite."""
  return tf.reduce_all(tf.stack(
      [tf.reduce_all(tf.math.is_finite(t), axis=1) for t in flat_tensors],
      axis=1,
  ), axis=1)


def flat_dimension(value_type) -> int:
  """How many values one user's update of `value_type` holds."""
  return sum(
      spec.shape.num_elements()
      for spec in tf.nest.flatten(tff.types.type_to_tf_tensor_specs(value_type))
  )


def _split_flat(matrix: tf.Tensor, value_specs) -> list[tf.Tensor]:
  """[users, D] -> per tensor [users, d_j], in `tf.nest.flatten` order."""
  sizes = [spec.shape.num_elements() for spec in tf.nest.flatten(value_specs)]
  return tf.split(matrix, sizes, axis=1)


def unflatten(vector: tf.Tensor, value_specs):
  """[D] -> the structure of `value_specs`."""
  parts = _split_flat(vector[tf.newaxis], value_specs)
  return tf.nest.pack_sequence_as(value_specs, [
      tf.reshape(part, spec.shape)
      for part, spec in zip(parts, tf.nest.flatten(value_specs))
  ])


class ClientStep:
  """The clients' step: each user's update -> its record and counts.

  Every clipping here multiplies each tensor of a user's update by a factor
  found from the tensors' norms, so the factories give only that rule:
  `clip_fn(norms, is_finite, params) -> (scales, counts)`, where `norms` is
  [users, tensors] (L1 or L2 by `norm_order`, inf where too large to
  represent), `is_finite` [users] says whether each user's values are all
  finite, `scales` [users, tensors] are the factors and `counts` a structure of
  [users] int32. A user whose update is not finite contributes zeros whatever
  its scale. `client_noise_fn(records, params, num_users)`, if given, adds the
  noise of `num_users` users to each of the tensors `records`.

  With `centered`, `params['center']` (a [D] vector, see `flat_dimension`) is
  subtracted from each user's update before it is clipped (centered clipping
  around a public centre).

  With `stacked_users`, a client's value is a stack of users' updates (the
  vectorized engine): every user is clipped (and counted) on its own. By
  default the client sends the sums over its users, so one user still moves
  the round's sums by at most its clipped update: the sensitivity and the
  noise are those of one user per client. The norms and the scaled sum are
  computed for all users at once (two passes over the stack); a per-user
  `tf.map_fn` made the vectorized engine's DP rounds 1.2-1.6x its no-DP
  rounds. With `gather`, the client sends every user's record instead, as
  a [users, D] matrix (for aggregations that see each record).
  """

  def __init__(
      self, clip_fn, norm_order: int, value_type, params_type,
      stacked_users: bool, client_noise_fn=None, centered: bool = False,
  ):
    if norm_order not in (1, 2):
      raise ValueError(f'norm_order must be 1 or 2, got {norm_order}.')
    self._clip_fn = clip_fn
    self._norm_order = norm_order
    self._value_type = value_type
    self._value_specs = tff.types.type_to_tf_tensor_specs(value_type)
    self._params_type = params_type
    self._stacked_users = stacked_users
    self._client_noise_fn = client_noise_fn
    self._centered = centered

  def _clip(self, flat, params):
    """Per tensor [users, d_j] -> (scales [users, tensors], zeroed flat, counts)."""
    users = tf.shape(flat[0])[0]
    norms = _user_norms(flat, self._norm_order)
    # Any non-finite value makes its norm non-finite, so finite norms prove
    # every value finite; the exact check runs only when they do not.
    is_finite = tf.cond(
        tf.reduce_all(tf.math.is_finite(norms)),
        lambda: tf.ones(tf.stack([users]), tf.bool),
        lambda: _users_all_finite(flat),
    )
    scales, counts = self._clip_fn(norms, is_finite, params)
    # A non-finite user's scale may be nan, and 0 * inf is nan: both its
    # scale and its values are zeroed.
    scales = tf.where(is_finite[:, tf.newaxis], scales, tf.zeros_like(scales))
    flat = tf.cond(
        tf.reduce_all(is_finite),
        lambda: flat,
        lambda: [tf.where(is_finite[:, tf.newaxis], t, tf.zeros_like(t))
                 for t in flat],
    )
    return scales, flat, counts

  def _user_records(self, flat, params):
    """Per tensor [users, d_j] -> ([users, D] records, counts)."""
    scales, flat, counts = self._clip(flat, params)
    records = [f * scales[:, j:j + 1] for j, f in enumerate(flat)]
    if self._client_noise_fn is not None:
      records = self._client_noise_fn(records, params, 1)
    return tf.concat(records, axis=1), counts

  def records(self, updates: tf.Tensor, params) -> tf.Tensor:
    """[k, D] records of [k, D] updates (already centred under `centered`).

    What k clients would send for these updates; the server uses it to put
    simulated updates through the clients' step (`aggregators.robust`).
    """
    return self._user_records(_split_flat(updates, self._value_specs), params)[0]

  def computation(self, gather: bool = False) -> tff.Computation:
    """(update, params) -> (record, counts); see the class docstring."""
    value_specs = self._value_specs

    def clip_client(stack, params):
      tensors = tf.nest.flatten(stack)
      users = tf.shape(tensors[0])[0]
      flat = [
          tf.reshape(t, [-1, spec.shape.num_elements()])
          for t, spec in zip(tensors, tf.nest.flatten(value_specs))
      ]
      if self._centered:
        centers = _split_flat(params['center'][tf.newaxis], value_specs)
        flat = [f - c for f, c in zip(flat, centers)]
      if gather:
        records, counts = self._user_records(flat, params)
      else:
        scales, flat, counts = self._clip(flat, params)
        sums = [
            tf.reshape(tf.linalg.matvec(f, scales[:, j], transpose_a=True),
                       tf.shape(t)[1:])
            for j, (f, t) in enumerate(zip(flat, tensors))
        ]
        if self._client_noise_fn is not None:
          sums = self._client_noise_fn(sums, params, users)
        records = tf.nest.pack_sequence_as(value_specs, sums)
      return records, tf.nest.map_structure(
          lambda c: tf.reduce_sum(c, axis=0), counts
      )

    if self._stacked_users:
      return tff.tensorflow.computation(
          clip_client, stacked_type(self._value_type), self._params_type
      )

    @tff.tensorflow.computation(self._value_type, self._params_type)
    def one_user(value, params):
      return clip_client(
          tf.nest.map_structure(lambda t: t[tf.newaxis], value), params
      )

    return one_user


def client_update_computation(
    clip_fn, norm_order: int, value_type, params_type, stacked_users: bool,
    client_noise_fn=None,
) -> tff.Computation:
  """The clients' step that sends sums; see `ClientStep`."""
  return ClientStep(
      clip_fn, norm_order, value_type, params_type, stacked_users,
      client_noise_fn,
  ).computation()


def clip_from_state(
    state_type, clip_field: str, clip_fn, norm_order: int, value_type,
    stacked_users: bool,
) -> tuple[tff.Computation, tff.Computation]:
  """(client params, client step) of a factory whose clients need only one
  float32 clip, its state's `clip_field`: the state -> that clip, and the
  clients' step that sends sums (`client_update_computation`)."""

  @tff.tensorflow.computation(state_type)
  def client_params(state):
    return state[clip_field]

  return client_params, client_update_computation(
      clip_fn, norm_order, value_type, tff.TensorType(np.float32),
      stacked_users,
  )


@dataclasses.dataclass(frozen=True)
class Clients:
  """What the clients compute, for aggregations that redo it on the server.

  Attributes:
    params: the server's state -> the clients' parameters.
    step: their step, when the factory built it as a `ClientStep`.
  """

  params: tff.Computation
  step: Optional[ClientStep] = None


class RecordAggregation(abc.ABC):
  """How the clients' clipped records and counts reach the server.

  Attributes:
    secure: the server never sees one client's record (so stacks of users,
      which would put several users in one record, are refused).
    sums: the aggregate is the sum of the records, so adding or removing one
      client moves it by at most that client's clipped record. Noise
      calibrated to that sensitivity is sound only after a sum; a factory
      refuses an aggregation that is not one (a median, a trimmed mean) with
      server noise. An aggregate that is not a sum is already the round's
      estimate of the mean: the factory does not divide it.
    gathers: the clients send every user's record, a [users, D] matrix of
      flattened updates (`ClientStep.computation(gather=True)`), not their
      sums.
    reads_center: it reads `state['center']`, the previous round's released
      aggregate as a [D] vector, which the factory then keeps in its state.
  """

  secure: bool = False
  sums: bool = True
  gathers: bool = False
  reads_center: bool = False

  def check_cohort(self, expected_clients_per_round: float) -> None:
    """Raises ValueError if it cannot aggregate cohorts of about this size."""
    del expected_clients_per_round

  def counts_type(self, counts_type):
    """The type of the count sums the server gets (it may add its own)."""
    return counts_type

  def post_noise_scale(self, record_type) -> float:
    """The factor the server applies to the noised aggregate (an encoding's
    shrink, undone after the noise)."""
    del record_type
    return 1.0

  def state_fields(self) -> dict:
    """Entries it needs in the factory's state (TF values; called while
    tracing the initial state), carried unchanged from round to round."""
    return {}

  @abc.abstractmethod
  def aggregate(self, records, counts, params, state, clients: Clients):
    """(SERVER aggregate, SERVER count sums) of CLIENTS `records` and `counts`.

    Called while tracing the process's federated computation; `params` are
    the clients' broadcast parameters, `state` the server's state and
    `clients` what the clients computed them with.
    """


class PlainSum(RecordAggregation):
  """`tff.federated_sum` of the records and of the counts."""

  def aggregate(self, records, counts, params, state, clients):
    del params, state, clients
    return tff.federated_sum(records), tff.federated_sum(counts)


def clip_aggregate_finish_process(
    initial_state: tff.Computation,
    client_params: tff.Computation,
    client_update: tff.Computation | ClientStep,
    finish_round: tff.Computation,
    record_aggregation: RecordAggregation,
) -> tff.templates.AggregationProcess:
  """The factories' process; see the module docstring.

  `client_update(value, params) -> (record, counts)`, or a `ClientStep`
  whose computation sends each user's record when `record_aggregation`
  gathers them; `finish_round(aggregate, count_sums, state) -> (result, new
  state, measurements)`. Only what `record_aggregation` releases leaves the
  clients' side, so the noise added in `finish_round` (or by the clients)
  covers everything released.
  """
  client_step = None
  if isinstance(client_update, ClientStep):
    client_step = client_update
    client_update = client_step.computation(gather=record_aggregation.gathers)
  elif record_aggregation.gathers:
    raise TypeError(
        f'{type(record_aggregation).__name__} gathers users\' records; the '
        'factory must give its client step as a skeleton.ClientStep.'
    )
  clients = Clients(client_params, client_step)

  @tff.federated_computation
  def init_fn():
    return tff.federated_eval(initial_state, tff.SERVER)

  # A user's update, or a stack of users' (see `ClientStep`).
  client_value_type = client_update.type_signature.parameter[0]

  @tff.federated_computation(
      init_fn.type_signature.result,
      tff.FederatedType(client_value_type, tff.CLIENTS),
  )
  def next_fn(state, value):
    params = tff.federated_broadcast(tff.federated_map(client_params, state))
    records, counts = tff.federated_map(client_update, (value, params))
    aggregate, count_sums = record_aggregation.aggregate(
        records, counts, params, state, clients
    )
    result, new_state, measurements = tff.federated_map(
        finish_round, (aggregate, count_sums, state)
    )
    return tff.templates.MeasuredProcessOutput(
        state=new_state, result=result, measurements=measurements
    )

  return tff.templates.AggregationProcess(init_fn, next_fn)
