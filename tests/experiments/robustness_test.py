"""The robustness study on a tiny digits grid, run as a user would."""

import csv
import os

from absl.testing import absltest
import dp_accounting

from tests.experiments import binaries

# 10 clients, all in every round, 3 rounds: every rule under ALIE with 2
# Byzantine clients, without DP, with central DP (mean and centered clipping
# only) and with local DP.
_TINY = (
    '--num_clients=10', '--rounds=3', '--eval_every=3', '--batch_size=16',
    '--noise_multiplier=0.3',
)


def _rows(path):
  with open(path) as f:
    return list(csv.DictReader(f))


class RobustnessStudyTest(absltest.TestCase):

  def test_rules_run_three_rounds_in_each_dp_mode(self):
    # Each rule's own behaviour is tested in tests/aggregators; the study
    # needs one that central DP refuses (median) and one it takes.
    output_dir = self.create_tempdir().full_path
    rules = ('none', 'median', 'centered_clipping')
    result = binaries.run(
        'robustness', f'--output_dir={output_dir}', *_TINY,
        '--attacks=alie', '--byzantine_fractions=0.2',
        f'--robust_rules={",".join(rules)}', timeout=1200,
    )
    self.assertEqual(result.returncode, 0, result.stderr[-3000:])
    rows = _rows(os.path.join(output_dir, 'results.csv'))
    runs = {(r['dp_mode'], r['robust_rule']) for r in rows}
    expected = {(mode, rule) for mode in ('none', 'local') for rule in rules} | {
        ('central', 'none'), ('central', 'centered_clipping')}
    self.assertEqual(runs, expected)
    self.assertLen(rows, len(expected))
    self.assertIn('skipped central DP with median', result.stderr)
    # Full participation: central DP composes 3 Gaussian rounds of z; local
    # DP is the replace-one event of each client's own message, z / 2.
    for mode, z in (('central', 0.3), ('local', 0.15)):
      accountant = dp_accounting.pld.PLDAccountant()
      accountant.compose(dp_accounting.GaussianDpEvent(z), 3)
      for row in rows:
        if row['dp_mode'] == mode:
          self.assertAlmostEqual(
              float(row['epsilon']), accountant.get_epsilon(1e-5), places=4)
    for row in rows:
      self.assertEqual(row['rounds'], '3')
      self.assertEqual(row['attack'], 'alie')
      self.assertBetween(float(row['eval_accuracy']), 0.0, 1.0)
    worst = _rows(os.path.join(output_dir, 'worst_case.csv'))
    self.assertLen(worst, len(expected))
    self.assertTrue(
        os.path.getsize(os.path.join(output_dir, 'accuracy_alie.png')))

  def test_mechanism_flags_set_by_the_study_exit_2(self):
    result = binaries.run('robustness', '--robust_rule=median')
    self.assertEqual(result.returncode, 2)
    self.assertIn('--robust_rule is set by the study', result.stderr)


if __name__ == '__main__':
  absltest.main()
