r"""Robustness study: accuracy against the fraction of Byzantine clients.

  python -m experiments.robustness --output_dir=runs/robustness

For each DP mode in --dp_modes, robust rule in --robust_rules, attack in
--attacks and Byzantine fraction in --byzantine_fractions, one training run;
a fraction of 0 is one run per rule without attack, shared by every attack's
panel. The DP modes:
* none: no privacy (--aggregator=none);
* central: gaussian_fixed with server noise; only the mean (rule none) and
  centered_clipping are sound there (aggregators/robust.py), the other rules
  are skipped and listed;
* local: gaussian_fixed with --noise_placement=client; every rule.
--noise_multiplier and --clip set the noise and clip of both DP modes;
centered_clipping on the server (none, local) uses --cc_radius, default
--clip.

Defaults follow the bucketing experiment of Karimireddy, He & Jaggi (ICLR
2022) in miniature: 25 clients, all taking part in every round, data sorted
by label before it is split (--partition=sorted), server momentum 0.9.

Writes OUTPUT_DIR/flags.json; results.csv (one row per run: DP mode, rule,
pre-aggregation, attack, fraction, epsilon, final accuracy and loss);
worst_case.csv (per DP mode, rule and fraction, the lowest accuracy over the
attacks and the attack that caused it); accuracy_<attack>.png, one panel per
attack; and each run's own outputs under OUTPUT_DIR/runs/.
"""

import collections
import os
import sys
from typing import Any, Optional

from absl import app
from absl import flags
from absl import logging
import tensorflow as tf  # noqa: F401  # pylint: disable=unused-import  # Before absl starts: Keras breaks when TF is first imported inside main.

from aggregators import attacks
from aggregators import checks
from aggregators import robust
from dp_fedavg import run_config
from experiments import plots
from experiments import privacy_flags
from experiments import runner
from experiments import studies
from experiments import training_flags

DP_MODES = ('none', 'central', 'local')
_OUTPUT_DIR = flags.DEFINE_string(
    'output_dir', 'runs/robustness', 'Where the study\'s results go.')
_OVERWRITE = flags.DEFINE_bool(
    'overwrite', False, 'Replace an earlier study\'s results in output_dir.')
_ROBUST_RULES = flags.DEFINE_list(
    'robust_rules', list(robust.RULES),
    f'Rules to compare, from {robust.RULES} (none: the mean).')
_ATTACKS = flags.DEFINE_list(
    'attacks', [a for a in attacks.ATTACKS if a != 'none'],
    f'Attacks, from {attacks.ATTACKS[1:]}.')
_BYZANTINE_FRACTIONS = flags.DEFINE_list(
    'byzantine_fractions', ['0', '0.1', '0.2', '0.3'],
    'Fractions of Byzantine clients, each in [0, 1).')
_DP_MODES = flags.DEFINE_list(
    'dp_modes', list(DP_MODES), f'From {DP_MODES}.')

# The study's setting; any of them can still be given on the command line.
STUDY_DEFAULTS = dict(
    task='digits', num_clients=25, sampling='full', partition='sorted',
    rounds=30, local_epochs=1, batch_size=8, client_lr=0.1,
    server_momentum=0.9, eval_every=30,
)
# Set per run by the study from its lists.
_STUDY_SETS = (
    'robust_rule', 'attack', 'byzantine_fraction', 'noise_placement',
)


def _list_error(flag: flags.FlagHolder, allowed: tuple[str, ...]) -> Optional[str]:
  if not flag.value or any(v not in allowed for v in flag.value):
    return (
        f'--{flag.name}={",".join(flag.value)} is out of range: must be a '
        f'non-empty list from {", ".join(allowed)}.'
    )
  return None


def study_error(config: run_config.RunConfig) -> Optional[str]:
  """The first problem with the study's flags, as one line; None if none."""
  for name in ('aggregator', *_STUDY_SETS):
    if flags.FLAGS[name].present:
      return (
          f'--{name} is set by the study for each run (--dp_modes, '
          '--robust_rules, --attacks, --byzantine_fractions); leave it unset.'
      )
  # --cc_radius and --robust_preaggregation go with the robust rules of the
  # study's runs, not with the mean of the configuration as given.
  error = training_flags.flag_error(config.replace(
      cc_radius=None, robust_preaggregation='none')) or studies.output_dir_error(
          _OUTPUT_DIR.value, _OVERWRITE.value)
  if error:
    return error
  try:
    robust.Robustness(
        rule='median', preaggregation=config.robust_preaggregation,
        bucket_size=config.bucket_size, cc_radius=config.cc_radius)
  except checks.ArgumentError as e:
    return run_config.out_of_range(e.name, e.value, e.allowed)
  error = (
      _list_error(_ROBUST_RULES, robust.RULES)
      or _list_error(_ATTACKS, attacks.ATTACKS[1:])
      or _list_error(_DP_MODES, DP_MODES)
  )
  if error:
    return error
  try:
    fractions = studies.parse_floats(_BYZANTINE_FRACTIONS)
  except ValueError as e:
    return str(e)
  if not fractions or not all(0 <= f < 1 for f in fractions):
    return (
        f'--byzantine_fractions={",".join(_BYZANTINE_FRACTIONS.value)} is out '
        'of range: must be a non-empty list of numbers in [0, 1).'
    )
  return None


