"""Execution contexts whose TFF worker processes are owned and always stopped.

TFF's own local C++ context starts `worker_binary` lazily and stops it only in
a `__del__`, which often does not run at interpreter exit: the worker then
lives on as an orphan (~200 MB), and because it inherits the caller's stdout it
also holds a `| grep` pipeline open. Here the worker is started by us, its
output goes to a log file, it is stopped on context exit and at interpreter
exit, and on Linux the kernel kills it if our process dies without cleaning up
(PR_SET_PDEATHSIG).

`worker_binary` listens on every interface without authentication: whoever
reaches its port can run TensorFlow graphs as the user. Where the kernel
lets an unprivileged user make a user and network namespace (`unshare`),
the local worker runs in one, where only loopback exists, and is reached
through a Unix socket (`dp_fedavg.isolated_worker`); elsewhere a warning
names the open port, once.
"""

import atexit
import contextlib
import ctypes
import functools
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from typing import Iterator

from absl import logging
import grpc
import portpicker
import tensorflow_federated as tff
# The compiler and argument transforms that TFF's own local context uses; they
# are not exported at the top level.
from tensorflow_federated.python.core.backends.native import compiler as native_compiler
from tensorflow_federated.python.core.backends.native import mergeable_comp_compiler
from tensorflow_federated.python.core.backends.test import compiler as test_compiler
from tensorflow_federated.python.core.environments.tensorflow_frontend import tensorflow_computation
from tensorflow_federated.python.core.impl.execution_contexts import mergeable_comp_execution_context

WORKER_BINARY = os.path.join(
    os.path.dirname(tff.__file__), 'data', 'worker_binary'
)
_STARTUP_TIMEOUT_SECONDS = 60.0
_PR_SET_PDEATHSIG = 1
_UNSHARE = ('unshare', '--user', '--net', '--map-root-user')


@functools.cache
def isolation_available() -> bool:
  """Whether a user and network namespace can be made here (checked once)."""
  try:
    return subprocess.run([*_UNSHARE, 'true'], capture_output=True,
                          timeout=30).returncode == 0
  except (OSError, subprocess.TimeoutExpired):
    return False


def isolated_worker_command(socket_path: str, worker: list[str]) -> list[str]:
  """The command running `worker` (the binary and its arguments but
  --port) in a user and network namespace of its own, served on
  `socket_path` (`dp_fedavg.isolated_worker`)."""
  # Inside its namespace every port is free.
  return [*_UNSHARE, sys.executable, '-m', 'dp_fedavg.isolated_worker',
          socket_path, '8000', *worker]


@functools.cache
def _warn_open_port_once() -> None:
  logging.warning(
      'the local TFF worker listens on its port on every network interface, '
      'without authentication (the kernel allows no user and network '
      'namespace to hide it here): whoever reaches this host on that port can '
      'run TensorFlow graphs as you; keep the host behind a firewall.')


def _stub(address: str) -> tff.framework.RemoteExecutorGrpcStub:
  channel = grpc.insecure_channel(
      address,
      options=[('grpc.max_receive_message_length', -1),
               ('grpc.max_send_message_length', -1)],
  )
  return tff.framework.RemoteExecutorGrpcStub(channel)


