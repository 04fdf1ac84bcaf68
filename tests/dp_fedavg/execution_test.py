import os
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from unittest import mock

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


def _children(pid: int) -> set[int]:
  """Every descendant of `pid`."""
  found = set()
  try:
    with open(f'/proc/{pid}/task/{pid}/children') as f:
      for child in map(int, f.read().split()):
        found |= {child} | _children(child)
  except FileNotFoundError:
    pass
  return found


def _socket_inodes(pid: int) -> set[str]:
  inodes = set()
  for fd in os.listdir(f'/proc/{pid}/fd'):
    try:
      target = os.readlink(f'/proc/{pid}/fd/{fd}')
    except OSError:
      continue
    if target.startswith('socket:['):
      inodes.add(target[len('socket:['):-1])
  return inodes


def _listening_off_loopback(pids: set[int]) -> list[str]:
  """Local addresses of the TCP sockets of `pids` listening, in this
  network namespace, on an address other than loopback (read from
  /proc/net/tcp and tcp6; nothing is sent)."""
  inodes = set().union(*(_socket_inodes(pid) for pid in pids))
  loopback = ('0100007F', '00000000000000000000000001000000')
  found = []
  for table in ('/proc/net/tcp', '/proc/net/tcp6'):
    with open(table) as f:
      for line in f.readlines()[1:]:
        fields = line.split()
        address, state, inode = fields[1], fields[3], fields[9]
        if (state == '0A' and inode in inodes
            and address.split(':')[0] not in loopback):
          found.append(address)
  return found


class IsolationTest(absltest.TestCase):

  def test_local_worker_listens_on_no_network_address(self):
    if not execution.isolation_available():
      self.skipTest('this kernel allows no user and network namespace')
    with execution.local_execution() as worker:
      self.assertEqual(_add_one(41), 42)
      self.assertTrue(worker.isolated)
      run = {os.getpid(), worker.pid, *_children(worker.pid)}
      binary = worker.binary_pid
      self.assertIn('worker_binary', os.readlink(f'/proc/{binary}/exe'))
      self.assertEmpty(_listening_off_loopback(run))
      # The worker's network namespace is not ours, and holds loopback only.
      self.assertNotEqual(os.readlink(f'/proc/{binary}/ns/net'),
                          os.readlink('/proc/self/ns/net'))
      with open(f'/proc/{binary}/net/dev') as f:
        interfaces = [line.split(':')[0].strip()
                      for line in f.readlines()[2:]]
      self.assertEqual(interfaces, ['lo'])
    self.assertTrue(_wait_until_dead(binary))
    self.assertFalse(os.path.exists(worker.socket_path))

  def test_without_namespaces_the_open_port_is_warned_once(self):
    execution._warn_open_port_once.cache_clear()  # pylint: disable=protected-access
    with mock.patch.object(execution, 'isolation_available',
                           return_value=False):
      with self.assertLogs(level='WARNING') as logs:
        with execution.local_execution() as worker:
          self.assertEqual(_add_one(1), 2)
          # The check above sees this one.
          self.assertNotEmpty(_listening_off_loopback({worker.pid}))
        with execution.local_execution():
          self.assertEqual(_add_one(2), 3)
    warnings = [line for line in logs.output if 'without authentication' in line]
    self.assertLen(warnings, 1)


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
      # With isolation, worker_pid relays to the worker_binary it started.
      descendants = _children(worker_pid)
      parent.send_signal(signal.SIGKILL)
      parent.wait()
      for pid in {worker_pid, *descendants}:
        self.assertTrue(_wait_until_dead(pid), 'worker outlived parent')
    finally:
      parent.kill()
      parent.wait()
      parent.stdout.close()


if __name__ == '__main__':
  absltest.main()


def _start_workers(count):
  """`python -m dp_fedavg.worker` processes; (addresses, procs). Each on a
  Unix socket in a namespace of its own where the kernel allows it (else
  on a free port): the setting the README recommends across hosts."""
  if execution.isolation_available():
    directory = tempfile.mkdtemp(prefix='dpfw_', dir='/tmp')
    where = [f'--socket={directory}/{i}.sock' for i in range(count)]
    addresses = [f'unix:{directory}/{i}.sock' for i in range(count)]
  else:
    ports = [portpicker.pick_unused_port() for _ in range(count)]
    where = [f'--port={port}' for port in ports]
    addresses = [f'localhost:{port}' for port in ports]
  procs = [
      subprocess.Popen(
          [sys.executable, '-m', 'dp_fedavg.worker', flag],
          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
      )
      for flag in where
  ]
  # Each worker imports TensorFlow and TFF before it listens: under a
  # loaded machine (pytest-xdist) that alone can pass the connection's 30 s.
  deadline = time.monotonic() + 300
  for address in addresses:
    while not _listening(address) and time.monotonic() < deadline:
      time.sleep(0.1)
  return addresses, procs


def _listening(address: str) -> bool:
  if address.startswith('unix:'):
    return os.path.exists(address[len('unix:'):])
  with socket.socket() as probe:
    return probe.connect_ex(('localhost', int(address.split(':')[1]))) == 0


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
