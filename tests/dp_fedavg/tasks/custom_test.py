"""The custom task: a user's data (SQLite, npz, CSV) and Keras model."""

import csv
import os
import shutil

from absl.testing import absltest
from absl.testing import parameterized
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_federated as tff

from dp_fedavg import run_config
from dp_fedavg import tasks
from dp_fedavg.tasks import base
from dp_fedavg.tasks import custom
from experiments import runner
from experiments import training_flags
from tests.experiments import binaries

_MODEL = 'tests.dp_fedavg.tasks.custom_test:small_model'


def small_model():
  """4 features in a 2x2 grid, 3 classes, logits out."""
  return tf.keras.Sequential([
      tf.keras.layers.InputLayer(input_shape=(2, 2)),
      tf.keras.layers.Flatten(),
      tf.keras.layers.Dense(3),
  ])


def softmax_model():
  return tf.keras.Sequential([
      tf.keras.layers.InputLayer(input_shape=(2, 2)),
      tf.keras.layers.Flatten(),
      tf.keras.layers.Dense(3, activation='softmax'),
  ])


_REGRESSION_MODEL = 'tests.dp_fedavg.tasks.custom_test:regression_model'


def regression_model():
  """4 features, 2 predicted values: Dense layers only (the vectorized
  engine's shared-GEMM path)."""
  return tf.keras.Sequential([
      tf.keras.layers.InputLayer(input_shape=(4,)),
      tf.keras.layers.Dense(8, activation='relu'),
      tf.keras.layers.Dense(2),
  ])


def _regression_examples(count=240, clients=30, seed=0):
  """y = x W + noise: a linear target the model can fit."""
  rng = np.random.default_rng(seed)
  ids = np.array([f'c{i % clients:02d}' for i in range(count)])
  features = rng.normal(size=(count, 4)).astype(np.float32)
  weights = rng.normal(size=(4, 2))
  labels = features @ weights + 0.1 * rng.normal(size=(count, 2))
  return ids, features, labels.astype(np.float32)


def _examples(count=60, clients=12, seed=0):
  rng = np.random.default_rng(seed)
  ids = np.array([f'c{i % clients}' for i in range(count)])
  features = rng.normal(size=(count, 2, 2)).astype(np.float32)
  labels = rng.integers(0, 3, count)
  return ids, features, labels


def _all(data):
  """{client: (features, labels)} of a ClientData."""
  result = {}
  for client in data.client_ids:
    x, y = base.all_examples(data.create_tf_dataset_for_client(client))
    result[client] = (x.numpy(), y.numpy())
  return result


