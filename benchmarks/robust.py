r"""Round time of the robust rules against gaussian_fixed, side by side.

  python -m benchmarks.robust --output=BENCHMARKS.md --repeats=5

On the synthetic MLP (784-200-10, 64 examples per client, one epoch of batch
16; `benchmarks.synthetic`), at 10, 50 and 200 clients per round on the
standard engine: one process per aggregator, built from the registry as
`experiments.train` builds it, the same client datasets for all, one warm-up
round, then `--repeats` timed rounds of `process.next` with the aggregators'
rounds alternating. The report gives each median and its ratio to
gaussian_fixed's, and replaces its own section of `--output` (between the
markers below), leaving `make bench`'s sections as they are.
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
from aggregators import robust
from benchmarks import report
from benchmarks import synthetic
from dp_fedavg import byzantine
from dp_fedavg import execution
from dp_fedavg import process

_OUTPUT = flags.DEFINE_string('output', 'BENCHMARKS.md', 'Markdown report.')
_JSON = flags.DEFINE_string(
    'json', 'benchmarks/robust_results.json', 'Raw numbers.')
_REPEATS = flags.DEFINE_integer('repeats', 5, 'Timed rounds per setting.')
_COHORTS = flags.DEFINE_list('cohorts', ['10', '50', '200'], 'Clients per round.')

BEGIN, END = '<!-- robust rules: begin -->', '<!-- robust rules: end -->'
_BASELINE = 'gaussian_fixed'
# Name -> (mechanism, its parameters, robustness).
_CONFIGURATIONS = {
    _BASELINE: ('gaussian_fixed', {}, robust.Robustness()),
    'centered_clipping (central DP)': (
        'gaussian_fixed', {}, robust.Robustness(rule='centered_clipping')),
    'centered_clipping (central DP) + ALIE attack': (
        'gaussian_fixed', {},
        robust.Robustness(rule='centered_clipping', attack='alie')),
    'median (local DP)': (
        'gaussian_fixed', {'noise_placement': 'client'},
        robust.Robustness(rule='median')),
    'trimmed_mean (local DP)': (
        'gaussian_fixed', {'noise_placement': 'client'},
        robust.Robustness(rule='trimmed_mean')),
    'krum (local DP)': (
        'gaussian_fixed', {'noise_placement': 'client'},
        robust.Robustness(rule='krum', assumed_byzantine=2)),
    'multi_krum (local DP)': (
        'gaussian_fixed', {'noise_placement': 'client'},
        robust.Robustness(rule='multi_krum', assumed_byzantine=2)),
    'geometric_median (local DP)': (
        'gaussian_fixed', {'noise_placement': 'client'},
        robust.Robustness(rule='geometric_median')),
    'median + bucketing (local DP)': (
        'gaussian_fixed', {'noise_placement': 'client'},
        robust.Robustness(rule='median', preaggregation='bucketing')),
    'median + nnm (local DP)': (
        'gaussian_fixed', {'noise_placement': 'client'},
        robust.Robustness(rule='median', preaggregation='nnm',
                          assumed_byzantine=2)),
}


def _factory(name: str, n: int):
  mechanism_name, values, robustness = _CONFIGURATIONS[name]
  mechanism = registry.get(mechanism_name)
  params = mechanism.params(values)
  return mechanism.factory(params, registry.Setting(
      expected_clients_per_round=n, noise_seed=0, robustness=robustness))


def _time_cohort(n: int, repeats: int, rng) -> dict[str, list[float]]:
  task = synthetic.build_task(1000)
  processes, initial_states = {}, {}
  for name in _CONFIGURATIONS:
    tf.keras.utils.set_random_seed(0)
    processes[name] = process.build_process(
        task.model_fn, _factory(name, n), 0.1, 1.0, 0.0)
    # A fifth of each cohort is Byzantine (read by the attack only).
    initial_states[name] = byzantine.ByzantineClients.with_count(
        processes[name].initialize(), n // 5)
  return synthetic.time_rounds_round_robin(
      processes, initial_states, task, n, repeats, rng)


def _report(results: dict[int, dict[str, list[float]]], command: str) -> str:
  cohorts = sorted(results)
  lines = [
      BEGIN,
      '## Robust rules against gaussian_fixed',
      '',
      f'`{command}`, {datetime.date.today()}: median round time in seconds '
      '(ratio to gaussian_fixed) of the standard engine on the synthetic '
      'MLP (159,010 parameters); rounds alternate between aggregators.',
      '',
      '| aggregator | ' + ' | '.join(f'n = {n}' for n in cohorts) + ' |',
      '| --- |' + ' --- |' * len(cohorts),
  ]
  for name in _CONFIGURATIONS:
    cells = []
    for n in cohorts:
      median = statistics.median(results[n][name])
      ratio = median / statistics.median(results[n][_BASELINE])
      cells.append(f'{median:.3f} ({ratio:.2f}x)')
    lines.append(f'| {name} | ' + ' | '.join(cells) + ' |')
  lines.append(END)
  return '\n'.join(lines) + '\n'


def main(argv):
  del argv
  command = 'python -m benchmarks.robust ' + ' '.join(sys.argv[1:])
  rng = np.random.default_rng(0)
  results = {}
  with execution.local_execution():
    for n in map(int, _COHORTS.value):
      results[n] = _time_cohort(n, _REPEATS.value, rng)
      for name, times in results[n].items():
        print(f'n={n} {name}: median {statistics.median(times):.3f}s',
              file=sys.stderr, flush=True)
  with open(_JSON.value, 'w') as f:
    json.dump({str(n): r for n, r in results.items()}, f, indent=1)
  report.replace_section(_OUTPUT.value, BEGIN, END, _report(results, command))


if __name__ == '__main__':
  app.run(main)
