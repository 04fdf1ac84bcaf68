"""The vectorized engine: many users per TFF client, trained simultaneously.

The standard engine gives every user its own TFF client, and TFF's worker
spends tens of milliseconds per client (instantiating the client graph, its
dataset pipeline) on a few hundred microseconds of arithmetic. Here a TFF
client holds a group of users: it reads their examples from files inside the
worker (a round sends file paths, not tensors), trains each user's model
from the round's weights, and hands the aggregator the stack of per-user
model deltas. The aggregators, created with
`stacked_users=True`, clip every user's delta on its own and add noise once,
so user-level DP is exactly that of the standard engine: a user's influence on
the sum is still bounded by the clip, and the noise is calibrated to it.

Local training is the standard engine's, user by user: the same example order
(`base.local_example_order`), the same batches (the last one of a user may be
short), plain SGD on the mean loss of each batch. Users with fewer batches
than others in their group are padded with masked batches that change
nothing.

Sequential stacks of Dense layers (the digits and benchmark MLPs) train all
users of a TFF client at once, and never copy a kernel per user: under SGD a
user's kernel is the shared one plus a low-rank term built from its own
inputs and gradients (`_train_dense_users`), so a step is one GEMM for all
users plus small per-user corrections. Models of the layer kinds that
`per_user_model` covers (the FEMNIST CNN: convolutions, group normalization,
pooling; the Shakespeare GRU: an embedding, a GRU, a Dense layer on every
position) train all users at once on a copy of the weights per user. Other
models train the client's users one after another inside the worker's
graph, with TFF's own forward pass; they still save the per-client overhead,
not the per-user arithmetic.
"""

import collections
import math
import os
from typing import Callable, Optional

import numpy as np
import tensorflow as tf
import tensorflow_federated as tff

from aggregators import skeleton
from dp_fedavg import canaries as canaries_lib
from dp_fedavg import dp_sgd
from dp_fedavg import per_user_model
from dp_fedavg import process as process_lib
from dp_fedavg.tasks import base


class UnsupportedDataError(ValueError):
  """The task's examples are not (features, label) pairs."""


_DENSE_STACK_LAYERS = (tf.keras.layers.InputLayer, tf.keras.layers.Dense)


def dense_activations(
    keras_model_fn: Callable[[], tf.keras.Model]
) -> Optional[list]:
  """The activation of each Dense layer of a Sequential stack of Dense layers
  with biases on feature vectors; None for any other model."""
  # A fresh graph, so this model's variables do not outlive the call.
  with tf.Graph().as_default():
    model = keras_model_fn()
    if (not isinstance(model, tf.keras.Sequential)
        or len(model.input_shape) != 2
        or not all(isinstance(layer, _DENSE_STACK_LAYERS)
                   for layer in model.layers)):
      return None
    layers = [l for l in model.layers if isinstance(l, tf.keras.layers.Dense)]
    if not all(layer.use_bias for layer in layers):
      return None
    return [layer.activation for layer in layers]


