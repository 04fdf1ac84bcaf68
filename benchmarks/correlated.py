r"""Round time and state memory of the correlated-noise mechanisms.

  python -m benchmarks.correlated --output=BENCHMARKS.md --repeats=5

On the synthetic MLP (784-200-10, `benchmarks.synthetic`) at 50 clients per
round on the standard engine: gaussian_fixed, dp_ftrl_tree (with and
without restarts) and banded_mf at several bands, each built from the
registry for a 64-round run over 1,000 clients, the same client datasets for
all, one warm-up round, then `--repeats` timed rounds of `process.next`
with the mechanisms' rounds alternating. Memory: the bytes of the
aggregator's state after the timed rounds, against the model's. The report
replaces its own section of `--output` (between the markers below).
"""

import datetime
import json
import statistics
import sys

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
_JSON = flags.DEFINE_string(
    'json', 'benchmarks/correlated_results.json', 'Raw numbers.')
_REPEATS = flags.DEFINE_integer('repeats', 5, 'Timed rounds per setting.')

BEGIN = '<!-- correlated noise: begin -->'
END = '<!-- correlated noise: end -->'
_COHORT, _POPULATION, _ROUNDS = 50, 1000, 64
_BASELINE = 'gaussian_fixed'
# Name -> (mechanism, its parameters).
_CONFIGURATIONS = {
    _BASELINE: ('gaussian_fixed', {}),
    'dp_ftrl_tree': ('dp_ftrl_tree', {}),
    'dp_ftrl_tree --tree_restart=epoch': ('dp_ftrl_tree',
                                          {'tree_restart': 'epoch'}),
    'banded_mf --mf_bands=1': ('banded_mf', {'mf_bands': 1}),
    'banded_mf --mf_bands=4': ('banded_mf', {'mf_bands': 4}),
    'banded_mf --mf_bands=16': ('banded_mf', {'mf_bands': 16}),
}


def _factory(name: str):
  mechanism_name, values = _CONFIGURATIONS[name]
  mechanism = registry.get(mechanism_name)
  return mechanism.factory(mechanism.params(values), registry.Setting(
      expected_clients_per_round=_COHORT, noise_seed=0, rounds=_ROUNDS,
      population=_POPULATION))


def _state_bytes(state) -> int:
  return sum(np.asarray(v).nbytes for v in tf.nest.flatten(state))


def _report(seconds, state_bytes, model_bytes, command) -> str:
  baseline = statistics.median(seconds[_BASELINE])
  lines = [
      BEGIN,
      '## Correlated noise: DP-FTRL and banded MF against gaussian_fixed',
      '',
      f'`{command}`, {datetime.date.today()}: the standard engine on the '
      f'synthetic MLP ({model_bytes // 4:,} parameters, {model_bytes:,} '
      f'bytes), {_COHORT} clients per round, factories built for a '
      f'{_ROUNDS}-round run over {_POPULATION:,} clients; rounds alternate '
      'between mechanisms. State: the aggregator state\'s bytes after the '
      'timed rounds (the tree\'s level buffer and previous noise, the '
      'banded buffers of B - 1 noise tensors).',
      '',
      '| mechanism | round, median s (ratio) | aggregator state | state / model |',
      '| --- | --- | --- | --- |',
  ]
  for name in _CONFIGURATIONS:
    median = statistics.median(seconds[name])
    lines.append(
        f'| {name} | {median:.3f} ({median / baseline:.2f}x) | '
        f'{state_bytes[name]:,} B | {state_bytes[name] / model_bytes:.2f} |')
  lines.append(END)
  return '\n'.join(lines) + '\n'


def main(argv):
  del argv
  command = 'python -m benchmarks.correlated ' + ' '.join(sys.argv[1:])
  task = synthetic.build_task(_POPULATION)
  processes, initial_states = {}, {}
  with execution.local_execution():
    for name in _CONFIGURATIONS:
      tf.keras.utils.set_random_seed(0)
      processes[name] = process.build_process(
          task.model_fn, _factory(name), 0.1, 1.0, 0.0)
      initial_states[name] = processes[name].initialize()
    model_bytes = _state_bytes(
        processes[_BASELINE].get_model_weights(initial_states[_BASELINE])
        .trainable)
    seconds, final_states = synthetic.time_rounds_round_robin(
        processes, initial_states, task, _COHORT, _REPEATS.value,
        np.random.default_rng(0), return_states=True)
  state_bytes = {name: _state_bytes(state.aggregator)
                 for name, state in final_states.items()}
  for name in _CONFIGURATIONS:
    print(f'{name}: median {statistics.median(seconds[name]):.3f}s, state '
          f'{state_bytes[name]:,} B', file=sys.stderr, flush=True)
  with open(_JSON.value, 'w') as f:
    json.dump({'seconds': seconds, 'state_bytes': state_bytes,
               'model_bytes': model_bytes}, f, indent=1)
  report.replace_section(_OUTPUT.value, BEGIN, END, _report(
      seconds, state_bytes, model_bytes, command))


if __name__ == '__main__':
  app.run(main)
