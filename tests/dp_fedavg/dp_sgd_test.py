"""Example-level DP-SGD inside a client: clipping, noise, sampling, engines."""

import math

from absl.testing import parameterized
import numpy as np
from sklearn import datasets as sklearn_datasets
import tensorflow as tf

from aggregators import checks
from aggregators import clipping as clipping_lib
from dp_fedavg import dp_sgd
from dp_fedavg import execution
from dp_fedavg import process
from dp_fedavg import vectorized
from dp_fedavg.tasks import base
from dp_fedavg.tasks import client_data
from tests.dp_fedavg import vectorized_test

Route = dp_sgd.Route
# (model, route): the routes each test model can take.
_ROUTES = (
    ('dense', Route.GHOST), ('dense', Route.COPIES), ('dense', Route.JACOBIAN),
    ('conv', Route.COPIES), ('conv', Route.JACOBIAN),
    ('recurrent', Route.JACOBIAN),
)


def _task(model: str, sizes=(60, 45)) -> base.FederatedTask:
  keras_model_fn, features_fn, dtype = vectorized_test._MODELS[model]  # pylint: disable=protected-access
  images, labels = sklearn_datasets.load_digits(return_X_y=True)
  arrays = (features_fn(images).astype(dtype), labels.astype(np.int32))
  bounds = np.cumsum((0,) + tuple(sizes))
  shares = [np.arange(bounds[i], bounds[i + 1]) for i in range(len(sizes))]
  return base.classification_task(
      model, keras_model_fn,
      client_data.sliced_client_data(
          [str(i) for i in range(len(sizes))], arrays, shares),
      client_data.sliced_client_data(['e'], arrays, [np.arange(500, 564)]),
  )


def _examples(task, client=0):
  return base.all_examples(task.train_data.create_tf_dataset_for_client(
      task.train_data.client_ids[client]))


def _config(**values):
  defaults = dict(noise_multiplier=0.0, clip=1e30, clipping='flat',
                  batch_size=1000, local_epochs=1)
  return dp_sgd.DpSgdConfig(**{**defaults, **values})


def _local(task, route=None, learning_rate=0.5, **values):
  """A client's DP-SGD whose model starts from the same weights every time."""
  local = dp_sgd.LocalDpSgd(task, _config(**values), learning_rate, route)
  tf.keras.utils.set_random_seed(3)
  for variable, value in zip(local.model.trainable_variables,
                             task.keras_model_fn().trainable_variables):
    variable.assign(value)
  return local


def _norms(tensors):
  return np.array([np.linalg.norm(np.ravel(t)) for t in tensors])


class RouteTest(tf.test.TestCase):

  def test_the_fastest_route_that_fits(self):
    self.assertEqual(
        dp_sgd.choose_route(_task('dense').keras_model_fn, 'flat'), Route.GHOST)
    self.assertEqual(
        dp_sgd.choose_route(_task('dense').keras_model_fn, 'per_layer_uniform'),
        Route.COPIES)
    self.assertEqual(
        dp_sgd.choose_route(_task('conv').keras_model_fn, 'flat'), Route.COPIES)
    self.assertEqual(
        dp_sgd.choose_route(_task('recurrent').keras_model_fn, 'flat'),
        Route.JACOBIAN)

  def test_ghost_route_refuses_per_layer_clipping(self):
    with self.assertRaisesRegex(ValueError, 'flat only'):
      _local(_task('dense'), Route.GHOST, clipping='per_layer_uniform')

  def test_config_checks_its_arguments(self):
    for values, name in ((dict(clip=0.0), 'clip'),
                         (dict(noise_multiplier=-1.0), 'noise_multiplier'),
                         (dict(clipping='median'), 'clipping'),
                         (dict(batch_size=0), 'batch_size')):
      with self.assertRaisesRegex(checks.ArgumentError, name):
        _config(**values)


