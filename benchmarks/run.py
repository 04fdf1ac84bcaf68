r"""Round time, memory and the compute floor, side by side: `make bench`.

  python -m benchmarks.run --output=BENCHMARKS.md --json=benchmarks/results.json

Measures, in one process, with the same client datasets for every aggregator
of a setting and their rounds alternating, the wall time of `process.next`
(one DP-FedAvg round)
for plain FedAvg, TFF's built-in `DifferentiallyPrivateFactory.gaussian_fixed`
and `gaussian_adaptive`, and each of this project's aggregators; at 10, 50 and
200 clients per round on the synthetic MLP (784-200-10, 64 examples per
client, one epoch of batch 16) and at 10 and 50 on the FEMNIST CNN (the shared
sample; skipped when absent). Each setting runs one warm-up round and then
`--repeats` timed rounds; the report gives the median and the range. It also
measures the machine's float32 matmul throughput, which turns each setting's
training FLOPs into a compute floor, the time of one round's phases in the
training loop, and peak memory at two population sizes (`benchmarks.memory`,
one fresh process each). Results go to a Markdown report and a JSON file.
"""

import datetime
import json
import os
import platform
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

from aggregators import distributed_dp
from aggregators import gaussian
from aggregators import laplace
from aggregators import registry
from aggregators import secure_encoding
from benchmarks import inprocess
from benchmarks import peers
from benchmarks import report
from benchmarks import synthetic
from dp_fedavg import accounting
from dp_fedavg import execution
from dp_fedavg import process
from dp_fedavg import sampling
from dp_fedavg import tasks
from dp_fedavg import vectorized

_OUTPUT = flags.DEFINE_string('output', 'BENCHMARKS.md', 'Markdown report.')
_JSON = flags.DEFINE_string('json', 'benchmarks/results.json', 'Raw numbers.')
_REPEATS = flags.DEFINE_integer('repeats', 3, 'Timed rounds per setting.')
_QUICK = flags.DEFINE_bool(
    'quick', False, 'Smallest settings only (checks the harness, not speed).')
# This run's section of the report; the others come from their own commands.
BEGIN = '<!-- make bench: begin -->'
END = '<!-- make bench: end -->'

_NOISE, _CLIP = 1.0, 1.0
_LOCAL_EPOCHS, _BATCH = synthetic.LOCAL_EPOCHS, synthetic.BATCH
_MLP_POPULATION = 1000


def _aggregators(n: int, stacked_users: bool = False) -> dict[str, object]:
  """Name -> factory for a cohort of n (the secure ones need the simulation).

  With `stacked_users`, those also timed on the vectorized engine (None is
  its plain mean over users).
  """
  if stacked_users:
    return {
        'FedAvg, no DP': None,
        'ours gaussian_fixed': gaussian.GaussianFactory(
            _NOISE, _CLIP, n, noise_seed=0, stacked_users=True),
        'ours gaussian_adaptive': gaussian.GaussianFactory(
            _NOISE, _CLIP, n, adaptive=gaussian.AdaptiveClipping(),
            noise_seed=0, stacked_users=True),
    }
  return {
      'FedAvg, no DP': tff.aggregators.UnweightedMeanFactory(),
      'TFF gaussian_fixed': tff.aggregators.DifferentiallyPrivateFactory
      .gaussian_fixed(_NOISE, n, _CLIP),
      'TFF gaussian_adaptive': tff.aggregators.DifferentiallyPrivateFactory
      .gaussian_adaptive(_NOISE, n, _CLIP, clipped_count_stddev=max(0.05 * n, 5 * _NOISE)),
      'ours gaussian_fixed': gaussian.GaussianFactory(_NOISE, _CLIP, n, noise_seed=0),
      'ours gaussian_adaptive': gaussian.GaussianFactory(
          _NOISE, _CLIP, n, adaptive=gaussian.AdaptiveClipping(), noise_seed=0),
      'ours laplace': laplace.LaplaceFactory(1.0, _CLIP, n, noise_seed=0),
      'ours secure_gaussian': gaussian.GaussianFactory(
          _NOISE, _CLIP, n, noise_seed=0,
          record_aggregation=secure_encoding.GridSecureSum()),
      'ours distributed_dp': distributed_dp.DistributedDpFactory(
          _NOISE, _CLIP, n, bits=20, rotation_seed=0),
  }


