"""Skipping tests of the shared real data where it is absent."""

import os

from absl.testing import absltest

from dp_fedavg.tasks import client_data


def require(name: str):
  """Skips the decorated test (class) unless ../shared/data/<name> exists."""
  path = os.path.join(client_data.SHARED_DATA_DIR, name)
  return absltest.skipUnless(
      os.path.exists(path),
      f'{path} is absent: the shared data sits beside the project root (CI '
      'has it; a user\'s own clone does not).',
  )
