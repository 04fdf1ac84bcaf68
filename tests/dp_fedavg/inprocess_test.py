"""The in-process engine runs the same computation as TFF's worker.

Every comparison runs one process object both ways: through TFF's worker
(the session's) and in process (`dp_fedavg.inprocess`), from the same state
and on the same client data.
"""

import collections
import math
import tempfile

from absl.testing import parameterized
import numpy as np
from sklearn import datasets as sklearn_datasets
import tensorflow as tf
import tensorflow_federated as tff

from aggregators import registry
from dp_fedavg import execution
from dp_fedavg import inprocess
from dp_fedavg import process
from dp_fedavg import run_config
from dp_fedavg import vectorized
from dp_fedavg.tasks import base
from dp_fedavg.tasks import client_data

_USERS, _EXAMPLES = 8, 12
_EPOCHS, _BATCH, _CLIENT_LR = 2, 4, 0.3


def _keras_model():
  return tf.keras.Sequential([
      tf.keras.layers.InputLayer(input_shape=(64,)),
      tf.keras.layers.Dense(16, activation='relu'),
      tf.keras.layers.Dense(10),
  ])


def _task() -> base.FederatedTask:
  images, labels = sklearn_datasets.load_digits(return_X_y=True)
  arrays = ((images / 16.0).astype(np.float32), labels.astype(np.int32))
  shares = [np.arange(i * _EXAMPLES, (i + 1) * _EXAMPLES) for i in range(_USERS)]
  return base.classification_task(
      'small', _keras_model,
      client_data.sliced_client_data(
          [str(i) for i in range(_USERS)], arrays, shares),
      client_data.sliced_client_data(
          ['a', 'b'], arrays, [np.arange(200, 230), np.arange(230, 250)]),
  )


_TASK = _task()


def _factory(aggregator: str, noise: float, stacked_users: bool, **values):
  config = run_config.with_defaults(aggregator=aggregator, **values)
  mechanism = config.mechanism
  params = config.params
  if mechanism.noise is not None:
    params = mechanism.with_noise(params, noise)
  return mechanism.factory(params, registry.Setting(
      expected_clients_per_round=_USERS, model_dimension=_TASK.update_dimension,
      noise_seed=3, stacked_users=stacked_users,
      robustness=config.robustness(_USERS)))


def _process(aggregator: str, noise: float, stacked_users: bool,
             server_momentum: float = 0.9, **values):
  factory = _factory(aggregator, noise, stacked_users, **values)
  if stacked_users:
    return vectorized.build_process(
        _TASK, factory, _CLIENT_LR, 1.0, server_momentum, _EPOCHS, _BATCH)
  return process.build_process(
      _TASK.model_fn, factory, _CLIENT_LR, 1.0, server_momentum)


def _client_data(stacked_users: bool, round_num: int, directory: str):
  users = list(range(_USERS))
  if stacked_users:
    return vectorized.pack_cohort(
        vectorized.UserFiles(_TASK, directory), users, 3, round_num)
  ids = _TASK.train_data.client_ids
  return [
      _TASK.preprocess(_TASK.train_data.create_tf_dataset_for_client(ids[u]),
                       _EPOCHS, _BATCH, seed=round_num)
      for u in users
  ]


def _flat_weights(learning_process, state) -> np.ndarray:
  weights = learning_process.get_model_weights(state)
  return np.concatenate([np.ravel(w) for w in weights.trainable])


def _relative_difference(a: np.ndarray, b: np.ndarray) -> float:
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def setUpModule():
  global _CONTEXT
  _CONTEXT = execution.local_execution(simulate_secure_aggregation=True)
  _CONTEXT.__enter__()


def tearDownModule():
  _CONTEXT.__exit__(None, None, None)