def _examples_per_round(task, client_ids) -> int:
  return sum(
      sum(1 for _ in task.train_data.create_tf_dataset_for_client(c))
      for c in client_ids
  ) * _LOCAL_EPOCHS


def _bench_task(name, task, cohort_sizes, repeats, gflops, rng, results,
                only=None):
  """Times every aggregator (or those named in `only`) on both engines."""
  flops_per_example = synthetic.training_flops_per_example(task.keras_model_fn())
  population = task.train_data.client_ids
  for n in cohort_sizes:
    if n > len(population):
      continue
    cohorts_indices = [
        list(rng.choice(len(population), n, replace=False))
        for _ in range(repeats + 1)
    ]
    cohorts_ids = [[population[i] for i in indices] for indices in cohorts_indices]
    start = time.perf_counter()
    cohorts = [synthetic.client_datasets(task, ids) for ids in cohorts_ids]
    dataset_seconds = (time.perf_counter() - start) / len(cohorts)
    aggregators = {
        aggregator_name: (factory, None)
        for aggregator_name, factory in _aggregators(n).items()
    }
    # Written before the timed rounds, as a run writes a user's files the
    # first time it is sampled; removed when the setting is done (the users
    # of the 1,000-client MLP take 200 MB).
    files_dir = tempfile.TemporaryDirectory(prefix='bench_users_')
    files = vectorized.UserFiles(task, files_dir.name)
    users_per_client = vectorized.default_users_per_client(n)
    groups = [
        vectorized.pack_cohort(files, indices, users_per_client, 0)
        for indices in cohorts_indices
    ]
    for aggregator_name, factory in _aggregators(n, stacked_users=True).items():
      aggregators[f'vectorized {aggregator_name}'] = (factory, groups)
    floor = (
        flops_per_example * _examples_per_round(task, cohorts_ids[1])
        / (gflops * 1e9)
    )
    # One context for every aggregator, so their rounds can alternate: the
    # secure-sum compilation leaves computations without secure sums as they
    # are, and compiled computations are cached.
    with execution.local_execution(simulate_secure_aggregation=True):
      processes, states, build_seconds = {}, {}, {}
      data = {}
      for aggregator_name, (factory, groups) in aggregators.items():
        if name != 'synthetic_mlp' and 'laplace' in aggregator_name:
          continue
        if only and aggregator_name.removeprefix('vectorized ') not in only:
          continue
        tf.keras.utils.set_random_seed(0)
        built = time.perf_counter()
        if groups is None:
          processes[aggregator_name] = process.build_process(
              task.model_fn, factory, 0.1, 1.0, 0.0
          )
          data[aggregator_name] = cohorts
        else:
          processes[aggregator_name] = vectorized.build_process(
              task, factory, 0.1, 1.0, 0.0, _LOCAL_EPOCHS, _BATCH
          )
          data[aggregator_name] = groups
        build_seconds[aggregator_name] = time.perf_counter() - built
        initial = processes[aggregator_name].initialize()
        # Warm-up round (tracing, first-call compilation).
        states[aggregator_name] = processes[aggregator_name].next(
            initial, data[aggregator_name][0]
        ).state
      seconds = {aggregator_name: [] for aggregator_name in processes}
      # Round-robin over aggregators, so drift of the machine's speed over
      # the minutes of a setting affects every aggregator alike.
      for round_index in range(1, repeats + 1):
        for aggregator_name, learning_process in processes.items():
          start = time.perf_counter()
          states[aggregator_name] = learning_process.next(
              states[aggregator_name], data[aggregator_name][round_index]
          ).state
          seconds[aggregator_name].append(time.perf_counter() - start)
    for aggregator_name, times in seconds.items():
      results.append(dict(
          task=name, clients_per_round=n, aggregator=aggregator_name,
          round_seconds=times, median=statistics.median(times),
          build_seconds=build_seconds[aggregator_name],
          dataset_seconds=dataset_seconds, floor_seconds=floor,
      ))
      print(f'{name} n={n} {aggregator_name}: median '
            f'{statistics.median(times):.3f}s', file=sys.stderr, flush=True)
    files_dir.cleanup()


