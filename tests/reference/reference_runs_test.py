"""The seeded reference runs give the values recorded before a refactoring.

Slow (about 10 minutes on 2 cores), so out of the default run:
  .venv/bin/python -m pytest -m slow tests/reference
"""

import json
import math
import re

from absl.testing import absltest
from absl.testing import parameterized
import pytest

from tests.reference import reference_runs

with open(reference_runs.RECORD) as _f:
  _RECORDED = json.load(_f)

# Numbers may differ in their last digits only: float32 metrics by an ulp or
# two (2.4e-7 at 2.26) with the order of their sums, and epsilon(delta), now
# scanned in numpy rather than by dp-accounting's loop, by 1e-12.
_RELATIVE_TOLERANCE = 1e-6
_NUMBER = re.compile(r'-?\d+\.\d+(?:e-?\d+)?|inf')


def _same_numbers(actual: str, expected: str) -> bool:
  """Whether the texts agree, numbers to `_RELATIVE_TOLERANCE`."""
  if _NUMBER.sub('#', actual) != _NUMBER.sub('#', expected):
    return False
  return all(
      math.isclose(float(a), float(e), rel_tol=_RELATIVE_TOLERANCE)
      for a, e in zip(_NUMBER.findall(actual), _NUMBER.findall(expected)))


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
      for column, value in expected.items():
        self.assertTrue(_same_numbers(row[column], value),
                        f'{name} round {row["round"]} {column}: '
                        f'{row[column]} != {value}')

  @parameterized.parameters(*reference_runs.REPORTS)
  def test_privacy_report_is_unchanged(self, name):
    # The first line describes the setting in words; the event and every
    # number after it must be the same.
    actual = self.results['privacy_report'][name].splitlines()[1:]
    expected = _RECORDED['privacy_report'][name].splitlines()[1:]
    self.assertLen(actual, len(expected))
    for line, recorded in zip(actual, expected):
      self.assertTrue(_same_numbers(line, recorded), f'{line} != {recorded}')


if __name__ == '__main__':
  absltest.main()
