r"""The in-process engine against TFF's worker, the compute floor and stock TFF.

  python -m benchmarks.inprocess --report=BENCHMARKS.md --timed_rounds=5

Side by side in one process, rounds alternating between systems (round 1 of
each, then round 2 of each, ..., each round in another seeded order),
medians of `--timed_rounds` rounds after a warm-up:
* stock TFF: `build_unweighted_fed_avg` with TFF's own
  `DifferentiallyPrivateFactory.gaussian_fixed`, on TFF's worker;
* our standard and vectorized engines (TFF's worker);
* the in-process engine (`dp_fedavg.inprocess`) on the vectorized process,
  with our gaussian_fixed and with no DP;
on the synthetic MLP (784-200-10, 64 examples per user) at 10 and 50 users,
and at 50 users on the FEMNIST CNN and the Shakespeare GRU when the shared
data is there. Noise multiplier 1, clip 1, one local epoch of batch 16.

It also times, on the MLP, the in-process round with DP against without,
the two alone; a whole training-loop round on the in-process engine
(sampling, packing, training, accounting, evaluation) against its
`process.next`, while users are first seen and once their files exist; and
the `make demo` run's wall time on the standard engine and on the default
(auto) engine, each in a fresh process. Writes its own section of
BENCHMARKS.md (`benchmarks.report.replace_section`); `benchmarks.run` (make
bench) runs it too.
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
import tensorflow as tf
import tensorflow_federated as tff

from aggregators import gaussian
from aggregators import registry
from benchmarks import report
from benchmarks import synthetic
from dp_fedavg import accounting
from dp_fedavg import execution
from dp_fedavg import inprocess
from dp_fedavg import loop
from dp_fedavg import process
from dp_fedavg import sampling
from dp_fedavg import tasks
from dp_fedavg import vectorized

# Not --output/--json/--repeats: benchmarks.run imports this module and
# defines those. benchmarks.peers shares --report and --timed_rounds.
REPORT_FLAG = flags.DEFINE_string('report', 'BENCHMARKS.md', 'Markdown report.')
_RAW = flags.DEFINE_string(
    'raw', 'benchmarks/inprocess_results.json', 'Raw numbers (JSON).')
TIMED_ROUNDS_FLAG = flags.DEFINE_integer('timed_rounds', 5,
                                     'Timed rounds per system.')

BEGIN = '<!-- begin inprocess -->'
END = '<!-- end inprocess -->'
_NOISE, _CLIP, _LR = 1.0, 1.0, 0.1
_EPOCHS, _BATCH = synthetic.LOCAL_EPOCHS, synthetic.BATCH
# Rounds of the MLP's cheap measurements (DP against no DP alone, the loop
# once users' files exist): more than --timed_rounds, for steadier medians.
_MANY_ROUNDS = 21


def _systems(task, n: int) -> dict:
  """Name -> (learning process, whether its data is the vectorized groups)."""
  systems = {
      'stock TFF gaussian_fixed': (tff.learning.algorithms.build_unweighted_fed_avg(
          task.model_fn,
          client_optimizer_fn=tff.learning.optimizers.build_sgdm(_LR),
          server_optimizer_fn=tff.learning.optimizers.build_sgdm(1.0),
          model_aggregator=tff.aggregators.DifferentiallyPrivateFactory
          .gaussian_fixed(_NOISE, n, _CLIP)), False),
      'standard ours gaussian_fixed': (process.build_process(
          task.model_fn, gaussian.GaussianFactory(_NOISE, _CLIP, n, noise_seed=0),
          _LR, 1.0, 0.0), False),
      'vectorized ours gaussian_fixed': (vectorized.build_process(
          task, gaussian.GaussianFactory(
              _NOISE, _CLIP, n, noise_seed=0, stacked_users=True),
          _LR, 1.0, 0.0, _EPOCHS, _BATCH), True),
  }
  systems.update({label: (learning_process, True) for label, learning_process
                  in _inprocess_systems(task, n).items()})
  return systems


def _inprocess_systems(task, n: int) -> dict:
  """The in-process engine with our gaussian_fixed and with no DP."""
  return {
      f'inprocess {label}': inprocess.InProcessLearningProcess(
          vectorized.build_process(task, factory, _LR, 1.0, 0.0, _EPOCHS,
                                   _BATCH))
      for label, factory in (
          ('ours gaussian_fixed', gaussian.GaussianFactory(
              _NOISE, _CLIP, n, noise_seed=0, stacked_users=True)),
          ('no DP', None))
  }


def _dp_overhead(task, n: int, rounds: int) -> dict[str, float]:
  """Median seconds of the in-process round with our gaussian_fixed and with
  no DP, the two alone, alternating which goes first, on the same groups of
  users: what DP adds to the engine's round, without a TFF worker's threads
  around (they slow whichever system runs next)."""
  population = len(task.train_data.client_ids)
  rng = np.random.default_rng(1)
  files_dir = tempfile.TemporaryDirectory(prefix='bench_users_')
  files = vectorized.UserFiles(task, files_dir.name)
  groups = [
      vectorized.pack_cohort(
          files, sorted(rng.choice(population, n, replace=False).tolist()),
          vectorized.default_users_per_client(n), 0)
      for _ in range(rounds + 1)
  ]
  systems = _inprocess_systems(task, n)
  states = {label: p.next(p.initialize(), groups[0]).state
            for label, p in systems.items()}
  seconds = {label: [] for label in systems}
  for round_index in range(1, rounds + 1):
    order = list(systems)[::1 if round_index % 2 else -1]
    for label in order:
      start = time.perf_counter()
      states[label] = systems[label].next(
          states[label], groups[round_index]).state
      seconds[label].append(time.perf_counter() - start)
  files_dir.cleanup()
  return {label: statistics.median(times) for label, times in seconds.items()}


def _bench(name, task, n, repeats, gflops, rng, results) -> None:
  population = task.train_data.client_ids
  cohorts = [sorted(rng.choice(len(population), n, replace=False).tolist())
             for _ in range(repeats + 1)]
  datasets = [synthetic.client_datasets(task, [population[i] for i in c])
              for c in cohorts]
  files_dir = tempfile.TemporaryDirectory(prefix='bench_users_')
  files = vectorized.UserFiles(task, files_dir.name)
  users_per_client = vectorized.default_users_per_client(n)
  groups = [vectorized.pack_cohort(files, c, users_per_client, 0)
            for c in cohorts]
  examples = sum(
      sum(1 for _ in task.train_data.create_tf_dataset_for_client(population[i]))
      for i in cohorts[1]) * _EPOCHS
  floor = (synthetic.training_flops_per_example(task.keras_model_fn())
           * examples / (gflops * 1e9))
  tf.keras.utils.set_random_seed(0)
  systems = _systems(task, n)
  states, seconds = {}, {label: [] for label in systems}
  for label, (learning_process, stacked) in systems.items():
    data = groups if stacked else datasets
    states[label] = learning_process.next(
        learning_process.initialize(), data[0]).state
  for round_index in range(1, repeats + 1):
    # Each round in another (seeded) order, so that no system always runs
    # right after the same one (a worker's threads still winding down).
    for label in np.random.default_rng(round_index).permutation(list(systems)):
      learning_process, stacked = systems[label]
      data = groups if stacked else datasets
      start = time.perf_counter()
      states[label] = learning_process.next(
          states[label], data[round_index]).state
      seconds[label].append(time.perf_counter() - start)
  for label, times in seconds.items():
    results.append(dict(task=name, clients_per_round=n, system=label,
                        round_seconds=times, median=statistics.median(times),
                        floor_seconds=floor))
    print(f'{name} n={n} {label}: {statistics.median(times):.3f}s',
          file=sys.stderr, flush=True)
  files_dir.cleanup()


def _loop_round(task, repeats) -> dict[str, float]:
  """Median seconds of a whole training-loop round on the in-process engine
  (MLP, 50 expected users, Poisson), while users are first seen (their files
  are written in the round that first samples them) and once every user's
  files exist; and of its process.next alone, on the same cohorts, with
  nothing else running."""
  n = 50
  num_clients = len(task.train_data.client_ids)
  mechanism = registry.get('gaussian_fixed')
  params = mechanism.params(dict(noise_multiplier=_NOISE, clip=_CLIP))
  setting = registry.Setting(expected_clients_per_round=n, noise_seed=0,
                             stacked_users=True)
  learning_process = inprocess.InProcessLearningProcess(
      vectorized.build_process(task, mechanism.factory(params, setting), _LR,
                               1.0, 0.0, _EPOCHS, _BATCH))
  evaluate = inprocess.InProcessEvaluator(
      task.model_fn, task.eval_client_datasets())
  sampler = sampling.ClientSampler(
      sampling.SamplingScheme.POISSON, num_clients, n, 0)
  users_per_client = vectorized.default_users_per_client(n)
  files_dir = tempfile.TemporaryDirectory(prefix='bench_users_')
  files = vectorized.UserFiles(task, files_dir.name)
  pack = lambda cohort, seed: vectorized.pack_cohort(  # noqa: E731
      files, cohort, users_per_client, seed)

  def loop_walls(rounds: int) -> np.ndarray:
    ledger = accounting.PrivacyLedger(
        mechanism.build_ledger(params, setting),
        sampling.SamplingScheme.POISSON, num_clients, n, 1e-5)
    released = []
    loop.run_training(
        learning_process, task, sampler, ledger, evaluate,
        rounds=rounds + 1, local_epochs=_EPOCHS, batch_size=_BATCH,
        on_round=lambda result: released.append(time.perf_counter()),
        client_data_fn=lambda cohort, seed, _: pack(cohort, seed))
    # Round r's wall time: between the releases of rounds r - 1 and r.
    return np.diff(released)

  first_seen = loop_walls(repeats)
  for user in range(num_clients):
    files.paths(user)
  written = loop_walls(_MANY_ROUNDS)
  state = learning_process.initialize()
  next_seconds = []
  for round_num in range(1, _MANY_ROUNDS + 2):
    data = pack(list(sampler.sample(round_num)),
                loop.round_shuffle_seed(0, round_num))
    start = time.perf_counter()
    state = learning_process.next(state, data).state
    next_seconds.append(time.perf_counter() - start)
  files_dir.cleanup()
  return dict(loop_round_first_seen=float(np.median(first_seen)),
              loop_round=float(np.median(written)),
              process_next=float(np.median(next_seconds[1:])))


def _demo_seconds() -> dict[str, float]:
  """Wall time of the `make demo` command, standard engine and default."""
  seconds = {}
  for label, engine_flags in (('standard engine', ['--engine=standard']),
                              ('default (auto)', [])):
    with tempfile.TemporaryDirectory() as output_dir:
      start = time.perf_counter()
      subprocess.run(
          [sys.executable, '-m', 'experiments.train',
           f'--output_dir={output_dir}', '--overwrite', *engine_flags],
          check=True, capture_output=True)
      seconds[label] = time.perf_counter() - start
  return seconds


def _ratio(results, task, n, numerator, denominator):
  values = {r['system']: r for r in results
            if (r['task'], r['clients_per_round']) == (task, n)}
  if numerator not in values or denominator not in values:
    return '-'
  return f'{values[numerator]["median"] / values[denominator]["median"]:.2f}'


def section(results, dp_overhead, loop_round, demo, command) -> str:
  lines = [
      BEGIN, '## In-process engine', '',
      f'Produced by `{command}`. Rounds of every system alternate, each round '
      'in another seeded order; medians of '
      f'{len(results[0]["round_seconds"])} rounds after a warm-up. The '
      'in-process engine runs the vectorized process\'s MapReduce form '
      '(`dp_fedavg.inprocess`) on the same groups of users as the vectorized '
      f'engine (ceil(n / {os.cpu_count()} cores) users per TFF client). Stock '
      'TFF is `build_unweighted_fed_avg` with TFF\'s `gaussian_fixed`. Noise '
      'multiplier 1, clip 1, one local epoch of batch 16, CPU.', '',
  ]
  for task in dict.fromkeys(r['task'] for r in results):
    sizes = sorted({r['clients_per_round'] for r in results if r['task'] == task})
    systems = list(dict.fromkeys(
        r['system'] for r in results if r['task'] == task))
    lines += [f'### {task}', '',
              '| system | ' + ' | '.join(f'n={n}' for n in sizes) + ' |',
              '| --- |' + ' --- |' * len(sizes)]
    for system in systems:
      cells = []
      for n in sizes:
        r = next((r for r in results if (r['task'], r['clients_per_round'],
                                         r['system']) == (task, n, system)), None)
        cells.append('-' if r is None else
                     f'{r["median"]:.3f} s ({min(r["round_seconds"]):.3f}-'
                     f'{max(r["round_seconds"]):.3f})')
      lines.append(f'| {system} | ' + ' | '.join(cells) + ' |')
    floors = [next(r for r in results if (r['task'], r['clients_per_round'])
                   == (task, n))['floor_seconds'] for n in sizes]
    lines += ['', '| ratio (medians) | ' + ' | '.join(f'n={n}' for n in sizes)
              + ' |', '| --- |' + ' --- |' * len(sizes)]
    for label, numerator, denominator in (
        ('stock TFF / in-process (target >= 5 for the CNN and GRU at n=50)',
         'stock TFF gaussian_fixed', 'inprocess ours gaussian_fixed'),
        ('vectorized on the worker / in-process',
         'vectorized ours gaussian_fixed', 'inprocess ours gaussian_fixed'),
        ('in-process: DP / no DP (target <= 1.05)',
         'inprocess ours gaussian_fixed', 'inprocess no DP'),
    ):
      lines.append(f'| {label} | ' + ' | '.join(
          _ratio(results, task, n, numerator, denominator) for n in sizes) + ' |')
    gaps = []
    for n, floor in zip(sizes, floors):
      r = next(r for r in results if (r['task'], r['clients_per_round'],
                                      r['system'])
               == (task, n, 'inprocess ours gaussian_fixed'))
      gaps.append(f'{r["median"] / floor:.1f}x')
    lines += ['| compute floor | ' + ' | '.join(
        f'{f * 1000:.1f} ms' for f in floors) + ' |',
              '| in-process / floor (MLP targets: <= 5 at n=10, <= 3 at n=50) | '
              + ' | '.join(gaps) + ' |', '']
  sizes = sorted(dp_overhead)
  lines += [
      '### DP against no DP on this engine, the two alone', '',
      f'The MLP, the two in-process systems alternating (which goes first '
      f'too), medians of {_MANY_ROUNDS} rounds: a TFF worker\'s threads, '
      'still winding down after its round, slow whichever system runs next '
      'in the tables above.', '',
      '| measure | ' + ' | '.join(f'n={n}' for n in sizes) + ' |',
      '| --- |' + ' --- |' * len(sizes),
      '| inprocess ours gaussian_fixed | ' + ' | '.join(
          f'{dp_overhead[n]["inprocess ours gaussian_fixed"]:.4f} s'
          for n in sizes) + ' |',
      '| inprocess no DP | ' + ' | '.join(
          f'{dp_overhead[n]["inprocess no DP"]:.4f} s' for n in sizes) + ' |',
      '| DP / no DP (target <= 1.05) | ' + ' | '.join(
          f'{dp_overhead[n]["inprocess ours gaussian_fixed"] / dp_overhead[n]["inprocess no DP"]:.2f}'
          for n in sizes) + ' |', '',
  ]
  lines += [
      '### Whole loop and demo', '',
      '| measure | seconds |', '| --- | --- |',
      f'| training-loop round, in process (MLP, 50 Poisson users out of '
      f'1000: sampling, packing, training, accounting, evaluation every '
      f'round), every user\'s files written (median of {_MANY_ROUNDS}) | '
      f'{loop_round["loop_round"]:.3f} |',
      f'| the same while users are first seen (their data read and written '
      f'in the round that first samples them) | '
      f'{loop_round["loop_round_first_seen"]:.3f} |',
      f'| its process.next alone (median of {_MANY_ROUNDS}) | '
      f'{loop_round["process_next"]:.3f} |',
      f'| ratio, files written (target <= 1.5) | '
      f'{loop_round["loop_round"] / loop_round["process_next"]:.2f} |',
      f'| ratio, users first seen | '
      f'{loop_round["loop_round_first_seen"] / loop_round["process_next"]:.2f} |',
  ]
  lines += [f'| `make demo` wall time, {label} | {s:.1f} |'
            for label, s in demo.items()]
  values = list(demo.values())
  lines += [f'| demo: standard / default (target >= 2) | '
            f'{values[0] / values[1]:.2f} |', '', END]
  return '\n'.join(lines) + '\n'


def run(output: str, json_path: str, repeats: int, gflops: float,
        command: str) -> None:
  """Measures everything above and writes the section and the raw numbers."""
  rng = np.random.default_rng(0)
  results = []
  with execution.local_execution(simulate_secure_aggregation=True):
    mlp = synthetic.build_task(1000)
    for n in (10, 50):
      _bench('synthetic_mlp', mlp, n, repeats, gflops, rng, results)
    dp_overhead = {n: _dp_overhead(mlp, n, _MANY_ROUNDS) for n in (10, 50)}
    for name, task_name in (('femnist_cnn', 'femnist'),
                            ('shakespeare_gru', 'shakespeare')):
      try:
        task = tasks.build_task(task_name)
      except tasks.DataNotFoundError as e:
        print(f'skipping {task_name}: {e}', file=sys.stderr)
        continue
      _bench(name, task, 50, repeats, gflops, rng, results)
  loop_round = _loop_round(mlp, repeats)
  demo = _demo_seconds()
  report.replace_section(
      output, BEGIN, END,
      section(results, dp_overhead, loop_round, demo, command))
  with open(json_path, 'w') as f:
    json.dump(dict(rounds=results, dp_overhead=dp_overhead,
                   loop_round=loop_round, demo=demo, command=command),
              f, indent=1)


def main(argv):
  del argv
  command = (f'python -m benchmarks.inprocess --report={REPORT_FLAG.value} '
             f'--raw={_RAW.value} --timed_rounds={TIMED_ROUNDS_FLAG.value}')
  run(REPORT_FLAG.value, _RAW.value, TIMED_ROUNDS_FLAG.value,
      synthetic.matmul_gflops(), command)


if __name__ == '__main__':
  app.run(main)