def _with_tf_data_defaults(dataset: tf.data.Dataset) -> tf.data.Dataset:
  """Undoes the client datasets' options: tf.data's default rewrites, autotune."""
  options = tf.data.Options()
  options.experimental_optimization.apply_default_optimizations = True
  options.autotune.enabled = True
  return dataset.with_options(options)


def _overhead_removal(task, repeats) -> dict[str, list[float]]:
  """Round seconds with each of our overhead removals undone, side by side.

  Ours gaussian_fixed on 50 clients of the MLP; the variants' rounds alternate.
  """
  n = 50
  cohorts = [
      synthetic.client_datasets(task, [str(i) for i in range(r * n, (r + 1) * n)])
      for r in range(repeats + 1)
  ]
  variants = {
      'tf.data rewrites and Grappler on (TFF defaults)':
          (True, [[_with_tf_data_defaults(d) for d in c] for c in cohorts]),
      'Grappler on, tf.data rewrites off': (True, cohorts),
      'both off (this project)': (False, cohorts),
  }
  seconds = {name: [] for name in variants}
  with execution.local_execution():
    processes, states = {}, {}
    for name, (graph_optimizer, variant_cohorts) in variants.items():
      processes[name] = process.build_process(
          task.model_fn, gaussian.GaussianFactory(_NOISE, _CLIP, n, noise_seed=0),
          0.1, 1.0, 0.0, graph_optimizer=graph_optimizer,
      )
      states[name] = processes[name].next(
          processes[name].initialize(), variant_cohorts[0]
      ).state
    for round_index in range(1, repeats + 1):
      for name, (_, variant_cohorts) in variants.items():
        start = time.perf_counter()
        states[name] = processes[name].next(
            states[name], variant_cohorts[round_index]
        ).state
        seconds[name].append(time.perf_counter() - start)
  return seconds


def _loop_phases(task, repeats) -> dict[str, float]:
  """Seconds per phase of a training-loop round (50 clients, ours fixed)."""
  n = 50
  sampler = sampling.ClientSampler(
      sampling.SamplingScheme.POISSON, len(task.train_data.client_ids), n, 0
  )
  mechanism = registry.get('gaussian_fixed')
  params = mechanism.params(dict(noise_multiplier=_NOISE, clip=_CLIP))
  setting = registry.Setting(expected_clients_per_round=n, noise_seed=0)
  ledger = accounting.PrivacyLedger(
      mechanism.build_ledger(params, setting), sampling.SamplingScheme.POISSON,
      len(task.train_data.client_ids), n, 1e-5,
  )
  phases = {'sample cohort and build datasets': [], 'process.next': [],
            'accounting (PLD and RDP)': []}
  with execution.local_execution():
    learning_process = process.build_process(
        task.model_fn, mechanism.build_factory(params, setting), 0.1, 1.0, 0.0,
    )
    state = learning_process.initialize()
    for round_num in range(repeats + 1):
      start = time.perf_counter()
      cohort = sampler.sample(round_num)
      datasets = synthetic.client_datasets(task, [str(i) for i in cohort])
      built = time.perf_counter()
      output = learning_process.next(state, datasets)
      trained = time.perf_counter()
      ledger.record_round(state.aggregator, cohort)
      ledger.epsilons()
      state = output.state
      done = time.perf_counter()
      if round_num:  # Round 0 is the warm-up.
        phases['sample cohort and build datasets'].append(built - start)
        phases['process.next'].append(trained - built)
        phases['accounting (PLD and RDP)'].append(done - trained)
  return {phase: statistics.median(s) for phase, s in phases.items()}