class ClippingTest(tf.test.TestCase, parameterized.TestCase):

  @parameterized.parameters(*_ROUTES)
  def test_each_examples_clipped_gradient_is_within_the_bound(self, model, route):
    task = _task(model)
    features, labels = _examples(task)
    clip = 0.05
    clippings = ['flat'] if route is Route.GHOST else [
        'flat', 'per_layer_uniform']
    for clipping in clippings:
      local = _local(task, route, clip=clip, clipping=clipping)
      shares = clipping_lib.uniform_shares(len(local.model.trainable_variables))
      # The recurrent model's per-example Jacobian costs ~8 s an example.
      for i in range(1 if model == 'recurrent' else 5):
        sums, _, clipped = local.clipped_sum(
            features[i:i + 1], labels[i:i + 1], shares)
        norms = _norms(sums)
        self.assertTrue(bool(clipped[0]))
        if clipping == 'flat':
          self.assertAllClose(np.linalg.norm(norms), clip, rtol=1e-4)
        else:
          bounds = clip * shares.numpy()
          self.assertTrue(np.all(norms <= bounds * (1 + 1e-4)), (norms, bounds))
          self.assertAllClose(np.max(norms / bounds), 1.0, rtol=1e-4)

  @parameterized.parameters(('dense', 'flat'), ('dense', 'per_layer_uniform'),
                            ('conv', 'flat'), ('conv', 'per_layer_uniform'))
  def test_routes_give_the_same_clipped_sum(self, model, clipping):
    task = _task(model)
    features, labels = _examples(task)
    # A clip between the examples' gradient norms: some are clipped, some not.
    unclipped = _local(task, Route.JACOBIAN)
    shares = clipping_lib.uniform_shares(len(unclipped.model.trainable_variables))
    gradients, _ = unclipped._per_example_gradients(features, labels)  # pylint: disable=protected-access
    norms = np.stack([
        np.linalg.norm(np.reshape(g, [len(labels), -1]), axis=1)
        for g in gradients], axis=1)
    # The clip at which an example is clipped: its norm (flat), or its
    # largest layer norm over that layer's share (per layer).
    needed = (np.linalg.norm(norms, axis=1) if clipping == 'flat'
              else np.max(norms / shares.numpy(), axis=1))
    clip = float(np.median(needed))
    routes = [Route.COPIES, Route.JACOBIAN]
    if clipping == 'flat' and model == 'dense':
      routes.append(Route.GHOST)
    results = []
    for route in routes:
      sums, losses, clipped = _local(
          task, route, clip=clip, clipping=clipping).clipped_sum(
              features, labels, shares)
      results.append((sums, losses, clipped))
    clipped_counts = [int(np.sum(r[2])) for r in results]
    self.assertBetween(clipped_counts[0], 1, len(labels) - 1)
    for sums, losses, clipped in results[1:]:
      for got, want in zip(sums, results[0][0]):
        self.assertAllClose(got, want, rtol=1e-4, atol=1e-6)
      self.assertAllClose(losses, results[0][1], rtol=1e-5)
      self.assertAllEqual(clipped, results[0][2])


class LocalTrainingTest(tf.test.TestCase, parameterized.TestCase):

  @parameterized.parameters(*_ROUTES)
  def test_no_noise_and_no_clip_is_full_batch_gradient_descent(self, model, route):
    # n <= B: q = 1, every step takes every example: plain gradient descent on
    # the mean loss, E steps.
    task = _task(model)
    examples = _examples(task)
    epochs, learning_rate = 3, 0.5
    clippings = ['flat'] if route is Route.GHOST else [
        'flat', 'per_layer_adaptive']
    for clipping in clippings:
      local = _local(task, route, learning_rate, local_epochs=epochs,
                     clipping=clipping)
      initial = [tf.identity(v) for v in local.model.trainable_variables]
      update, _, sampled, clipped = tf.function(local.train)(
          initial, examples, tf.constant([1, 2], tf.int64))
      self.assertEqual(int(sampled), epochs * len(examples[1]))
      self.assertEqual(int(clipped), 0)
      reference = task.keras_model_fn()
      for variable, value in zip(reference.trainable_variables, initial):
        variable.assign(value)
      loss_fn = task.loss_fn()
      for _ in range(epochs):
        with tf.GradientTape() as tape:
          loss = loss_fn(examples[1], reference(examples[0], training=True))
        for variable, gradient in zip(
            reference.trainable_variables,
            tape.gradient(loss, reference.trainable_variables)):
          variable.assign_sub(learning_rate * tf.convert_to_tensor(gradient))
      for got, value, final in zip(update, initial,
                                   reference.trainable_variables):
        self.assertAllClose(got, value - final, rtol=1e-4, atol=1e-6)

  def test_step_noise_has_stddev_z_s_over_expected_batch(self):
    # One step (n <= B, one epoch): the noised update minus the noiseless one
    # (same seed, so the same sample) is lr * N(0, (z S)^2) / n per coordinate.
    task = _task('dense')
    examples = _examples(task)
    n = len(examples[1])
    z, clip, learning_rate = 1.3, 0.7, 0.5
    seed = tf.constant([5, 6], tf.int64)
    updates = []
    for noise in (z, 0.0):
      local = _local(task, Route.GHOST, learning_rate, noise_multiplier=noise,
                     clip=clip)
      initial = [tf.identity(v) for v in local.model.trainable_variables]
      updates.append(local.train(initial, examples, seed)[0])
    noise = np.concatenate([
        np.ravel(noisy - plain) for noisy, plain in zip(*updates)
    ]) / learning_rate
    sigma = z * clip / n
    d = noise.size
    self.assertLess(abs(np.mean(noise)), 5 * sigma / math.sqrt(d))
    # The sample stddev's standard error is sigma / sqrt(2 d).
    self.assertLess(abs(np.std(noise) - sigma), 5 * sigma / math.sqrt(2 * d))

  def test_batches_are_poisson_samples_of_rate_b_over_n(self):
    task = _task('dense', sizes=(200,))
    examples = _examples(task)
    batch, epochs = 50, 5
    local = _local(task, Route.GHOST, noise_multiplier=1.0, clip=1.0,
                   batch_size=batch, local_epochs=epochs)
    initial = [tf.identity(v) for v in local.model.trainable_variables]
    _, _, sampled, _ = tf.function(local.train)(
        initial, examples, tf.constant([0, 9], tf.int64))
    steps = epochs * math.ceil(200 / batch)
    q = batch / 200
    # Binomial(200, q) per step, independent steps.
    standard_error = math.sqrt(steps * 200 * q * (1 - q))
    self.assertLess(abs(int(sampled) - steps * batch), 5 * standard_error)
    self.assertEqual(local._config.steps_per_round(200), steps)  # pylint: disable=protected-access

  def test_a_client_without_examples_sends_a_zero_update(self):
    task = _task('dense')
    local = _local(task, Route.GHOST, noise_multiplier=1.0, clip=1.0)
    initial = [tf.identity(v) for v in local.model.trainable_variables]
    empty = (tf.zeros([0, 64]), tf.zeros([0], tf.int32))
    update, _, sampled, _ = local.train(initial, empty, tf.constant([0, 0], tf.int64))
    self.assertEqual(int(sampled), 0)
    for tensor in update:
      self.assertAllEqual(tensor, tf.zeros_like(tensor))


