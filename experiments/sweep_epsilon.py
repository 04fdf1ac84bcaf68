r"""Test accuracy against epsilon for any aggregator: the privacy-utility curve.

  python -m experiments.sweep_epsilon --target_epsilons=1,2,4,8 \
      --output_dir=runs/sweep_epsilon

One DP-FedAvg run per point, with every other flag of `experiments.train`.
Give exactly one list:
  --target_epsilons: each run's noise is calibrated to reach that epsilon at
    --delta after --rounds (any private aggregator);
  --noise_multipliers: noise multipliers (mechanisms with --noise_multiplier);
  --epsilons_per_round: per-round epsilons (mechanisms with
    --epsilon_per_round: laplace).
With --baseline (default) one more run without DP gives the reference line.

Writes OUTPUT_DIR/flags.json, OUTPUT_DIR/results.csv (one row per run: swept
value, noise used, epsilon, final accuracy and loss), and
OUTPUT_DIR/accuracy_vs_epsilon.png (log epsilon axis); each run's own outputs
are under OUTPUT_DIR/runs/.
"""

import os
import sys

from absl import app
from absl import flags
import tensorflow as tf  # noqa: F401  # pylint: disable=unused-import  # Before absl starts: Keras breaks when TF is first imported inside main.

from aggregators import registry
from dp_fedavg import run_config
from experiments import plots
from experiments import privacy_flags
from experiments import runner
from experiments import studies
from experiments import training_flags

_OUTPUT_DIR = flags.DEFINE_string(
    'output_dir', 'runs/sweep_epsilon', 'Where the study\'s results go.')
_OVERWRITE = flags.DEFINE_bool(
    'overwrite', False, 'Replace an earlier study\'s results in output_dir.')
_TARGET_EPSILONS = flags.DEFINE_list(
    'target_epsilons', None, 'Epsilons to calibrate each run\'s noise to.')
_NOISE_MULTIPLIERS = flags.DEFINE_list(
    'noise_multipliers', None,
    'Noise multipliers (mechanisms with --noise_multiplier).')
_EPSILONS_PER_ROUND = flags.DEFINE_list(
    'epsilons_per_round', None,
    'Per-round epsilons (mechanisms with --epsilon_per_round).')
_BASELINE = flags.DEFINE_bool(
    'baseline', True, 'Also train once without DP, for reference.')

# (list flag, the run value it sets, other run values). A mechanism
# parameter's list applies to the mechanisms that have that parameter.
_SWEEPS = (
    (_TARGET_EPSILONS, 'target_epsilon', dict(calibrate='noise')),
    (_NOISE_MULTIPLIERS, 'noise_multiplier', {}),
    (_EPSILONS_PER_ROUND, 'epsilon_per_round', {}),
)


def _chosen_sweep():
  chosen = [sweep for sweep in _SWEEPS if sweep[0].value]
  return chosen[0] if len(chosen) == 1 else None


def study_error(config: run_config.RunConfig) -> str | None:
  error = training_flags.flag_error(config) or studies.output_dir_error(
      _OUTPUT_DIR.value, _OVERWRITE.value
  )
  if error:
    return error
  if config.mechanism.noise is None:
    return '--aggregator must be a private one; the sweep varies its privacy.'
  sweep = _chosen_sweep()
  if sweep is None:
    return (
        'give exactly one of --target_epsilons, --noise_multipliers and '
        '--epsilons_per_round.'
    )
  holder, run_value, _ = sweep
  takers = {
      info.name: info.mechanisms for info in registry.parameters()
  }.get(run_value)
  if takers is not None and config.aggregator not in takers:
    return (
        f'--{holder.name} applies to --aggregator={"|".join(takers)}, '
        f'not {config.aggregator}; --target_epsilons applies to every private '
        'aggregator.'
    )
  try:
    values = studies.parse_floats(holder)
  except ValueError as e:
    return str(e)
  if min(values) <= 0:
    return (
        f'--{holder.name}={",".join(holder.value)} is out of range: must be '
        'numbers > 0.'
    )
  return None


def main(argv):
  config = training_flags.config_from_flags()
  task = training_flags.start_or_exit(argv, study_error(config), config)
  holder, run_value, other_values = _chosen_sweep()

  def run_values(value):
    return {run_value: value, **other_values}

  values = studies.parse_floats(holder)
  utility = studies.utility(task)
  # Calibrating every point first: an unreachable target fails before training.
  plans = [
      runner.plan_or_exit(
          config.replace(**run_values(value)), task,
          lambda e, value=value: privacy_flags.exit_with_usage_error(
              f'--{holder.name}={value:g}: {e}'),
      )
      for value in values
  ]
  output_dir = _OUTPUT_DIR.value
  study_values = studies.write_flags(output_dir, sys.modules[__name__])
  progress = studies.Progress(len(values) + int(_BASELINE.value), output_dir)
  rows = []
  baseline = None
  with (progress.stopping_on_signals('sweep_epsilon.py'),
        runner.execution_context(config)):
    study = runner.Runner(task)
    for value, plan in zip(values, plans):
      summary = study.run(
          plan, os.path.join(output_dir, 'runs', f'{holder.name}_{value:g}'),
          {**study_values, **run_values(value)}, overwrite=True,
      )
      rows.append({
          run_value: value, 'noise': summary.noise,
          'epsilon': summary.epsilon, 'delta': summary.delta,
          'accountant': summary.accountant, 'rounds': summary.rounds_completed,
          'eval_accuracy': summary.eval_accuracy, 'eval_loss': summary.eval_loss,
      })
      progress.run_finished(
          f'{run_value}={value:g}: epsilon {summary.epsilon:.4g}, '
          f'{utility.label} {getattr(summary, utility.key)}',
          rows)
    if _BASELINE.value:
      # Plain FedAvg, whatever the privacy unit.
      no_dp = dict(aggregator='none', privacy_unit='user',
                   target_epsilon=None, calibrate='none')
      summary = study.run(
          runner.plan_or_exit(
              config.replace(**no_dp), task, privacy_flags.exit_with_usage_error
          ),
          os.path.join(output_dir, 'runs', 'no_dp'),
          {**study_values, **no_dp}, overwrite=True,
      )
      baseline = getattr(summary, utility.key)
      progress.run_finished(f'no DP: {utility.label} {baseline}', rows)
  results = studies.write_results(output_dir, rows)
  figure = os.path.join(output_dir, 'accuracy_vs_epsilon.png')
  plots.accuracy_vs_epsilon(
      {config.aggregator: [
          (r['epsilon'], r[utility.key]) for r in rows
      ]},
      figure,
      f'{task.name}: {config.aggregator}, {config.rounds} rounds',
      config.delta,
      baseline=baseline,
      ylabel=utility.label,
  )
  if baseline is not None:
    print(f'no-DP {utility.label}: {baseline:.4f}')
  print(f'results: {results}\nfigure: {figure}')


if __name__ == '__main__':
  app.run(main)