def study_runs(
    config: run_config.RunConfig,
) -> tuple[list[dict[str, Any]], list[str]]:
  """(the runs' settings, the skipped combinations with the reason)."""
  clip = dict(config.mechanism_values)['clip']
  runs, skipped = [], []
  preaggregated = config.robust_preaggregation != 'none'
  for mode in _DP_MODES.value:
    if mode == 'central' and preaggregated:
      skipped.append(
          'central DP: pre-aggregation mixes clients before the clip, so '
          'central noise would not cover one client')
      continue
    for rule in _ROBUST_RULES.value:
      if mode == 'central' and rule in robust.NOT_SUMS:
        skipped.append(
            f'central DP with {rule}: its output moves by about the clip '
            'when one client changes, so central noise would not cover it')
        continue
      if rule == 'none' and preaggregated:
        skipped.append(
            f'{mode} DP with the mean: pre-aggregation feeds a robust rule')
        continue
      for fraction in studies.parse_floats(_BYZANTINE_FRACTIONS):
        for attack in _ATTACKS.value if fraction > 0 else ['none']:
          run = dict(
              dp_mode=mode, robust_rule=rule, attack=attack,
              byzantine_fraction=fraction,
              aggregator='none' if mode == 'none' else 'gaussian_fixed',
              noise_placement='client' if mode == 'local' else 'server',
              cc_radius=None,
          )
          if rule == 'centered_clipping' and mode != 'central':
            run['cc_radius'] = config.cc_radius or clip
          runs.append(run)
  return runs, skipped


def _run_name(run: dict[str, Any]) -> str:
  return (f'{run["dp_mode"]}_{run["robust_rule"]}_{run["attack"]}'
          f'_f{run["byzantine_fraction"]:g}')


def worst_cases(
    rows: list[dict[str, Any]], utility: studies.Utility
) -> list[dict[str, Any]]:
  """Per DP mode, rule and fraction > 0: the worst utility over attacks (the
  lowest accuracy, or the highest loss)."""
  worst = collections.OrderedDict()
  for row in rows:
    value = row[utility.key]
    if row['byzantine_fraction'] == 0 or value is None:
      continue
    key = (row['dp_mode'], row['robust_rule'], row['byzantine_fraction'])
    if key not in worst or utility.worse(value, worst[key][utility.key]):
      worst[key] = {
          'dp_mode': key[0], 'robust_rule': key[1],
          'byzantine_fraction': key[2], utility.key: value,
          'worst_attack': row['attack']}
  return list(worst.values())


_MODE_LABELS = dict(none='no DP', central='central DP', local='local DP')


def write_figures(
    rows: list[dict[str, Any]], attacks_shown: list[str], output_dir: str,
    title: str, utility: studies.Utility,
) -> list[str]:
  """accuracy_<attack>.png per attack: accuracy against the fraction, one
  line per rule and DP mode (fraction 0 is the run without attack)."""
  paths = []
  for attack in attacks_shown:
    series = collections.defaultdict(list)
    for row in rows:
      if row['attack'] in (attack, 'none') and row[utility.key] is not None:
        label = f'{row["robust_rule"]}, {_MODE_LABELS[row["dp_mode"]]}'
        series[label].append((row['byzantine_fraction'], row[utility.key]))
    path = os.path.join(output_dir, f'accuracy_{attack}.png')
    plots.accuracy_vs_fraction(
        dict(series), path, f'{title}: {attack}', utility.label)
    paths.append(path)
  return paths


def main(argv):
  config = training_flags.config_from_flags()
  task = training_flags.start_or_exit(argv, study_error(config), config)
  output_dir = _OUTPUT_DIR.value
  study_values = studies.write_flags(output_dir, sys.modules[__name__])
  runs, skipped = study_runs(config)
  for reason in skipped:
    logging.info('skipped %s', reason)
  progress = studies.Progress(len(runs), output_dir)
  utility = studies.utility(task)
  rows = []
  with (progress.stopping_on_signals('robustness.py'),
        runner.execution_context(config)):
    study = runner.Runner(task)
    for run in runs:
      settings = {k: v for k, v in run.items() if k != 'dp_mode'}
      summary = study.run(
          runner.plan_or_exit(
              config.replace(**settings), task,
              privacy_flags.exit_with_usage_error),
          os.path.join(output_dir, 'runs', _run_name(run)),
          {**study_values, **run},
          overwrite=True,
      )
      rows.append(dict(
          dp_mode=run['dp_mode'], robust_rule=run['robust_rule'],
          robust_preaggregation=config.robust_preaggregation,
          attack=run['attack'], byzantine_fraction=run['byzantine_fraction'],
          epsilon=summary.epsilon, delta=summary.delta,
          rounds=summary.rounds_completed,
          eval_accuracy=summary.eval_accuracy, eval_loss=summary.eval_loss,
      ))
      progress.run_finished(
          f'{_run_name(run)}: {utility.label} '
          f'{getattr(summary, utility.key)}, epsilon {summary.epsilon:.4g}',
          rows)
  results = studies.write_results(output_dir, rows)
  worst = worst_cases(rows, utility)
  if worst:
    studies.write_results(output_dir, worst, 'worst_case.csv')
  figures = write_figures(
      rows, _ATTACKS.value, output_dir,
      f'{task.name}, pre-aggregation {config.robust_preaggregation}',
      utility)
  print(f'results: {results}')
  for row in worst:
    print(f'worst case {row["dp_mode"]:>7} DP {row["robust_rule"]:>17} at '
          f'{row["byzantine_fraction"]:g}: {utility.label} '
          f'{row[utility.key]:.4f} ({row["worst_attack"]})')
  print('figures: ' + ', '.join(figures))


if __name__ == '__main__':
  for name, value in STUDY_DEFAULTS.items():
    flags.FLAGS.set_default(name, value)
  app.run(main)
