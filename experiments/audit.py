r"""Audits a DP-FedAvg run with canary clients: empirical epsilon beside the
accountant's.

  python -m experiments.audit --task=digits --aggregator=gaussian_fixed \
      --noise_multiplier=1.0 --clip=1.0 --canaries=500 --rounds=30

Trains as `experiments.train` does (every flag of it but the checkpoint
ones), with `--canaries` canary clients added to the population
(`dp_fedavg.canaries`: each inserted or held out by a fair coin, sampled like
the real clients, never counted in the metrics). After training it prints,
and writes to OUTPUT_DIR/audit.json:
* epsilon_accountant: the run's epsilon from its privacy ledger;
* epsilon_one_shot_final: the one-shot estimate (Andrew et al., ICLR 2024)
  from the cosines between the inserted canaries and the final model delta,
  against the null of a random direction;
* epsilon_one_shot_all_iterates: the same from each canary's largest cosine
  with one round's model delta, against the held-out canaries' ones;
* epsilon_lower_bound: the largest of the one-run bound (Steinke, Nasr &
  Jagielski 2023) and the Clopper-Pearson threshold bound on both
  statistics, holding together with probability `--audit_confidence`
  (`dp_fedavg.empirical_privacy.epsilon_lower_bound`).
An estimate is not a guarantee: it says how much this run's canaries leaked.
A lower bound above the accountant's epsilon means the implementation does
not do what its accounting assumes. OUTPUT_DIR/canaries.csv holds every
canary's statistics and OUTPUT_DIR/canaries.png their histograms; the run's
own outputs (metrics.csv, config.json, ...) are those of experiments.train.
"""

import dataclasses
import json
import os
import sys
from typing import Any, Optional

from absl import app
from absl import flags
from absl import logging
import tensorflow as tf  # noqa: F401  # pylint: disable=unused-import  # Before absl starts: Keras breaks when TF is first imported inside main.

from dp_fedavg import canaries as canaries_lib
from dp_fedavg import empirical_privacy
from dp_fedavg import execution
from dp_fedavg import outputs
from dp_fedavg import run_config
from dp_fedavg import tasks
from experiments import plots
from experiments import privacy_flags
from experiments import runner
from experiments import training_flags

AUDIT_FILE = 'audit.json'
CANARIES_FILE = 'canaries.csv'
HISTOGRAM_FILE = 'canaries.png'
MIN_CANARIES = 10

_OUTPUT_DIR = flags.DEFINE_string(
    'output_dir', 'runs/audit',
    'Where audit.json, canaries.csv, canaries.png and the run\'s own outputs '
    'go.')
_OVERWRITE = flags.DEFINE_bool(
    'overwrite', False, 'Replace the results of an earlier run in output_dir.')
_CANARIES = flags.DEFINE_integer(
    'canaries', 500,
    f'Canary clients (>= {MIN_CANARIES}); each is inserted or held out by a '
    'fair coin.')
_CONFIDENCE = flags.DEFINE_float(
    'audit_confidence', 0.95,
    'Confidence of the lower bound, in (0, 1).')


class NothingToAuditError(ValueError):
  """The run stopped before its first round."""


@dataclasses.dataclass(frozen=True)
class AuditResult:
  """An audited run's epsilons (see the module docstring) and its canaries.

  `lower_bounds` holds each bound that `epsilon_lower_bound` is the largest
  of; `statistics` each statistic's (inserted, held-out) values.
  """

  epsilon_accountant: float
  epsilon_one_shot_final: float
  epsilon_one_shot_all_iterates: float
  epsilon_lower_bound: float
  confidence: float
  canaries_inserted: int
  canaries_held_out: int
  delta: float
  accountant: str
  adjacency: str
  rounds_completed: int
  eval_accuracy: Optional[float]
  lower_bounds: dict[str, float]
  statistics: dict[str, tuple[list[float], list[float]]]

  def as_json(self) -> dict[str, Any]:
    values = dataclasses.asdict(self)
    del values['statistics']
    return values


