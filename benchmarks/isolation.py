r"""What isolating the local TFF worker costs per round.

  python -m benchmarks.isolation --output=BENCHMARKS.md --repeats=5

The local worker runs in a network namespace of its own, reached through a
Unix socket relayed to its loopback port (`dp_fedavg.isolated_worker`);
without namespaces it listens on a TCP port directly. On the synthetic MLP
(784-200-10, `benchmarks.synthetic`) at 50 clients per round on the standard
engine with gaussian_fixed, each repeat starts one worker of each kind in
turn, runs a warm-up round and times one `process.next`; medians over the
repeats. The report replaces its own section of `--output`.
"""

import datetime
import statistics
import sys
from unittest import mock

from absl import app
from absl import flags
import numpy as np
import tensorflow as tf

from aggregators import registry
from benchmarks import report
from benchmarks import synthetic
from dp_fedavg import execution
from dp_fedavg import process

_OUTPUT = flags.DEFINE_string('output', 'BENCHMARKS.md', 'Markdown report.')
_REPEATS = flags.DEFINE_integer('repeats', 5, 'Timed rounds per variant.')

BEGIN = '<!-- worker isolation: begin -->'
END = '<!-- worker isolation: end -->'
_COHORT, _POPULATION = 50, 1000
_VARIANTS = {'open TCP port': False, 'namespace + Unix socket relay': True}


def main(argv):
  del argv
  if not execution.isolation_available():
    sys.exit('isolation: this kernel allows no user and network namespace.')
  command = 'python -m benchmarks.isolation ' + ' '.join(sys.argv[1:])
  task = synthetic.build_task(_POPULATION)
  mechanism = registry.get('gaussian_fixed')
  factory = mechanism.factory(mechanism.params({}), registry.Setting(
      expected_clients_per_round=_COHORT, noise_seed=0))
  tf.keras.utils.set_random_seed(0)
  learning_process = process.build_process(task.model_fn, factory, 0.1, 1.0, 0.0)
  seconds = {name: [] for name in _VARIANTS}
  for repeat in range(_REPEATS.value):
    for name, isolated in _VARIANTS.items():
      with mock.patch.object(execution, 'isolation_available',
                             return_value=isolated), \
          execution.local_execution() as worker:
        assert worker.isolated == isolated
        seconds[name].extend(synthetic.time_rounds_round_robin(
            {name: learning_process}, {name: learning_process.initialize()},
            task, _COHORT, 1, np.random.default_rng(repeat))[name])
  base = statistics.median(seconds['open TCP port'])
  lines = [
      BEGIN, '## Isolated local worker', '',
      f'`{command}`, {datetime.date.today()}: one round of the standard engine '
      f'on the synthetic MLP, {_COHORT} clients per round, gaussian_fixed; '
      'each repeat starts a worker of each kind in turn (a warm-up round, '
      'then one timed round).', '',
      '| local worker | round, median s (ratio) |', '| --- | --- |',
  ]
  for name in _VARIANTS:
    median = statistics.median(seconds[name])
    print(f'{name}: median {median:.3f}s', file=sys.stderr, flush=True)
    lines.append(f'| {name} | {median:.3f} ({median / base:.2f}x) |')
  lines.append(END)
  report.replace_section(_OUTPUT.value, BEGIN, END, '\n'.join(lines) + '\n')


if __name__ == '__main__':
  app.run(main)
