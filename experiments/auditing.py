"""Audits a run with canary clients: the Python API of `experiments.audit`.

`plan_with_canaries` builds a run's privacy plan over its clients and the
canaries (`dp_fedavg.canaries`); `run_audit` trains it, gathers every
canary's statistics, and estimates and bounds epsilon
(`dp_fedavg.empirical_privacy`); see `experiments/audit.py` for what each
number means.
"""

import dataclasses
import json
import os
from typing import Any, Optional

from absl import logging

from dp_fedavg import canaries as canaries_lib
from dp_fedavg import empirical_privacy
from dp_fedavg import outputs
from dp_fedavg import run_config
from dp_fedavg import tasks
from experiments import plots
from experiments import runner

AUDIT_FILE = 'audit.json'
CANARIES_FILE = 'canaries.csv'
HISTOGRAM_FILE = 'canaries.png'
MIN_CANARIES = 10


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
  # Percentile bootstrap intervals of the two estimates at `confidence`.
  epsilon_one_shot_final_interval: tuple[float, float]
  epsilon_one_shot_all_iterates_interval: tuple[float, float]
  epsilon_lower_bound: float
  confidence: float
  canaries_inserted: int
  canaries_held_out: int
  delta: float
  accountant: str
  adjacency: str
  rounds_completed: int
  eval_accuracy: Optional[float]
  eval_loss: Optional[float]
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
    delta: float, confidence: float, seed: int,
) -> dict[str, Any]:
  """The audit's estimates and bounds (`AuditResult`'s fields of the same
  names) from the canaries' statistics."""
  split = {
      name: ([float(v) for v in values[inserted]],
             [float(v) for v in values[~inserted]])
      for name, values in (('cosine_final', statistics.final_cosine),
                           ('max_cosine_over_rounds',
                            statistics.max_round_cosine))
  }
  final = {'dimension': dimension}
  iterates = {'held_out': split['max_cosine_over_rounds'][1]}
  lower, bounds = empirical_privacy.epsilon_lower_bound(
      split, delta, confidence)
  return dict(
      epsilon_one_shot_final=empirical_privacy.one_shot_epsilon(
          split['cosine_final'][0], delta, **final),
      epsilon_one_shot_all_iterates=empirical_privacy.one_shot_epsilon(
          split['max_cosine_over_rounds'][0], delta, **iterates),
      epsilon_one_shot_final_interval=(
          empirical_privacy.one_shot_epsilon_interval(
              split['cosine_final'][0], delta, confidence, seed=seed,
              **final)),
      epsilon_one_shot_all_iterates_interval=(
          empirical_privacy.one_shot_epsilon_interval(
              split['max_cosine_over_rounds'][0], delta, confidence,
              seed=seed, **iterates)),
      epsilon_lower_bound=lower,
      lower_bounds=bounds,
      statistics=split,
  )


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
  estimates = estimate(statistics, inserted, task.update_dimension,
                       summary.delta, confidence, config.seed)
  result = AuditResult(
      epsilon_accountant=summary.epsilon,
      confidence=confidence,
      canaries_inserted=int(inserted.sum()),
      canaries_held_out=int((~inserted).sum()),
      delta=summary.delta,
      accountant=summary.accountant,
      adjacency=plan.ledger.adjacency.value,
      rounds_completed=summary.rounds_completed,
      eval_accuracy=summary.eval_accuracy,
      eval_loss=summary.eval_loss,
      **estimates,
  )
  with open(os.path.join(output_dir, AUDIT_FILE), 'w') as f:
    json.dump(result.as_json(), f, indent=2)
  outputs.write_csv(os.path.join(output_dir, CANARIES_FILE), statistics.rows())
  plots.canary_histograms(
      result.statistics, os.path.join(output_dir, HISTOGRAM_FILE),
      f'{config.task}, {config.aggregator}: accountant epsilon '
      f'{summary.epsilon:.3g} at delta {summary.delta:g}')
  logging.info(
      'audit at delta=%g: accountant epsilon %.4g (%s); one-shot estimate '
      '%.4g (final model; %g bootstrap interval %.3g-%.3g), %.4g (all '
      'iterates; %.3g-%.3g); lower bound %.4g at confidence %g%s; in %s',
      summary.delta, summary.epsilon, summary.accountant,
      result.epsilon_one_shot_final, confidence,
      *result.epsilon_one_shot_final_interval,
      result.epsilon_one_shot_all_iterates,
      *result.epsilon_one_shot_all_iterates_interval,
      result.epsilon_lower_bound, confidence,
      ' ABOVE THE ACCOUNTANT\'S EPSILON: the implementation does not do what '
      'its accounting assumes' if result.epsilon_lower_bound > summary.epsilon
      else '', output_dir,
  )
  return result