class CustomTaskTest(parameterized.TestCase):

  def _write(self, kind, ids, features, labels):
    path = os.path.join(self.create_tempdir().full_path, f'data.{kind}')
    if kind == 'sqlite':
      custom.write_client_data(path, ids, features, labels)
    elif kind == 'npz':
      np.savez(path, client_id=ids, x=features, y=labels)
    else:
      with open(path, 'w', newline='') as f:
        writer = csv.writer(f)
        writer.writerow(['client_id', 'f0', 'f1', 'f2', 'f3', 'y'])
        for i, x, y in zip(ids, features.reshape(len(ids), -1), labels):
          writer.writerow([i, *x.tolist(), int(y)])
    return path

  @parameterized.parameters('sqlite', 'npz', 'csv')
  def test_every_format_gives_the_written_examples(self, kind):
    ids, features, labels = _examples()
    task = custom.build_task(
        self._write(kind, ids, features, labels), _MODEL,
        test_data_path=self._write(kind, ids[:6], features[:6], labels[:6]))
    train = _all(task.train_data)
    self.assertLen(train, 12)
    for client, (x, y) in train.items():
      mine = ids == client
      np.testing.assert_allclose(x, features[mine], rtol=1e-6)
      np.testing.assert_array_equal(y, labels[mine])
    self.assertLen(task.eval_data.client_ids, 6)

  def test_without_test_file_a_tenth_of_the_clients_is_held_out(self):
    ids, features, labels = _examples(count=200, clients=40)
    path = self._write('npz', ids, features, labels)
    task = custom.build_task(path, _MODEL, seed=3)
    train, held_out = (set(task.train_data.client_ids),
                       set(task.eval_data.client_ids))
    self.assertLen(held_out, 4)
    self.assertEmpty(train & held_out)
    self.assertEqual(train | held_out, set(ids))
    again = custom.build_task(path, _MODEL, seed=3)
    self.assertEqual(set(again.eval_data.client_ids), held_out)

  def test_one_hot_labels_become_classes(self):
    ids, features, labels = _examples()
    path = self._write('npz', ids, features, np.eye(3)[labels])
    train = _all(custom.build_task(path, _MODEL).train_data)
    np.testing.assert_array_equal(train['c0'][1], labels[ids == 'c0'])

  def test_keras_file_starts_from_its_weights(self):
    model = small_model()
    path = os.path.join(self.create_tempdir().full_path, 'model.keras')
    model.save(path)
    ids, features, labels = _examples()
    task = custom.build_task(self._write('npz', ids, features, labels), path)
    for saved, built in zip(model.get_weights(),
                            task.keras_model_fn().get_weights()):
      np.testing.assert_array_equal(saved, built)

  @parameterized.named_parameters(
      ('label_out_of_range', lambda i, x, y: (i, x, y + 3), 'npz',
       r'labels span \[3, 5\]; the model has 3 outputs'),
      ('shape_mismatch', lambda i, x, y: (i, np.ones((len(i), 5)), y), 'npz',
       r'5 feature values .* takes 4'),
      ('empty', lambda i, x, y: (i[:0], x[:0], y[:0]), 'npz',
       'holds no examples'),
      ('float_labels', lambda i, x, y: (i, x, y + 0.5), 'npz',
       'not integer classes or one-hot rows; for regression pass --loss=mse'),
  )
  def test_data_that_does_not_fit_the_model_is_one_line(self, change, kind,
                                                        message):
    path = self._write(kind, *change(*_examples()))
    with self.assertRaisesRegex(custom.CustomTaskError, message) as raised:
      custom.build_task(path, _MODEL)
    self.assertIn(path, str(raised.exception))
    self.assertNotIn('\n', str(raised.exception))

  def test_missing_columns_are_named(self):
    ids, features, labels = _examples()
    path = os.path.join(self.create_tempdir().full_path, 'data.npz')
    np.savez(path, client_id=ids, pixels=features, y=labels)
    with self.assertRaisesRegex(custom.CustomTaskError,
                                r"no array 'x'; it has client_id, pixels, y"):
      custom.build_task(path, _MODEL)
    sqlite = self._write('sqlite', ids, features, labels)
    with self.assertRaisesRegex(custom.CustomTaskError,
                                r"examples have no 'label'; they have x, y"):
      custom.build_task(sqlite, _MODEL, label_key='label')
    table = os.path.join(self.create_tempdir().full_path, 'data.csv')
    with open(table, 'w') as f:
      f.write('user,f0,y\nu,1.0,0\n')
    with self.assertRaisesRegex(custom.CustomTaskError,
                                r"no column 'client_id'; the header has user"):
      custom.build_task(table, _MODEL)

  def test_models_that_cannot_be_used_are_one_line(self):
    path = self._write('npz', *_examples())
    broken = os.path.join(self.create_tempdir().full_path, 'broken.keras')
    with open(broken, 'w') as f:
      f.write('not a model')
    for model, message in (
        (broken, 'does not load'),
        ('tests.dp_fedavg.tasks.custom_test:softmax_model',
         'ends in a softmax'),
        ('tests.dp_fedavg.tasks.custom_test:no_such_function', 'no attribute'),
        ('no_colon', 'expected a .keras file or module:function'),
        ('/no/such/model.keras', 'no such file'),
    ):
      with self.assertRaisesRegex(custom.CustomTaskError, message):
        custom.build_task(path, model)

  def test_a_client_without_examples_is_named(self):
    path = os.path.join(self.create_tempdir().full_path, 'data.sqlite')
    ids, features, labels = _examples()

    def dataset_fn(client):
      mine = ids == client if client != 'idle' else np.zeros(len(ids), bool)
      return tf.data.Dataset.from_tensor_slices({
          'x': features[mine].reshape(-1, 4), 'y': labels[mine][:, None]})

    tff.simulation.datasets.save_to_sql_client_data(
        ['c0', 'idle'], dataset_fn, path)
    with self.assertRaisesRegex(custom.CustomTaskError,
                                "client 'idle' has no examples"):
      custom.build_task(path, _MODEL)

  def test_unknown_format_and_missing_file(self):
    with self.assertRaisesRegex(custom.CustomTaskError, 'unknown format'):
      path = os.path.join(self.create_tempdir().full_path, 'data.parquet')
      open(path, 'w').close()
      custom.build_task(path, _MODEL)
    with self.assertRaisesRegex(custom.CustomTaskError, 'no such file'):
      custom.build_task('/no/such/data.npz', _MODEL)


