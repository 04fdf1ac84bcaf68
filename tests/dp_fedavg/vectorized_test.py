"""The vectorized engine trains users exactly as the standard engine does."""

import collections
import math

from absl.testing import parameterized
import numpy as np
from sklearn import datasets as sklearn_datasets
import tensorflow as tf
import tensorflow_federated as tff

from aggregators import checks
from aggregators import gaussian
from aggregators import laplace
from aggregators import secure_encoding
from dp_fedavg import execution
from dp_fedavg import process
from dp_fedavg import tasks
from dp_fedavg import vectorized
from dp_fedavg.tasks import base
from dp_fedavg.tasks import client_data
from dp_fedavg.tasks import models
from tests.dp_fedavg.tasks import shared_data

# Users of very different sizes, one of them empty.
_USER_SIZES = (0, 3, 17, 40, 9, 25, 1)
_EPOCHS, _BATCH, _CLIENT_LR = 2, 8, 0.3


def _keras_model():
  return tf.keras.Sequential([
      tf.keras.layers.InputLayer(input_shape=(64,)),
      tf.keras.layers.Dense(32, activation='relu'),
      tf.keras.layers.Dense(10),
  ])


def _conv_model():
  """The FEMNIST CNN's layer kinds, on 8x8 digits."""
  return tf.keras.Sequential([
      tf.keras.layers.InputLayer(input_shape=(8, 8, 1)),
      tf.keras.layers.Conv2D(4, 3, activation='tanh'),
      tf.keras.layers.GroupNormalization(2),
      tf.keras.layers.MaxPooling2D(2),
      tf.keras.layers.Flatten(),
      tf.keras.layers.Dense(10),
  ])


def _recurrent_model():
  """The Shakespeare model's layer kinds: pixel intensities as 64 tokens."""
  return tf.keras.Sequential([
      tf.keras.layers.InputLayer(input_shape=(64,), dtype=tf.int32),
      tf.keras.layers.Embedding(17, 4),
      tf.keras.layers.GRU(8),
      tf.keras.layers.Dense(10),
  ])


_MODELS = {
    'dense': (_keras_model, lambda images: images / 16.0, np.float32),
    'conv': (_conv_model, lambda images: images.reshape(-1, 8, 8, 1) / 16.0,
             np.float32),
    'recurrent': (_recurrent_model, lambda images: images, np.int32),
}


def _task(model: str = 'dense') -> base.FederatedTask:
  keras_model_fn, features_fn, dtype = _MODELS[model]
  images, labels = sklearn_datasets.load_digits(return_X_y=True)
  arrays = (features_fn(images).astype(dtype), labels.astype(np.int32))
  bounds = np.cumsum((0,) + _USER_SIZES)
  shares = [np.arange(bounds[i], bounds[i + 1]) for i in range(len(_USER_SIZES))]
  ids = [str(i) for i in range(len(_USER_SIZES))]
  return base.classification_task(
      'sizes', keras_model_fn, client_data.sliced_client_data(ids, arrays, shares),
      client_data.sliced_client_data(['e'], arrays, [np.arange(100, 164)]),
  )


def setUpModule():
  global _CONTEXT
  _CONTEXT = execution.local_execution()
  _CONTEXT.__enter__()


def tearDownModule():
  _CONTEXT.__exit__(None, None, None)


def _initial_weights(learning_process):
  # One fixed starting point for both engines.
  tf.keras.utils.set_random_seed(7)
  return learning_process.get_model_weights(learning_process.initialize())


class LocalExampleOrderTest(tf.test.TestCase):

  def test_every_epoch_is_a_permutation_and_epochs_differ(self):
    order = base.local_example_order(tf.constant(50), 3, 11).numpy()
    epochs = order.reshape(3, 50)
    for epoch in epochs:
      self.assertCountEqual(epoch, range(50))
    self.assertFalse(np.array_equal(epochs[0], epochs[1]))
    again = base.local_example_order(tf.constant(50), 3, 11).numpy()
    self.assertAllEqual(order, again)

  def test_standard_preprocess_batches_in_that_order(self):
    features = np.arange(10, dtype=np.float32)[:, None]
    dataset = tf.data.Dataset.from_tensor_slices((features, np.arange(10)))
    task = _task()
    batches = list(task.preprocess(dataset, 2, 4, seed=5))
    self.assertEqual([len(b[1]) for b in batches], [4, 4, 4, 4, 4])
    got = np.concatenate([b[1].numpy() for b in batches])
    self.assertAllEqual(got, base.local_example_order(tf.constant(10), 2, 5))


