r"""Accuracy against the clients' dropout rate, central against distributed DP.

  python -m experiments.dropouts --output_dir=runs/dropouts \
      --dropout_rates=0,0.1,0.2,0.3,0.5 --ddp_dropout_tolerance=0.3

For each rate in --dropout_rates, two runs that differ only in where the
noise is added: `gaussian_fixed` (the server adds it: central DP, epsilon
unchanged by dropouts) and `distributed_dp` (each client adds a share to a
secure sum, sized for --ddp_dropout_tolerance: past it the shares that
arrive are too few, and the epsilon composed is that of those shares). Both
use fixed-size sampling (distributed DP's accounting needs it) and the noise
multiplier, clip and every other flag of `experiments.train`.

Writes OUTPUT_DIR/flags.json, OUTPUT_DIR/results.csv (one row per run: the
noise placement, dropout rate, mean clients dropped per round, epsilon, final
accuracy and loss), OUTPUT_DIR/accuracy_vs_dropout.png and each run's own
outputs under OUTPUT_DIR/runs/<placement>_d<rate>/.
"""

import os
import sys

from absl import app
from absl import flags
import numpy as np
import tensorflow as tf  # noqa: F401  # pylint: disable=unused-import  # Before absl starts: Keras breaks when TF is first imported inside main.

from dp_fedavg import run_config
from experiments import plots
from experiments import privacy_flags
from experiments import runner
from experiments import studies
from experiments import training_flags

_OUTPUT_DIR = flags.DEFINE_string(
    'output_dir', 'runs/dropouts', 'Where the study\'s results go.')
_OVERWRITE = flags.DEFINE_bool(
    'overwrite', False, 'Replace an earlier study\'s results in output_dir.')
_DROPOUT_RATES = flags.DEFINE_list(
    'dropout_rates', ['0', '0.1', '0.2', '0.3', '0.5'],
    'Dropout rates to run, each in [0, 1).')

# Where the noise is added: (name in results.csv, aggregator).
_PLACEMENTS = (('central', 'gaussian_fixed'), ('distributed', 'distributed_dp'))
# The flags are checked as distributed_dp's (its --ddp_* flags apply), with
# the fixed-size sampling its accounting needs.
STUDY_DEFAULTS = dict(aggregator='distributed_dp', sampling='uniform')


def study_error(config: run_config.RunConfig) -> str | None:
  error = training_flags.flag_error(config) or studies.output_dir_error(
      _OUTPUT_DIR.value, _OVERWRITE.value)
  if error:
    return error
  if flags.FLAGS['aggregator'].present:
    return ('--aggregator: the study runs both gaussian_fixed and '
            'distributed_dp; drop --aggregator.')
  if config.workers:
    return ('--workers: distributed DP\'s secure sums run on one local '
            'worker; drop --workers.')
  try:
    rates = studies.parse_floats(_DROPOUT_RATES)
  except ValueError as e:
    return str(e)
  if not rates or not all(0 <= rate < 1 for rate in rates):
    return (f'--dropout_rates={",".join(_DROPOUT_RATES.value)} is out of '
            'range: must be a non-empty list of numbers in [0, 1).')
  return None


def main(argv):
  config = training_flags.config_from_flags()
  task = training_flags.start_or_exit(argv, study_error(config), config)
  rates = studies.parse_floats(_DROPOUT_RATES)
  utility = studies.utility(task)
  runs = [(name, aggregator, rate) for rate in rates
          for name, aggregator in _PLACEMENTS]
  # Every run's plan first: a setting the mechanisms refuse fails before
  # any training.
  plans = [
      runner.plan_or_exit(
          config.replace(aggregator=aggregator, dropout_rate=rate), task,
          privacy_flags.exit_with_usage_error)
      for _, aggregator, rate in runs
  ]
  output_dir = _OUTPUT_DIR.value
  study_values = studies.write_flags(output_dir, sys.modules[__name__])
  progress = studies.Progress(len(runs), output_dir)
  rows = []
  with (progress.stopping_on_signals('dropouts.py'),
        runner.execution_context(config)):
    study = runner.Runner(task)
    for (name, aggregator, rate), plan in zip(runs, plans):
      summary = study.run(
          plan, os.path.join(output_dir, 'runs', f'{name}_d{rate:g}'),
          {**study_values, 'aggregator': aggregator, 'dropout_rate': rate},
          overwrite=True)
      rows.append({
          'noise_placement': name, 'dropout_rate': rate,
          'mean_dropped': float(np.mean(
              [r.dropped_clients for r in summary.results])),
          'epsilon': summary.epsilon, 'delta': summary.delta,
          'accountant': summary.accountant,
          'rounds': summary.rounds_completed,
          'eval_accuracy': summary.eval_accuracy,
          'eval_loss': summary.eval_loss,
      })
      progress.run_finished(
          f'{name} DP, dropout {rate:g}: epsilon {summary.epsilon:.4g}, '
          f'{utility.label} {getattr(summary, utility.key)}',
          rows)
  results = studies.write_results(output_dir, rows)
  figure = os.path.join(output_dir, 'accuracy_vs_dropout.png')
  plots.accuracy_vs_fraction(
      {f'{name} DP': [(r['dropout_rate'], r[utility.key])
                      for r in rows if r['noise_placement'] == name]
       for name, _ in _PLACEMENTS},
      figure,
      f'{task.name}: z={config.params.noise_multiplier:g}, '
      f'{config.clients_per_round} clients per round',
      utility.label, xlabel='dropout rate')
  print(f'results: {results}\nfigure: {figure}')


if __name__ == '__main__':
  for name, value in STUDY_DEFAULTS.items():
    flags.FLAGS.set_default(name, value)
  app.run(main)