class SameComputationTest(tf.test.TestCase, parameterized.TestCase):
  """The same model as TFF's worker, round after round: at noise 0, and with
  noise for Laplace (whose scale 1/epsilon cannot be 0): our aggregators draw
  their noise from a seed in their state, so it is the worker's noise too."""

  @parameterized.named_parameters(
      ('none', 'none', 0.0, False, {}),
      ('gaussian_fixed', 'gaussian_fixed', 0.0, False, {}),
      ('gaussian_adaptive', 'gaussian_adaptive', 0.0, False, {}),
      ('laplace', 'laplace', 1.0, False, {}),
      ('secure_gaussian', 'secure_gaussian', 0.0, False, {}),
      ('client_noise', 'gaussian_fixed', 0.0, False,
       {'noise_placement': 'client'}),
      ('centered_clipping', 'gaussian_fixed', 0.0, False,
       {'robust_rule': 'centered_clipping'}),
      ('stacked_gaussian_fixed', 'gaussian_fixed', 0.0, True, {}),
      ('stacked_gaussian_adaptive', 'gaussian_adaptive', 0.0, True, {}),
      ('stacked_none', 'none', 0.0, True, {}),
  )
  def test_same_model_every_round(self, aggregator, noise, stacked_users,
                                  values):
    learning_process = _process(aggregator, noise, stacked_users, **values)
    in_process = inprocess.InProcessLearningProcess(learning_process)
    directory = self.create_tempdir().full_path
    tf.keras.utils.set_random_seed(1)
    state = learning_process.initialize()
    state_here = in_process.initialize()
    self.assertEqual(
        _relative_difference(_flat_weights(learning_process, state),
                             _flat_weights(in_process, state_here)), 0.0)
    for round_num in range(1, 4):
      data = _client_data(stacked_users, round_num, directory)
      output = learning_process.next(state, data)
      output_here = in_process.next(state_here, data)
      state, state_here = output.state, output_here.state
      self.assertLessEqual(
          _relative_difference(_flat_weights(in_process, state_here),
                               _flat_weights(learning_process, state)),
          1e-6, f'round {round_num}')
      self.assertAllClose(
          output_here.metrics['client_work'], output.metrics['client_work'],
          rtol=1e-6)
    self.assertEqual(
        type(state_here), type(state), 'the state keeps TFF\'s containers')

  def test_clients_in_parallel_give_the_sequential_model(self):
    # Three TFF clients of stacked users (no variables): they run at once,
    # and the sum is still taken in the clients' order.
    learning_process = _process('gaussian_fixed', 1.0, True)
    parallel = inprocess.InProcessLearningProcess(learning_process)
    sequential = inprocess.InProcessLearningProcess(
        learning_process, parallel_clients=1)
    directory = self.create_tempdir().full_path
    state = state_sequential = parallel.initialize()
    for round_num in (1, 2):
      data = _client_data(True, round_num, directory)
      self.assertLen(data, 3)
      state = parallel.next(state, data).state
      state_sequential = sequential.next(state_sequential, data).state
      self.assertAllEqual(_flat_weights(parallel, state),
                          _flat_weights(sequential, state_sequential))

  def test_distributed_dp_within_its_rounding_error(self):
    # Its stochastic rounding draws an unseeded seed, so two runs on TFF's
    # worker differ too. Each client's rounding error has L2 norm below
    # sqrt(d) / s (distributed_dp_test), so does the mean's, and two runs'
    # means differ by less than twice that; the first server step (momentum
    # buffer 0, rate 1) moves the model by the mean.
    factory = _factory('distributed_dp', 0.0, False)
    learning_process = process.build_process(
        _TASK.model_fn, factory, _CLIENT_LR, 1.0, 0.9)
    in_process = inprocess.InProcessLearningProcess(learning_process)
    state = learning_process.initialize()
    data = _client_data(False, 1, '')
    model = _flat_weights(
        learning_process, learning_process.next(state, data).state)
    model_here = _flat_weights(in_process, in_process.next(state, data).state)
    params = factory.parameters(_TASK.update_dimension)
    bound = 2 * math.sqrt(params['padded_dimension']) / params['scale']
    self.assertLess(np.linalg.norm(model_here - model), bound)

  def test_seeded_noise_is_the_workers_noise(self):
    # Our aggregators draw noise from a seed in their state, so the noised
    # model is the same too, not only its distribution.
    learning_process = _process('gaussian_fixed', 1.0, False)
    in_process = inprocess.InProcessLearningProcess(learning_process)
    state = learning_process.initialize()
    data = _client_data(False, 1, '')
    noised = _flat_weights(
        learning_process, learning_process.next(state, data).state)
    noised_here = _flat_weights(in_process, in_process.next(state, data).state)
    self.assertLessEqual(_relative_difference(noised_here, noised), 1e-6)


class NoiseTest(tf.test.TestCase):

  def test_noise_stddev_is_the_stated_one(self):
    # One round from the same state, noise z and noise 0: with server
    # momentum 0 and rate 1 the models differ by the noise of the mean,
    # N(0, (z S / n)^2) per coordinate. The sample stddev over d coordinates
    # has standard error sigma / sqrt(2 d).
    noise, clip = 2.0, 0.1
    models = {}
    initial_weights = None
    for z in (noise, 0.0):
      learning_process = _process(
          'gaussian_fixed', z, True, server_momentum=0.0, clip=clip)
      in_process = inprocess.InProcessLearningProcess(learning_process)
      state = in_process.initialize()
      # Both rounds start from the same model, whatever the random state
      # each process was traced in.
      if initial_weights is None:
        initial_weights = in_process.get_model_weights(state)
      state = in_process.set_model_weights(state, initial_weights)
      data = _client_data(True, 1, self.create_tempdir().full_path)
      models[z] = _flat_weights(in_process, in_process.next(state, data).state)
    difference = models[noise] - models[0.0]
    expected = noise * clip / _USERS
    standard_error = expected / math.sqrt(2 * difference.size)
    self.assertLess(abs(np.std(difference) - expected), 5 * standard_error)
    self.assertLess(abs(np.mean(difference)), 5 * expected / math.sqrt(difference.size))