class UserFilesTest(tf.test.TestCase):

  def test_files_hold_each_users_examples(self):
    task = _task()
    files = vectorized.UserFiles(task, self.create_tempdir().full_path)
    for user in (0, 2):
      paths = files.paths(user)
      self.assertLen(paths, 2)
      features = tf.io.parse_tensor(tf.io.read_file(paths[0]), tf.float32)
      labels = tf.io.parse_tensor(tf.io.read_file(paths[1]), tf.int32)
      expected = list(task.train_data.create_tf_dataset_for_client(str(user)))
      self.assertEqual(features.shape, (_USER_SIZES[user], 64))
      self.assertAllEqual(labels, [y for _, y in expected])

  def test_groups_hold_at_most_users_per_client(self):
    files = vectorized.UserFiles(_task(), self.create_tempdir().full_path)
    groups = [
        group.get_single_element()
        for group in vectorized.pack_cohort(files, [1, 2, 3, 4, 5, 6, 0], 3, 9)
    ]
    self.assertEqual([g['paths'].shape for g in groups], [(3, 2), (3, 2), (1, 2)])
    self.assertEqual({int(g['shuffle_seed']) for g in groups}, {9})
    # Grouped by size, smallest first: users of 0, 1, 3 | 9, 17, 25 | 40.
    sizes = [
        [len(tf.io.parse_tensor(tf.io.read_file(p[1]), tf.int32)) for p in g['paths']]
        for g in groups
    ]
    self.assertEqual(sizes, [[0, 1, 3], [9, 17, 25], [40]])


class EngineEquivalenceTest(tf.test.TestCase, parameterized.TestCase):
  """Noise 0: both engines give the same model after two rounds.

  Tolerance: float32 rounding. The engines sum the same products in different
  orders (batched einsum against Keras' matmul; users summed within a group
  first), which moves each weight by a few ulps per step; over 2 rounds of up
  to 10 steps, weights of order 1 agree to 2e-5.
  """

  @parameterized.named_parameters(
      ('no_clipping', 'dense', 1e6, 3),
      # Every user is clipped, each to its own scale: clipping a group's sum
      # instead would give another model.
      ('every_user_clipped', 'dense', 0.05, 3),
      ('one_user_per_client', 'dense', 0.05, 1),
      ('one_client', 'dense', 0.05, 7),
      ('conv_per_user_copies', 'conv', 0.05, 3),
      ('recurrent_users_one_by_one', 'recurrent', 0.05, 3),
  )
  def test_same_model_as_standard_engine(self, model, clip, users_per_client):
    task = _task(model)
    users = len(_USER_SIZES)
    standard = process.build_process(
        task.model_fn, gaussian.GaussianFactory(0.0, clip, users, noise_seed=0),
        _CLIENT_LR, 1.0, 0.5,
    )
    fast = vectorized.build_process(
        task, gaussian.GaussianFactory(
            0.0, clip, users, noise_seed=0, stacked_users=True),
        _CLIENT_LR, 1.0, 0.5, _EPOCHS, _BATCH,
    )
    weights = _initial_weights(standard)
    standard_state = standard.set_model_weights(standard.initialize(), weights)
    fast_state = fast.set_model_weights(fast.initialize(), weights)
    files = vectorized.UserFiles(task, self.create_tempdir().full_path)
    cohort = list(range(users))
    for round_num in (1, 2):
      datasets = [
          task.preprocess(task.train_data.create_tf_dataset_for_client(str(u)),
                          _EPOCHS, _BATCH, seed=round_num)
          for u in cohort
      ]
      standard_output = standard.next(standard_state, datasets)
      fast_output = fast.next(fast_state, vectorized.pack_cohort(
          files, cohort, users_per_client, round_num))
      standard_state, fast_state = standard_output.state, fast_output.state
      standard_aggregator = standard_output.metrics['aggregator']
      fast_aggregator = fast_output.metrics['aggregator']
      self.assertEqual(fast_aggregator['clipped_count'],
                       standard_aggregator['clipped_count'])
      self.assertNear(
          float(fast_output.metrics['client_work']['train']['loss']),
          float(standard_output.metrics['client_work']['train']['loss']), 1e-5)
    if clip < 1:
      # The empty user is never clipped.
      self.assertEqual(standard_aggregator['clipped_count'], users - 1)
    for a, b in zip(fast.get_model_weights(fast_state).trainable,
                    standard.get_model_weights(standard_state).trainable):
      self.assertAllClose(a, b, atol=2e-5, rtol=0)


