import os
import subprocess
import sys

from absl.testing import absltest
import dp_accounting

_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(__file__)))


def _run_report(*args: str) -> subprocess.CompletedProcess:
  return subprocess.run(
      [sys.executable, '-m', 'experiments.privacy_report', *args],
      cwd=_REPO_ROOT, capture_output=True, text=True, timeout=300,
  )


class PrivacyReportTest(absltest.TestCase):

  def test_tff_tutorial_setting(self):
    result = _run_report(
        '--aggregator=gaussian_fixed', '--noise_multiplier=1.2',
        '--clients_per_round=120', '--num_clients=3383', '--sampling=poisson',
        '--rounds=100', '--delta=1e-5', '--table_every=50',
        '--target_epsilon=1.5',
    )
    self.assertEqual(result.returncode, 0, result.stderr[-3000:])
    rows = {
        int(line.split()[0]): line.split()[1:]
        for line in result.stdout.splitlines()
        if line.split() and line.split()[0].isdigit()
    }
    self.assertEqual(sorted(rows), [50, 100])
    event = dp_accounting.PoissonSampledDpEvent(
        120 / 3383, dp_accounting.GaussianDpEvent(1.2)
    )
    rdp = dp_accounting.rdp.RdpAccountant()
    rdp.compose(event, 100)
    pld = dp_accounting.pld.PLDAccountant(value_discretization_interval=1e-4)
    pld.compose(event, 100)
    self.assertEqual(rows[100], [f'{rdp.get_epsilon(1e-5):.4f}',
                                 f'{pld.get_epsilon(1e-5):.4f}'])
    self.assertIn('allows 73 of 100 rounds', result.stdout)

  def test_one_client_of_example_level_dp_sgd(self):
    result = _run_report(
        '--privacy_unit=example', '--examples_per_client=7500',
        '--batch_size=256', '--local_epochs=2', '--rounds=5',
        '--noise_multiplier=1.0',
    )
    self.assertEqual(result.returncode, 0, result.stderr[-3000:])
    self.assertIn('ADD_OR_REMOVE_ONE_EXAMPLE', result.stdout)
    row = [line.split() for line in result.stdout.splitlines()
           if line.split() and line.split()[0] == '5']
    # 5 rounds of 2 epochs of ceil(7500 / 256) = 30 steps, q = 256 / 7500.
    event = dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(
            256 / 7500, dp_accounting.GaussianDpEvent(1.0)), 5 * 2 * 30)
    rdp = dp_accounting.rdp.RdpAccountant().compose(event)
    pld = dp_accounting.pld.PLDAccountant(
        value_discretization_interval=1e-4).compose(event)
    self.assertEqual(row, [['5', f'{rdp.get_epsilon(1e-5):.4f}',
                            f'{pld.get_epsilon(1e-5):.4f}']])

  def test_example_level_needs_the_clients_size(self):
    result = _run_report('--privacy_unit=example')
    self.assertEqual(result.returncode, 2)
    self.assertIn('--examples_per_client=None is out of range', result.stderr)

  def test_bad_flag_exits_2(self):
    result = _run_report('--delta=2')
    self.assertEqual(result.returncode, 2)
    self.assertIn('--delta=2.0 is out of range', result.stderr)


if __name__ == '__main__':
  absltest.main()