def plan_with_canaries(
    config: run_config.RunConfig, task: tasks.FederatedTask, count: int,
) -> tuple[runner.PrivacyPlan, canaries_lib.Canaries]:
  """The run's plan over its clients and canaries, and the canaries.

  Raises:
    ValueError: a mechanism without privacy, the example level, too few
      canaries, or what `PrivacyPlan.build` refuses.
  """
  if config.mechanism.noise is None:
    raise ValueError(
        f'--aggregator={config.aggregator} has no privacy to audit: it neither '
        'clips nor adds noise, so a canary would move the model by its own '
        'size and the accountant\'s epsilon is infinite.')
  if config.example_level:
    raise ValueError(
        '--privacy_unit=example: canary clients audit user-level DP; one '
        'example\'s influence needs canary examples, which are not built.')
  if count < MIN_CANARIES:
    raise ValueError(f'--canaries must be >= {MIN_CANARIES}, got {count}.')
  num_clients = len(task.train_data.client_ids)
  # The adjacency, which decides whether held-out canaries are clients of
  # the population, is the ledger's under the run's sampling.
  adjacency = runner.PrivacyPlan.build(
      config.replace(calibrate='none'), num_clients + count,
      task.update_dimension).ledger.adjacency
  canaries = canaries_lib.Canaries(count, num_clients, config.seed, adjacency)
  if min(canaries.inserted.sum(), (~canaries.inserted).sum()) < 2:
    raise ValueError(
        f'--canaries={count} with --seed={config.seed} gave fewer than 2 '
        'inserted or held-out canaries: use more canaries.')
  plan = runner.PrivacyPlan.build(
      config, canaries.population, task.update_dimension)
  return plan, canaries


def estimate(
    statistics: canaries_lib.CanaryStatistics, inserted, dimension: int,
    delta: float, confidence: float,
) -> tuple[float, float, float, dict[str, float], dict[str, tuple]]:
  """(one-shot final, one-shot all iterates, lower bound, each bound, each
  statistic's (inserted, held-out) values)."""
  split = {
      name: ([float(v) for v in values[inserted]],
             [float(v) for v in values[~inserted]])
      for name, values in (('cosine_final', statistics.final_cosine),
                           ('max_cosine_over_rounds',
                            statistics.max_round_cosine))
  }
  final = empirical_privacy.one_shot_epsilon(
      split['cosine_final'][0], delta, dimension=dimension)
  iterates = empirical_privacy.one_shot_epsilon(
      split['max_cosine_over_rounds'][0], delta,
      held_out=split['max_cosine_over_rounds'][1])
  lower, bounds = empirical_privacy.epsilon_lower_bound(
      split, delta, confidence)
  return final, iterates, lower, bounds, split


