from absl.testing import absltest
import numpy as np
import tensorflow as tf

from benchmarks import synthetic
from dp_fedavg.tasks import models


class SyntheticTaskTest(absltest.TestCase):

  def test_client_data_is_a_function_of_the_client_id(self):
    task = synthetic.build_task(num_clients=100_000, examples_per_client=4)
    self.assertLen(task.train_data.client_ids, 100_000)
    first = list(task.train_data.create_tf_dataset_for_client('99999'))
    again = list(task.train_data.create_tf_dataset_for_client('99999'))
    other = list(task.train_data.create_tf_dataset_for_client('7'))
    self.assertLen(first, 4)
    for (x, y), (x2, y2) in zip(first, again):
      np.testing.assert_array_equal(x, x2)
      self.assertEqual(int(y), int(y2))
    self.assertFalse(np.array_equal(first[0][0], other[0][0]))
    self.assertEqual(first[0][0].shape, (synthetic.FEATURES,))

  def test_training_flops_count_dense_and_conv_layers(self):
    mlp = synthetic.build_task(10).keras_model_fn()
    self.assertEqual(
        synthetic.training_flops_per_example(mlp),
        3 * 2 * (784 * 200 + 200 * 10),
    )
    cnn = models.group_norm_cnn((28, 28, 1), 62)
    conv = 2 * (24 * 24 * 16 * 5 * 5 * 1 + 8 * 8 * 32 * 5 * 5 * 16)
    dense = 2 * (512 * 120 + 120 * 84 + 84 * 62)
    self.assertEqual(synthetic.training_flops_per_example(cnn), 3 * (conv + dense))

  def test_training_flops_count_recurrent_steps_and_per_step_dense(self):
    gru = tf.keras.Sequential([
        tf.keras.layers.InputLayer(input_shape=(80,), dtype=tf.int32),
        tf.keras.layers.Embedding(90, 8),
        tf.keras.layers.GRU(128, return_sequences=True),
        tf.keras.layers.Dense(90),
    ])
    recurrent = 2 * 80 * (8 * 384 + 128 * 384)
    dense = 2 * 80 * 128 * 90
    self.assertEqual(
        synthetic.training_flops_per_example(gru), 3 * (recurrent + dense))


if __name__ == '__main__':
  absltest.main()