class UserFiles:
  """Each user's training examples, written once to files the worker reads.

  A user's examples are written the first time the user is sampled (so the
  cost is spread over the first rounds and memory does not grow with the
  population), one file per element component, as serialized tensors.
  """

  def __init__(self, task: base.FederatedTask, directory: str):
    self._task = task
    self._directory = directory
    self._specs = tf.nest.flatten(task.train_data.element_type_structure)
    os.makedirs(directory, exist_ok=True)

  @property
  def directory(self) -> str:
    return self._directory

  @property
  def num_components(self) -> int:
    return len(self._specs)

  def paths(
      self, user_index: int,
      flip_labels: Optional[Callable[[tf.Tensor], tf.Tensor]] = None,
  ) -> list[str]:
    """The user's files, written now if they are not yet; with `flip_labels`
    (a label_flip attacker), files of its poisoned examples."""
    poisoned = '.flipped' if flip_labels else ''
    paths = [
        os.path.join(self._directory,
                     f'{user_index}{poisoned}.{component}.tensor')
        for component in range(len(self._specs))
    ]
    if not all(os.path.exists(path) for path in paths):
      client_id = self._task.train_data.client_ids[user_index]
      examples = base.all_examples(
          self._task.train_data.create_tf_dataset_for_client(client_id)
      )
      if examples is not None and flip_labels:
        features, labels = examples
        examples = (features, flip_labels(labels))
      tensors = (
          [tf.zeros([0, *spec.shape], spec.dtype) for spec in self._specs]
          if examples is None else tf.nest.flatten(examples)
      )
      for tensor, path in zip(tensors, paths):
        # Written under a temporary name and renamed, so a killed run never
        # leaves a truncated file that a resumed run would trust.
        tf.io.write_file(path + '.partial', tf.io.serialize_tensor(tensor))
        os.replace(path + '.partial', path)
    return paths

  def empty_paths(self) -> list[str]:
    """The files of a user with no examples (a canary client)."""
    paths = [os.path.join(self._directory, f'empty.{component}.tensor')
             for component in range(len(self._specs))]
    for spec, path in zip(self._specs, paths):
      if not os.path.exists(path):
        tf.io.write_file(path + '.partial', tf.io.serialize_tensor(
            tf.zeros([0, *spec.shape], spec.dtype)))
        os.replace(path + '.partial', path)
    return paths


def default_users_per_client(expected_users_per_round: float) -> int:
  """Enough TFF clients to keep every core busy, no more: ceil(n / cores)."""
  cores = os.cpu_count() or 1
  return max(1, math.ceil(expected_users_per_round / cores))


def pack_cohort(
    user_files: UserFiles, cohort: list[int], users_per_client: int,
    shuffle_seed: int, byzantine_count: int = 0,
    flip_labels: Optional[Callable[[tf.Tensor], tf.Tensor]] = None,
    with_user_indices: bool = False,
    canaries: Optional[canaries_lib.Canaries] = None,
) -> list:
  """The round's client data: groups of at most `users_per_client` users.

  Each TFF client gets a one-element dataset (TFF's client work takes
  sequences) holding its users' file paths and the round's shuffle seed.
  Users are grouped by size: a group trains for as many steps as its
  largest user, so mixing small and large users would waste most of the
  steps on padding. (Which users share a TFF client changes nothing else:
  each is trained and clipped on its own.) The cohort's first
  `byzantine_count` users are Byzantine, and stay first, so that the
  aggregator finds their records first (`dp_fedavg.byzantine`); with
  `flip_labels` they train on poisoned labels. With `with_user_indices`
  (example-level DP), a group also says which users it holds (`users`), so
  each draws its batches and noise from its own seed. With `canaries` (an
  audit), canary users have no examples and each group's data is
  `<data=group, canaries=update ids of its users>`
  (`dp_fedavg.canaries.with_canaries`).
  """
  paths = {
      user: user_files.empty_paths()
      if canaries is not None and canaries.canary_of(user) is not None
      else user_files.paths(
          user, flip_labels if position < byzantine_count else None)
      for position, user in enumerate(cohort)
  }
  # The file's size grows with the user's number of examples.
  by_size = [
      user for part in (cohort[:byzantine_count], cohort[byzantine_count:])
      for user in sorted(part, key=lambda user: os.path.getsize(paths[user][0]))
  ]
  groups = []
  for start in range(0, len(by_size), users_per_client):
    users = by_size[start:start + users_per_client]
    group = collections.OrderedDict(
        paths=tf.constant(
            [paths[user] for user in users], tf.string,
            shape=[len(users), user_files.num_components],
        ),
        shuffle_seed=tf.constant(shuffle_seed, tf.int64),
    )
    if with_user_indices:
      group['users'] = tf.constant(users, tf.int64, shape=[len(users)])
    dataset = (tf.data.Dataset.from_tensors(group)
               .with_options(base.client_dataset_options()))
    if canaries is not None:
      dataset = collections.OrderedDict(
          data=dataset, canaries=canaries_lib.canary_ids_dataset(
              [canaries.update_id(user) for user in users]))
    groups.append(dataset)
  return groups


