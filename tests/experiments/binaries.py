"""Running the experiment binaries as a user would: in a subprocess."""

import os
import subprocess
import sys

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(__file__)))
_WORKER_BINARY = b'worker_binary'


def start(module: str, *args: str) -> subprocess.Popen:
  """Starts a binary in the background; its output is discarded (an unread
  pipe would block it once full)."""
  return subprocess.Popen(
      [sys.executable, '-m', f'experiments.{module}', *args],
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
