"""One TFF worker for the whole test session, stopped when the session ends."""

import os

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

import pytest  # pylint: disable=g-import-not-at-top

from dp_fedavg import execution  # pylint: disable=g-import-not-at-top

SHARED_DATA = os.path.join(
    os.path.dirname(os.path.abspath(__file__)), '..', '..', 'shared', 'data'
)


@pytest.fixture(scope='session', autouse=True)
def tff_worker():
  with execution.local_execution() as worker:
    yield worker
