r"""Where the in-process engine's ops run, and a FEMNIST round on GPU vs CPU.

  make gpu-check      # installs requirements/cuda.txt, then runs this
  python -m benchmarks.gpu_check [--data_dir=...] [--rounds=5]

One short script for a GPU machine (one is lent only briefly):
1. lists the GPUs TensorFlow sees; if it sees none, exits 1 saying what is
   missing: the NVIDIA driver (libcuda.so.1) or the CUDA 11.8 libraries
   where TensorFlow looks for them;
2. runs one in-process round of the FEMNIST CNN (50 users, our
   gaussian_fixed, users grouped per TFF client) with TensorFlow's device
   placement logged, and counts the placed ops by device: the client
   training (Conv2D, MatMul and their gradients) and the clip and noise ops
   (Norm/Sqrt/Maximum, the stateless random normal) are listed;
3. times `--rounds` rounds on the GPU and, in a child process that hides
   the GPUs (CUDA_VISIBLE_DEVICES=''), on the CPU; prints both medians and
   their ratio. Without the shared FEMNIST sample it uses the synthetic MLP.
The TFF worker is never used: it has no GPU kernels (BUILD.md).
"""

import os
import re
import statistics
import subprocess
import sys
import tempfile
import time

from absl import app
from absl import flags

from benchmarks import gpu_report

_ROUNDS = flags.DEFINE_integer('rounds', 5, 'Timed rounds per device.')
_DATA_DIR = flags.DEFINE_string('data_dir', None, 'FEMNIST data directory.')
_CPU_ONLY = flags.DEFINE_bool(
    'cpu_only', False, 'Internal: the child process that times the CPU.')
_USERS = 50


def _round_timer():
  """(one-round function, label) of the FEMNIST CNN, else the MLP."""
  # Imported here, after CUDA_VISIBLE_DEVICES is set for the child.
  from aggregators import gaussian  # pylint: disable=g-import-not-at-top
  from benchmarks import synthetic  # pylint: disable=g-import-not-at-top
  from dp_fedavg import inprocess  # pylint: disable=g-import-not-at-top
  from dp_fedavg import tasks  # pylint: disable=g-import-not-at-top
  from dp_fedavg import vectorized  # pylint: disable=g-import-not-at-top
  try:
    task = tasks.build_task(
        'femnist', tasks.TaskOptions(data_dir=_DATA_DIR.value))
    label = 'FEMNIST CNN'
  except tasks.DataNotFoundError:
    task, label = synthetic.build_task(1000), 'synthetic MLP'
  factory = gaussian.GaussianFactory(1.0, 1.0, _USERS, noise_seed=0,
                                     stacked_users=True)
  learning_process = inprocess.InProcessLearningProcess(
      vectorized.build_process(task, factory, 0.1, 1.0, 0.0, 1, 16))
  files = vectorized.UserFiles(task, tempfile.mkdtemp(prefix='gpu_check_'))
  state = learning_process.initialize()
  cohorts = len(task.train_data.client_ids) // _USERS
  rounds = iter(range(10**6))

  def one_round():
    nonlocal state
    first = next(rounds) % cohorts * _USERS
    cohort = list(range(first, first + _USERS))
    data = vectorized.pack_cohort(files, cohort, _USERS, 0)
    start = time.perf_counter()
    output = learning_process.next(state, data)
    state = output.state
    float(output.metrics['client_work']['train']['loss'])  # Waits for it.
    return time.perf_counter() - start

  return one_round, label


def _median_round_seconds() -> tuple[float, str]:
  one_round, label = _round_timer()
  one_round()  # Warm-up: tracing, placement, kernels.
  return statistics.median(one_round() for _ in range(_ROUNDS.value)), label


def main(argv):
  del argv
  if _CPU_ONLY.value:
    seconds, _ = _median_round_seconds()
    print(f'cpu_seconds={seconds}')
    return
  # TensorFlow 2.14 ships GPU binaries up to compute capability 7.5 and PTX
  # for 8.0: an A100 or H100 compiles that PTX at first use. CUDA caches the
  # result on disk for this script's child processes, up to
  # CUDA_CACHE_MAXSIZE, here the largest it allows (4 GiB).
  os.environ.setdefault('CUDA_CACHE_MAXSIZE', str(4 << 30))
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  gpus = tf.config.list_physical_devices('GPU')
  print(f'TensorFlow {tf.__version__}, built with CUDA: '
        f'{tf.test.is_built_with_cuda()}; GPUs: {gpus}')
  if not gpus:
    sys.exit('gpu_check: TensorFlow sees no GPU: ' + gpu_report.no_gpu_reason(
        os.path.dirname(os.path.dirname(tf.__file__))))
  # Placement of one round's ops, from TensorFlow's own placement log.
  log = tempfile.NamedTemporaryFile(suffix='.log', delete=False)
  result = subprocess.run(
      [sys.executable, '-c',
       'import tensorflow as tf; tf.debugging.set_log_device_placement(True);'
       'import sys; from absl import flags; flags.FLAGS(sys.argv[:1]);'
       'from benchmarks import gpu_check; gpu_check._round_timer()[0]()'],
      stdout=log, stderr=subprocess.STDOUT, check=False)
  with open(log.name, errors='replace') as f:
    placed = gpu_report.placed_ops(f)
  print('placed ops of one round (op, device): count; log in', log.name)
  for (op, device), count in sorted(placed.items()):
    print(f'  {op:28s} {device}: {count}')
  if result.returncode:
    sys.exit(f'gpu_check: the placement round failed; see {log.name}')
  gpu_seconds, label = _median_round_seconds()
  child = subprocess.run(
      [sys.executable, '-m', 'benchmarks.gpu_check', '--cpu_only',
       f'--rounds={_ROUNDS.value}']
      + ([f'--data_dir={_DATA_DIR.value}'] if _DATA_DIR.value else []),
      env={**os.environ, 'CUDA_VISIBLE_DEVICES': ''}, capture_output=True,
      text=True, check=True)
  cpu_seconds = float(re.search(r'cpu_seconds=([\d.e-]+)', child.stdout)[1])
  print(f'{label}, {_USERS} users, in process: GPU {gpu_seconds:.3f} s, CPU '
        f'{cpu_seconds:.3f} s per round (median of {_ROUNDS.value}); CPU / '
        f'GPU = {cpu_seconds / gpu_seconds:.2f}')


if __name__ == '__main__':
  app.run(main)