def _memory(populations) -> list[dict]:
  rows = []
  for engine in ('standard', 'vectorized'):
    for population in populations:
      result = subprocess.run(
          [sys.executable, '-m', 'benchmarks.memory', f'--population={population}',
           f'--engine={engine}'],
          capture_output=True, text=True, check=True,
      )
      rows.append(json.loads(result.stdout.strip().splitlines()[-1]))
  return rows


def _machine() -> dict:
  cpu = platform.processor()
  try:
    with open('/proc/cpuinfo') as f:
      cpu = next(l.split(':', 1)[1].strip() for l in f if l.startswith('model name'))
  except (OSError, StopIteration):
    pass
  with open('/proc/meminfo') as f:
    memory_gib = int(f.readline().split()[1]) / 2**20
  return dict(
      cpu=cpu, cores=os.cpu_count(), memory_gib=round(memory_gib, 1),
      python=platform.python_version(), tensorflow=tf.__version__,
      tensorflow_federated=tff.__version__,
      date=datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC'),
  )


def _report(machine, gflops, results, overhead, phases, memory, command) -> str:
  def cell(task, n, aggregator):
    for r in results:
      if (r['task'], r['clients_per_round'], r['aggregator']) == (task, n, aggregator):
        return r
    return None

  lines = [
      '# Benchmarks', '',
      f'Produced by `{command}` (`make bench`) on {machine["date"]}.', '',
      f'Machine: {machine["cpu"]}, {machine["cores"]} cores, '
      f'{machine["memory_gib"]} GiB; Python {machine["python"]}, TensorFlow '
      f'{machine["tensorflow"]}, TFF {machine["tensorflow_federated"]}.', '',
      f'Float32 matmul throughput (1024x1024, median of 5): **{gflops:.0f} GFLOP/s**.',
      '', 'Round time is the wall time of one `process.next` (local training of '
      'the cohort, aggregation, server update), median of '
      f'{len(results[0]["round_seconds"])} rounds after a warm-up, with the '
      'range. Every aggregator of a setting trains on the same client datasets, '
      'and their rounds alternate (round 1 of each, then round 2 of each, ...), '
      'all in the context that simulates secure sums. '
      'Noise multiplier 1, clip 1; one local epoch of batch 16. The compute '
      'floor is the local training FLOPs (3 x forward, Dense and Conv2D) '
      'divided by the matmul throughput. These machines are noisy: compare '
      'ratios within one table, not across runs.', '',
      'Rows named `vectorized` run `--engine=vectorized` on the same users: '
      f'ceil(n / {os.cpu_count()} cores) users per TFF client, each user\'s '
      'examples read from files inside the worker (written before the timed '
      'rounds). The MLP trains all users of a TFF client at once with the '
      'low-rank SGD update (no per-user kernel); the CNN and the GRU train '
      'all users at once on per-user weight copies (grouped convolutions, '
      'where TF has their CPU gradient: with oneDNN, else the CNN trains user '
      'by user; one batched matmul per GRU time step).', '',
  ]
  for task in dict.fromkeys(r['task'] for r in results):
    sizes = sorted({r['clients_per_round'] for r in results if r['task'] == task})
    aggregators = list(dict.fromkeys(r['aggregator'] for r in results if r['task'] == task))
    lines += [f'## {task}', '',
              '| aggregator | ' + ' | '.join(f'n={n}' for n in sizes) + ' |',
              '| --- |' + ' --- |' * len(sizes)]
    for aggregator in aggregators:
      cells = []
      for n in sizes:
        r = cell(task, n, aggregator)
        cells.append('-' if r is None else
                     f'{r["median"]:.3f} s ({min(r["round_seconds"]):.3f}-'
                     f'{max(r["round_seconds"]):.3f})')
      lines.append(f'| {aggregator} | ' + ' | '.join(cells) + ' |')
    lines += ['', '| ratio (medians) | ' + ' | '.join(f'n={n}' for n in sizes) + ' |',
              '| --- |' + ' --- |' * len(sizes)]
    ratio_rows = [
        ('ours gaussian_fixed / TFF gaussian_fixed (target <= 1.0)',
         'ours gaussian_fixed', 'TFF gaussian_fixed'),
        ('ours gaussian_adaptive / TFF gaussian_adaptive (target <= 1.0)',
         'ours gaussian_adaptive', 'TFF gaussian_adaptive'),
        ('ours gaussian_fixed / no DP (target <= 1.05)',
         'ours gaussian_fixed', 'FedAvg, no DP'),
        ('TFF gaussian_fixed / no DP', 'TFF gaussian_fixed', 'FedAvg, no DP'),
        ('speed-up of the vectorized engine, ours gaussian_fixed (target >= 5)',
         'ours gaussian_fixed', 'vectorized ours gaussian_fixed'),
        ('speed-up of the vectorized engine, ours gaussian_adaptive',
         'ours gaussian_adaptive', 'vectorized ours gaussian_adaptive'),
        ('speed-up of the vectorized engine, no DP',
         'FedAvg, no DP', 'vectorized FedAvg, no DP'),
        ('vectorized: ours gaussian_fixed / no DP (target <= 1.05)',
         'vectorized ours gaussian_fixed', 'vectorized FedAvg, no DP'),
    ]
    for label, numerator, denominator in ratio_rows:
      values = []
      for n in sizes:
        a, b = cell(task, n, numerator), cell(task, n, denominator)
        values.append('-' if a is None or b is None else f'{a["median"] / b["median"]:.2f}')
      lines.append(f'| {label} | ' + ' | '.join(values) + ' |')
    floors, gaps, vectorized_gaps, per_client = [], [], [], []
    for n in sizes:
      r = cell(task, n, 'ours gaussian_fixed')
      floors.append(f'{r["floor_seconds"] * 1000:.1f} ms')
      gaps.append(f'{r["median"] / r["floor_seconds"]:.0f}x')
      v = cell(task, n, 'vectorized ours gaussian_fixed')
      vectorized_gaps.append(
          '-' if v is None else f'{v["median"] / v["floor_seconds"]:.1f}x')
      per_client.append(f'{r["median"] / n * 1000:.1f} ms')
    lines += ['| compute floor | ' + ' | '.join(floors) + ' |',
              '| ours gaussian_fixed / floor | ' + ' | '.join(gaps) + ' |',
              '| vectorized ours gaussian_fixed / floor (target <= 3) | '
              + ' | '.join(vectorized_gaps) + ' |',
              '| ours gaussian_fixed per client | ' + ' | '.join(per_client) + ' |',
              '']
  baseline = statistics.median(next(iter(overhead.values())))
  lines += ['## Overhead removed (synthetic MLP, 50 clients, ours gaussian_fixed)', '',
            'The same round with our changes to TFF\'s defaults undone, variants '
            'alternating round by round. Predicted from a `perf` profile of the '
            'worker (share of its CPU time): tf.data\'s per-round dataset '
            'rewrites (FinalizeDataset, RewriteDataset) 6%; Grappler on every '
            'function instantiation (OptimizeFunctionGraph) 11%. Left as they '
            'were after measuring (MLP, n=50, separate processes): the '
            'worker\'s max_concurrent_computation_calls (no limit 0.67 s; 1: '
            '1.02 s; 2: 0.72 s; 4: 0.75 s), oneDNN off (0.72 s), one intra-op '
            'thread with 2 concurrent calls (0.83 s).', '',
            '| variant | median round | range | vs TFF defaults |',
            '| --- | --- | --- | --- |']
  for name, times in overhead.items():
    lines.append(f'| {name} | {statistics.median(times):.3f} s | '
                 f'{min(times):.3f}-{max(times):.3f} | '
                 f'{statistics.median(times) / baseline:.2f} |')
  lines += ['', '## Where a training-loop round goes (synthetic MLP, 50 expected clients, '
            'Poisson, ours gaussian_fixed)', '',
            '| phase | median seconds |', '| --- | --- |']
  lines += [f'| {phase} | {seconds:.3f} |' for phase, seconds in phases.items()]
  lines += ['', '## Peak memory against population (synthetic MLP, 3 rounds of 50)', '',
            '| engine | population | Python peak (MiB) | TFF worker peak (MiB) |',
            '| --- | --- | --- | --- |']
  lines += [f'| {m["engine"]} | {m["population"]:,} | {m["python_peak_mib"]:.0f} | '
            f'{m["worker_peak_mib"]:.0f} |' for m in memory]
  lines.append('')
  return '\n'.join(lines)


