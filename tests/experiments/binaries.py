"""Running the experiment binaries as a user would: in a subprocess."""

import os
import subprocess
import sys

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(__file__)))
_WORKER_BINARY = b'worker_binary'


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


def run(module: str, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
  return subprocess.run(
      [sys.executable, '-m', f'experiments.{module}', *args],
      cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout,
  )


def worker_pids() -> set[int]:
  """Process ids of every running TFF worker_binary."""
  pids = set()
  for entry in os.listdir('/proc'):
    if entry.isdigit():
      try:
        with open(f'/proc/{entry}/cmdline', 'rb') as f:
          if _WORKER_BINARY in f.read():
            pids.add(int(entry))
      except OSError:
        pass
  return pids
