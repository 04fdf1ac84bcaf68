"""A Keras model's forward pass with a copy of its weights per user.

The vectorized engine trains every user of a TFF client at once. For models
made of the layer kinds below, each layer runs once for all users, with each
user's own weights: convolutions as one grouped convolution (users stacked in
the channel axis), Dense layers as one batched matmul, embeddings as one
gather, a GRU as one batched matmul per time step. The arithmetic is that
of the Keras layers, so training matches the standard engine up to float32
rounding.

Layouts: convolutional activations are [batch, height, width, users,
channels], so a grouped convolution or a pooling needs only a reshape;
after Flatten, activations are [users, batch, features]; token sequences
are [users, batch, time, ...].
"""

import concurrent.futures
import functools
from typing import Callable, Optional

import tensorflow as tf

# A user-stacked forward pass: (weights, each [users, *shape], in the model's
# trainable-variable order; features [users, batch, ...]) -> logits [users,
# batch, classes].
Forward = Callable[[list[tf.Tensor], tf.Tensor], tf.Tensor]


def _users_in_channels(h):
  """[batch, height, width, users, channels] -> [..., users * channels]."""
  shape = tf.shape(h)
  return tf.reshape(h, tf.concat([shape[:3], [shape[3] * shape[4]]], 0))


def _users_out_of_channels(y, users):
  """[batch, height, width, users * channels] -> [..., users, channels]."""
  return tf.reshape(y, tf.concat([tf.shape(y)[:3], [users, -1]], 0))


@functools.cache
def grouped_conv_has_gradients() -> bool:
  """Whether this TF differentiates grouped convolutions on this machine.

  TF 2.14 has no CPU gradient for them unless oneDNN is on (by default on
  CPUs with AVX-512 VNNI and newer): "Gradients for grouped convolutions are
  not supported on CPU". The TFF worker runs the same TF build on the same
  CPU, so the answer here is the answer there. Where it is False,
  convolutional models train user by user: an im2col batched matmul that
  does differentiate measured 3x slower than that (242 against 84 ms per
  step of 10 FEMNIST users on an AVX2 EPYC).
  """

  def differentiate() -> bool:
    inputs = tf.zeros([1, 3, 3, 2])
    filters = tf.zeros([1, 1, 1, 2])  # Two groups of one channel.
    try:
      with tf.GradientTape() as tape:
        tape.watch(filters)
        output = tf.nn.conv2d(inputs, filters, 1, 'VALID')
      tape.gradient(output, filters)
    except tf.errors.InvalidArgumentError:
      return False
    return True

  # Only running the gradient shows whether a kernel exists, so it runs
  # eagerly, in a thread of its own: the caller may be building a graph
  # (graphs are per thread).
  with concurrent.futures.ThreadPoolExecutor(1) as thread:
    return thread.submit(differentiate).result()


def _conv2d(layer: tf.keras.layers.Conv2D):
  if (layer.groups != 1 or tuple(layer.dilation_rate) != (1, 1)
      or not layer.use_bias or not grouped_conv_has_gradients()):
    return None

  def apply(weights, h):
    kernel, bias = weights
    shape = tf.shape(h)
    users, channels = shape[3], shape[4]
    height, width, _, out = kernel.shape[1:]
    # Filter [height, width, channels, users * out]: with users * channels
    # input channels, TF groups them by user.
    filters = tf.reshape(tf.transpose(kernel, [1, 2, 3, 0, 4]),
                         tf.stack([height, width, channels, users * out]))
    y = tf.nn.conv2d(_users_in_channels(h), filters, layer.strides,
                     layer.padding.upper())
    return layer.activation(_users_out_of_channels(y, users) + bias)

  return apply, 2