class _Interrupted(Exception):
  pass



# Every mechanism trains the custom regression task. Those with an engine or
# accounting of their own run in `make test`; the aggregators that only
# clip and noise differently are slow (`pytest -m slow`).
# (gaussian_fixed trains it on every engine in RegressionTest.)
_MECHANISMS_WITH_OWN_ENGINES = (
    ('dp_ftrl_tree', 'dp_ftrl_tree', {'sampling': 'full'}),
    ('banded_mf', 'banded_mf', {'sampling': 'full'}),
    ('secure_gaussian', 'secure_gaussian', {}),
    ('distributed_dp', 'distributed_dp', {'sampling': 'uniform'}),
)
_MECHANISMS_CLIPPING_AND_NOISE = (
    ('per_layer', 'gaussian_fixed', {'clipping': 'per_layer_uniform'}),
    ('client_noise', 'gaussian_fixed', {'noise_placement': 'client'}),
    ('adaptive', 'gaussian_adaptive', {}),
    ('laplace', 'laplace', {}),
    ('centered_clipping', 'gaussian_fixed',
     {'robust_rule': 'centered_clipping'}),
)


class _RegressionData(parameterized.TestCase):
  """A class's regression data file, its run configs and runs."""

  _path = None

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls._directory = os.path.join(absltest.get_default_test_tmpdir(),
                                  cls.__name__)
    os.makedirs(cls._directory, exist_ok=True)
    cls._path = os.path.join(cls._directory, 'train.sqlite')
    custom.write_client_data(cls._path, *_regression_examples(),
                             overwrite=True)

  @classmethod
  def tearDownClass(cls):
    shutil.rmtree(cls._directory)
    super().tearDownClass()

  def _config(self, **values):
    settings = dict(
        task='custom', data_path=self._path, model=_REGRESSION_MODEL,
        loss='mse', rounds=2, clients_per_round=8, noise_multiplier=0.1,
        clip=1.0, client_lr=0.1, eval_every=1, engine='inprocess', seed=1)
    settings.update(values)
    return run_config.with_defaults(**settings)

  def _run(self, config, output_dir, **run_args):
    task = training_flags.build_task_or_exit(config)
    plan = runner.PrivacyPlan.build(
        config, len(task.train_data.client_ids), task.update_dimension)
    with runner.execution_context(config):
      return runner.Runner(task).run(plan, output_dir, {}, **run_args)

  def _check_trains(self, aggregator, extra):
    summary = self._run(
        self._config(aggregator=aggregator, engine='auto', **extra),
        self.create_tempdir().full_path)
    self.assertEqual(summary.rounds_completed, 2)
    self.assertTrue(np.isfinite(summary.eval_loss))
    self.assertBetween(summary.epsilon, 0.0, 1e6)


