"""Example-level DP: every client runs DP-SGD on its own examples (cross-silo).

With `--privacy_unit=example` the protected unit is one example of one client,
not a client's whole data. Each client (a silo) trains locally with DP-SGD
(Abadi et al. 2016), as Opacus does:

* a local epoch is ceil(n_i / B) steps; each step draws a Poisson sample of
  the client's n_i examples, each example independently with probability
  q_i = min(1, B / n_i);
* every sampled example's gradient is clipped: flat, ||g|| <= S; or per layer
  (one tensor of the model), ||g_j|| <= S_j with S_j = S w_j and ||w|| = 1
  (`aggregators.clipping`: uniform w_j = 1/sqrt(m), or adaptive w_j
  proportional to layer j's largest magnitude in the previous step's noised
  gradient sum; a round's first step uses uniform shares);
* the clipped gradients are summed, N(0, (z S)^2) is added to every
  coordinate, and the result is divided by the expected batch size q_i n_i;
* the weights take an SGD step with the client learning rate.
The client sends the difference between the round's weights and its last
ones; the server averages the clients' differences (no further noise).

Guarantee. Adding or removing one example of client i changes a step's
clipped sum by at most S in L2 norm: flat clipping bounds it directly, and
per-layer clipping bounds it by sqrt(sum_j S_j^2) = S. So a step is the
Poisson-subsampled Gaussian mechanism with noise multiplier z and rate q_i,
under add/remove-one-example adjacency. The per-layer adaptive shares are a
function of earlier noised sums only, so they are post-processing of earlier
releases and the steps compose adaptively. A client's update, and the whole
run, are post-processing of its noised steps: over R_i rounds with E local
epochs, client i's guarantee is that of
SelfComposedDpEvent(PoissonSampledDpEvent(q_i, GaussianDpEvent(z)),
R_i E ceil(n_i / B)) (`dp_fedavg.example_privacy` accounts it). No credit is
taken for which clients take part in a round, and the epsilon of client i
counts only the rounds it took part in.

Per-example gradients, by the first route that fits the model:
* `ghost`: flat clipping of models whose trainable layers are all in
  tensorflow-privacy's fast-gradient-clipping registry (Dense, Embedding):
  its `compute_gradient_norms` gives every example's gradient norm without
  forming the gradients, and a second backward pass of the clip-weighted loss
  sum gives the clipped sum.
* `copies`: models that `dp_fedavg.per_user_model` runs with a copy of the
  weights per user (Dense stacks, the FEMNIST CNN): every example is a "user"
  with its own copy of the convolution and normalization weights, so one
  backward pass gives every per-example gradient. Dense layers are shared
  instead: an example's kernel gradient is the outer product of the layer's
  inputs and the gradient at its outputs, so its norm is the product of
  theirs and the clipped sum one matmul, never forming the per-example
  kernels (Goodfellow 2015; the "ghost" idea). tensorflow-privacy 0.9
  registers no Conv2D or GroupNormalization, so its fast clipping does not
  fit the CNN, and per-layer clipping needs each tensor's norm, which its
  norms (one per layer, kernel and bias together) do not give.
* `jacobian`: any other model (the Shakespeare GRU): TF's vectorized Jacobian
  of the per-example losses, as tensorflow-privacy's vectorized DP
  optimizers compute per-example gradients.
"""

import collections
import dataclasses
import enum
import math
from typing import Callable, Optional

import numpy as np
import tensorflow as tf
import tensorflow_federated as tff
from tensorflow_privacy.privacy.fast_gradient_clipping import clip_grads
from tensorflow_privacy.privacy.fast_gradient_clipping import gradient_clipping_utils
from tensorflow_privacy.privacy.fast_gradient_clipping import layer_registry

from aggregators import checks
from aggregators import clipping as clipping_lib
from dp_fedavg import per_user_model
from dp_fedavg import process as process_lib
from dp_fedavg.tasks import base


class Route(enum.Enum):
  """How per-example gradients are computed (see the module docstring)."""

  GHOST = 'ghost'
  COPIES = 'copies'
  JACOBIAN = 'jacobian'


