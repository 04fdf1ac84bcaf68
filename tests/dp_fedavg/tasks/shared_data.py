"""Skipping tests of the shared real data where it is absent."""

import os

from absl.testing import absltest

from dp_fedavg.tasks import client_data


def _absent_reason(name: str) -> str:
  path = os.path.join(client_data.SHARED_DATA_DIR, name)
  if os.path.exists(path):
    return ''
  return (
      f'{path} is absent: the shared data sits beside the project root (CI '
      'has it; a user\'s own clone does not).'
  )


def require(name: str):
  """Skips the decorated test (class) unless ../shared/data/<name> exists."""
  reason = _absent_reason(name)
  return absltest.skipIf(bool(reason), reason)


def skip_unless_present(test_case: absltest.TestCase, name: str) -> None:
  """Skips the running test unless ../shared/data/<name> exists."""
  reason = _absent_reason(name)
  if reason:
    test_case.skipTest(reason)