class RealTaskEquivalenceTest(tf.test.TestCase, parameterized.TestCase):
  """The FEMNIST CNN and the Shakespeare GRU on their real users' data."""

  @parameterized.named_parameters(('femnist', 'femnist', 'femnist_sample'),
                                  ('shakespeare', 'shakespeare', 'shakespeare'))
  def test_one_round_same_model_as_standard_engine(self, name, data_dir):
    shared_data.skip_unless_present(self, data_dir)
    users = 4
    task = tasks.build_task(name, tasks.TaskOptions(num_clients=users))
    standard = process.build_process(
        task.model_fn, gaussian.GaussianFactory(0.0, 0.05, users, noise_seed=0),
        _CLIENT_LR, 1.0, 0.0,
    )
    fast = vectorized.build_process(
        task, gaussian.GaussianFactory(
            0.0, 0.05, users, noise_seed=0, stacked_users=True),
        _CLIENT_LR, 1.0, 0.0, 1, 16,
    )
    weights = _initial_weights(standard)
    datasets = [
        task.preprocess(task.train_data.create_tf_dataset_for_client(c), 1, 16,
                        seed=1)
        for c in task.train_data.client_ids
    ]
    standard_state = standard.next(
        standard.set_model_weights(standard.initialize(), weights), datasets
    ).state
    files = vectorized.UserFiles(task, self.create_tempdir().full_path)
    fast_state = fast.next(
        fast.set_model_weights(fast.initialize(), weights),
        vectorized.pack_cohort(files, list(range(users)), 2, 1),
    ).state
    for a, b in zip(fast.get_model_weights(fast_state).trainable,
                    standard.get_model_weights(standard_state).trainable):
      self.assertAllClose(a, b, atol=2e-5, rtol=0)


class VectorizedNoiseTest(tf.test.TestCase):

  def test_noise_stddev_is_z_clip_over_users(self):
    """With no local progress, the model moves by the noise / n alone."""
    task = _task()
    users, z, clip = len(_USER_SIZES), 2.0, 0.5
    fast = vectorized.build_process(
        task, gaussian.GaussianFactory(
            z, clip, users, noise_seed=3, stacked_users=True),
        1e-12, 1.0, 0.0, 1, _BATCH,
    )
    state = fast.initialize()
    before = fast.get_model_weights(state).trainable
    files = vectorized.UserFiles(task, self.create_tempdir().full_path)
    state = fast.next(
        state, vectorized.pack_cohort(files, list(range(users)), 3, 1)).state
    moved = np.concatenate([
        (a - b).ravel()
        for a, b in zip(before, fast.get_model_weights(state).trainable)
    ])
    expected = z * clip / users
    # The sample stddev of d normal values has relative standard error
    # 1/sqrt(2d); allow 5 of them (local steps move weights by ~1e-12).
    tolerance = 5 / math.sqrt(2 * moved.size)
    self.assertNear(np.std(moved) / expected, 1.0, tolerance)