@dataclasses.dataclass(frozen=True)
class DpSgdConfig:
  """One client's DP-SGD: noise z, clip S, clipping, batch B, local epochs E."""

  noise_multiplier: float
  clip: float
  clipping: str
  batch_size: int
  local_epochs: int

  def __post_init__(self):
    checks.check_number(self.noise_multiplier, 'noise_multiplier', 0, False)
    checks.check_number(self.clip, 'clip', 0, True)
    allowed = [c.value for c in clipping_lib.Clipping]
    if self.clipping not in allowed:
      raise checks.ArgumentError('clipping', self.clipping, f'one of {allowed}')
    for name in ('batch_size', 'local_epochs'):
      value = getattr(self, name)
      if not (isinstance(value, (int, np.integer)) and value >= 1):
        raise checks.ArgumentError(name, value, 'an integer >= 1')

  def sampling_rate(self, num_examples: int) -> float:
    """q_i = min(1, B / n_i)."""
    return min(1.0, self.batch_size / num_examples)

  def steps_per_round(self, num_examples: int) -> int:
    """E ceil(n_i / B) steps; a client without examples takes none."""
    return self.local_epochs * math.ceil(num_examples / self.batch_size)


def per_example_loss_fn(task: base.FederatedTask) -> Callable:
  """(labels, predictions) -> [batch] losses: the task's loss unreduced, each
  example's mean over its other axes (a sequence's tokens), so the batch mean
  is the task's training loss."""
  unreduced = base.unreduced_loss(task)

  def losses(labels, predictions):
    values = unreduced(labels, predictions)
    return tf.reshape(
        tf.reduce_mean(tf.reshape(values, [tf.shape(values)[0], -1]), axis=1),
        [-1],
    )

  return losses


def choose_route(
    keras_model_fn: Callable[[], tf.keras.Model], clipping: str
) -> Route:
  """The fastest route that fits the model and the clipping."""
  if clipping == clipping_lib.Clipping.FLAT.value:
    with tf.Graph().as_default():
      model = keras_model_fn()
      if gradient_clipping_utils.all_trainable_layers_are_registered(
          model, layer_registry.make_default_layer_registry()):
        return Route.GHOST
  # The copies route shares Dense layers between examples (the hook).
  if per_user_model.build_forward(
      keras_model_fn, dense_hook=lambda inputs, outputs: outputs) is not None:
    return Route.COPIES
  return Route.JACOBIAN


@dataclasses.dataclass(frozen=True)
class _Stacked:
  """Every example's gradient of one tensor: [batch, *shape]."""

  gradients: tf.Tensor

  def _rows(self):
    return tf.reshape(self.gradients, [tf.shape(self.gradients)[0], -1])

  def finite(self):
    return tf.reduce_all(tf.math.is_finite(self._rows()), axis=1)

  def norms(self):
    return tf.math.reduce_euclidean_norm(self._rows(), axis=1)

  def weighted_sum(self, weights):
    """sum_b weights[b] g_b; a zero weight drops a non-finite g_b."""
    rows = tf.where((weights > 0)[:, tf.newaxis], self._rows(), 0.0)
    return tf.reshape(tf.tensordot(weights, rows, 1),
                      tf.shape(self.gradients)[1:])


@dataclasses.dataclass(frozen=True)
class _OuterProducts:
  """Every example's gradient of a Dense kernel, never formed: example b's
  is the outer product of its inputs [batch, in] and the gradient at the
  layer's outputs [batch, out], whose norm is the product of theirs."""

  inputs: tf.Tensor
  output_gradients: tf.Tensor

  def finite(self):
    return tf.logical_and(
        tf.reduce_all(tf.math.is_finite(self.inputs), axis=1),
        tf.reduce_all(tf.math.is_finite(self.output_gradients), axis=1))

  def norms(self):
    return (tf.math.reduce_euclidean_norm(self.inputs, axis=1)
            * tf.math.reduce_euclidean_norm(self.output_gradients, axis=1))

  def weighted_sum(self, weights):
    """sum_b weights[b] inputs[b] (x) output_gradients[b]."""
    keep = (weights > 0)[:, tf.newaxis]
    inputs = tf.where(keep, self.inputs, 0.0) * weights[:, tf.newaxis]
    return tf.matmul(inputs, tf.where(keep, self.output_gradients, 0.0),
                     transpose_a=True)


