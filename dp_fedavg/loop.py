"""The training loop: sample a cohort, run a round, account, evaluate, report.

The loop knows nothing of flags or files: it takes built pieces and hands each
round's `RoundResult` to a callback (see `dp_fedavg.outputs`).
"""

import collections.abc
import concurrent.futures
import dataclasses
import datetime
import math
import time
from typing import Any, Callable, Optional

from absl import logging
import numpy as np
import tensorflow_federated as tff

from dp_fedavg import accounting
from dp_fedavg import byzantine as byzantine_lib
from dp_fedavg import checkpoints
from dp_fedavg import process as process_lib
from dp_fedavg import sampling
from dp_fedavg.tasks import base


@dataclasses.dataclass(frozen=True)
class RoundResult:
  """What one round produced.

  `train_loss` is the clients' mean training loss: a diagnostic that is *not*
  privatized. On the standard and in-process engines it is over the clients
  whose update was finite; on the vectorized engine it is NaN if any user's
  was not; NaN when no client's was. `diverged_clients` counts the clients
  (users) whose update was not finite; they send zeros (None where the
  engine does not count them: example-level DP-SGD). `epsilon` is the
  privacy spent by all rounds so far, at `delta`, by the named `accountant`
  ('rdp' or 'pld'), for neighbouring datasets as `adjacency` says (see
  `dp_fedavg.accounting.Adjacency`).
  `eval_*` are None on rounds without evaluation. `cohort_size` counts the
  clients that reported; `dropped_clients` those sampled that dropped out.
  """

  round: int
  cohort_size: int
  train_loss: float
  dropped_clients: int
  diverged_clients: Optional[int]
  eval_loss: Optional[float]
  eval_accuracy: Optional[float]
  epsilon: float
  accountant: str
  delta: float
  adjacency: str
  seconds: float
  aggregator: dict[str, Any]


@dataclasses.dataclass(frozen=True)
class TrainingOutcome:
  """How training ended: the final state and why it stopped."""

  state: tff.learning.templates.LearningAlgorithmState
  rounds_completed: int
  stop_reason: str
  interrupted: bool = False
  diverged: bool = False


def _scalar_measurements(measurements, prefix: str = '') -> dict[str, Any]:
  """Flattens nested measurements to {'a/b': scalar}, dropping empty ones."""
  flat = {}
  if not isinstance(measurements, collections.abc.Mapping):
    # An aggregator without measurements (the plain mean of stacked users)
    # reports an empty structure.
    return flat
  for name, value in measurements.items():
    if isinstance(value, collections.abc.Mapping):
      flat.update(_scalar_measurements(value, f'{prefix}{name}/'))
    elif np.size(value) == 1:
      flat[f'{prefix}{name}'] = np.asarray(value).item()
  return flat


def _format_duration(seconds: float) -> str:
  return str(datetime.timedelta(seconds=round(seconds)))


def _log_round(result: RoundResult, total_rounds: int, eta_seconds: float):
  if result.eval_accuracy is not None:
    evaluation = f'eval_acc {result.eval_accuracy:.4f}'
  elif result.eval_loss is not None:  # A task without accuracy (regression).
    evaluation = f'eval_loss {result.eval_loss:.4g}'
  else:
    evaluation = 'eval_acc    -  '
  logging.info(
      'round %*d/%d  clients %3d  train_loss %.4f  %s  '
      'epsilon %.4g  %.2fs  ETA %s',
      len(str(total_rounds)), result.round, total_rounds, result.cohort_size,
      result.train_loss, evaluation, result.epsilon, result.seconds,
      _format_duration(eta_seconds),
  )


@dataclasses.dataclass(frozen=True)
class _RoundPlan:
  """What a round's client data depends on, known before it runs: the
  sampled clients, those that report (Byzantine ones first), how many are
  Byzantine, and the clients' shuffle seed."""

  sampled: np.ndarray
  cohort: list[int]
  byzantine_count: int
  shuffle_seed: int


def round_shuffle_seed(seed: int, round_num: int) -> int:
  """The seed of every client's local example order in a round."""
  return seed * 1_000_003 + round_num


def standard_client_data(
    task: base.FederatedTask, local_epochs: int, batch_size: int,
    byzantine: Optional[byzantine_lib.ByzantineClients] = None,
) -> Callable[[list[int], int, int], list]:
  """The standard engine's client data: one preprocessed dataset per client
  of a cohort (indices into `task.train_data.client_ids`), given the round's
  shuffle seed and how many of the first clients are Byzantine."""
  client_ids = task.train_data.client_ids

  def client_data(cohort, shuffle_seed, byzantine_count):
    datasets = [
        task.preprocess(
            task.train_data.create_tf_dataset_for_client(client_ids[i]),
            local_epochs, batch_size, seed=shuffle_seed,
        )
        for i in cohort
    ]
    if byzantine is not None and byzantine.poisons_data:
      datasets[:byzantine_count] = map(
          byzantine.poison, datasets[:byzantine_count])
    return datasets

  return client_data