class StackedFactoriesTest(tf.test.TestCase, parameterized.TestCase):

  _STACKED = tff.types.to_type(collections.OrderedDict(
      kernel=tff.TensorType(np.float32, [None, 3, 2]),
      bias=tff.TensorType(np.float32, [None, 2]),
  ))
  _ONE = tff.types.to_type(collections.OrderedDict(
      kernel=tff.TensorType(np.float32, [3, 2]),
      bias=tff.TensorType(np.float32, [2]),
  ))

  @parameterized.named_parameters(
      ('gaussian', lambda: gaussian.GaussianFactory(
          1.0, 1.0, 5, noise_seed=0, stacked_users=True)),
      ('gaussian_adaptive', lambda: gaussian.GaussianFactory(
          1.0, 1.0, 5, adaptive=gaussian.AdaptiveClipping(), noise_seed=0,
          stacked_users=True)),
      ('laplace', lambda: laplace.LaplaceFactory(
          1.0, 1.0, 5, noise_seed=0, stacked_users=True)),
  )
  def test_takes_stacks_and_returns_one_update(self, factory_fn):
    aggregation = factory_fn().create(self._STACKED)
    parameter = aggregation.next.type_signature.parameter
    self.assertEqual(parameter[1], tff.FederatedType(self._STACKED, tff.CLIENTS))
    self.assertEqual(aggregation.next.type_signature.result.result,
                     tff.FederatedType(self._ONE, tff.SERVER))

  def test_counts_users_not_clients(self):
    aggregation = gaussian.GaussianFactory(
        0.0, 1.0, 5, noise_seed=0, stacked_users=True).create(self._STACKED)
    big = collections.OrderedDict(
        kernel=np.full([2, 3, 2], 10.0, np.float32),
        bias=np.zeros([2, 2], np.float32))
    small = collections.OrderedDict(
        kernel=np.full([3, 3, 2], 0.01, np.float32),
        bias=np.zeros([3, 2], np.float32))
    output = aggregation.next(aggregation.initialize(), [big, small])
    self.assertEqual(output.measurements['clipped_count'], 2)
    # Two users clipped to norm 1 each, three small ones, over 5 expected.
    kernel_norm_sum = 2 * 1.0 + 3 * 0.01 * math.sqrt(6)
    self.assertNear(np.linalg.norm(output.result['kernel']) * 5,
                    kernel_norm_sum, 1e-4)

  @parameterized.named_parameters(
      ('gaussian_flat', lambda stacked: gaussian.GaussianFactory(
          0.0, 1.0, 5, noise_seed=0, stacked_users=stacked)),
      ('gaussian_per_layer', lambda stacked: gaussian.GaussianFactory(
          0.0, 1.0, 5, clipping='per_layer_uniform', noise_seed=0,
          stacked_users=stacked)),
      ('laplace', lambda stacked: laplace.LaplaceFactory(
          1e9, 1.0, 5, noise_seed=0, stacked_users=stacked)),
  )
  def test_stack_aggregates_as_one_user_per_client(self, factory_fn):
    # Users clipped or not, one with a nan, one with an inf, one whose values
    # are finite but whose norm is not (float32 overflows): the stacked
    # aggregator must treat each exactly as a client of its own.
    kernels = np.stack([
        np.full([3, 2], 0.01), np.full([3, 2], 10.0),
        np.array([[np.nan, 0, 0], [0, 0, 0]]).T, np.full([3, 2], 1e30),
        np.array([[1, 0, 0], [0, np.inf, 0]]).T,
    ]).astype(np.float32)
    biases = np.array([[0.2, 0], [0, -3], [1, 1], [0, 0], [1, 1]], np.float32)
    stacked = factory_fn(True).create(self._STACKED)
    output = stacked.next(stacked.initialize(), [collections.OrderedDict(
        kernel=kernels, bias=biases)])
    one_per_client = factory_fn(False).create(self._ONE)
    expected = one_per_client.next(one_per_client.initialize(), [
        collections.OrderedDict(kernel=k, bias=b)
        for k, b in zip(kernels, biases)
    ])
    self.assertAllClose(output.result, expected.result, rtol=1e-6, atol=0)
    self.assertTrue(np.all(np.isfinite(output.result['kernel'])))
    measurements = dict(output.measurements)
    self.assertEqual(measurements['nonfinite_count'], 2)
    # The overflowing user is scaled to zero and counted as clipped.
    self.assertEqual(measurements['clipped_count'], 2)
    self.assertEqual(measurements, dict(expected.measurements))

  def test_client_noise_of_every_user(self):
    users, z, clip, size = 4, 1.0, 0.5, 5_000
    stacked_type = tff.types.to_type(tff.TensorType(np.float32, [None, size]))
    aggregation = gaussian.GaussianFactory(
        z, clip, users, noise_placement='client', stacked_users=True,
    ).create(stacked_type)
    output = aggregation.next(
        aggregation.initialize(), [np.zeros([users, size], np.float32)])
    # Four users' independent N(0, (z C)^2) draws summed, divided by 4.
    sigma = z * clip * math.sqrt(users) / users
    noise = np.asarray(output.result, np.float64)
    self.assertLess(abs(noise.std() - sigma), 5 * sigma / math.sqrt(2 * size))

  def test_refuses_unstacked_values(self):
    with self.assertRaisesRegex(TypeError, 'leading users axis'):
      gaussian.GaussianFactory(
          1.0, 1.0, 5, stacked_users=True).create(self._ONE)

  def test_refuses_secure_sum(self):
    with self.assertRaisesRegex(checks.UnsupportedError, 'stacked users'):
      gaussian.GaussianFactory(
          1.0, 1.0, 5, record_aggregation=secure_encoding.GridSecureSum(),
          stacked_users=True)