class LocalDpSgd:
  """A client's local DP-SGD, built inside the TF graph that runs it.

  `train(initial, examples, seed)` runs on the Keras model's variables: it
  sets them to `initial` (a list, the model's trainable order), trains on
  `examples` (the client's (features, labels), all of them), and returns
  (the update initial - final per trainable tensor, the sum of the sampled
  examples' losses, how many were sampled, how many of them were clipped).
  `seed` (int64[2]) draws the batches and the noise.
  """

  def __init__(self, task: base.FederatedTask, config: DpSgdConfig,
               learning_rate: float, route: Optional[Route] = None):
    self._config = config
    self._learning_rate = learning_rate
    self._clipping = clipping_lib.Clipping(config.clipping)
    self.route = route or choose_route(task.keras_model_fn, config.clipping)
    if self.route is Route.GHOST and self._clipping is not clipping_lib.Clipping.FLAT:
      raise ValueError('the ghost route clips flat only.')
    self._tape = None
    self._dense_outputs = []
    if self.route is Route.COPIES:
      # Before this object's model: build_forward makes a model in a graph of
      # its own, which would invalidate an eager Keras model made before it.
      self._forward = per_user_model.build_forward(
          task.keras_model_fn, dense_hook=self._watch_dense)
    self.model = task.keras_model_fn()
    self._losses = per_example_loss_fn(task)
    if self.route is Route.COPIES:
      # The trainable tensors of Dense layers, as (kernel, bias) positions.
      self._dense_positions = []
      position = 0
      for layer in self.model.layers:
        if isinstance(layer, tf.keras.layers.Dense):
          self._dense_positions.append((position, position + 1))
        position += len(layer.trainable_weights)

  def _watch_dense(self, inputs, outputs):
    """per_user_model's Dense hook: records a Dense layer's inputs and its
    pre-activation outputs, watched by the current tape."""
    self._tape.watch(outputs)
    self._dense_outputs.append((inputs, outputs))
    return outputs

  def _per_example_gradients(self, features, labels):
    """(per trainable tensor, every example's gradient: a [batch, *shape]
    tensor or, for Dense kernels of the copies route, `_OuterProducts`;
    [batch] losses)."""
    variables = self.model.trainable_variables
    if self.route is Route.COPIES:
      count = tf.shape(labels)[0]
      in_dense = {p for pair in self._dense_positions for p in pair}
      # A copy per example of every tensor but the Dense layers', which
      # all examples share: a Dense layer's per-example gradients are outer
      # products of its inputs and output gradients, never formed.
      weights = [
          v if j in in_dense else tf.tile(
              v[tf.newaxis], tf.concat([[count], tf.ones_like(tf.shape(v))], 0))
          for j, v in enumerate(variables)
      ]
      copies = [w for j, w in enumerate(weights) if j not in in_dense]
      self._dense_outputs = []
      with tf.GradientTape() as tape:
        self._tape = tape
        tape.watch(copies)
        # Each example is a user of one example: logits [batch, 1, ...].
        logits = self._forward(weights, features[:, tf.newaxis])
        losses = self._losses(labels, logits[:, 0])
        total = tf.reduce_sum(losses)
      self._tape = None
      outputs = [z for _, z in self._dense_outputs]
      gradients = tape.gradient(total, copies + outputs)
      copy_gradients = iter(gradients[:len(copies)])
      per_example = [None if j in in_dense else next(copy_gradients)
                     for j in range(len(variables))]
      for (kernel, bias), (inputs, _), output_gradients in zip(
          self._dense_positions, self._dense_outputs, gradients[len(copies):]):
        per_example[kernel] = _OuterProducts(inputs[:, 0], output_gradients[:, 0])
        per_example[bias] = output_gradients[:, 0]
      return per_example, losses
    with tf.GradientTape() as tape:
      losses = self._losses(labels, self.model(features, training=True))
    gradients = tape.jacobian(
        losses, variables, experimental_use_pfor=True,
        unconnected_gradients=tf.UnconnectedGradients.ZERO,
    )
    return gradients, losses

  def clipped_sum(self, features, labels, shares):
    """(the clipped gradients' sum per tensor, [batch] losses, [batch] bool:
    clipped). Examples whose gradient is not finite add zero."""
    clip = self._config.clip
    if self.route is Route.GHOST:
      norms = clip_grads.compute_gradient_norms(
          self.model, layer_registry.make_default_layer_registry(),
          features, labels,
          per_example_loss_fn=lambda y, p, w: self._losses(y, p),
          trainable_vars=self.model.trainable_variables,
      )
      finite = tf.math.is_finite(norms)
      weights = tf.where(finite, clip_grads.compute_clip_weights(clip, norms), 0.0)
      with tf.GradientTape() as tape:
        losses = self._losses(labels, self.model(features, training=True))
        weighted = tf.reduce_sum(tf.stop_gradient(weights) * losses)
      sums = tape.gradient(
          weighted, self.model.trainable_variables,
          unconnected_gradients=tf.UnconnectedGradients.ZERO,
      )
      return sums, losses, tf.logical_or(norms > clip, ~finite)
    gradients, losses = self._per_example_gradients(features, labels)
    gradients = [g if isinstance(g, _OuterProducts) else _Stacked(g)
                 for g in gradients]
    finite = tf.reduce_all(tf.stack([g.finite() for g in gradients], 1), axis=1)
    norms = tf.stack([g.norms() for g in gradients], 1)
    scales, within = clipping_lib.clip_scales(norms, clip, shares, self._clipping)
    scales = tf.where(finite[:, tf.newaxis], scales, 0.0)
    sums = [g.weighted_sum(scales[:, j]) for j, g in enumerate(gradients)]
    return sums, losses, tf.logical_or(~within, ~finite)

  def train(self, initial, examples, seed):
    features, labels = examples
    variables = self.model.trainable_variables
    for variable, value in zip(variables, initial):
      variable.assign(value)
    config = self._config
    num_examples = tf.shape(labels)[0]
    n = tf.cast(num_examples, tf.float32)
    rate = tf.minimum(1.0, config.batch_size / tf.maximum(n, 1.0))
    expected_batch = rate * n
    steps = config.local_epochs * (
        (num_examples + config.batch_size - 1) // config.batch_size)
    shares = clipping_lib.uniform_shares(len(variables))
    stddev = config.noise_multiplier * config.clip
    loss_sum = tf.constant(0.0)
    sampled = tf.constant(0)
    clipped = tf.constant(0)
    for step in tf.range(steps):
      seeds = tf.random.experimental.stateless_split(
          tf.random.experimental.stateless_fold_in(seed, tf.cast(step, tf.int64)),
          num=1 + len(variables),
      )
      chosen = tf.where(
          tf.random.stateless_uniform([num_examples], seed=seeds[0]) < rate)[:, 0]
      # A Poisson sample may be empty: it adds no gradient, still noise.
      sums, losses, was_clipped = tf.cond(
          tf.size(chosen) > 0,
          lambda: self.clipped_sum(
              tf.gather(features, chosen), tf.gather(labels, chosen), shares),
          lambda: ([tf.zeros_like(v) for v in variables], tf.zeros([0]),
                   tf.zeros([0], tf.bool)),
      )
      noised = [
          s + tf.random.stateless_normal(tf.shape(s), seed=seeds[1 + j],
                                         stddev=stddev)
          for j, s in enumerate(sums)
      ]
      for variable, total in zip(variables, noised):
        variable.assign_sub(self._learning_rate * total / expected_batch)
      if self._clipping is clipping_lib.Clipping.PER_LAYER_ADAPTIVE:
        # From this step's released (noised) sum: post-processing.
        shares = clipping_lib.adaptive_shares(noised, shares)
      loss_sum += tf.reduce_sum(losses)
      sampled += tf.size(chosen)
      clipped += tf.reduce_sum(tf.cast(was_clipped, tf.int32))
    update = [value - variable for value, variable in zip(initial, variables)]
    return update, loss_sum, sampled, clipped


def train_metrics(loss_sum, sampled, clipped):
  """A client's metric sums: loss over sampled examples, counts."""
  return collections.OrderedDict(
      loss_sum=loss_sum, num_examples=tf.cast(sampled, tf.float32),
      clipped=tf.cast(clipped, tf.float32),
  )


def finalize_metrics(sums):
  """The round's train metrics from the clients' summed counts."""
  examples = tf.maximum(sums['num_examples'], 1.0)
  return collections.OrderedDict(
      loss=sums['loss_sum'] / examples,
      num_examples=tf.cast(sums['num_examples'], tf.int64),
      clipped_example_fraction=sums['clipped'] / examples,
  )


def client_seed(shuffle_seed: int, client_index: int) -> np.ndarray:
  """The int64[2] seed of a client's batches and noise in a round."""
  return np.array([shuffle_seed, client_index], np.int64)


def client_datasets(
    task: base.FederatedTask, cohort: list[int], shuffle_seed: int,
    poison: Optional[Callable] = None, poisoned_count: int = 0,
) -> list[tf.data.Dataset]:
  """The standard engine's client data: one element per client holding all
  its examples and its seed (the first `poisoned_count` put through
  `poison`, a label_flip attacker's relabelling)."""
  datasets = []
  for position, index in enumerate(cohort):
    client_id = task.train_data.client_ids[index]
    examples = base.all_examples(task.train_data.create_tf_dataset_for_client(
        client_id))
    if examples is None:
      examples = tuple(
          tf.zeros([0, *spec.shape], spec.dtype)
          for spec in tf.nest.flatten(task.train_data.element_type_structure))
    features, labels = examples
    if poison is not None and position < poisoned_count:
      labels = poison(labels)
    datasets.append(tf.data.Dataset.from_tensors(collections.OrderedDict(
        features=features, labels=labels,
        seed=tf.constant(client_seed(shuffle_seed, index)),
    )).with_options(base.client_dataset_options()))
  return datasets


def build_client_work(
    task: base.FederatedTask, weights_type, config: DpSgdConfig,
    learning_rate: float,
) -> tff.learning.templates.ClientWorkProcess:
  """The standard engine's client work: one client, DP-SGD on its examples."""
  features_spec, labels_spec = tf.nest.flatten(
      task.train_data.element_type_structure)
  data_type = tff.SequenceType(collections.OrderedDict(
      features=tff.TensorType(features_spec.dtype.as_numpy_dtype,
                              [None, *features_spec.shape]),
      labels=tff.TensorType(labels_spec.dtype.as_numpy_dtype,
                            [None, *labels_spec.shape]),
      seed=tff.TensorType(np.int64, [2]),
  ))
  trainable_specs = tff.types.type_to_tf_tensor_specs(weights_type.trainable)

  @tff.tensorflow.computation(weights_type, data_type)
  def train_client(weights, data):
    # Built here, so its variables belong to this computation's graph.
    local = LocalDpSgd(task, config, learning_rate)

    @tf.function
    def train(weights, data):
      element = data.get_single_element()
      update, loss_sum, sampled, clipped = local.train(
          list(weights.trainable),
          (element['features'], element['labels']), element['seed'],
      )
      return (
          tff.learning.templates.ClientResult(
              update=tf.nest.pack_sequence_as(trainable_specs, update),
              update_weight=tf.constant(1.0),
          ),
          train_metrics(loss_sum, sampled, clipped),
      )

    return train(weights, data)

  return process_lib.client_work_process(
      train_client, weights_type, data_type, finalize_metrics)


def build_process(
    task: base.FederatedTask, config: DpSgdConfig, client_learning_rate: float,
    server_learning_rate: float, server_momentum: float,
) -> tff.learning.templates.LearningProcess:
  """The standard engine's process with example-level DP-SGD on every client
  and the plain mean of their updates on the server (no server noise)."""
  return process_lib.compose_process(
      task,
      lambda weights_type: build_client_work(
          task, weights_type, config, client_learning_rate),
      tff.aggregators.UnweightedMeanFactory(), lambda trainable: trainable,
      client_learning_rate, server_learning_rate, server_momentum,
  )
