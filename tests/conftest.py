"""One TFF worker for the whole test session, stopped when the session ends."""

import os

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

from absl import flags  # pylint: disable=g-import-not-at-top
import pytest  # pylint: disable=g-import-not-at-top

from dp_fedavg import execution  # pylint: disable=g-import-not-at-top

# absltest helpers (create_tempdir) and the binaries' flags read absl flags,
# which pytest does not parse.
flags.FLAGS.mark_as_parsed()


@pytest.fixture(scope='session', autouse=True)
def tff_worker():
  with execution.local_execution() as worker:
    yield worker