def _group_normalization(layer: tf.keras.layers.GroupNormalization):
  if layer.axis not in (-1, 3) or not (layer.center and layer.scale):
    return None
  groups = layer.groups
  epsilon = layer.epsilon

  def apply(weights, h):
    gamma, beta = weights
    shape = tf.shape(h)
    batch, users, channels = shape[0], shape[3], gamma.shape[-1]
    per_group = channels // groups
    # [batch, height * width, users * channels]: an example's group is a
    # run of `per_group` channels at every position. Its statistics reduce
    # the middle axis, then runs of the last: two fast reductions, where
    # reducing axes (1, 2, 5) of [batch, height, width, users, groups,
    # channels per group] at once cost 3.6x as much.
    rows = tf.reshape(h, tf.stack([batch, -1, users * channels]))
    count = tf.cast(tf.shape(rows)[1] * per_group, h.dtype)

    def group_mean(t):
      """[batch, users * groups]: each example's mean of `t` per group."""
      sums = tf.reshape(tf.reduce_sum(t, axis=1),
                        tf.stack([batch, users * groups, per_group]))
      return tf.reduce_sum(sums, axis=2) / count

    def broadcast(per_group_values):
      """[batch, users * groups] -> [batch, 1, users * channels]."""
      repeated = tf.repeat(per_group_values, per_group, axis=1)
      return repeated[:, tf.newaxis]

    @tf.custom_gradient
    def normalize(rows, gamma, beta):
      mean = group_mean(rows)
      centered = rows - broadcast(mean)
      # Biased variance about the mean, as tf.nn.moments in the layer.
      inverse_std = tf.math.rsqrt(group_mean(tf.square(centered)) + epsilon)
      standardized = centered * broadcast(inverse_std)
      multiplier = broadcast(inverse_std) * gamma

      def gradient(upstream):
        # y = gamma x^ + beta, x^ = (x - mean) / std over a group's N
        # values: dx = (g - mean(g) - x^ mean(g x^)) / std, g = dy gamma;
        # its first term as autodiff's, dy * gamma / std.
        scaled = upstream * gamma
        rows_gradient = (
            upstream * multiplier
            - broadcast(inverse_std * group_mean(scaled))
            - standardized * broadcast(
                inverse_std * group_mean(scaled * standardized)))
        return (rows_gradient,
                tf.reduce_sum(upstream * standardized, axis=[0, 1],
                              keepdims=True),
                tf.reduce_sum(upstream, axis=[0, 1], keepdims=True))

      # tf.nn.batch_normalization's arithmetic, as in the layer.
      normalized = rows * multiplier + (beta - broadcast(mean) * multiplier)
      return normalized, gradient

    per_user = tf.stack([1, 1, users * channels])
    normalized = normalize(rows, tf.reshape(gamma, per_user),
                           tf.reshape(beta, per_user))
    return tf.reshape(normalized, shape)

  return apply, 2


def _max_pooling2d(layer: tf.keras.layers.MaxPooling2D):
  def apply(weights, h):
    del weights  # Pooling has none.
    y = tf.nn.max_pool2d(_users_in_channels(h), layer.pool_size,
                         layer.strides, layer.padding.upper())
    return _users_out_of_channels(y, tf.shape(h)[3])

  return apply, 0


def _flatten(layer: tf.keras.layers.Flatten):
  del layer  # Its one setting, data_format, is checked for every layer.

  def apply(weights, h):
    del weights  # Flatten has none.
    shape = tf.shape(h)
    # Each user's examples flattened in (height, width, channel) order.
    per_user = tf.transpose(h, [3, 0, 1, 2, 4])
    return tf.reshape(per_user, tf.stack([shape[3], shape[0], -1]))

  return apply, 0


def _dense(layer: tf.keras.layers.Dense):
  if not layer.use_bias:
    return None

  def apply(weights, h):
    kernel, bias = weights
    # [users, batch, in] or, on sequences, [users, batch, time, in], as one
    # batched matmul per user ([users, rows, in]): TF's einsum over the
    # extra axes has a gradient 80x slower (FEMNIST-sized Shakespeare step).
    shape = tf.shape(h)
    rows = tf.reshape(h, tf.stack([shape[0], -1, shape[-1]]))
    y = tf.matmul(rows, kernel) + bias[:, tf.newaxis]
    return layer.activation(
        tf.reshape(y, tf.concat([shape[:-1], tf.shape(kernel)[-1:]], 0)))

  return apply, 2