def _read_user(user_paths, specs) -> list[tf.Tensor]:
  """One user's examples, per component, from its files."""
  return [
      tf.ensure_shape(
          tf.io.parse_tensor(tf.io.read_file(user_paths[j]), spec.dtype),
          [None, *spec.shape],
      )
      for j, spec in enumerate(specs)
  ]


def _read_group(paths, specs, local_epochs, batch_size, shuffle_seed):
  """[users, steps, batch, ...] examples per component and their mask.

  Every user's examples go into one flat tensor per component, followed by a
  row of zeros; one gather per component then lays each user's examples out
  in its local order (`base.local_example_order`), padded with the zero row.
  A gather per user, a ragged tensor and its padded copy, which this
  replaces, took a fifth of the MLP's client work; this takes a seventh.
  """
  users = tf.shape(paths)[0]
  components = [
      tf.TensorArray(spec.dtype, size=users + 1, infer_shape=False,
                     element_shape=[None, *spec.shape])
      for spec in specs
  ]
  # Each user's examples in local order, as rows of the flat tensors.
  orders = tf.TensorArray(tf.int32, size=users, infer_shape=False,
                          element_shape=[None])
  lengths = tf.TensorArray(tf.int32, size=users, element_shape=[])
  offset = tf.constant(0)
  for user in tf.range(users):
    tensors = _read_user(paths[user], specs)
    count = tf.shape(tensors[0])[0]
    components = [c.write(user, t) for c, t in zip(components, tensors)]
    order = base.local_example_order(count, local_epochs, shuffle_seed)
    orders = orders.write(user, offset + order)
    lengths = lengths.write(user, tf.size(order))
    offset += count
  flat = [
      c.write(users, tf.zeros([1, *spec.shape], spec.dtype)).concat()
      for c, spec in zip(components, specs)
  ]
  lengths = lengths.stack()
  longest = tf.reduce_max(tf.concat([lengths, tf.zeros([1], lengths.dtype)], 0))
  steps = (longest + batch_size - 1) // batch_size
  padded_length = steps * batch_size
  # Padding points at the zero row, which follows every user's examples.
  rows = tf.RaggedTensor.from_row_lengths(orders.concat(), lengths).to_tensor(
      default_value=offset, shape=tf.stack([users, padded_length]))
  batched = [
      tf.reshape(tf.gather(f, rows), tf.concat(
          [tf.stack([users, steps, batch_size]),
           tf.constant(spec.shape.as_list(), tf.int32)], axis=0))
      for f, spec in zip(flat, specs)
  ]
  mask = tf.reshape(
      tf.sequence_mask(lengths, padded_length, dtype=tf.float32),
      tf.stack([users, steps, batch_size]),
  )
  return batched, mask, steps


def _step_losses(example_losses, outputs, labels, mask):
  """(the sum over users of each one's mean batch loss, the sum of all
  examples' losses), for [users, batch, ...] labels and a [users, batch]
  mask; `example_losses` is the task's unreduced loss
  (`base.unreduced_loss`)."""
  losses = example_losses(labels, outputs)
  if losses.shape.rank > 2:
    # An example's loss over a sequence is the mean over its positions: Keras
    # averages a batch's [batch, time] losses over all of them.
    losses = tf.reduce_mean(losses, axis=list(range(2, losses.shape.rank)))
  # Each user's loss is the mean over its batch, as Keras computes it; users
  # are independent, so the sum gives each its own gradient.
  user_losses = (tf.reduce_sum(losses * mask, axis=1)
                 / tf.maximum(tf.reduce_sum(mask, axis=1), 1.0))
  return tf.reduce_sum(user_losses), tf.reduce_sum(losses * mask)


