from absl.testing import parameterized
import dp_accounting
import numpy as np
import tensorflow as tf

from aggregators import gaussian
from aggregators import laplace
from dp_fedavg import accounting
from dp_fedavg import loop
from dp_fedavg import process
from dp_fedavg import sampling
from dp_fedavg.tasks import digits

_NUM_CLIENTS = 100
_COHORT = 20


class DpFedAvgProcessTest(tf.test.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    tf.keras.utils.set_random_seed(0)
    cls.task = digits.build_task(num_clients=_NUM_CLIENTS, seed=0)
    # Noise 0 with a clip: the DP code path, minus the noise.
    cls.process = process.build_process(
        cls.task.model_fn,
        gaussian.GaussianFactory(0.0, 1.0, _COHORT, noise_seed=0),
        client_learning_rate=0.3,
        server_learning_rate=1.0,
        server_momentum=0.9,
    )

  def test_learns_digits_without_noise(self):
    results = []
    accountant = accounting.PrivacyAccountant(
        sampling.SamplingScheme.UNIFORM, _NUM_CLIENTS, _COHORT, 1e-5
    )
    outcome = loop.run_training(
        self.process,
        self.task,
        sampling.ClientSampler('uniform', _NUM_CLIENTS, _COHORT, seed=0),
        accountant,
        gaussian.dp_event_from_state,
        process.FederatedEvaluator(
            self.task.model_fn, self.task.eval_client_datasets()
        ),
        rounds=30,
        local_epochs=2,
        batch_size=8,
        eval_every=30,
        on_round=results.append,
    )
    self.assertLen(results, 30)
    self.assertEqual(outcome.rounds_completed, 30)
    self.assertEqual([r.round for r in results], list(range(1, 31)))
    self.assertGreaterEqual(results[-1].eval_accuracy, 0.85)
    self.assertIsNone(results[0].eval_accuracy)
    self.assertTrue(all(r.cohort_size == _COHORT for r in results))
    self.assertEqual(results[-1].epsilon, float('inf'))  # Noise 0.

  def test_nonfinite_client_update_does_not_poison_model(self):
    state = self.process.initialize()
    before = self.process.get_model_weights(state).trainable
    healthy = [
        self.task.preprocess(
            self.task.train_data.create_tf_dataset_for_client(c), 1, 8, seed=0
        )
        for c in ('0', '1')
    ]
    poisoned = self.task.preprocess(
        tf.data.Dataset.from_tensor_slices((
            np.full([8, 64], np.nan, np.float32), np.zeros([8], np.int32)
        )),
        1, 8, seed=0,
    )
    output = self.process.next(state, healthy + [poisoned])
    after = self.process.get_model_weights(output.state).trainable
    # TFF's client work zeroes a non-finite delta before it leaves the client
    # (so the aggregator's own drop-and-count, tested in gaussian_test, sees
    # none here). With the mean's fixed denominator a zero update changes
    # nothing: the model is exactly the one the healthy clients alone give.
    healthy_only = self.process.get_model_weights(
        self.process.next(state, healthy).state
    ).trainable
    for poisoned_run, healthy_run in zip(after, healthy_only):
      self.assertAllEqual(poisoned_run, healthy_run)
    for weights in after:
      self.assertTrue(np.all(np.isfinite(weights)))
    self.assertTrue(
        any(not np.array_equal(b, a) for b, a in zip(before, after)),
        'the healthy clients should still move the model',
    )

  def test_target_epsilon_stops_before_the_round_that_would_exceed_it(self):
    # The loop decides from the accountant and the round's event alone; an
    # event of z=2 is given for this noiseless process to exercise it.
    event = dp_accounting.GaussianDpEvent(2.0)
    accountant = accounting.PrivacyAccountant(
        sampling.SamplingScheme.POISSON, _NUM_CLIENTS, _COHORT, 1e-5
    )
    reference = accounting.PrivacyAccountant(
        sampling.SamplingScheme.POISSON, _NUM_CLIENTS, _COHORT, 1e-5
    )
    target = 0.9
    allowed = reference.rounds_within_budget(event, target, max_rounds=10)
    self.assertBetween(allowed, 1, 9)
    results = []
    outcome = loop.run_training(
        self.process,
        self.task,
        sampling.ClientSampler('poisson', _NUM_CLIENTS, _COHORT, seed=1),
        accountant,
        lambda state: event,
        lambda weights: {'loss': 0.0, 'accuracy': 0.0},
        rounds=10,
        local_epochs=1,
        batch_size=8,
        eval_every=10,
        target_epsilon=target,
        on_round=results.append,
    )
    self.assertEqual(outcome.rounds_completed, allowed)
    self.assertLen(results, allowed)
    self.assertIn(f'before round {allowed + 1}', outcome.stop_reason)
    self.assertLessEqual(results[-1].epsilon, target)
    self.assertGreater(accountant.epsilon_after_round(event), target)

  def test_dp_event_is_the_factorys_noise_multiplier(self):
    state = self.process.initialize()
    self.assertEqual(
        gaussian.dp_event_from_state(state.aggregator),
        dp_accounting.GaussianDpEvent(0.0),
    )


class EveryAggregatorTrainsTest(tf.test.TestCase, parameterized.TestCase):
  """Three DP-FedAvg rounds on digits with each aggregator and clipping."""

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.task = digits.build_task(num_clients=_NUM_CLIENTS, seed=0)

  @parameterized.named_parameters(
      ('fixed_flat', lambda: gaussian.GaussianFactory(1.0, 1.0, _COHORT)),
      ('fixed_per_layer_uniform', lambda: gaussian.GaussianFactory(
          1.0, 1.0, _COHORT, clipping='per_layer_uniform')),
      ('fixed_per_layer_adaptive', lambda: gaussian.GaussianFactory(
          1.0, 1.0, _COHORT, clipping='per_layer_adaptive')),
      ('adaptive_flat', lambda: gaussian.GaussianFactory(
          1.0, 0.5, _COHORT, adaptive=gaussian.AdaptiveClipping())),
      ('adaptive_per_layer_adaptive', lambda: gaussian.GaussianFactory(
          1.0, 0.5, _COHORT, clipping='per_layer_adaptive',
          adaptive=gaussian.AdaptiveClipping())),
      ('client_noise', lambda: gaussian.GaussianFactory(
          1.0, 1.0, _COHORT, noise_placement='client')),
      ('laplace', lambda: laplace.LaplaceFactory(0.5, 1.0, _COHORT)),
  )
  def test_three_rounds(self, make_factory):
    factory = make_factory()
    learning_process = process.build_process(
        self.task.model_fn, factory, 0.3, 1.0, 0.9
    )
    event_fn = (
        laplace.dp_event_from_state
        if isinstance(factory, laplace.LaplaceFactory)
        else gaussian.dp_event_from_state
    )
    accountant = accounting.PrivacyAccountant(
        sampling.SamplingScheme.POISSON, _NUM_CLIENTS, _COHORT, 1e-5
    )
    results = []
    outcome = loop.run_training(
        learning_process, self.task,
        sampling.ClientSampler('poisson', _NUM_CLIENTS, _COHORT, seed=0),
        accountant, event_fn,
        lambda weights: {'loss': 0.0, 'accuracy': 0.0},
        rounds=3, local_epochs=1, batch_size=8, eval_every=3,
        on_round=results.append,
    )
    self.assertEqual(outcome.rounds_completed, 3)
    epsilons = [r.epsilon for r in results]
    self.assertEqual(epsilons, sorted(epsilons))
    self.assertTrue(all(0 < e < float('inf') for e in epsilons))
    for weights in learning_process.get_model_weights(outcome.state).trainable:
      self.assertTrue(np.all(np.isfinite(weights)))


if __name__ == '__main__':
  tf.test.main()