def _embedding(layer: tf.keras.layers.Embedding):
  if layer.mask_zero or layer.input_length is not None:
    return None

  def apply(weights, h):
    table, = weights
    # Token ids [users, batch, time] -> [users, batch, time, dim].
    return tf.gather(table, h, batch_dims=1)

  return apply, 1


# Up to this many users, a GRU step's [users, batch, units] x [users, units,
# 3 * units] product runs on Eigen, above it on oneDNN (below).
_FEW_USERS = 8


def _step_product(a, b, few_users):
  """`a @ b` for a batch of users' small per-step products.

  With oneDNN on, TensorFlow runs `tf.matmul`'s batched products on oneDNN,
  which costs about 100 us per product of 2 users' 16 x 128 x 384 (17 of a
  32 ms local step of the Shakespeare GRU: 160 such products). `BatchMatMulV3`,
  which oneDNN's rewrite leaves to Eigen, took 44 us. Measured on the GRU's
  two-group local step, Eigen against oneDNN took 0.63, 0.85 and 0.91 of the
  wall time at 1, 4 and 8 users, and 1.10 and 1.18 at 14 and 25; a round's
  last steps train only a group's largest users (Shakespeare: 0.91 of the
  round time with the choice, median of 12 paired rounds).
  """
  return tf.cond(
      few_users,
      lambda: tf.raw_ops.BatchMatMulV3(x=a, y=b, Tout=a.dtype),
      lambda: tf.matmul(a, b))