def _train_users_with_copies(forward, example_losses, trainable, features,
                             labels, mask, steps, learning_rate):
  """Local SGD of every user at once, on a copy of the weights per user.

  `forward` is a `per_user_model.Forward`. A step trains only the users that
  still have a batch: a group's users can differ by tens of batches (the
  Shakespeare speakers), and computing the others' masked batches would cost
  most of the round. Returns (each user's delta, stacked, per variable; loss
  sum).
  """
  users = tf.shape(mask)[0]
  weights = [
      tf.tile(w[tf.newaxis], tf.concat([[users], tf.ones_like(tf.shape(w))], 0))
      for w in trainable
  ]
  user_steps = tf.reduce_sum(
      tf.cast(tf.reduce_any(mask > 0, axis=2), tf.int32), axis=1)
  loss_sum = tf.constant(0.0)
  for step in tf.range(steps):
    active = tf.where(user_steps > step)[:, 0]
    active_weights = [tf.gather(w, active) for w in weights]
    with tf.GradientTape() as tape:
      tape.watch(active_weights)
      total, step_loss_sum = _step_losses(
          example_losses,
          forward(active_weights, tf.gather(features[:, step], active)),
          tf.gather(labels[:, step], active),
          tf.gather(mask[:, step], active),
      )
    gradients = tape.gradient(total, active_weights)
    weights = [
        tf.tensor_scatter_nd_sub(w, active[:, tf.newaxis], learning_rate * g)
        for w, g in zip(weights, gradients)
    ]
    loss_sum += step_loss_sum
  return [w[tf.newaxis] - final for w, final in zip(trainable, weights)], loss_sum


def _train_dense_users(kernels, biases, activations, example_losses, features,
                       labels, mask, steps, learning_rate):
  """Local SGD of every user at once, never copying a kernel per user.

  Under SGD a user's kernel after s steps is the shared one plus a low-rank
  term, W_s = W_0 - lr * sum_{t<s} H_t^T G_t (H_t the layer's inputs at step
  t, G_t the loss gradient at its outputs), so its outputs are
  H_s W_s = H_s W_0 - lr * sum_{t<s} (H_s H_t^T) G_t: one GEMM shared by all
  users plus a correction through each user's small Gram matrix of its own
  inputs. The first layer's inputs are the data, so its GEMM and Grams are
  computed once for every step. Biases are small and copied per user.
  Exact for SGD up to float32 rounding (the products are summed in another
  order). Returns (each user's kernel and bias deltas, loss sum, [users]
  whether each user's deltas are all finite).
  """
  users, batch = tf.shape(mask)[0], tf.shape(mask)[2]
  rows = steps * batch
  widths = [kernel.shape[1] for kernel in kernels]
  # Every step's inputs and output gradients, [users, steps * batch, width];
  # steps not yet taken hold zeros, so they add nothing to the corrections.
  inputs = [tf.reshape(features, [users, rows, kernels[0].shape[0]])] + [
      tf.zeros(tf.stack([users, rows, kernel.shape[0]])) for kernel in kernels[1:]
  ]
  output_grads = [tf.zeros(tf.stack([users, rows, width])) for width in widths]
  # Batched matmuls, not einsums: an einsum pays for parsing and reshaping
  # on every call, which the loop's small products feel.
  first_layer_gram = tf.matmul(inputs[0], inputs[0], transpose_b=True)
  first_layer_shared = tf.reshape(
      tf.matmul(tf.reshape(features, [-1, kernels[0].shape[0]]), kernels[0]),
      tf.stack([users, steps, batch, widths[0]]))
  user_biases = [tf.tile(bias[tf.newaxis], [users, 1]) for bias in biases]
  loss_sum = tf.constant(0.0)
  for step in tf.range(steps):
    step_rows = slice(step * batch, (step + 1) * batch)
    with tf.GradientTape() as tape:
      outputs, hidden_inputs = [], []
      h = None
      for layer, (kernel, activation) in enumerate(zip(kernels, activations)):
        if layer == 0:
          shared = first_layer_shared[:, step]
          gram = first_layer_gram[:, step_rows]
        else:
          hidden_inputs.append(h)
          shared = tf.reshape(
              tf.matmul(tf.reshape(h, [-1, kernel.shape[0]]), kernel),
              tf.stack([users, batch, kernel.shape[1]]))
          gram = tf.matmul(h, inputs[layer], transpose_b=True)
        z = (shared + user_biases[layer][:, tf.newaxis]
             - learning_rate * tf.matmul(gram, output_grads[layer]))
        tape.watch(z)
        outputs.append(z)
        h = activation(z)
      total, step_loss_sum = _step_losses(
          example_losses, h, labels[:, step], mask[:, step])
    gradients = tape.gradient(total, outputs)
    output_grads = [_record_step(g, d, step, steps)
                    for g, d in zip(output_grads, gradients)]
    inputs = inputs[:1] + [_record_step(i, h, step, steps)
                           for i, h in zip(inputs[1:], hidden_inputs)]
    user_biases = [b - learning_rate * tf.reduce_sum(d, axis=1)
                   for b, d in zip(user_biases, gradients)]
    loss_sum += step_loss_sum
  # The learning rate scales the small factor, not the product.
  kernel_deltas = [tf.matmul(i, learning_rate * g, transpose_a=True)
                   for i, g in zip(inputs, output_grads)]
  bias_deltas = [b[tf.newaxis] - u for b, u in zip(biases, user_biases)]
  finite = _users_finite_from_factors(
      kernel_deltas, bias_deltas, inputs, output_grads, learning_rate)
  return kernel_deltas, bias_deltas, loss_sum, finite


