import os
import signal
import subprocess
import sys
import textwrap
import time

from absl.testing import absltest
import numpy as np
import tensorflow_federated as tff

from dp_fedavg import execution

_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(__file__)))


def _alive(pid: int) -> bool:
  try:
    with open(f'/proc/{pid}/stat') as f:
      return f.read().split()[2] != 'Z'
  except FileNotFoundError:
    return False


def _wait_until_dead(pid: int, timeout: float = 15.0) -> bool:
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline:
    if not _alive(pid):
      return True
    time.sleep(0.1)
  return False


@tff.tensorflow.computation(np.int32)
def _add_one(x):
  return x + 1


class LocalExecutionTest(absltest.TestCase):

  def test_nested_block_runs_and_stops_its_worker(self):
    # The session fixture's context is active around this test.
    with execution.local_execution() as worker:
      self.assertEqual(_add_one(41), 42)
      self.assertTrue(_alive(worker.pid))
    self.assertTrue(_wait_until_dead(worker.pid))
    self.assertFalse(os.path.exists(worker.log_path))
    # The outer (session) context is back in force.
    self.assertEqual(_add_one(1), 2)

  def test_worker_dies_when_its_parent_is_killed(self):
    script = textwrap.dedent("""
        import sys, time
        from dp_fedavg import execution
        with execution.local_execution() as worker:
          print(worker.pid, flush=True)
          time.sleep(600)
    """)
    parent = subprocess.Popen(
        [sys.executable, '-c', script], cwd=_REPO_ROOT,
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        # A killed parent leaves its worker's log for diagnosis; keep it here.
        env=dict(os.environ, TMPDIR=self.create_tempdir().full_path),
    )
    try:
      worker_pid = int(parent.stdout.readline())
      self.assertTrue(_alive(worker_pid))
      parent.send_signal(signal.SIGKILL)
      parent.wait()
      self.assertTrue(_wait_until_dead(worker_pid), 'worker outlived parent')
    finally:
      parent.kill()
      parent.wait()
      parent.stdout.close()


if __name__ == '__main__':
  absltest.main()