def main(argv):
  del argv
  command = 'python -m benchmarks.run ' + ' '.join(
      f'--{name}={flags.FLAGS[name].value}' for name in ('output', 'json', 'repeats')
  ) + (' --quick' if _QUICK.value else '')
  rng = np.random.default_rng(0)
  gflops = synthetic.matmul_gflops()
  print(f'matmul: {gflops:.0f} GFLOP/s', file=sys.stderr)
  results = []
  sizes = (10,) if _QUICK.value else (10, 50, 200)
  mlp = synthetic.build_task(_MLP_POPULATION)
  _bench_task('synthetic_mlp', mlp, sizes, _REPEATS.value, gflops, rng, results)
  if not _QUICK.value:
    try:
      femnist = tasks.build_task('femnist')
    except tasks.DataNotFoundError as e:
      print(f'skipping femnist: {e}', file=sys.stderr)
    else:
      _bench_task('femnist_cnn', femnist, (10, 50), _REPEATS.value, gflops, rng,
                  results)
    try:
      shakespeare = tasks.build_task('shakespeare')
    except tasks.DataNotFoundError as e:
      print(f'skipping shakespeare: {e}', file=sys.stderr)
    else:
      _bench_task('shakespeare_gru', shakespeare, (10,), _REPEATS.value, gflops,
                  rng, results, only=('FedAvg, no DP', 'ours gaussian_fixed'))
  overhead = _overhead_removal(mlp, _REPEATS.value)
  phases = _loop_phases(mlp, _REPEATS.value)
  memory = _memory((1_000,) if _QUICK.value else (1_000, 100_000))
  machine = _machine()
  # Only this run's section: the file's other sections come from their own
  # commands (robust rules, DP-SGD step, correlated noise, ...).
  report.replace_section(
      _OUTPUT.value, BEGIN, END,
      f'{BEGIN}\n'
      f'{_report(machine, gflops, results, overhead, phases, memory, command)}'
      f'{END}\n')
  os.makedirs(os.path.dirname(_JSON.value) or '.', exist_ok=True)
  with open(_JSON.value, 'w') as f:
    json.dump(dict(machine=machine, matmul_gflops=gflops, rounds=results,
                   overhead_removal=overhead, loop_phases=phases, memory=memory, command=command), f, indent=1)
  inprocess.run(
      _OUTPUT.value, os.path.join(os.path.dirname(_JSON.value) or '.',
                                  'inprocess_results.json'),
      _REPEATS.value, gflops, command)
  try:
    peers.run(_OUTPUT.value,
              os.path.join(os.path.dirname(_JSON.value) or '.',
                           'peers_results.json'),
              _REPEATS.value, peers.PEERS_VENV, command)
  except subprocess.CalledProcessError as e:
    # No index to install torch and pfl from: the rest of the report stands.
    print(f'skipping the peers: {e}', file=sys.stderr)
  print(f'report: {_OUTPUT.value}\nraw: {_JSON.value}')


if __name__ == '__main__':
  app.run(main)