def _die_with_parent() -> None:
  if sys.platform.startswith('linux'):
    libc = ctypes.CDLL('libc.so.6', use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


class LocalWorker:
  """One `worker_binary` process serving TFF's C++ runtime to this process
  only: in a namespace of its own behind a Unix socket where the kernel
  allows it (`isolated`), else on a localhost port that every interface
  exposes (warned)."""

  def __init__(self, max_concurrent_computation_calls: int = -1):
    if not os.path.isfile(WORKER_BINARY):
      raise RuntimeError(
          f'TFF worker binary not found at {WORKER_BINARY}; reinstall '
          'tensorflow-federated (see BUILD.md).'
      )
    worker = [
        WORKER_BINARY,
        f'--max_concurrent_computation_calls={max_concurrent_computation_calls}',
    ]
    self.isolated = isolation_available()
    self.log_path = os.path.join(
        tempfile.gettempdir(), f'dp_fedavg_worker_{os.getpid()}_{id(self)}.log')
    self.port = self._socket_dir = self.socket_path = None
    if self.isolated:
      # A directory of the user's only; short, as a Unix socket's path must
      # be (108 bytes), even where TMPDIR is long.
      base = tempfile.gettempdir()
      self._socket_dir = tempfile.mkdtemp(
          prefix='dp_fedavg_', dir=base if len(base) <= 64 else '/tmp')
      self.socket_path = os.path.join(self._socket_dir, 'worker.sock')
      command = isolated_worker_command(self.socket_path, worker)
      address = f'unix:{self.socket_path}'
    else:
      _warn_open_port_once()
      self.port = portpicker.pick_unused_port()
      command = [worker[0], f'--port={self.port}', *worker[1:]]
      address = f'localhost:{self.port}'
    with open(self.log_path, 'wb') as log:
      self._process = subprocess.Popen(
          command,
          stdin=subprocess.DEVNULL,
          stdout=log,
          stderr=subprocess.STDOUT,
          preexec_fn=_die_with_parent,
          # Its own session: a Ctrl-C at the terminal goes to the training
          # process alone, which finishes its round on this worker before
          # stopping it (dp_fedavg.interrupts).
          start_new_session=True,
      )
    atexit.register(self.stop)
    self.stub = _stub(address)
    deadline = time.monotonic() + _STARTUP_TIMEOUT_SECONDS
    while not self.stub.is_ready:
      if self._process.poll() is not None or time.monotonic() > deadline:
        self.stop(keep_log=True)
        raise RuntimeError(
            f'TFF worker at {address} did not start; see {self.log_path}'
        )
      time.sleep(0.05)

  @property
  def pid(self) -> int:
    """The process this one started: the worker, or with isolation the
    relay in front of it (see `binary_pid`)."""
    return self._process.pid

  @property
  def binary_pid(self) -> int:
    """The `worker_binary` process's id (memory measurements)."""
    if not self.isolated:
      return self._process.pid
    with open(f'/proc/{self.pid}/task/{self.pid}/children') as f:
      (child,) = map(int, f.read().split())
    return child

  def stop(self, keep_log: bool = False) -> None:
    """Stops the worker; its log is removed unless `keep_log`."""
    if self._process.poll() is None:
      self._process.send_signal(signal.SIGINT)
      try:
        self._process.wait(timeout=10)
      except subprocess.TimeoutExpired:
        self._process.kill()
        self._process.wait()
    atexit.unregister(self.stop)
    if self._socket_dir:
      shutil.rmtree(self._socket_dir, ignore_errors=True)
    if not keep_log and os.path.exists(self.log_path):
      os.remove(self.log_path)


class _OutsideLocalExecution(tff.framework.SyncContext):
  """Installed after the last `local_execution` block: refuses to run."""

  def invoke(self, comp, arg):
    raise RuntimeError(
        'TFF computations run only inside dp_fedavg.execution.local_execution()'
        ', which starts and stops their worker.'
    )


# Our contexts that are active now, innermost last.
_active_contexts: list[tff.framework.SyncExecutionContext] = []

# Replaces the context TFF installs when it is imported. That one starts a
# worker that nothing stops, and its leftover manager raises in `__del__`
# during interpreter shutdown ("'NoneType' object has no attribute 'Popen'").
tff.framework.get_context_stack().set_default_context(_OutsideLocalExecution())


def _simulate_secure_intrinsics(comp):
  """TFF's test-context compilation: secure sums become checked plain sums.

  The C++ runtime cannot run the secure intrinsics ("Cannot embed a federated
  value"); TFF's test backend replaces each with a body that checks its bounds
  and sums in the clear, which is what a simulation can do.
  """
  return native_compiler.desugar_and_transform_to_native(
      test_compiler.replace_secure_intrinsics_with_bodies(comp)
  )


def _executor_factory(stub) -> tff.framework.ResourceManagingExecutorFactory:
  def stack_fn(cardinalities):
    # Computations with no CLIENTS-placed argument (initialize) still need a
    # clients cardinality on the worker; TFF's local context uses 0 too.
    cardinalities.setdefault(tff.CLIENTS, 0)
    executor = tff.framework.RemoteExecutor(stub)
    executor.set_cardinalities(cardinalities)
    return executor

  return tff.framework.ResourceManagingExecutorFactory(stack_fn)


def _context_for(
    worker: LocalWorker, simulate_secure_aggregation: bool
) -> tff.framework.SyncExecutionContext:
  return tff.framework.SyncExecutionContext(
      executor_fn=_executor_factory(worker.stub),
      compiler_fn=_simulate_secure_intrinsics if simulate_secure_aggregation
      else native_compiler.desugar_and_transform_to_native,
      transform_args=tensorflow_computation.transform_args,
      transform_result=tensorflow_computation.transform_result,
  )


@contextlib.contextmanager
def local_execution(
    max_concurrent_computation_calls: int = -1,
    simulate_secure_aggregation: bool = False,
) -> Iterator[LocalWorker]:
  """Runs TFF computations in a local worker for the duration of the block.

  Args:
    max_concurrent_computation_calls: passed to the worker; nonpositive means
      no limit.
    simulate_secure_aggregation: compile secure sums (SecureSumFactory,
      SecureModularSumFactory) into checked insecure sums, as TFF's test
      context does; without it they fail in the C++ runtime.

  Yields:
    The running `LocalWorker`; it is stopped when the block exits.
  """
  worker = LocalWorker(max_concurrent_computation_calls)
  try:
    with _installed(_context_for(worker, simulate_secure_aggregation)):
      yield worker
  finally:
    worker.stop()


class _WorkerOnFirstUse(tff.framework.SyncContext):
  """Starts a local worker the first time a TFF computation runs.

  The in-process engine (`dp_fedavg.inprocess`) runs no TFF computation, so
  a run on it never starts a worker; any other engine gets one on demand.
  """

  def __init__(self, simulate_secure_aggregation: bool):
    self._simulate_secure_aggregation = simulate_secure_aggregation
    self._context = None
    self.worker = None

  def invoke(self, comp, arg):
    if self._context is None:
      self.worker = LocalWorker()
      logging.info(
          'started a TFF worker (pid %d) on first use, %s', self.worker.pid,
          f'in a network namespace of its own (only loopback), through '
          f'{self.worker.socket_path}' if self.worker.isolated
          else f'on port {self.worker.port} of every interface')
      self._context = _context_for(self.worker, self._simulate_secure_aggregation)
    return self._context.invoke(comp, arg)

  def stop(self) -> None:
    if self.worker is not None:
      self.worker.stop()


@contextlib.contextmanager
def _installed(context) -> Iterator[None]:
  """`context` is TFF's default for the block; the previous one after it."""
  context_stack = tff.framework.get_context_stack()
  context_stack.set_default_context(context)
  _active_contexts.append(context)
  try:
    yield
  finally:
    _active_contexts.remove(context)
    context_stack.set_default_context(
        _active_contexts[-1] if _active_contexts else _OutsideLocalExecution()
    )


@contextlib.contextmanager
def on_demand_execution(
    simulate_secure_aggregation: bool = False,
) -> Iterator[_WorkerOnFirstUse]:
  """Like `local_execution`, but the worker starts only when a TFF
  computation first runs (never, for a run on the in-process engine).

  Yields the context; its `worker` is None until one was started.
  """
  context = _WorkerOnFirstUse(simulate_secure_aggregation)
  try:
    with _installed(context):
      yield context
  finally:
    context.stop()


@contextlib.contextmanager
def without_tff_runtime() -> Iterator[None]:
  """Any TFF computation run in the block raises: what runs in it runs in
  Python TensorFlow alone (the in-process engine's promise)."""
  with _installed(_OutsideLocalExecution()):
    yield


class WorkerUnavailableError(RuntimeError):
  """A remote TFF worker cannot be reached or failed during a computation."""


class _FailFastExecutionContext(tff.framework.AsyncExecutionContext):
  """An async context on one remote worker that fails instead of waiting.

  TFF's `AsyncExecutionContext.invoke` retries an unavailable worker forever
  (backing off to 30 s), so a run whose worker died hangs. This context runs
  the same invocation once and turns the failure into a
  `WorkerUnavailableError` naming the worker.
  """

  def __init__(self, address: str, **kwargs):
    super().__init__(**kwargs)
    self._address = address

  async def invoke(self, comp, arg):
    try:
      # The undecorated invoke: TFF's retry wrapper is what would hang.
      return await tff.framework.AsyncExecutionContext.invoke.__wrapped__(
          self, comp, arg
      )
    except (grpc.RpcError, tff.framework.RetryableError) as e:
      cause = e.grpc_error if hasattr(e, 'grpc_error') else e
      status = cause.code().name if isinstance(cause, grpc.Call) else type(e).__name__
      raise WorkerUnavailableError(
          f'the TFF worker at {self._address} failed or became unreachable '
          f'during a computation (gRPC {status}).'
      ) from e


def _check_reachable(address: str, stub, timeout_seconds: float) -> None:
  deadline = time.monotonic() + timeout_seconds
  while not stub.is_ready:
    if time.monotonic() > deadline:
      raise WorkerUnavailableError(
          f'no TFF worker answers at {address} (waited {timeout_seconds:g}s); '
          'start one there with `python -m dp_fedavg.worker --port=PORT`.'
      )
    time.sleep(0.1)


@contextlib.contextmanager
def remote_execution(
    addresses: list[str], connect_timeout_seconds: float = 30.0
) -> Iterator[None]:
  """Runs TFF computations on the TFF workers at `addresses` (host:port).

  Each computation is compiled to TFF's mergeable form: every worker runs the
  clients' part on its share of the clients and returns partial aggregates;
  those are merged, and the server part (for our aggregators: the noise, the
  clip update, the optimizer step) runs once on the merged result. Secure
  sums are not supported across workers.

  Raises:
    WorkerUnavailableError: a worker does not answer within the timeout.
  """
  if not addresses:
    raise ValueError('remote_execution needs at least one host:port address.')
  stubs = [_stub(address) for address in addresses]
  for address, stub in zip(addresses, stubs):
    _check_reachable(address, stub, connect_timeout_seconds)
  context = mergeable_comp_execution_context.MergeableCompExecutionContext(
      async_contexts=[
          _FailFastExecutionContext(
              address,
              executor_fn=_executor_factory(stub),
              compiler_fn=native_compiler.desugar_and_transform_to_native,
              transform_args=tensorflow_computation.transform_args,
              transform_result=tensorflow_computation.transform_result,
          )
          for address, stub in zip(addresses, stubs)
      ],
      compiler_fn=mergeable_comp_compiler.compile_to_mergeable_comp_form,
      transform_args=tensorflow_computation.transform_args,
      transform_result=tensorflow_computation.transform_result,
  )
  with _installed(context):
    yield
