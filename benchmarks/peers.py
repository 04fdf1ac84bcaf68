r"""The in-process engine against pfl-research and a plain PyTorch loop.

  python -m benchmarks.peers --report=BENCHMARKS.md --timed_rounds=5

The workload of `benchmarks/peer_systems/common.py`: an MLP 784-200-10, 50
users per round out of 1000, 64 examples each, 4 SGD steps of batch 16, clip
1, noise multiplier 1, CPU. The peers run in their own environment
(`--peers_venv`, made here from `benchmarks/peer_systems/requirements.txt`
when missing: torch and pfl never enter the project's dependencies), each in
a subprocess that runs one round whenever asked; rounds alternate between
the three systems, and each system's median over `--timed_rounds` rounds
after a warm-up is reported.

Our round is what the training loop does for the engine: pack the cohort's
groups of users (their files are written during set-up, as the peers hold
their users' data in memory) and `process.next` of the vectorized process run
in process, with our `gaussian_fixed`.
"""

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

from absl import app
from absl import flags
import numpy as np

from aggregators import gaussian
from benchmarks import inprocess as inprocess_benchmark
from benchmarks import report
from benchmarks import synthetic
from dp_fedavg import inprocess
from dp_fedavg import vectorized

# --report and --timed_rounds are benchmarks.inprocess's.
_RAW = flags.DEFINE_string('peers_raw', 'benchmarks/peers_results.json',
                           'Raw numbers (JSON).')
PEERS_VENV = 'benchmarks/.peers-venv'
_PEERS_VENV = flags.DEFINE_string(
    'peers_venv', PEERS_VENV,
    'The peers\' Python environment; made when missing.')

BEGIN = '<!-- begin peers -->'
END = '<!-- end peers -->'
_PEERS_DIR = os.path.join(os.path.dirname(__file__), 'peer_systems')
_PREFIX = '@@'
_USERS, _POPULATION, _LR = 50, 1000, 0.1


def ensure_peers_venv(path: str) -> str:
  """The peers' Python, made with pip from their requirements if missing."""
  python = os.path.abspath(os.path.join(path, 'bin', 'python'))
  if not os.path.exists(os.path.join(path, '.installed')):
    subprocess.run([sys.executable, '-m', 'venv', path], check=True)
    subprocess.run([python, '-m', 'pip', 'install', '--quiet',
                    '--disable-pip-version-check', '-r',
                    os.path.join(_PEERS_DIR, 'requirements.txt')], check=True)
    open(os.path.join(path, '.installed'), 'w').close()
  return python


class _Peer:
  """A peer system in its subprocess, one round per request."""

  def __init__(self, python: str, script: str):
    self._process = subprocess.Popen(
        [python, script], cwd=_PEERS_DIR, stdin=subprocess.PIPE,
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    if self._reply() != 'ready':
      raise RuntimeError(f'{script} did not start.')

  def _reply(self) -> str:
    for line in self._process.stdout:
      if line.startswith(_PREFIX):
        return line[len(_PREFIX):].strip()
    raise RuntimeError(f'the peer exited with {self._process.wait()}.')

  def round(self) -> float:
    self._process.stdin.write('round\n')
    self._process.stdin.flush()
    return float(self._reply())

  def close(self) -> None:
    self._process.stdin.write('stop\n')
    self._process.stdin.close()
    self._process.wait(timeout=60)


class _Ours:
  """Our in-process engine's round on the same workload."""

  def __init__(self, files_dir: str):
    task = synthetic.build_task(_POPULATION)
    self._files = vectorized.UserFiles(task, files_dir)
    for user in range(_POPULATION):
      self._files.paths(user)
    self._process = inprocess.InProcessLearningProcess(vectorized.build_process(
        task, gaussian.GaussianFactory(1.0, 1.0, _USERS, noise_seed=0,
                                       stacked_users=True),
        _LR, 1.0, 0.0, synthetic.LOCAL_EPOCHS, synthetic.BATCH))
    self._state = self._process.initialize()
    self._rng = np.random.default_rng(0)
    self._round = 0
    self.round()

  def round(self) -> float:
    start = time.perf_counter()
    self._round += 1
    cohort = sorted(self._rng.choice(_POPULATION, _USERS, replace=False).tolist())
    groups = vectorized.pack_cohort(
        self._files, cohort, vectorized.default_users_per_client(_USERS),
        self._round)
    self._state = self._process.next(self._state, groups).state
    return time.perf_counter() - start


def section(seconds: dict[str, list[float]], command: str) -> str:
  medians = {name: statistics.median(s) for name, s in seconds.items()}
  ours = medians['dp-fedavg in-process']
  lines = [
      BEGIN, '## Against pfl-research and a plain PyTorch loop', '',
      f'Produced by `{command}`. MLP 784-200-10, 50 users per round out of '
      '1000, 64 examples each, 4 SGD steps of batch 16, clip 1, noise '
      'multiplier 1, CPU. Rounds alternate between the systems (each peer in '
      'its own process and environment: torch 2.13.0 CPU, pfl 0.6.0); '
      f'medians of {len(next(iter(seconds.values())))} rounds after a '
      'warm-up.', '',
      '| system | round (median, range) | its time / in-process |',
      '| --- | --- | --- |',
  ]
  for name, s in seconds.items():
    lines.append(f'| {name} | {medians[name]:.3f} s ({min(s):.3f}-'
                 f'{max(s):.3f}) | {medians[name] / ours:.2f} |')
  lines += ['', 'Target: pfl / in-process >= 5.', '', END]
  return '\n'.join(lines) + '\n'


def run(output: str, json_path: str, repeats: int, peers_venv: str,
        command: str) -> None:
  python = ensure_peers_venv(peers_venv)
  with tempfile.TemporaryDirectory(prefix='bench_peers_') as files_dir:
    systems = {
        'dp-fedavg in-process': _Ours(files_dir),
        'pfl 0.6.0 (PyTorch backend)': _Peer(python, 'pfl_fedavg.py'),
        'plain PyTorch loop': _Peer(python, 'torch_loop.py'),
    }
    seconds = {name: [] for name in systems}
    for _ in range(repeats):
      for name, system in systems.items():
        seconds[name].append(system.round())
    for system in systems.values():
      if isinstance(system, _Peer):
        system.close()
  for name, s in seconds.items():
    print(f'{name}: {statistics.median(s):.3f}s', file=sys.stderr)
  report.replace_section(output, BEGIN, END, section(seconds, command))
  with open(json_path, 'w') as f:
    json.dump(dict(round_seconds=seconds, command=command), f, indent=1)


def main(argv):
  del argv
  report_path = inprocess_benchmark.REPORT_FLAG.value
  timed_rounds = inprocess_benchmark.TIMED_ROUNDS_FLAG.value
  command = (f'python -m benchmarks.peers --report={report_path} '
             f'--peers_raw={_RAW.value} --timed_rounds={timed_rounds}')
  run(report_path, _RAW.value, timed_rounds, _PEERS_VENV.value, command)


if __name__ == '__main__':
  app.run(main)