def _users_finite_from_factors(kernel_deltas, bias_deltas, inputs,
                               output_grads, learning_rate):
  """[users] bool: whether all of each user's deltas are finite.

  A kernel delta is lr * sum_t x_t^T g_t, so each of its entries is at most
  lr * sum_t |x_t| |g_t| (row norms) in size. Where that bound is below the
  largest float32 for every user (it is nan or inf where a factor is not
  finite), and the small bias deltas are finite, every delta is finite: the
  check reads the factors, not every user's kernel delta (a pass over 16 MB
  for 25 users of the MLP). Otherwise (a user diverged) it checks the
  deltas themselves.
  """
  # Half the largest float32: the bound's own rounding cannot reach it.
  limit = np.finfo(np.float32).max / 2
  bounded = tf.reduce_all(tf.stack([
      learning_rate * tf.reduce_sum(
          tf.math.reduce_euclidean_norm(i, axis=2)
          * tf.math.reduce_euclidean_norm(g, axis=2), axis=1) < limit
      for i, g in zip(inputs, output_grads)], axis=1), axis=1)
  users = tf.shape(bounded)[0]
  return tf.cond(
      tf.reduce_all(tf.logical_and(bounded, _users_all_finite(bias_deltas))),
      lambda: tf.ones(tf.stack([users]), tf.bool),
      lambda: _users_all_finite(kernel_deltas + bias_deltas),
  )


def _users_all_finite(deltas) -> tf.Tensor:
  """[users] bool: whether all of each user's values in `deltas` (each
  [users, ...]) are finite."""
  return tf.reduce_all(tf.stack([
      tf.reduce_all(tf.math.is_finite(tf.reshape(d, [tf.shape(d)[0], -1])),
                    axis=1)
      for d in deltas], axis=1), axis=1)


def _record_step(history, value, step, steps):
  """`history` [users, steps * batch, width] with `value` [users, batch,
  width] written at the rows of `step` (which hold zeros until then)."""
  shape = tf.shape(history)
  by_step = tf.reshape(history, tf.stack([shape[0], steps, -1, shape[2]]))
  # A scatter writes the step's rows into a copy of the history; adding a
  # one-hot mask read and wrote all of it three times (a tenth of the MLP's
  # client work).
  at_step = tf.stack([tf.range(shape[0]), tf.fill([shape[0]], step)], axis=1)
  return tf.reshape(tf.tensor_scatter_nd_update(by_step, at_step, value), shape)


