"""Running the experiment binaries as a user would: in a subprocess."""

import os
import subprocess
import sys

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(__file__)))
_WORKER_BINARY = b'worker_binary'
_LABEL = 'DP_FEDAVG_TEST_LABEL'


def start(module: str, *args: str, stderr_path: str = os.devnull) -> subprocess.Popen:
  """Starts a binary in the background, its stderr to `stderr_path` (a pipe
  nobody reads would block it once full)."""
  with open(stderr_path, 'w') as stderr:
    return subprocess.Popen(
        [sys.executable, '-m', f'experiments.{module}', *args],
        cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=stderr,
    )


def start_worker(port: int) -> subprocess.Popen:
  return subprocess.Popen(
      [sys.executable, '-m', 'dp_fedavg.worker', f'--port={port}'],
      cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
  )


def run(module: str, *args: str, timeout: int = 300,
        label: str = '') -> subprocess.CompletedProcess:
  """Runs a binary to its end; `label` marks its processes' environment
  (and so its workers') for `worker_pids`."""
  env = dict(os.environ, **({_LABEL: label} if label else {}))
  return subprocess.run(
      [sys.executable, '-m', f'experiments.{module}', *args],
      cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout, env=env,
  )


def worker_pids(label: str) -> set[int]:
  """Process ids of the running TFF worker_binary processes started under
  `label` (other tests' workers run beside them under pytest-xdist)."""
  marker = f'{_LABEL}={label}'.encode() + b'\0'
  pids = set()
  for entry in os.listdir('/proc'):
    if entry.isdigit():
      try:
        with open(f'/proc/{entry}/cmdline', 'rb') as f:
          if _WORKER_BINARY not in f.read():
            continue
        with open(f'/proc/{entry}/environ', 'rb') as f:
          if marker in f.read():
            pids.add(int(entry))
      except OSError:
        pass
  return pids
