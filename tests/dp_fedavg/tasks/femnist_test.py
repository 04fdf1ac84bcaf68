import os

from absl.testing import absltest
import numpy as np
import tensorflow as tf
import tensorflow_federated as tff

from dp_fedavg import tasks
from dp_fedavg.tasks import femnist
from tests.dp_fedavg.tasks import shared_data

_EXAMPLES = 18_796
_WRITERS = 184


def _size(data, client_id):
  return sum(1 for _ in data.create_tf_dataset_for_client(client_id))


class FemnistTest(absltest.TestCase):

  def test_missing_file_names_the_path(self):
    missing = self.create_tempdir().full_path
    with self.assertRaisesRegex(
        tasks.DataNotFoundError,
        os.path.join(missing, femnist.FILE_NAME) + '.*--data_dir',
    ):
      femnist.build_task(data_dir=missing)

  def test_tff_source_maps_emnist_elements_to_examples(self):
    def fake_emnist(only_digits, cache_dir):
      self.assertFalse(only_digits)
      self.assertEqual(cache_dir, '/cache')
      data = tff.simulation.datasets.TestClientData({
          f'w{i}': {'pixels': np.full((3, 28, 28), i, np.float32),
                    'label': np.arange(3, dtype=np.int32)}
          for i in range(4)
      })
      return data, data

    original = tff.simulation.datasets.emnist.load_data
    tff.simulation.datasets.emnist.load_data = fake_emnist
    try:
      task = femnist.build_task(data_dir='/cache', data_source='tff', num_clients=2)
    finally:
      tff.simulation.datasets.emnist.load_data = original
    self.assertEqual(task.train_data.client_ids, ['w0', 'w1'])
    x, y = next(iter(task.train_data.create_tf_dataset_for_client('w1')))
    self.assertEqual(x.shape, (28, 28, 1))
    self.assertEqual(float(x[0, 0, 0]), 1.0)
    self.assertEqual(y.dtype, tf.int32)


@shared_data.require('femnist_sample')
class SharedFemnistTest(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.task = femnist.build_task(seed=0)

  def test_every_example_is_in_one_writer_split(self):
    train, test = self.task.train_data, self.task.eval_data
    self.assertLen(train.client_ids, _WRITERS)
    train_sizes = [_size(train, c) for c in train.client_ids]
    test_sizes = [_size(test, c) for c in test.client_ids]
    self.assertEqual(sum(train_sizes) + sum(test_sizes), _EXAMPLES)
    self.assertGreater(min(train_sizes), 0)
    # Test clients are writers, holding 20% of their examples, rounded down.
    self.assertContainsSubset(test.client_ids, train.client_ids)
    for client in test.client_ids[:20]:
      whole = _size(train, client) + _size(test, client)
      self.assertEqual(_size(test, client), int(0.2 * whole))

  def test_examples_are_28x28x1_with_62_classes(self):
    x, y = next(iter(self.task.train_data.create_tf_dataset_for_client('0')))
    self.assertEqual(x.shape, (28, 28, 1))
    self.assertBetween(float(tf.reduce_max(x)), 0.0, 1.0)
    self.assertBetween(int(y), 0, 61)
    self.assertEqual(self.task.keras_model_fn()(x[None]).shape, (1, 62))

  def test_silos_pool_every_writers_training_examples(self):
    task = femnist.build_task(seed=0, silos=2)
    self.assertEqual(task.train_data.client_ids, ['silo0', 'silo1'])
    sizes = task.examples_per_client
    self.assertEqual(
        int(sizes.sum()), int(self.task.examples_per_client.sum()))
    self.assertLessEqual(abs(int(sizes[0]) - int(sizes[1])), 1)
    # Evaluation is still each writer's held-out characters.
    self.assertEqual(task.eval_data.client_ids, self.task.eval_data.client_ids)

  def test_first_writers_subset(self):
    task = femnist.build_task(num_clients=5)
    self.assertEqual(task.train_data.client_ids, ['0', '1', '2', '3', '4'])
    with self.assertRaisesRegex(ValueError, 'at most the 184'):
      femnist.build_task(num_clients=185)


if __name__ == '__main__':
  absltest.main()
