from absl.testing import parameterized
import dp_accounting
import numpy as np
import tensorflow as tf

from aggregators import gaussian
from aggregators import registry
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
    ledger = accounting.PrivacyLedger(
        accounting.SampledRounds(
            gaussian.round_dp_event(0.0), gaussian.dp_event_from_state
        ),
        sampling.SamplingScheme.UNIFORM, _NUM_CLIENTS, _COHORT, 1e-5,
    )
    outcome = loop.run_training(
        self.process,
        self.task,
        sampling.ClientSampler('uniform', _NUM_CLIENTS, _COHORT, seed=0),
        ledger,
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

  def test_each_rounds_client_data_is_built_once_from_its_plan(self):
    # The loop builds round r + 1's client data while round r trains; each
    # round must still get the data of its own cohort and shuffle seed.
    calls = []
    standard = loop.standard_client_data(self.task, 1, 8)

    def client_data(cohort, shuffle_seed, byzantine_count):
      calls.append((list(cohort), shuffle_seed, byzantine_count))
      return standard(cohort, shuffle_seed, byzantine_count)

    sampler = sampling.ClientSampler('poisson', _NUM_CLIENTS, _COHORT, seed=3)
    ledger = accounting.PrivacyLedger(
        accounting.SampledRounds(
            gaussian.round_dp_event(1.0), gaussian.dp_event_from_state),
        sampling.SamplingScheme.POISSON, _NUM_CLIENTS, _COHORT, 1e-5,
    )
    results = []
    loop.run_training(
        self.process, self.task, sampler, ledger,
        lambda weights: {'loss': 0.0, 'accuracy': 0.0},
        rounds=4, local_epochs=1, batch_size=8, eval_every=4, seed=5,
        on_round=results.append, client_data_fn=client_data,
    )
    self.assertEqual(calls, [
        (sampler.sample(r).tolist(), loop.round_shuffle_seed(5, r), 0)
        for r in range(1, 5)
    ])
    self.assertEqual([r.cohort_size for r in results],
                     [len(sampler.sample(r)) for r in range(1, 5)])
    # The epsilon computed while each round trained is the ledger's.
    self.assertEqual(results[-1].epsilon, ledger.epsilon())

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
    # The loop decides from the ledger alone; a ledger of z=2 is given for
    # this noiseless process to exercise it.
    event = dp_accounting.GaussianDpEvent(2.0)
    target = 0.9
    # dp-accounting alone: the rounds of z=2 at q=0.2 within the target.
    allowed = 0
    while True:
      reference = dp_accounting.pld.PLDAccountant(
          value_discretization_interval=1e-4
      )
      reference.compose(
          dp_accounting.PoissonSampledDpEvent(_COHORT / _NUM_CLIENTS, event),
          allowed + 1,
      )
      if reference.get_epsilon(1e-5) > target:
        break
      allowed += 1
    self.assertBetween(allowed, 1, 9)
    ledger = accounting.PrivacyLedger(
        accounting.SampledRounds(event, lambda state: event),
        sampling.SamplingScheme.POISSON, _NUM_CLIENTS, _COHORT, 1e-5,
        accounting.AccountantKind.PLD,
    )
    results = []
    outcome = loop.run_training(
        self.process,
        self.task,
        sampling.ClientSampler('poisson', _NUM_CLIENTS, _COHORT, seed=1),
        ledger,
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
    self.assertGreater(ledger.epsilon_if_round(None, [0]), target)

  def test_run_level_ledger_stops_on_the_realised_participation(self):
    """A run-level ledger sees each round's cohort before the round runs."""
    event_of = lambda participation: dp_accounting.GaussianDpEvent(
        2.0 / max(participation.max_participations(), 1) ** 0.5
    )
    sampler = sampling.ClientSampler('uniform', _NUM_CLIENTS, _COHORT, seed=2)
    participation = accounting.Participation()
    for round_num in range(1, 11):
      participation = participation.with_round(sampler.sample(round_num))
      if participation.max_participations() == 3:
        break
    # Two participations of any client fit; a third does not.
    rdp = dp_accounting.rdp.RdpAccountant(
        neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_SPECIAL
    )
    rdp.compose(event_of(accounting.Participation(((0,), (0,)))))
    ledger = accounting.PrivacyLedger(
        accounting.RunLevel(event_of), sampling.SamplingScheme.UNIFORM,
        _NUM_CLIENTS, _COHORT, 1e-5, accounting.AccountantKind.RDP,
    )
    outcome = loop.run_training(
        self.process, self.task, sampler, ledger,
        lambda weights: {'loss': 0.0, 'accuracy': 0.0},
        rounds=10, local_epochs=1, batch_size=8, eval_every=10,
        target_epsilon=rdp.get_epsilon(1e-5) * 1.001,
    )
    self.assertEqual(outcome.rounds_completed, round_num - 1)
    self.assertEqual(ledger.rounds, round_num - 1)

  def test_dp_event_is_the_factorys_noise_multiplier(self):
    state = self.process.initialize()
    self.assertEqual(
        gaussian.dp_event_from_state(state.aggregator),
        dp_accounting.GaussianDpEvent(0.0),
    )


def _reference_epsilon(event, rounds: int, relation) -> float:
  """min(RDP, PLD) of `event` composed `rounds` times, by dp-accounting alone."""
  rdp = dp_accounting.rdp.RdpAccountant(neighboring_relation=relation)
  epsilons = []
  if rdp.supports(event):
    rdp.compose(event, rounds)
    epsilons.append(rdp.get_epsilon(1e-5))
  pld = dp_accounting.pld.PLDAccountant(value_discretization_interval=1e-4)
  if pld.supports(event):
    pld.compose(event, rounds)
    epsilons.append(pld.get_epsilon(1e-5))
  return min(epsilons)


_Q = _COHORT / _NUM_CLIENTS
_ADD_REMOVE = dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE
# Noise multiplier 1 (the defaults) at the test's sampling rate.
_SAMPLED_GAUSSIAN = dp_accounting.PoissonSampledDpEvent(
    _Q, dp_accounting.GaussianDpEvent(1.0)
)


class EveryMechanismTrainsTest(tf.test.TestCase, parameterized.TestCase):
  """Three DP-FedAvg rounds on digits with each mechanism, built from its
  registry entry, and the exact epsilon dp-accounting gives on its own."""

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.task = digits.build_task(num_clients=_NUM_CLIENTS, seed=0)

  @parameterized.named_parameters(
      ('fixed_flat', 'gaussian_fixed', {}, _SAMPLED_GAUSSIAN, _ADD_REMOVE),
      ('fixed_per_layer_uniform', 'gaussian_fixed',
       dict(clipping='per_layer_uniform'), _SAMPLED_GAUSSIAN, _ADD_REMOVE),
      ('fixed_per_layer_adaptive', 'gaussian_fixed',
       dict(clipping='per_layer_adaptive'), _SAMPLED_GAUSSIAN, _ADD_REMOVE),
      # The update and the count share the total z = 1: the same sampled
      # Gaussian of z = 1 (PLD's bound, the tighter here).
      ('adaptive_flat', 'gaussian_adaptive', {}, _SAMPLED_GAUSSIAN,
       _ADD_REMOVE),
      ('adaptive_per_layer_adaptive', 'gaussian_adaptive',
       dict(clipping='per_layer_adaptive'), _SAMPLED_GAUSSIAN, _ADD_REMOVE),
      # Local DP: every round, unsampled, z / 2 under replace-one.
      ('client_noise', 'gaussian_fixed', dict(noise_placement='client'),
       dp_accounting.GaussianDpEvent(0.5),
       dp_accounting.NeighboringRelation.REPLACE_ONE),
      ('laplace', 'laplace', {},
       dp_accounting.PoissonSampledDpEvent(
           _Q, dp_accounting.LaplaceDpEvent(2.0)), _ADD_REMOVE),
  )
  def test_three_rounds(self, name, values, reference_event, relation):
    mechanism = registry.get(name)
    params = mechanism.params(values)
    setting = registry.Setting(expected_clients_per_round=_COHORT, noise_seed=0)
    learning_process = process.build_process(
        self.task.model_fn, mechanism.build_factory(params, setting),
        0.3, 1.0, 0.9,
    )
    ledger = accounting.PrivacyLedger(
        mechanism.build_ledger(params, setting),
        sampling.SamplingScheme.POISSON, _NUM_CLIENTS, _COHORT, 1e-5,
    )
    results = []
    outcome = loop.run_training(
        learning_process, self.task,
        sampling.ClientSampler('poisson', _NUM_CLIENTS, _COHORT, seed=0),
        ledger, lambda weights: {'loss': 0.0, 'accuracy': 0.0},
        rounds=3, local_epochs=1, batch_size=8, eval_every=3,
        on_round=results.append,
    )
    self.assertEqual(outcome.rounds_completed, 3)
    for rounds, result in enumerate(results, start=1):
      self.assertAlmostEqual(
          result.epsilon,
          _reference_epsilon(reference_event, rounds, relation), places=4,
      )
      self.assertEqual(result.adjacency, ledger.adjacency.value)
    for weights in learning_process.get_model_weights(outcome.state).trainable:
      self.assertTrue(np.all(np.isfinite(weights)))


if __name__ == '__main__':
  tf.test.main()