class ProcessTest(tf.test.TestCase):
  """Through TFF: the standard engine, the vectorized engine, FedAvg."""

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls._context = execution.local_execution()
    cls._context.__enter__()
    # Equal sizes: FedAvg's batches of one client's size are its whole data
    # every epoch, the steps of DP-SGD with q = 1.
    cls.task = _task('dense', sizes=(60, 60))

  @classmethod
  def tearDownClass(cls):
    cls._context.__exit__(None, None, None)
    super().tearDownClass()

  def _differences(self, a, b):
    return max(float(np.max(np.abs(x - y)))
               for x, y in zip(a.trainable, b.trainable))

  def test_no_noise_and_no_clip_equals_fedavg(self):
    task = self.task
    fedavg = process.build_process(task.model_fn, None, 0.5, 1.0, 0.0)
    tf.keras.utils.set_random_seed(7)
    state = fedavg.initialize()
    batches = [
        task.preprocess(task.train_data.create_tf_dataset_for_client(c), 2,
                        60, seed=1)
        for c in task.train_data.client_ids
    ]
    want = fedavg.get_model_weights(fedavg.next(state, batches).state)
    private = dp_sgd.build_process(
        task, _config(local_epochs=2, batch_size=60), 0.5, 1.0, 0.0)
    start = private.set_model_weights(
        private.initialize(), fedavg.get_model_weights(state))
    output = private.next(start, dp_sgd.client_datasets(task, [0, 1], 1))
    self.assertLess(
        self._differences(private.get_model_weights(output.state), want), 1e-5)
    train = output.metrics['client_work']['train']
    self.assertEqual(int(train['num_examples']), 2 * (60 + 60))
    self.assertEqual(float(train['clipped_example_fraction']), 0.0)

  def test_engines_train_the_same(self):
    task = self.task
    config = _config(noise_multiplier=1.1, clip=0.5, batch_size=16,
                     clipping='per_layer_adaptive')
    standard = dp_sgd.build_process(task, config, 0.1, 1.0, 0.0)
    batched = vectorized.build_process(task, None, 0.1, 1.0, 0.0, 1, 16,
                                       example_dp=config)
    tf.keras.utils.set_random_seed(7)
    weights = standard.get_model_weights(standard.initialize())
    files = vectorized.UserFiles(task, self.create_tempdir().full_path)
    out_standard = standard.next(
        standard.set_model_weights(standard.initialize(), weights),
        dp_sgd.client_datasets(task, [1, 0], 4))
    out_batched = batched.next(
        batched.set_model_weights(batched.initialize(), weights),
        vectorized.pack_cohort(files, [1, 0], 2, 4, with_user_indices=True))
    self.assertLess(self._differences(
        standard.get_model_weights(out_standard.state),
        batched.get_model_weights(out_batched.state)), 1e-6)
    self.assertGreater(self._differences(
        weights, standard.get_model_weights(out_standard.state)), 1e-3)
    self.assertEqual(out_standard.metrics['client_work'],
                     out_batched.metrics['client_work'])