class RegressionTest(_RegressionData):
  """--loss=mse: float labels, a mean squared error, no accuracy; on every
  engine, resumed, in a study and in privacy_report."""

  def test_labels_are_float_rows_and_the_loss_their_squared_error(self):
    task = custom.build_task(self._path, _REGRESSION_MODEL, loss='mse')
    self.assertTrue(task.regression)
    client = task.train_data.client_ids[0]
    _, labels = base.all_examples(
        task.train_data.create_tf_dataset_for_client(client))
    self.assertEqual(labels.dtype, tf.float32)
    self.assertEqual(labels.shape[1], 2)
    self.assertIsInstance(task.loss_fn(), tf.keras.losses.MeanSquaredError)
    with self.assertRaisesRegex(
        custom.CustomTaskError, 'not integer classes .* --loss=mse'):
      custom.build_task(self._path, _REGRESSION_MODEL)

  def test_label_values_must_match_the_outputs(self):
    ids, features, labels = _regression_examples()
    path = os.path.join(self.create_tempdir().full_path, 'three.npz')
    np.savez(path, client_id=ids, x=features, y=np.ones((len(ids), 3)))
    with self.assertRaisesRegex(
        custom.CustomTaskError,
        '3 label values; the model has 2 outputs') as raised:
      custom.build_task(path, _REGRESSION_MODEL, loss='mse')
    self.assertIn(path, str(raised.exception))
    del labels

  def test_every_engine_trains_it_to_the_same_losses(self):
    summaries = {
        engine: self._run(self._config(engine=engine),
                          self.create_tempdir().full_path)
        for engine in ('inprocess', 'standard', 'vectorized')}
    task = training_flags.build_task_or_exit(self._config())
    model = task.keras_model_fn()
    model.compile(loss=task.loss_fn())
    initial_loss = np.mean([
        model.evaluate(dataset, verbose=0)
        for dataset in task.eval_client_datasets()])
    reference = summaries['inprocess']
    self.assertIsNone(reference.eval_accuracy)
    self.assertLess(reference.eval_loss, initial_loss)
    for engine, summary in summaries.items():
      for a, b in zip(reference.results, summary.results):
        self.assertAlmostEqual(a.train_loss, b.train_loss, places=4,
                               msg=engine)
        self.assertAlmostEqual(a.eval_loss, b.eval_loss, places=4, msg=engine)
      self.assertEqual(reference.epsilon, summary.epsilon)

  @parameterized.named_parameters(*_MECHANISMS_WITH_OWN_ENGINES)
  def test_mechanisms_with_their_own_engine_or_accounting(self, aggregator,
                                                          extra):
    self._check_trains(aggregator, extra)

  def test_label_flip_is_refused(self):
    config = self._config(robust_rule='median', attack='label_flip',
                          byzantine_fraction=0.1)
    task = training_flags.build_task_or_exit(config)
    errors = []

    def record(message):
      errors.append(message)
      raise _Interrupted()

    with self.assertRaises(_Interrupted):
      runner.plan_or_exit(config, task, record)
    self.assertIn('--attack=label_flip flips class labels', errors[0])

  def test_sweep_compares_the_loss_and_privacy_report_reads_the_population(
      self):
    output_dir = self.create_tempdir().full_path
    task_flags = (f'--data_path={self._path}', '--task=custom',
                  f'--model={_REGRESSION_MODEL}', '--loss=mse',
                  '--clients_per_round=8', '--rounds=2')
    swept = binaries.run(
        'sweep_epsilon', *task_flags, '--noise_multipliers=0.5',
        '--engine=inprocess', f'--output_dir={output_dir}')
    self.assertEqual(swept.returncode, 0, swept.stderr[-3000:])
    self.assertIn('no-DP test loss (mean squared error):', swept.stdout)
    with open(os.path.join(output_dir, 'results.csv')) as f:
      (row,) = list(csv.DictReader(f))
    self.assertEqual(row['eval_accuracy'], '')
    self.assertGreater(float(row['eval_loss']), 0)

    report = binaries.run('privacy_report', *task_flags,
                          '--noise_multiplier=0.5')
    self.assertEqual(report.returncode, 0, report.stderr[-3000:])
    population = len(custom.build_task(
        self._path, _REGRESSION_MODEL, loss='mse').train_data.client_ids)
    self.assertEqual(population, 27)  # 30 clients, a tenth held out.
    self.assertIn(f'sampling of 8 of {population} clients', report.stdout)