def _gru_recurrence(inputs, recurrent_kernel, recurrent_bias):
  """The states [time, users, batch, units] of Keras's GRU (reset_after,
  sigmoid gates, tanh candidate, zero initial state) with each user's
  recurrent kernel [users, units, 3 * units] and bias [users, 1, 3 * units],
  from the inputs' share of the gates [time, users, batch, 3 * units].

  Differentiated by hand, as backpropagation through time: autodiff of the
  loop computes each step's kernel gradient, a [users, units, 3 * units]
  product over one batch of rows, and adds it to an accumulator, every step;
  here each step keeps its gates' gradient, and one batched matmul over all
  steps' rows gives the kernel's (a local step of 25 users took 0.75 to
  0.85 of autodiff's CPU time in `benchmarks/gru_step.py`'s runs). With the
  step's recurrent share u = h W + b, pre-activations a_z = x_z + u_z,
  a_r = x_r + u_r, a_c = x_c + r u_c, and h' = z h + (1 - z) c:
    dz = dh' (h - c),  dc = dh' (1 - z),  g := d a_c = dc (1 - c^2),
    dr = g u_c,  d a_{z,r} = d{z,r} {z,r} (1 - {z,r}),
    d x = (d a_z, d a_r, g),  d u = (d a_z, d a_r, g r),
    dh = dh' z + du W^T,  dW = sum_t h_t^T du_t,  db = sum_t du_t.
  The loops index their inputs (a slice of the leading axis shares its
  buffer) rather than unstack them as `tf.scan` does, which copies them.
  """
  units = recurrent_kernel.shape[1]

  def outputs(size):
    return tf.TensorArray(inputs.dtype, size=size)

  @tf.custom_gradient
  def recurrence(inputs, recurrent_kernel, recurrent_bias):
    shape = tf.shape(inputs)
    steps = shape[0]
    few_users = shape[1] <= _FEW_USERS
    gate_inputs, candidate_inputs = tf.split(inputs, [2 * units, units], -1)
    initial = tf.zeros(tf.stack([shape[1], shape[2], units]), inputs.dtype)

    def step(t, state, states, gates, candidates, candidate_shares):
      recurrent = (_step_product(state, recurrent_kernel, few_users)
                   + recurrent_bias)
      recurrent_zr, recurrent_c = tf.split(
          recurrent, [2 * units, units], axis=-1)
      # z and r share one sigmoid.
      zr = tf.sigmoid(gate_inputs[t] + recurrent_zr)
      z, r = tf.split(zr, 2, axis=-1)
      candidate = tf.tanh(candidate_inputs[t] + r * recurrent_c)
      new_state = candidate + z * (state - candidate)
      return (t + 1, new_state, states.write(t + 1, new_state),
              gates.write(t, zr), candidates.write(t, candidate),
              candidate_shares.write(t, recurrent_c))

    _, _, states, gates, candidates, candidate_shares = tf.while_loop(
        lambda t, *_: t < steps, step,
        (0, initial, outputs(steps + 1).write(0, initial), outputs(steps),
         outputs(steps), outputs(steps)))
    # [time + 1, ...]: the initial state, then each step's.
    states = states.stack()

    def gradient(upstream):
      # Transposed once: a matmul with `transpose_b` ran at 2/3 the speed.
      transposed_kernel = tf.transpose(recurrent_kernel, [0, 2, 1])

      def back_step(t, state_gradient, input_gradients, recurrent_gradients):
        zr = gates.read(t)
        z, r = tf.split(zr, 2, axis=-1)
        candidate = candidates.read(t)
        d_state = upstream[t] + state_gradient
        carried = d_state * z
        g = tf.raw_ops.TanhGrad(y=candidate, dy=d_state - carried)
        d_zr = tf.raw_ops.SigmoidGrad(y=zr, dy=tf.concat(
            [d_state * (states[t] - candidate), g * candidate_shares.read(t)],
            axis=-1))
        d_recurrent = tf.concat([d_zr, g * r], axis=-1)
        d_previous = carried + _step_product(
            d_recurrent, transposed_kernel, few_users)
        return (t - 1, d_previous,
                input_gradients.write(t, tf.concat([d_zr, g], axis=-1)),
                recurrent_gradients.write(t, d_recurrent))

      _, _, input_gradients, recurrent_gradients = tf.while_loop(
          lambda t, *_: t >= 0, back_step,
          (steps - 1, tf.zeros_like(initial), outputs(steps), outputs(steps)))
      # [time, users, batch, ...] -> [users, time * batch, ...].
      rows = lambda t: tf.reshape(  # noqa: E731
          tf.transpose(t, [1, 0, 2, 3]),
          tf.stack([shape[1], steps * shape[2], -1]))
      d_recurrent_rows = rows(recurrent_gradients.stack())
      return (input_gradients.stack(),
              tf.matmul(rows(states[:-1]), d_recurrent_rows, transpose_a=True),
              tf.reduce_sum(d_recurrent_rows, axis=1, keepdims=True))

    return states[1:], gradient

  return recurrence(inputs, recurrent_kernel, recurrent_bias)


def _gru(layer: tf.keras.layers.GRU):
  """Keras's GRU (TF 2 default: reset_after) with each user's weights, on
  [users, batch, time, features]."""
  cell = layer.cell
  if (not cell.reset_after or not cell.use_bias or cell.dropout
      or cell.recurrent_dropout or layer.go_backwards or layer.stateful
      or layer.return_state or layer.time_major
      # The recurrence's gradient is written for Keras's default gates.
      or cell.activation is not tf.keras.activations.tanh
      or cell.recurrent_activation is not tf.keras.activations.sigmoid):
    return None

  def apply(weights, h):
    kernel, recurrent_kernel, bias = weights
    # The inputs' share of every gate at every step, at once:
    # [time, users, batch, 3 * units], gates in Keras's order (z, r, h).
    shape = tf.shape(h)
    inputs = tf.matmul(tf.reshape(h, tf.stack([shape[0], -1, shape[3]])),
                       kernel) + bias[:, 0, tf.newaxis]
    inputs = tf.transpose(
        tf.reshape(inputs, tf.stack([shape[0], shape[1], shape[2], -1])),
        [2, 0, 1, 3])
    states = _gru_recurrence(inputs, recurrent_kernel,
                             bias[:, 1, tf.newaxis])
    if layer.return_sequences:
      return tf.transpose(states, [1, 2, 0, 3])
    return states[-1]

  return apply, 3