def _train_users_one_by_one(model, initial, features, labels, mask, steps,
                            learning_rate):
  """Any model: users one after another, in the worker's graph.

  Exactly TFF's client update (`forward_pass`, its SGD) per user; batches are
  sliced to their true size, so a short last batch averages its own examples.
  Returns (each user's delta, stacked, per variable; loss sum).
  """
  variables = model.trainable_variables
  # TFF's own client optimizer, as the standard engine steps with it.
  optimizer = tff.learning.optimizers.build_sgdm(learning_rate=learning_rate)
  optimizer_state = optimizer.initialize(
      tuple(tf.TensorSpec(v.shape, v.dtype) for v in variables)
  )
  users = tf.shape(mask)[0]
  deltas = [
      tf.TensorArray(v.dtype, size=users, element_shape=v.shape)
      for v in variables
  ]
  loss_sum = tf.constant(0.0)
  for user in tf.range(users):
    for variable, value in zip(variables, initial):
      variable.assign(value)
    for step in tf.range(steps):
      size = tf.cast(tf.reduce_sum(mask[user, step]), tf.int32)
      if size > 0:
        batch = (features[user, step, :size], labels[user, step, :size])
        with tf.GradientTape() as tape:
          output = model.forward_pass(batch, training=True)
        gradients = tape.gradient(output.loss, variables)
        _, updated = optimizer.next(
            optimizer_state, tuple(variables), tuple(gradients)
        )
        for variable, value in zip(variables, updated):
          variable.assign(value)
        loss_sum += output.loss * tf.cast(size, tf.float32)
    deltas = [
        delta.write(user, value - variable)
        for delta, value, variable in zip(deltas, initial, variables)
    ]
  return [delta.stack() for delta in deltas], loss_sum


