from absl.testing import parameterized
import numpy as np
import tensorflow as tf

from dp_fedavg import tasks
from dp_fedavg.tasks import digits

_DIGITS_EXAMPLES = 1797


def _client_sizes_of(client_data):
  return [
      sum(1 for _ in client_data.create_tf_dataset_for_client(c))
      for c in client_data.client_ids
  ]


def _client_sizes(task):
  return _client_sizes_of(task.train_data)


class DigitsTaskTest(tf.test.TestCase, parameterized.TestCase):

  @parameterized.parameters('iid', 'dirichlet', 'sorted')
  def test_partition_covers_train_split_with_no_empty_client(self, partition):
    task = digits.build_task(
        num_clients=40, partition=partition, dirichlet_alpha=0.05, seed=1
    )
    sizes = _client_sizes(task)
    num_eval = sum(_client_sizes_of(task.eval_data))
    self.assertLen(sizes, 40)
    self.assertEqual(sum(sizes) + num_eval, _DIGITS_EXAMPLES)
    self.assertEqual(num_eval, round(0.2 * _DIGITS_EXAMPLES))
    self.assertGreater(min(sizes), 0)
    self.assertGreater(min(_client_sizes_of(task.eval_data)), 0)
    self.assertLen(task.eval_data.client_ids, 10)  # 40 * 359 / 1438 clients.

  def test_dirichlet_skews_labels_more_than_iid(self):
    def mean_distinct_labels(partition):
      task = digits.build_task(
          num_clients=30, partition=partition, dirichlet_alpha=0.1, seed=2
      )
      return np.mean([
          len({int(y) for _, y in task.train_data.create_tf_dataset_for_client(c)})
          for c in task.train_data.client_ids
      ])

    self.assertLess(mean_distinct_labels('dirichlet'), mean_distinct_labels('iid') - 2)

  def test_sorted_partition_gives_each_client_one_or_two_labels(self):
    # 30 consecutive shares of ~48 label-sorted examples; each class has
    # ~144, so a share spans at most two classes.
    task = digits.build_task(num_clients=30, partition='sorted', seed=2)
    distinct = [
        len({int(y) for _, y in task.train_data.create_tf_dataset_for_client(c)})
        for c in task.train_data.client_ids
    ]
    self.assertLessEqual(max(distinct), 2)

  def test_examples_are_scaled_images_with_labels(self):
    task = digits.build_task(num_clients=10)
    x, y = next(iter(task.train_data.create_tf_dataset_for_client('0')))
    self.assertEqual(x.shape, (64,))
    self.assertEqual(x.dtype, tf.float32)
    self.assertBetween(float(tf.reduce_min(x)), 0.0, 1.0)
    self.assertBetween(float(tf.reduce_max(x)), 0.0, 1.0)
    self.assertBetween(int(y), 0, 9)

  def test_model_fn_matches_input_spec(self):
    task = digits.build_task(num_clients=5)
    batch = next(iter(task.eval_client_datasets(batch_size=4)[0]))
    self.assertTrue(task.input_spec[0].is_compatible_with(batch[0]))
    self.assertEqual(task.keras_model_fn()(batch[0]).shape, (4, 10))

  @parameterized.named_parameters(
      ('too_many_clients', dict(num_clients=5000), 'num_clients'),
      ('zero_clients', dict(num_clients=0), 'num_clients'),
      ('unknown_partition', dict(partition='shards'), 'partition'),
      ('bad_alpha', dict(dirichlet_alpha=0.0), 'dirichlet_alpha'),
      ('bad_heldout', dict(heldout_fraction=1.0), 'heldout_fraction'),
  )
  def test_invalid_arguments_raise(self, kwargs, message):
    with self.assertRaisesRegex(ValueError, message):
      digits.build_task(**kwargs)

  def test_registry(self):
    self.assertIn('digits', tasks.TASK_NAMES)
    with self.assertRaisesRegex(ValueError, 'unknown task'):
      tasks.build_task('mnist')


if __name__ == '__main__':
  tf.test.main()
