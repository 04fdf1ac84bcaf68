import os
import pickle

from absl.testing import absltest
from absl.testing import parameterized
import numpy as np

from dp_fedavg import tasks
from dp_fedavg.tasks import cifar10

_PER_BATCH = 12
_TEST = 10


def _write_batch(path, labels, rng):
  """A batch in CIFAR-10's python format: rows of 1024 R, G, B values."""
  data = rng.integers(0, 256, size=(len(labels), 3072), dtype=np.uint8)
  with open(path, 'wb') as f:
    pickle.dump({b'data': data, b'labels': list(labels), b'batch_label': b'x'}, f)
  return data


class Cifar10Test(parameterized.TestCase):

  def setUp(self):
    super().setUp()
    self.data_dir = self.create_tempdir().full_path
    rng = np.random.default_rng(0)
    self.first_rows = _write_batch(
        os.path.join(self.data_dir, 'data_batch_1'),
        np.arange(_PER_BATCH) % 10, rng,
    )
    for i in range(2, 6):
      _write_batch(
          os.path.join(self.data_dir, f'data_batch_{i}'),
          np.arange(_PER_BATCH) % 10, rng,
      )
    _write_batch(
        os.path.join(self.data_dir, 'test_batch'), np.arange(_TEST) % 10, rng
    )

  def test_reads_channel_planes_into_hwc_images(self):
    images, labels = cifar10.read_batch(
        os.path.join(self.data_dir, 'data_batch_1')
    )
    self.assertEqual(images.shape, (_PER_BATCH, 32, 32, 3))
    row = self.first_rows[0]
    # Pixel (row 1, column 2) of channel c is at c * 1024 + 1 * 32 + 2.
    for channel in range(3):
      self.assertEqual(images[0, 1, 2, channel], row[channel * 1024 + 34])
    np.testing.assert_array_equal(labels, np.arange(_PER_BATCH) % 10)

  @parameterized.parameters('iid', 'dirichlet')
  def test_split_covers_training_images(self, partition):
    task = cifar10.build_task(
        data_dir=self.data_dir, num_clients=6, partition=partition
    )
    sizes = [
        sum(1 for _ in task.train_data.create_tf_dataset_for_client(c))
        for c in task.train_data.client_ids
    ]
    self.assertEqual(sum(sizes), 5 * _PER_BATCH)
    self.assertGreater(min(sizes), 0)
    evaluated = sum(
        sum(1 for _ in task.eval_data.create_tf_dataset_for_client(c))
        for c in task.eval_data.client_ids
    )
    self.assertEqual(evaluated, _TEST)
    x, _ = next(iter(task.eval_data.create_tf_dataset_for_client('0')))
    self.assertEqual(x.shape, (32, 32, 3))
    self.assertLessEqual(float(np.max(x)), 1.0)
    self.assertEqual(task.keras_model_fn()(x[None]).shape, (1, 10))

  def test_missing_batch_names_the_path(self):
    os.remove(os.path.join(self.data_dir, 'data_batch_3'))
    with self.assertRaisesRegex(
        tasks.DataNotFoundError,
        os.path.join(self.data_dir, 'data_batch_3') + '.*cifar-10-python',
    ):
      cifar10.build_task(data_dir=self.data_dir)

  def test_no_data_dir_says_how_to_get_the_data(self):
    with self.assertRaisesRegex(tasks.DataNotFoundError, '--data_dir'):
      cifar10.build_task()

  def test_file_that_is_not_a_batch_is_refused(self):
    with open(os.path.join(self.data_dir, 'test_batch'), 'wb') as f:
      pickle.dump([1, 2, 3], f)
    with self.assertRaisesRegex(ValueError, 'not a CIFAR-10 batch'):
      cifar10.build_task(data_dir=self.data_dir)

  def test_tff_source_is_refused(self):
    with self.assertRaisesRegex(ValueError, 'CIFAR-100'):
      cifar10.build_task(data_dir=self.data_dir, data_source='tff')


if __name__ == '__main__':
  absltest.main()
