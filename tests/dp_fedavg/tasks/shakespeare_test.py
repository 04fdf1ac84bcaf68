import os

from absl.testing import absltest
import numpy as np
import tensorflow as tf
import tensorflow_federated as tff

from dp_fedavg import tasks
from dp_fedavg.tasks import base
from dp_fedavg.tasks import shakespeare
from tests.dp_fedavg.tasks import shared_data


class TokenizeTest(absltest.TestCase):

  def test_snippet_is_wrapped_padded_and_cut_like_tff(self):
    pieces = shakespeare.tokenize(b'ab' * 50)  # 100 chars + BOS + EOS = 102.
    self.assertEqual(pieces.shape, (2, 81))
    self.assertEqual(pieces[0, 0], shakespeare.BOS)
    self.assertEqual(pieces[1, 102 - 81 - 1], shakespeare.EOS)
    self.assertTrue(np.all(pieces[1, 102 - 81:] == shakespeare.PAD))
    vocab = shakespeare.tff_preprocessing.CHAR_VOCAB
    self.assertEqual(pieces[0, 1], vocab.index('a') + 1)

  def test_unknown_byte_is_oov(self):
    self.assertEqual(shakespeare.tokenize('é'.encode())[0, 1], shakespeare.OOV)

  def test_masked_accuracy_ignores_padding(self):
    metric = shakespeare.MaskedAccuracy()
    logits = tf.one_hot([[3, 3, 3]], depth=shakespeare.VOCAB_SIZE)
    metric.update_state(tf.constant([[3, 5, shakespeare.PAD]]), logits)
    self.assertAlmostEqual(float(metric.result()), 0.5)

  def test_tff_source_tokenizes_like_the_local_one(self):
    snippets = [b'To be, or not to be' * 5, b'Ay \xc3\xa9 me!']

    def fake_load_data(cache_dir):
      self.assertEqual(cache_dir, '/cache')
      data = tff.simulation.datasets.TestClientData(
          {'ROMEO': {'snippets': snippets}, 'JULIET': {'snippets': snippets[:1]}}
      )
      return data, data

    original = tff.simulation.datasets.shakespeare.load_data
    tff.simulation.datasets.shakespeare.load_data = fake_load_data
    try:
      task = shakespeare.build_task(
          data_dir='/cache', data_source='tff', num_clients=1
      )
    finally:
      tff.simulation.datasets.shakespeare.load_data = original
    self.assertLen(task.train_data.client_ids, 1)
    client = task.train_data.client_ids[0]
    examples = list(task.train_data.create_tf_dataset_for_client(client))
    expected = np.concatenate([shakespeare.tokenize(s) for s in snippets])
    self.assertLen(examples, len(expected))
    for (x, y), piece in zip(examples, expected):
      np.testing.assert_array_equal(x, piece[:-1])
      np.testing.assert_array_equal(y, piece[1:])

  def test_missing_files_name_the_path(self):
    missing = self.create_tempdir().full_path
    with self.assertRaisesRegex(
        tasks.DataNotFoundError,
        os.path.join(missing, 'shakespeare_train.h5') + '.*--data_dir',
    ):
      shakespeare.build_task(data_dir=missing)


@shared_data.require('shakespeare')
class SharedShakespeareTest(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.task = shakespeare.build_task()

  def test_client_and_snippet_counts_are_tffs(self):
    self.assertLen(self.task.train_data.client_ids, 715)
    self.assertLen(self.task.eval_data.client_ids, 715)
    # Every snippet starts exactly one piece with BOS. (Each client's pieces
    # are read as one batch: one at a time, this test took a minute.)
    bos = 0
    for client_id in self.task.train_data.client_ids:
      x, _ = base.all_examples(
          self.task.train_data.create_tf_dataset_for_client(client_id))
      bos += int(np.sum(x[:, 0].numpy() == shakespeare.BOS))
    self.assertEqual(bos, 16_068)

  def test_examples_are_shifted_sequences(self):
    client = self.task.train_data.client_ids[0]
    x, y = next(iter(self.task.train_data.create_tf_dataset_for_client(client)))
    self.assertEqual(x.shape, (80,))
    np.testing.assert_array_equal(x[1:], y[:-1])
    self.assertEqual(self.task.keras_model_fn()(x[None]).shape,
                     (1, 80, shakespeare.VOCAB_SIZE))

  def test_first_clients_subset(self):
    task = shakespeare.build_task(num_clients=3)
    self.assertEqual(
        task.train_data.client_ids, self.task.train_data.client_ids[:3]
    )
    with self.assertRaisesRegex(ValueError, 'at most the 715'):
      shakespeare.build_task(num_clients=716)


if __name__ == '__main__':
  absltest.main()