class _UncheckedSecureSum(tff.aggregators.UnweightedAggregationFactory):
  """Sums int32(1000 * value) with TFF's secure sum, bounded by
  `max_input`, without clipping first: a client above it breaks the bound."""

  def __init__(self, max_input: int):
    self._max_input = max_input

  def create(self, value_type):
    @tff.tensorflow.computation(value_type)
    def encode(value):
      return tf.nest.map_structure(
          lambda t: tf.cast(tf.abs(t) * 1000.0, tf.int32), value)

    @tff.federated_computation
    def init_fn():
      return tff.federated_value((), tff.SERVER)

    @tff.federated_computation(
        init_fn.type_signature.result, tff.FederatedType(value_type, tff.CLIENTS))
    def next_fn(state, value):
      total = tff.federated_secure_sum(
          tff.federated_map(encode, value), self._max_input)
      return tff.templates.MeasuredProcessOutput(
          state=state,
          result=tff.federated_map(
              tff.tensorflow.computation(
                  lambda t: tf.nest.map_structure(
                      lambda x: tf.zeros(x.shape, tf.float32), t)),
              total),
          measurements=tff.federated_value((), tff.SERVER))

    return tff.templates.AggregationProcess(init_fn, next_fn)


class SecureSumBoundsTest(tf.test.TestCase):

  def test_a_client_above_the_secure_sum_bound_fails(self):
    data = _client_data(False, 1, '')
    for max_input, fails in ((2**30, False), (1, True)):
      learning_process = process.build_process(
          _TASK.model_fn, _UncheckedSecureSum(max_input), _CLIENT_LR, 1.0, 0.0)
      in_process = inprocess.InProcessLearningProcess(learning_process)
      state = in_process.initialize()
      if fails:
        with self.assertRaisesRegex(
            tf.errors.InvalidArgumentError,
            'larger than maximum specified for secure sum'):
          in_process.next(state, data)
      else:
        in_process.next(state, data)


class WithoutWorkerTest(tf.test.TestCase, parameterized.TestCase):

  def test_rounds_and_evaluation_run_without_tff_runtime(self):
    learning_process = _process('gaussian_fixed', 1.0, True)
    evaluate = inprocess.InProcessEvaluator(
        _TASK.model_fn, _TASK.eval_client_datasets())
    with execution.without_tff_runtime():
      with self.assertRaisesRegex(RuntimeError, 'only inside'):
        learning_process.initialize()
      in_process = inprocess.InProcessLearningProcess(learning_process)
      state = in_process.initialize()
      for round_num in (1, 2):
        state = in_process.next(
            state, _client_data(True, round_num, self.create_tempdir().full_path)
        ).state
      metrics = evaluate(in_process.get_model_weights(state))
    self.assertBetween(metrics['accuracy'], 0.0, 1.0)

  # 7: batches that cross the two held-out clients' boundary (30 + 20).
  @parameterized.parameters(512, 7)
  def test_evaluation_is_tffs_federated_evaluation(self, batch_size):
    weights = tff.learning.models.ModelWeights.from_model(_keras_model())
    federated = process.FederatedEvaluator(
        _TASK.model_fn, _TASK.eval_client_datasets())(weights)
    here = inprocess.InProcessEvaluator(
        _TASK.model_fn, _TASK.eval_client_datasets(), batch_size)(weights)
    # Rebatched, it counts no batches (the evaluator's docstring).
    self.assertEqual(here.keys(), federated.keys() - {'num_batches'})
    self.assertEqual(here['num_examples'], 50)
    for name, value in here.items():
      self.assertAllClose(value, federated[name], rtol=1e-6, msg=name)


class RefusalTest(tf.test.TestCase):

  def test_a_federated_computation_is_not_a_tf_computation(self):
    learning_process = _process('none', 0.0, False)
    with self.assertRaisesRegex(inprocess.UnsupportedProcessError,
                                'expected a TensorFlow computation'):
      inprocess.TfComputation(learning_process.next)


if __name__ == '__main__':
  tf.test.main()