def run_training(
    process: tff.learning.templates.LearningProcess,
    task: base.FederatedTask,
    sampler: sampling.ClientSampler,
    ledger: accounting.PrivacyLedger,
    evaluate: Callable[[tff.learning.models.ModelWeights], dict[str, float]],
    rounds: int,
    local_epochs: int,
    batch_size: int,
    eval_every: int = 1,
    seed: int = 0,
    target_epsilon: Optional[float] = None,
    on_round: Callable[[RoundResult], None] = lambda result: None,
    checkpointer: Optional[checkpoints.Checkpointer] = None,
    checkpoint_every: int = 0,
    resume: bool = False,
    inspect_round: Optional[
        Callable[[int, tff.learning.models.ModelWeights, list], None]
    ] = None,
    client_data_fn: Optional[Callable[[list[int], int, int], list]] = None,
    byzantine: Optional[byzantine_lib.ByzantineClients] = None,
    stop_requested: Callable[[], bool] = lambda: False,
    max_diverged_rounds: int = 0,
    dropout_rate: float = 0.0,
    fewest_reporting: Optional[Callable[[int], int]] = None,
) -> TrainingOutcome:
  """Trains for `rounds` rounds, or until the privacy budget would run out.

  Args:
    process: a `tff.learning` process (see `dp_fedavg.process`).
    task: the task whose `train_data` the sampler's indices refer to.
    sampler: draws each round's cohort.
    ledger: the run's privacy ledger (the mechanism's, bound to the
      sampling); each round is recorded with the aggregator's state it ran
      from and its cohort.
    evaluate: held-out metrics (at least 'loss' and 'accuracy') of weights.
    rounds: number of rounds, >= 1.
    local_epochs: passes over each client's data per round, >= 1.
    batch_size: client batch size, >= 1.
    eval_every: evaluate every this many rounds, and after the last one.
    seed: seed of the clients' shuffling.
    target_epsilon: if set, training stops before the first round whose
      composition would take epsilon above it; a round is never run first.
    on_round: called with every round's result, in order.
    checkpointer: where checkpoints go; needed by `checkpoint_every` and
      `resume`.
    checkpoint_every: save a checkpoint every this many rounds and after the
      last one; 0 never saves.
    resume: start from the checkpointer's latest checkpoint (its state, round
      and privacy ledger) instead of from round 1.
    inspect_round: called before each round with the round number, the model
      weights the cohort starts from and the cohort's datasets (diagnostics
      such as `dp_fedavg.diagnostics.UpdateNormProbe`).
    client_data_fn: the process's client data for a cohort (indices into
      `task.train_data.client_ids`), the round's shuffle seed and how many of
      the cohort's first clients are Byzantine; None builds one preprocessed
      dataset per client (the standard engine). It is called for the next
      round while a round trains, from another thread: its result must
      depend on its arguments alone.
    byzantine: the simulated Byzantine clients: each round they come first
      in the cohort, and the aggregator is told how many were sampled.
    stop_requested: asked after each round; when true, training stops there
      (an interrupt, `dp_fedavg.interrupts`), with a checkpoint of that round
      if there is a checkpointer.
    max_diverged_rounds: stop after this many consecutive rounds in which
      every client's update was not finite (nothing was trained); 0 never
      stops. A round with any such client logs a warning.
    dropout_rate: each sampled client fails to report with this probability
      (`sampling.reporting_clients`); the ledger counts it as sampled.
    fewest_reporting: for noise added by the clients (distributed DP), the
      fewest of n sampled clients whose noise keeps the stated epsilon; a
      round with fewer is logged, and the ledger composes the event of the
      clients that reported.

  Raises:
    ValueError: `resume` without a checkpoint to resume from.
  """
  if (checkpoint_every or resume) and checkpointer is None:
    raise ValueError('checkpoint_every and resume need a checkpointer.')
  if client_data_fn is None:
    client_data_fn = standard_client_data(
        task, local_epochs, batch_size, byzantine)
  state = process.initialize()
  first_round = 1
  if resume:
    restored = checkpointer.restore_latest(state, ledger)
    if restored is None:
      raise ValueError(f'no checkpoint to resume from in {checkpointer.directory}.')
    state, first_round = restored.state, restored.round + 1
    logging.info(
        'resumed after round %d from %s; epsilon so far %.4g',
        restored.round, checkpointer.directory, ledger.epsilon(),
    )

  def round_plan(round_num: int) -> _RoundPlan:
    sampled = sampler.sample(round_num)
    cohort = sampling.reporting_clients(sampled, dropout_rate, seed, round_num)
    byzantine_count = 0
    if byzantine is not None:
      cohort, byzantine_count = byzantine.arrange(cohort)
    return _RoundPlan(sampled, list(cohort), byzantine_count,
                      round_shuffle_seed(seed, round_num))

  def client_data_of(plan: _RoundPlan) -> list:
    return client_data_fn(plan.cohort, plan.shuffle_seed, plan.byzantine_count)

  elapsed = 0.0
  diverged_streak = 0
  next_plan = next_data = None
  # A round's cohort, shuffling and Byzantine count depend only on the seeds,
  # so `ahead` builds the next round's client data (first-seen users' files,
  # `dp_fedavg.vectorized`) while a round trains, and computes the round's
  # epsilon meanwhile: TensorFlow releases the GIL while it runs a graph.
  # That thread only reads the ledger, and only until the round's record.
  with concurrent.futures.ThreadPoolExecutor(
      max_workers=2, thread_name_prefix='round_ahead') as ahead:
    for round_num in range(first_round, rounds + 1):
      plan = round_plan(round_num) if next_plan is None else next_plan
      sampled, cohort = plan.sampled, plan.cohort
      # Without dropouts every sampled client reports (None: the ledger's
      # event as before).
      reporting = len(cohort) if dropout_rate else None
      if fewest_reporting is not None and dropout_rate and len(
          cohort) < fewest_reporting(len(sampled)):
        logging.warning(
            'round %d: %d of %d sampled clients dropped out, more than the '
            'tolerance allows: the noise shares that arrived are below the '
            'stated level, and this round is accounted with them', round_num,
            len(sampled) - len(cohort), len(sampled))
      if byzantine is not None:
        state = byzantine.with_count(state, plan.byzantine_count)
      # The aggregator's state before the round fixes the round's privacy.
      epsilon_after = ahead.submit(
          ledger.epsilon_if_round, state.aggregator, sampled, reporting)
      if target_epsilon is not None:
        next_epsilon = epsilon_after.result()
        if next_epsilon > target_epsilon:
          reason = (
              f'stopped before round {round_num}: it would take epsilon to '
              f'{next_epsilon:.4g}, above the target {target_epsilon:g}'
          )
          logging.info('%s', reason)
          last_round = round_num - 1
          if (checkpoint_every and last_round >= first_round
              and last_round % checkpoint_every):
            checkpointer.save(last_round, state, ledger)
          return TrainingOutcome(state, last_round, reason)
      start = time.monotonic()
      client_data = (client_data_of(plan) if next_data is None
                     else next_data.result())
      next_plan = round_plan(round_num + 1) if round_num < rounds else None
      next_data = (None if next_plan is None
                   else ahead.submit(client_data_of, next_plan))
      if inspect_round is not None:
        inspect_round(round_num, process.get_model_weights(state), client_data)
      output = process.next(state, client_data)
      epsilon_after.result()
      ledger.record_round(state.aggregator, sampled, reporting)
      state = output.state
      aggregator_measurements = _scalar_measurements(output.metrics['aggregator'])
      evaluation = {}
      if round_num % eval_every == 0 or round_num == rounds:
        evaluation = evaluate(process.get_model_weights(state))
      seconds = time.monotonic() - start
      elapsed += seconds
      epsilon, accountant_name = ledger.epsilon_and_accountant()
      train_metrics = output.metrics['client_work']['train']
      train_loss = float(train_metrics['loss']) if len(cohort) else math.nan
      diverged = train_metrics.get(process_lib.NONFINITE_CLIENTS)
      if diverged is not None:
        diverged = int(diverged)
        all_diverged = bool(len(cohort)) and diverged == len(cohort)
        diverged_streak = diverged_streak + 1 if all_diverged else 0
        if all_diverged:  # Nothing was trained: TFF would report 0.
          train_loss = math.nan
        if diverged:
          logging.warning(
              'round %d: %d of %d clients\' updates were not finite (training '
              'diverged there); they sent zeros', round_num, diverged,
              len(cohort))
      result = RoundResult(
          round=round_num,
          cohort_size=len(cohort),
          train_loss=train_loss,
          dropped_clients=len(sampled) - len(cohort),
          diverged_clients=diverged,
          eval_loss=evaluation.get('loss'),
          eval_accuracy=evaluation.get('accuracy'),
          epsilon=epsilon,
          accountant=accountant_name,
          delta=ledger.delta,
          adjacency=ledger.adjacency.value,
          seconds=seconds,
          aggregator=aggregator_measurements,
      )
      rounds_run = round_num - first_round + 1
      _log_round(result, rounds, elapsed / rounds_run * (rounds - round_num))
      on_round(result)
      saved = checkpoint_every and (
          round_num % checkpoint_every == 0 or round_num == rounds)
      if saved:
        checkpointer.save(round_num, state, ledger)
      if max_diverged_rounds and diverged_streak >= max_diverged_rounds:
        return TrainingOutcome(
            state, round_num,
            f'stopped after round {round_num}: every client\'s update was not '
            f'finite in the last {diverged_streak} rounds (training diverged)',
            diverged=True)
      if stop_requested() and round_num < rounds:
        if checkpointer is not None and not saved:
          checkpointer.save(round_num, state, ledger)
        return TrainingOutcome(
            state, round_num, f'interrupted after round {round_num}',
            interrupted=True)
  return TrainingOutcome(state, rounds, 'all rounds completed')
