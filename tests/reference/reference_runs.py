r"""Seeded reference runs: what a refactoring must leave unchanged.

  .venv/bin/python -m tests.reference.reference_runs --record   # rewrite the JSON
  .venv/bin/python -m pytest -m slow tests/reference             # compare

Every aggregator, each clipping strategy, each sampling scheme, both engines,
the budget stop, noise calibration and each accountant: 3 rounds on digits,
each through `experiments.train` as a user runs it, plus `privacy_report`
tables. `reference_runs.json` holds their metrics.csv values (the wall-clock
column dropped). Runs whose clients draw unseeded noise (client-side Gaussian
noise, distributed DP) are compared on their privacy columns only.
"""

import argparse
import concurrent.futures
import csv
import json
import os
import subprocess
import sys
import tempfile

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(__file__)))
RECORD = os.path.join(os.path.dirname(__file__), 'reference_runs.json')
PRIVACY_COLUMNS = ('round', 'cohort_size', 'epsilon', 'accountant', 'delta')
# The engine the runs were recorded on; a run's own --engine comes later and
# wins. (The default became --engine=auto, in process, whose float sums run
# in another order.)
_COMMON = (
    '--task=digits', '--rounds=3', '--num_clients=30', '--clients_per_round=6',
    '--seed=4', '--local_epochs=1', '--eval_every=1', '--engine=standard',
)

# name -> (flags, whether the run is deterministic given its seed).
TRAIN_RUNS = {
    'none': (('--aggregator=none',), True),
    'gaussian_fixed': ((), True),
    'gaussian_fixed_per_layer_uniform': (('--clipping=per_layer_uniform',), True),
    'gaussian_fixed_per_layer_adaptive': (
        ('--clipping=per_layer_adaptive',), True),
    'gaussian_fixed_uniform': (('--sampling=uniform',), True),
    'gaussian_fixed_full': (('--sampling=full',), True),
    'gaussian_fixed_client_noise': (('--noise_placement=client',), False),
    'gaussian_adaptive': (('--aggregator=gaussian_adaptive',), True),
    'gaussian_adaptive_uniform_pld': (
        ('--aggregator=gaussian_adaptive', '--sampling=uniform',
         '--accountant=rdp'), True),
    'gaussian_fixed_pld': (('--accountant=pld',), True),
    'laplace': (('--aggregator=laplace', '--l1_clip=2'), True),
    'secure_gaussian': (('--aggregator=secure_gaussian',), True),
    'secure_gaussian_adaptive': (
        ('--aggregator=secure_gaussian', '--adaptive_clip'), True),
    'distributed_dp_ddgauss': (
        ('--aggregator=distributed_dp', '--sampling=uniform'), False),
    'distributed_dp_skellam': (
        ('--aggregator=distributed_dp', '--sampling=uniform',
         '--ddp_mechanism=skellam'), False),
    'budget_stop': (
        ('--noise_multiplier=0.8', '--target_epsilon=4.5'), True),
    'calibrated': (
        ('--sampling=uniform', '--target_epsilon=5', '--calibrate=noise'), True),
    'vectorized_none': (('--engine=vectorized', '--aggregator=none'), True),
    'vectorized_gaussian_fixed': (('--engine=vectorized',), True),
    'vectorized_gaussian_adaptive': (
        ('--engine=vectorized', '--aggregator=gaussian_adaptive',
         '--clipping=per_layer_uniform'), True),
    'vectorized_laplace': (('--engine=vectorized', '--aggregator=laplace'), True),
    'vectorized_client_noise': (
        ('--engine=vectorized', '--noise_placement=client'), False),
}

REPORTS = {
    'tutorial': (
        '--noise_multiplier=1.2', '--clients_per_round=120',
        '--num_clients=3383', '--rounds=100', '--table_every=25',
        '--target_epsilon=1.5'),
    'adaptive_uniform': (
        '--aggregator=gaussian_adaptive', '--sampling=uniform', '--rounds=50',
        '--table_every=10'),
    'laplace': ('--aggregator=laplace', '--rounds=20', '--table_every=5'),
    'client_noise': ('--noise_placement=client', '--rounds=10'),
    'calibrated': ('--target_epsilon=2', '--calibrate=noise', '--rounds=40'),
}


def _python(module: str, *args: str) -> subprocess.CompletedProcess:
  return subprocess.run(
      [sys.executable, '-m', module, *args], cwd=REPO_ROOT,
      capture_output=True, text=True, timeout=900,
  )


def train_run(name: str) -> list[dict[str, str]]:
  """metrics.csv of reference run `name`, without wall-clock seconds."""
  args, deterministic = TRAIN_RUNS[name]
  with tempfile.TemporaryDirectory() as output_dir:
    result = _python(
        'experiments.train', f'--output_dir={output_dir}', *_COMMON, *args
    )
    if result.returncode:
      raise RuntimeError(f'{name}: {result.stderr[-3000:]}')
    with open(os.path.join(output_dir, 'metrics.csv')) as f:
      rows = list(csv.DictReader(f))
  keep = (lambda c: c != 'seconds') if deterministic else (
      lambda c: c in PRIVACY_COLUMNS)
  return [{c: v for c, v in row.items() if keep(c)} for row in rows]


def report(name: str) -> str:
  result = _python('experiments.privacy_report', *REPORTS[name])
  if result.returncode:
    raise RuntimeError(f'report {name}: {result.stderr[-3000:]}')
  return result.stdout


def run_all(workers: int = 2) -> dict:
  with concurrent.futures.ThreadPoolExecutor(workers) as pool:
    runs = dict(zip(TRAIN_RUNS, pool.map(train_run, TRAIN_RUNS)))
    reports = dict(zip(REPORTS, pool.map(report, REPORTS)))
  return {'train': runs, 'privacy_report': reports}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--record', action='store_true',
                      help=f'rewrite {os.path.basename(RECORD)}')
  args = parser.parse_args()
  results = run_all()
  if args.record:
    with open(RECORD, 'w') as f:
      json.dump(results, f, indent=1, sort_keys=True)
      f.write('\n')
    print(f'recorded {len(results["train"])} runs in {RECORD}')
  else:
    print(json.dumps(results, indent=1, sort_keys=True))


if __name__ == '__main__':
  main()
