"""The seeded reference runs give the values recorded before a refactoring.

Slow (about 10 minutes on 2 cores), so out of the default run:
  .venv/bin/python -m pytest -m slow tests/reference
"""

import json

from absl.testing import absltest
from absl.testing import parameterized
import pytest

from tests.reference import reference_runs

with open(reference_runs.RECORD) as _f:
  _RECORDED = json.load(_f)


@pytest.mark.slow
class ReferenceRunsTest(parameterized.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    # Two runs at a time.
    cls.results = reference_runs.run_all()

  @parameterized.parameters(*reference_runs.TRAIN_RUNS)
  def test_train_run_metrics_are_unchanged(self, name):
    rows = self.results['train'][name]
    recorded = _RECORDED['train'][name]
    self.assertLen(rows, len(recorded))
    for row, expected in zip(rows, recorded):
      # Columns added since the recording are not compared.
      self.assertEqual({c: row[c] for c in expected}, expected)

  @parameterized.parameters(*reference_runs.REPORTS)
  def test_privacy_report_is_unchanged(self, name):
    # The first line describes the setting in words; the event and every
    # number after it must be the same.
    self.assertEqual(
        self.results['privacy_report'][name].splitlines()[1:],
        _RECORDED['privacy_report'][name].splitlines()[1:],
    )


if __name__ == '__main__':
  absltest.main()