class DenseStackTest(tf.test.TestCase):

  def test_only_dense_stacks_take_the_low_rank_update(self):
    self.assertLen(vectorized.dense_activations(_keras_model), 2)
    self.assertIsNone(vectorized.dense_activations(
        lambda: models.group_norm_cnn((28, 28, 1), 62)))
    self.assertIsNone(vectorized.dense_activations(
        lambda: tf.keras.Sequential([
            tf.keras.layers.InputLayer(input_shape=(3, 4)),
            tf.keras.layers.Dense(2),
        ])))


class FiniteFromFactorsTest(tf.test.TestCase, parameterized.TestCase):
  """The dense route's finiteness check, from the factors of the kernel
  deltas, against checking the deltas themselves."""

  @parameterized.named_parameters(
      ('finite', None, 1.0, 0),
      ('nan_input', ('input', 1, np.nan), 1.0, 1),
      ('inf_gradient', ('gradient', 2, np.inf), 1.0, 1),
      ('inf_times_zero_gradient', ('input', 0, np.inf), 0.0, 1),
      ('nan_bias', ('bias', 3, np.nan), 1.0, 1),
      # Finite factors whose products overflow float32, and large finite
      # factors whose products do not.
      ('products_overflow', ('input', 2, 1e30), 1e10, 1),
      ('large_but_finite', ('input', 2, 1e30), 1e-10, 0),
  )
  def test_same_as_checking_the_deltas(self, corruption, gradient_scale,
                                       nonfinite_users):
    rng = np.random.default_rng(0)
    users, rows = 5, 6
    inputs = [rng.normal(size=(users, rows, 4)).astype(np.float32)]
    output_grads = [(gradient_scale * rng.normal(size=(users, rows, 3)))
                    .astype(np.float32)]
    bias_deltas = [rng.normal(size=(users, 3)).astype(np.float32)]
    if corruption is not None:
      where, user, value = corruption
      target = {'input': inputs, 'gradient': output_grads,
                'bias': bias_deltas}[where][0]
      target[user].flat[0] = value
    kernel_deltas = [tf.matmul(inputs[0], 0.5 * output_grads[0],
                               transpose_a=True)]
    expected = np.all(np.isfinite(np.concatenate(
        [kernel_deltas[0].numpy().reshape(users, -1), bias_deltas[0]],
        axis=1)), axis=1)
    self.assertAllEqual(
        vectorized._users_finite_from_factors(
            kernel_deltas, [tf.constant(b) for b in bias_deltas],
            [tf.constant(i) for i in inputs],
            [tf.constant(g) for g in output_grads], 0.5),
        expected)
    self.assertEqual(np.sum(~expected), nonfinite_users)


if __name__ == '__main__':
  tf.test.main()