@pytest.mark.slow
class RegressionMechanismsTest(_RegressionData):
  """The rest of the mechanisms on the custom regression task, and its
  resumption (which tests/experiments/train_test.py checks on digits)."""

  @parameterized.named_parameters(*_MECHANISMS_CLIPPING_AND_NOISE)
  def test_mechanism_trains_it(self, aggregator, extra):
    self._check_trains(aggregator, extra)

  def test_an_interrupted_run_resumes_to_the_same_metrics(self):
    whole, interrupted = (self.create_tempdir().full_path for _ in range(2))
    config = self._config(engine='standard')
    self._run(config, whole)

    def interrupt(round_num, *unused):
      if round_num == 2:
        raise _Interrupted()

    with self.assertRaises(_Interrupted):
      self._run(config, interrupted, checkpoint_every=1,
                inspect_round=interrupt)
    self._run(config, interrupted, resume=True, checkpoint_every=1)

    def metrics(output_dir):
      with open(os.path.join(output_dir, 'metrics.csv')) as f:
        return [(r['round'], r['train_loss'], r['eval_loss'], r['epsilon'])
                for r in csv.DictReader(f)]

    self.assertEqual(metrics(interrupted), metrics(whole))


class SameAsBuiltInTest(absltest.TestCase):

  def test_digits_as_a_custom_task_trains_to_the_same_metrics(self):
    # The built-in task's clients and evaluation clients written as files,
    # its model named by module:function: the same cohorts, batches, initial
    # weights and noise, so the same losses, accuracy and epsilon. Ids are
    # zero-padded: a custom task orders its clients by id.
    digits = tasks.build_task('digits')
    directory = self.create_tempdir().full_path

    def write(data, name):
      ids, xs, ys = [], [], []
      for client in data.client_ids:
        x, y = base.all_examples(data.create_tf_dataset_for_client(client))
        ids.extend([f'{int(client):03d}'] * len(y))
        xs.append(x.numpy())
        ys.append(y.numpy())
      path = os.path.join(directory, name)
      custom.write_client_data(path, ids, np.concatenate(xs),
                               np.concatenate(ys))
      return path

    config = run_config.with_defaults(
        task='digits', rounds=2, clients_per_round=10, noise_multiplier=0.5,
        engine='inprocess')
    custom_config = config.replace(
        task='custom', data_path=write(digits.train_data, 'train.sqlite'),
        test_data_path=write(digits.eval_data, 'test.sqlite'),
        model='dp_fedavg.tasks.digits:keras_model')
    summaries = []
    for task_config in (config, custom_config):
      task = training_flags.build_task_or_exit(task_config)
      plan = runner.PrivacyPlan.build(
          task_config, len(task.train_data.client_ids), task.update_dimension)
      with runner.execution_context(task_config):
        summaries.append(runner.Runner(task).run(
            plan, self.create_tempdir().full_path, {}))
    built_in, own = summaries
    for a, b in zip(built_in.results, own.results):
      self.assertAlmostEqual(a.train_loss, b.train_loss, places=5)
      self.assertAlmostEqual(a.eval_loss, b.eval_loss, places=5)
      self.assertEqual(a.eval_accuracy, b.eval_accuracy)
      self.assertEqual(a.epsilon, b.epsilon)


if __name__ == '__main__':
  absltest.main()
