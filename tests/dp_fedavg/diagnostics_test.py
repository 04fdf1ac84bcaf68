import numpy as np
import tensorflow as tf
import tensorflow_federated as tff

from dp_fedavg import diagnostics
from dp_fedavg import process
from dp_fedavg.tasks import digits


class UpdateNormProbeTest(tf.test.TestCase):

  def test_norms_are_those_of_each_clients_fedavg_delta(self):
    task = digits.build_task(num_clients=4, seed=1)
    datasets = [
        task.preprocess(task.train_data.create_tf_dataset_for_client(c), 1, 8, 0)
        for c in task.train_data.client_ids[:2]
    ]
    # A server step of 1 without momentum applies the mean delta as it is,
    # so a one-client round's model change is that client's delta.
    fed_avg = process.build_process(task.model_fn, None, 0.3, 1.0, 0.0)
    state = fed_avg.initialize()
    start = fed_avg.get_model_weights(state)
    probe = diagnostics.UpdateNormProbe(task.model_fn, 0.3)
    norms = probe(start, datasets)
    self.assertEqual(norms.shape, (2, 4))
    for client, dataset in enumerate(datasets):
      after = fed_avg.get_model_weights(fed_avg.next(state, [dataset]).state)
      expected = [
          np.linalg.norm(np.asarray(a) - np.asarray(b))
          for a, b in zip(start.trainable, after.trainable)
      ]
      self.assertAllClose(norms[client], expected, rtol=1e-5)
    self.assertNotAllClose(norms[0], norms[1])

  def test_no_clients_no_rows(self):
    task = digits.build_task(num_clients=4)
    probe = diagnostics.UpdateNormProbe(task.model_fn, 0.3)
    fed_avg = tff.learning.algorithms.build_unweighted_fed_avg(
        task.model_fn, tff.learning.optimizers.build_sgdm(0.3)
    )
    weights = fed_avg.get_model_weights(fed_avg.initialize())
    self.assertEqual(probe(weights, []).shape, (0, 4))


if __name__ == '__main__':
  tf.test.main()
