import os
import signal
import subprocess
import sys
import textwrap
import time

from absl.testing import absltest
import numpy as np
import portpicker
import tensorflow as tf
import tensorflow_federated as tff

from aggregators import gaussian
from dp_fedavg import execution
from dp_fedavg import process
from dp_fedavg.tasks import digits

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


def _start_workers(count):
  """`python -m dp_fedavg.worker` processes on free ports; (addresses, procs)."""
  ports = [portpicker.pick_unused_port() for _ in range(count)]
  procs = [
      subprocess.Popen(
          [sys.executable, '-m', 'dp_fedavg.worker', f'--port={port}'],
          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
      )
      for port in ports
  ]
  return [f'localhost:{port}' for port in ports], procs


def _stop(procs):
  for proc in procs:
    proc.kill()
    proc.wait()


class RemoteExecutionTest(absltest.TestCase):
  """Two TFF workers on loopback, as on two hosts."""

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.addresses, cls.procs = _start_workers(2)
    cls.task = digits.build_task(num_clients=8, seed=2)
    cls.datasets = [
        cls.task.preprocess(
            cls.task.train_data.create_tf_dataset_for_client(c), 1, 8, 0
        )
        for c in cls.task.train_data.client_ids[:6]
    ]

  @classmethod
  def tearDownClass(cls):
    _stop(cls.procs)
    super().tearDownClass()

  def _train_two_rounds(self):
    tf.keras.utils.set_random_seed(0)
    learning_process = process.build_process(
        self.task.model_fn, gaussian.GaussianFactory(0.0, 1.0, 6), 0.3, 1.0, 0.9
    )
    state = learning_process.initialize()
    for _ in range(2):
      state = learning_process.next(state, self.datasets).state
    return learning_process.get_model_weights(state).trainable

  def test_split_clients_give_the_single_worker_model(self):
    local = self._train_two_rounds()  # The session's local worker.
    with execution.remote_execution(self.addresses):
      remote = self._train_two_rounds()
    for a, b in zip(local, remote):
      # Only the order of float32 additions differs.
      np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)

  def test_noise_is_added_once_not_per_worker(self):
    size, clients, noise_multiplier, clip = 20_000, 4, 2.0, 0.5
    with execution.remote_execution(self.addresses):
      aggregator = gaussian.GaussianFactory(
          noise_multiplier, clip, clients, noise_seed=7
      ).create(tff.TensorType(np.float32, [size]))
      output = aggregator.next(
          aggregator.initialize(), [np.zeros(size, np.float32)] * clients
      )
    sigma = noise_multiplier * clip / clients
    # Noise per worker would give sqrt(2) sigma, 70 standard errors away.
    self.assertLess(
        abs(np.std(output.result) - sigma), 5 * sigma / np.sqrt(2 * size)
    )


class WorkerFailureTest(absltest.TestCase):

  def test_unreachable_worker_is_named(self):
    port = portpicker.pick_unused_port()
    with self.assertRaisesRegex(
        execution.WorkerUnavailableError, f'localhost:{port}.*dp_fedavg.worker'
    ):
      with execution.remote_execution(
          [f'localhost:{port}'], connect_timeout_seconds=1
      ):
        pass

  def test_worker_dying_between_rounds_fails_fast_and_names_it(self):
    addresses, procs = _start_workers(2)
    try:
      with execution.remote_execution(addresses):
        aggregator = gaussian.GaussianFactory(0.0, 1.0, 2).create(
            tff.TensorType(np.float32, [3])
        )
        state = aggregator.initialize()
        aggregator.next(state, [np.ones(3, np.float32)] * 2)
        procs[1].kill()
        procs[1].wait()
        start = time.monotonic()
        with self.assertRaisesRegex(
            execution.WorkerUnavailableError, addresses[1]
        ):
          aggregator.next(state, [np.ones(3, np.float32)] * 2)
        self.assertLess(time.monotonic() - start, 30)
    finally:
      _stop(procs)