def _shared_dense(layer: tf.keras.layers.Dense, on_outputs):
  """A Dense layer whose kernel [in, out] and bias [out] every user shares;
  `on_outputs(inputs, outputs)` sees its pre-activation outputs."""

  def apply(weights, h):
    kernel, bias = weights
    return layer.activation(
        on_outputs(h, tf.einsum('ubi,io->ubo', h, kernel) + bias))

  return apply, 2


# (inputs [users, batch, in], pre-activation outputs [users, batch, out]) ->
# the outputs to go on with (e.g. watched by a tape).
DenseHook = Callable[[tf.Tensor, tf.Tensor], tf.Tensor]


# Layer kind -> (builder, the layout it takes: convolutional, or [users,
# batch, ...] otherwise).
_LAYERS = {
    tf.keras.layers.Conv2D: (_conv2d, True),
    tf.keras.layers.GroupNormalization: (_group_normalization, True),
    tf.keras.layers.MaxPooling2D: (_max_pooling2d, True),
    tf.keras.layers.Flatten: (_flatten, True),
    tf.keras.layers.Dense: (_dense, False),
    tf.keras.layers.Embedding: (_embedding, False),
    tf.keras.layers.GRU: (_gru, False),
}
# Layers whose weights `dense_hook` cannot share between users.
_PER_USER_ONLY = (tf.keras.layers.Embedding, tf.keras.layers.GRU)


def build_forward(
    keras_model_fn: Callable[[], tf.keras.Model],
    dense_hook: Optional[DenseHook] = None,
) -> Optional[Forward]:
  """The model's forward pass with per-user weights; None unless the model is
  a Sequential stack of the layer kinds above, in configurations they cover.

  With `dense_hook`, Dense layers take one kernel and bias for all users
  (unstacked) and pass their pre-activation outputs through the hook
  (per-example gradients read them: `dp_fedavg.dp_sgd`)."""
  # A fresh graph, so this model's variables do not outlive the call.
  with tf.Graph().as_default():
    model = keras_model_fn()
    if not isinstance(model, tf.keras.Sequential):
      return None
    steps = []
    # Images, feature vectors or token sequences (an Embedding first).
    if len(model.input_shape) not in (2, 4):
      return None
    convolutional = len(model.input_shape) == 4
    layers = [layer for layer in model.layers
              if not isinstance(layer, tf.keras.layers.InputLayer)]
    tokens = model.inputs[0].dtype.is_integer
    if tokens != (bool(layers)
                  and isinstance(layers[0], tf.keras.layers.Embedding)):
      return None
    for layer in layers:
      if type(layer) not in _LAYERS:
        return None
      if dense_hook is not None and isinstance(layer, _PER_USER_ONLY):
        return None
      if getattr(layer, 'data_format', 'channels_last') != 'channels_last':
        return None
      builder, takes_convolutional = _LAYERS[type(layer)]
      built = builder(layer)
      if built is None or takes_convolutional != convolutional:
        return None
      if dense_hook is not None and isinstance(layer, tf.keras.layers.Dense):
        built = _shared_dense(layer, dense_hook)
      if len(layer.trainable_weights) != built[1] or layer.non_trainable_weights:
        return None
      steps.append(built)
      if isinstance(layer, tf.keras.layers.Flatten):
        convolutional = False
    if convolutional:
      return None

  def forward(weights, features):
    h = features
    if len(features.shape) == 5:
      # [users, batch, height, width, channels] -> the convolutional layout.
      h = tf.transpose(h, [1, 2, 3, 0, 4])
    used = 0
    for apply, count in steps:
      h = apply(weights[used:used + count], h)
      used += count
    return h

  return forward
