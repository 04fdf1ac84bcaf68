"""Peak memory of a few DP rounds at one population size (one process per size).

  python -m benchmarks.memory --population=100000

Prints one JSON line: the engine, the population, and the peak resident set
(VmHWM) of the Python process and of the TFF worker, in MiB. Not ru_maxrss: a
child starts with its parent's, so it would report the benchmark's own RSS.
Run by `benchmarks.run` once per engine and population, each in a fresh
process, because peak RSS only grows.
"""

import json
import os
import tempfile

from absl import app
from absl import flags
import numpy as np

from aggregators import gaussian
from benchmarks import synthetic
from dp_fedavg import execution
from dp_fedavg import process
from dp_fedavg import sampling
from dp_fedavg import vectorized

_POPULATION = flags.DEFINE_integer('population', 1000, 'Clients in the population.')
_COHORT = flags.DEFINE_integer('clients_per_round', 50, 'Clients per round.')
_ROUNDS = flags.DEFINE_integer('rounds', 3, 'Rounds to run.')
_ENGINE = flags.DEFINE_enum(
    'engine', 'standard', ['standard', 'vectorized'], 'The training engine.')


def _peak_mib(pid: int) -> float:
  with open(f'/proc/{pid}/status') as f:
    for line in f:
      if line.startswith('VmHWM:'):
        return int(line.split()[1]) / 1024
  return float('nan')


def main(argv):
  del argv
  task = synthetic.build_task(_POPULATION.value)
  sampler = sampling.ClientSampler(
      sampling.SamplingScheme.UNIFORM, _POPULATION.value, _COHORT.value, seed=0
  )
  stacked = _ENGINE.value == 'vectorized'
  factory = gaussian.GaussianFactory(
      1.0, 1.0, _COHORT.value, noise_seed=0, stacked_users=stacked
  )
  with execution.local_execution() as worker, tempfile.TemporaryDirectory() as files_dir:
    if stacked:
      learning_process = vectorized.build_process(
          task, factory, 0.1, 1.0, 0.0, 1, 16
      )
      files = vectorized.UserFiles(task, files_dir)
      users_per_client = vectorized.default_users_per_client(_COHORT.value)
    else:
      learning_process = process.build_process(
          task.model_fn, factory, 0.1, 1.0, 0.0
      )
    state = learning_process.initialize()
    for round_num in range(1, _ROUNDS.value + 1):
      cohort = sampler.sample(round_num)
      if stacked:
        client_data = vectorized.pack_cohort(
            files, list(cohort), users_per_client, 0
        )
      else:
        client_data = [
            task.preprocess(
                task.train_data.create_tf_dataset_for_client(str(i)), 1, 16, 0
            )
            for i in cohort
        ]
      state = learning_process.next(state, client_data).state
    worker_mib = _peak_mib(worker.binary_pid)
    weights = learning_process.get_model_weights(state).trainable
  print(json.dumps({
      'engine': _ENGINE.value,
      'population': _POPULATION.value,
      'python_peak_mib': _peak_mib(os.getpid()),
      'worker_peak_mib': worker_mib,
      'model_finite': bool(all(np.all(np.isfinite(w)) for w in weights)),
  }))


if __name__ == '__main__':
  app.run(main)