def run_audit(
    task: tasks.FederatedTask,
    plan: runner.PrivacyPlan,
    canaries: canaries_lib.Canaries,
    confidence: float,
    output_dir: str,
    config_json: dict[str, Any],
    overwrite: bool = False,
) -> AuditResult:
  """Trains `plan` with `canaries` (`plan_with_canaries`) and audits the run;
  writes the audit's files.

  Raises:
    ValueError: `confidence` outside (0, 1).
    NothingToAuditError: no round ran.
  """
  if not 0 < confidence < 1:
    raise ValueError(f'--audit_confidence must be in (0, 1), got {confidence}.')
  config = plan.config
  inserted = canaries.inserted
  logging.info(
      'audit: %d canaries, %d inserted and %d held out by fair coins (%s); '
      'a canary\'s update is a random unit direction times %g',
      canaries.count, inserted.sum(), (~inserted).sum(),
      'held-out canaries are not in the population (add-or-remove adjacency)'
      if len(canaries.members) < canaries.count else
      'held-out canaries are clients without data, sending zeros '
      f'({plan.ledger.adjacency.value} adjacency)',
      canaries_lib.CANARY_NORM,
  )
  statistics = canaries_lib.CanaryStatistics(canaries, task.update_dimension)
  with runner.execution_context(config):
    summary = runner.Runner(task).run(
        plan, output_dir,
        {**config_json, 'canaries': canaries.count,
         'audit_confidence': confidence},
        overwrite=overwrite,
        inspect_round=lambda round_num, weights, data: statistics.observe(
            weights),
        canaries=canaries,
    )
  if not summary.rounds_completed:
    raise NothingToAuditError(
        f'--target_epsilon={config.target_epsilon:g} stopped the run before '
        'its first round: nothing to audit.')
  statistics.finish(summary.model_weights)
  final, iterates, lower, bounds, split = estimate(
      statistics, inserted, task.update_dimension, summary.delta, confidence)
  result = AuditResult(
      epsilon_accountant=summary.epsilon,
      epsilon_one_shot_final=final,
      epsilon_one_shot_all_iterates=iterates,
      epsilon_lower_bound=lower,
      confidence=confidence,
      canaries_inserted=int(inserted.sum()),
      canaries_held_out=int((~inserted).sum()),
      delta=summary.delta,
      accountant=summary.accountant,
      adjacency=plan.ledger.adjacency.value,
      rounds_completed=summary.rounds_completed,
      eval_accuracy=summary.eval_accuracy,
      lower_bounds=bounds,
      statistics=split,
  )
  with open(os.path.join(output_dir, AUDIT_FILE), 'w') as f:
    json.dump(result.as_json(), f, indent=2)
  outputs.write_csv(os.path.join(output_dir, CANARIES_FILE), statistics.rows())
  plots.canary_histograms(
      split, os.path.join(output_dir, HISTOGRAM_FILE),
      f'{config.task}, {config.aggregator}: accountant epsilon '
      f'{summary.epsilon:.3g} at delta {summary.delta:g}')
  logging.info(
      'audit at delta=%g: accountant epsilon %.4g (%s); one-shot estimate '
      '%.4g (final model), %.4g (all iterates); lower bound %.4g at '
      'confidence %g%s; in %s', summary.delta, summary.epsilon,
      summary.accountant, final, iterates, lower, confidence,
      ' ABOVE THE ACCOUNTANT\'S EPSILON: the implementation does not do what '
      'its accounting assumes' if lower > summary.epsilon else '',
      output_dir,
  )
  return result


def flag_error(config: run_config.RunConfig) -> Optional[str]:
  """The first problem with the parsed flags, as one line; None if none."""
  error = training_flags.flag_error(config)
  if error:
    return error
  if _CANARIES.value < MIN_CANARIES:
    return (f'--canaries={_CANARIES.value} is out of range: must be an '
            f'integer >= {MIN_CANARIES}.')
  if not 0 < _CONFIDENCE.value < 1:
    return (f'--audit_confidence={_CONFIDENCE.value} is out of range: must be '
            'in (0, 1).')
  metrics_path = os.path.join(_OUTPUT_DIR.value, outputs.METRICS_FILE)
  if os.path.exists(metrics_path) and not _OVERWRITE.value:
    return (
        f'--output_dir={_OUTPUT_DIR.value} already holds metrics.csv: choose '
        'another --output_dir or pass --overwrite.')
  return None


def main(argv):
  config = training_flags.config_from_flags()
  task = training_flags.start_or_exit(argv, flag_error(config), config)
  try:
    plan, canaries = plan_with_canaries(config, task, _CANARIES.value)
  except ValueError as e:
    privacy_flags.exit_with_usage_error(str(e))
  try:
    result = run_audit(
        task, plan, canaries, _CONFIDENCE.value, _OUTPUT_DIR.value,
        training_flags.flag_values(sys.modules[__name__]),
        overwrite=_OVERWRITE.value,
    )
  except NothingToAuditError as e:
    privacy_flags.exit_with_usage_error(str(e))
  except execution.WorkerUnavailableError as e:
    print(f'audit.py: error: {e}', file=sys.stderr)
    sys.exit(1)
  print(json.dumps({k: v for k, v in result.as_json().items()
                    if not isinstance(v, dict)}, indent=2))


if __name__ == '__main__':
  app.run(main)