def build_client_work(
    task: base.FederatedTask,
    weights_type,
    client_learning_rate: float,
    local_epochs: int,
    batch_size: int,
    example_dp: Optional[dp_sgd.DpSgdConfig] = None,
) -> tff.learning.templates.ClientWorkProcess:
  """Client work on groups of users: stacked per-user deltas, train metrics.

  With `example_dp`, every user of the group runs DP-SGD on its own examples
  (`dp_fedavg.dp_sgd`), one user after another, each with the seed of the
  standard engine's client (`dp_sgd.client_seed`); the group's data then
  holds its users' indices (`pack_cohort(with_user_indices=True)`).

  Stacks of Dense layers train all users at once (shared GEMMs plus
  per-user low-rank corrections); models of the layer kinds in
  `per_user_model` train all users at once on per-user weight copies; other
  models train the group's users one after another inside the worker.
  `weights_type` is the model's `ModelWeights` type.
  """
  activations = dense_activations(task.keras_model_fn)
  per_user_forward = (per_user_model.build_forward(task.keras_model_fn)
                      if activations is None else None)
  example_losses = base.unreduced_loss(task)
  specs = tf.nest.flatten(task.train_data.element_type_structure)
  if len(specs) != 2:
    raise UnsupportedDataError(
        '--engine=vectorized needs (features, label) examples.'
    )
  data_type = tff.SequenceType(collections.OrderedDict(
      paths=tff.TensorType(np.str_, [None, len(specs)]),
      shuffle_seed=tff.TensorType(np.int64),
  ))
  trainable_specs = tff.types.type_to_tf_tensor_specs(weights_type.trainable)
  if example_dp is not None:
    return _dp_sgd_client_work(task, weights_type, specs, example_dp,
                               client_learning_rate)

  def read(data):
    group = data.get_single_element()
    return _read_group(
        group['paths'], specs, local_epochs, batch_size, group['shuffle_seed']
    )

  def result(deltas, loss_sum, mask, finite=None):
    # A user diverged when its update is not finite; the aggregator replaces
    # it with zeros (and counts it too).
    if finite is None:
      finite = _users_all_finite(deltas)
    return (
        tff.learning.templates.ClientResult(
            update=tf.nest.pack_sequence_as(trainable_specs, deltas),
            update_weight=tf.constant(1.0),
        ),
        collections.OrderedDict(
            loss_sum=loss_sum, num_examples=tf.reduce_sum(mask),
            num_users=tf.shape(mask)[0],
            nonfinite_users=tf.reduce_sum(
                tf.cast(tf.logical_not(finite), tf.int32)),
        ),
    )

  @tf.function
  def train_dense_group(weights, data):
    (features, labels), mask, steps = read(data)
    trainable = list(weights.trainable)
    kernels, biases = trainable[0::2], trainable[1::2]
    kernel_deltas, bias_deltas, loss_sum, finite = _train_dense_users(
        kernels, biases, activations, example_losses, features, labels, mask,
        steps, client_learning_rate,
    )
    deltas = [None] * len(trainable)
    deltas[0::2], deltas[1::2] = kernel_deltas, bias_deltas
    return result(deltas, loss_sum, mask, finite)

  @tf.function
  def train_group_with_copies(weights, data):
    (features, labels), mask, steps = read(data)
    deltas, loss_sum = _train_users_with_copies(
        per_user_forward, example_losses, list(weights.trainable), features,
        labels, mask, steps, client_learning_rate,
    )
    return result(deltas, loss_sum, mask)

  @tff.tensorflow.computation(weights_type, data_type)
  def train_group(weights, data):
    if activations is not None:
      return train_dense_group(weights, data)
    if per_user_forward is not None:
      return train_group_with_copies(weights, data)
    # Built here, as TFF's own client work builds its model: its variables
    # belong to this computation's graph.
    model = task.model_fn()

    @tf.function
    def train_one_by_one(weights, data):
      for variable, value in zip(model.non_trainable_variables,
                                 weights.non_trainable):
        variable.assign(value)
      (features, labels), mask, steps = read(data)
      deltas, loss_sum = _train_users_one_by_one(
          model, list(weights.trainable), features, labels, mask, steps,
          client_learning_rate,
      )
      return result(deltas, loss_sum, mask)

    return train_one_by_one(weights, data)

  def finalize_metrics(sums):
    return collections.OrderedDict([
        ('loss', sums['loss_sum'] / tf.maximum(sums['num_examples'], 1.0)),
        ('num_examples', tf.cast(sums['num_examples'], tf.int64)),
        ('num_users', sums['num_users']),
        (process_lib.NONFINITE_CLIENTS, sums['nonfinite_users']),
    ])

  return process_lib.client_work_process(
      train_group, weights_type, data_type, finalize_metrics)


def _dp_sgd_client_work(task, weights_type, specs, config, learning_rate):
  """`build_client_work` with example-level DP-SGD inside every user."""
  data_type = tff.SequenceType(collections.OrderedDict(
      paths=tff.TensorType(np.str_, [None, len(specs)]),
      shuffle_seed=tff.TensorType(np.int64),
      users=tff.TensorType(np.int64, [None]),
  ))
  trainable_specs = tff.types.type_to_tf_tensor_specs(weights_type.trainable)

  @tff.tensorflow.computation(weights_type, data_type)
  def train_group(weights, data):
    # Built here, so its variables belong to this computation's graph.
    local = dp_sgd.LocalDpSgd(task, config, learning_rate)

    @tf.function
    def train(weights, data):
      group = data.get_single_element()
      num_users = tf.shape(group['users'])[0]
      updates = [
          tf.TensorArray(spec.dtype, size=num_users, element_shape=spec.shape)
          for spec in tf.nest.flatten(trainable_specs)
      ]
      loss_sum, sampled, clipped = tf.constant(0.0), tf.constant(0), tf.constant(0)
      for user in tf.range(num_users):
        seed = tf.stack([group['shuffle_seed'], group['users'][user]])
        update, user_loss, user_sampled, user_clipped = local.train(
            list(weights.trainable), _read_user(group['paths'][user], specs),
            seed,
        )
        updates = [u.write(user, value) for u, value in zip(updates, update)]
        loss_sum += user_loss
        sampled += user_sampled
        clipped += user_clipped
      return (
          tff.learning.templates.ClientResult(
              update=tf.nest.pack_sequence_as(
                  trainable_specs, [u.stack() for u in updates]),
              update_weight=tf.constant(1.0),
          ),
          dp_sgd.train_metrics(loss_sum, sampled, clipped),
      )

    return train(weights, data)

  return process_lib.client_work_process(
      train_group, weights_type, data_type, dp_sgd.finalize_metrics)


