"""Example-level accounting against dp-accounting and tensorflow-privacy."""

from absl.testing import parameterized
import dp_accounting
from dp_accounting.pld import pld_privacy_accountant
from dp_accounting.rdp import rdp_privacy_accountant
import numpy as np
from tensorflow_privacy.privacy.analysis import compute_dp_sgd_privacy_lib

from dp_fedavg import accounting
from dp_fedavg import dp_sgd
from dp_fedavg import example_privacy
from dp_fedavg import sampling

Kind = accounting.AccountantKind
_DELTA = 1e-5


def _config(noise=1.1, batch=64, epochs=2):
  return dp_sgd.DpSgdConfig(noise, 1.0, 'flat', batch, epochs)


def _ledger(examples, config=None, kind=Kind.AUTO):
  return example_privacy.ExampleLedger(
      config or _config(), examples, sampling.SamplingScheme.POISSON, 2,
      _DELTA, kind)


def _direct(noise, rate, steps):
  """A fresh dp-accounting RDP and PLD epsilon of the DP-SGD steps."""
  event = dp_accounting.SelfComposedDpEvent(
      dp_accounting.PoissonSampledDpEvent(
          rate, dp_accounting.GaussianDpEvent(noise)), steps)
  rdp = rdp_privacy_accountant.RdpAccountant().compose(event)
  pld = pld_privacy_accountant.PLDAccountant(
      value_discretization_interval=1e-4).compose(event)
  return {'rdp': rdp.get_epsilon(_DELTA), 'pld': pld.get_epsilon(_DELTA)}


class ExampleLedgerTest(parameterized.TestCase):

  def test_each_client_is_its_own_steps_composed(self):
    examples = [50, 300, 1000]
    ledger = _ledger(examples)
    for cohort in ([0, 1, 2], [1, 2], [2]):
      ledger.record_round(None, cohort)
    rows = ledger.client_rows(['a', 'b', 'c'])
    for client, (n, rounds) in enumerate(zip(examples, [1, 2, 3])):
      steps = rounds * 2 * int(np.ceil(n / 64))
      rate = min(1.0, 64 / n)
      want = _direct(1.1, rate, steps)
      row = rows[client]
      self.assertEqual((row['rounds'], row['steps']), (rounds, steps))
      self.assertAlmostEqual(row['sampling_rate'], rate)
      self.assertAlmostEqual(row['epsilon_rdp'], want['rdp'], places=6)
      self.assertAlmostEqual(row['epsilon_pld'], want['pld'], places=6)
      self.assertAlmostEqual(row['epsilon'], min(want.values()), places=9)
    # The run's epsilon is the most exposed client's, from its accountant.
    worst = max(rows, key=lambda row: row['epsilon'])
    self.assertEqual(ledger.epsilon_and_accountant(),
                     (worst['epsilon'], worst['accountant']))

  @parameterized.parameters(Kind.RDP, Kind.PLD)
  def test_against_tensorflow_privacy(self, kind):
    # 6,400 examples in batches of 64: q = 0.01, 100 steps an epoch, one
    # epoch a round, 3 rounds: tensorflow-privacy's 3-epoch DP-SGD.
    ledger = _ledger([6400], _config(noise=0.9, epochs=1), kind)
    for _ in range(3):
      ledger.record_round(None, [0])
    want = compute_dp_sgd_privacy_lib._compute_dp_sgd_example_privacy(  # pylint: disable=protected-access
        num_epochs=3, noise_multiplier=0.9, example_delta=_DELTA,
        used_microbatching=False, poisson_subsampling_probability=0.01,
        accountant_type=compute_dp_sgd_privacy_lib.AccountantType[kind.name],
    )
    self.assertAlmostEqual(ledger.epsilon(), want, delta=1e-3 * want)

  def test_largest_client_with_many_sizes(self):
    # Many distinct sizes: the pruned search must find the brute-force maximum.
    rng = np.random.default_rng(0)
    examples = rng.integers(1, 400, size=30)
    ledger = _ledger(examples)
    ledger.record_round(None, list(range(30)))
    ledger.record_round(None, list(range(0, 30, 2)))
    brute = max(row['epsilon'] for row in ledger.client_rows(
        [str(i) for i in range(30)]))
    self.assertEqual(ledger.epsilon(), brute)

  def test_a_client_that_never_took_part_spent_nothing(self):
    ledger = _ledger([100, 100])
    ledger.record_round(None, [1])
    rows = ledger.client_rows(['a', 'b'])
    self.assertEqual(rows[0]['epsilon'], 0.0)
    self.assertGreater(rows[1]['epsilon'], 0.0)

  def test_epsilon_if_round_then_record(self):
    ledger = _ledger([100, 700])
    ledger.record_round(None, [0, 1])
    predicted = ledger.epsilon_if_round(None, [1])
    ledger.record_round(None, [1])
    self.assertEqual(predicted, ledger.epsilon())

  def test_history_round_trip(self):
    ledger = _ledger([100, 700, 5])
    ledger.record_round(None, [0, 2])
    ledger.record_round(None, [2])
    restored = _ledger([100, 700, 5])
    restored.restore_history(ledger.history_json())
    self.assertEqual(restored.rounds, 2)
    self.assertEqual(restored.epsilon(), ledger.epsilon())

  def test_no_noise_is_infinite(self):
    ledger = _ledger([100], _config(noise=0.0))
    ledger.record_round(None, [0])
    self.assertEqual(ledger.epsilon(), float('inf'))


class CalibrationTest(parameterized.TestCase):

  @parameterized.parameters(Kind.RDP, Kind.AUTO)
  def test_meets_the_target_within_one_percent(self, kind):
    examples, rounds, target = [100, 2000], [5, 5], 2.0
    noise = example_privacy.calibrate_noise(
        _config(), examples, rounds, _DELTA, kind, target)

    def worst(z):
      ledger = _ledger(examples, _config(noise=z), kind)
      for _ in range(5):
        ledger.record_round(None, [0, 1])
      return ledger.epsilon()

    self.assertBetween(worst(noise), 0.99 * target, target)
    self.assertGreater(worst(0.99 * noise), target)