def build_process(
    task: base.FederatedTask,
    aggregator: Optional[tff.aggregators.UnweightedAggregationFactory],
    client_learning_rate: float,
    server_learning_rate: float,
    server_momentum: float,
    local_epochs: int,
    batch_size: int,
    example_dp: Optional[dp_sgd.DpSgdConfig] = None,
    wrap_client_work: Optional[Callable] = None,
) -> tff.learning.templates.LearningProcess:
  """The vectorized DP-FedAvg process: a `tff.learning` LearningProcess.

  Args:
    task: any task; Sequential stacks of Dense layers train all users of a
      TFF client at once, other models one user after another.
    aggregator: a factory created with `stacked_users=True` (it clips each
      user), or None for the plain mean over users (no privacy).
    client_learning_rate, server_learning_rate, server_momentum: as in
      `dp_fedavg.process.build_process`.
    local_epochs: passes over each user's examples per round.
    batch_size: examples per local step.
    example_dp: example-level DP-SGD inside every user (see
      `build_client_work`).
    wrap_client_work: (client work, weights type) -> the client work the
      process runs (canaries for an audit); None runs it as built.
  """
  wrap_client_work = wrap_client_work or (lambda work, weights_type: work)
  return process_lib.compose_process(
      task,
      lambda weights_type: wrap_client_work(build_client_work(
          task, weights_type, client_learning_rate, local_epochs, batch_size,
          example_dp,
      ), weights_type),
      # The aggregators take every user's update: a users axis in front.
      aggregator or StackedMeanFactory(), skeleton.stacked_type,
      client_learning_rate, server_learning_rate, server_momentum,
  )


class StackedMeanFactory(tff.aggregators.UnweightedAggregationFactory):
  """The plain mean over users of stacked updates (no privacy)."""

  def create(self, value_type) -> tff.templates.AggregationProcess:
    @tff.tensorflow.computation(value_type)
    def sum_users(stack):
      sums = tf.nest.map_structure(lambda t: tf.reduce_sum(t, axis=0), stack)
      return sums, tf.shape(tf.nest.flatten(stack)[0])[0]

    @tff.tensorflow.computation(sum_users.type_signature.result)
    def mean(sums_and_count):
      sums, count = sums_and_count
      return tf.nest.map_structure(
          lambda t: t / tf.cast(tf.maximum(count, 1), t.dtype), sums
      )

    @tff.federated_computation
    def init_fn():
      return tff.federated_value((), tff.SERVER)

    @tff.federated_computation(
        init_fn.type_signature.result, tff.FederatedType(value_type, tff.CLIENTS)
    )
    def next_fn(state, value):
      total = tff.federated_sum(tff.federated_map(sum_users, value))
      return tff.templates.MeasuredProcessOutput(
          state=state, result=tff.federated_map(mean, total),
          measurements=tff.federated_value((), tff.SERVER),
      )

    return tff.templates.AggregationProcess(init_fn, next_fn)
