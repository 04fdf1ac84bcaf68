"""One DP-FedAvg run from the flags: aggregator, process, loop, outputs.

A `Runner` holds what runs of one study share (the task's data and the
evaluation process), so a study runs its runs one after another in one process
and builds only what differs: the aggregator, the learning process and the
accountant. Flags are read when `run` is called; studies set them per run with
`privacy_flags.flag_values`.
"""

import contextlib
import dataclasses
import tempfile
from typing import Any, Callable, Iterator, Optional

from absl import flags
from absl import logging
import tensorflow as tf

from dp_fedavg import checkpoints
from dp_fedavg import execution
from dp_fedavg import loop
from dp_fedavg import outputs
from dp_fedavg import process
from dp_fedavg import sampling
from dp_fedavg import tasks
from dp_fedavg import vectorized
from experiments import privacy_flags
from experiments import training_flags


@dataclasses.dataclass(frozen=True)
class RunSummary:
  """How a run ended: its rounds, its privacy and its final evaluation."""

  rounds_completed: int
  stop_reason: str
  noise: float
  epsilon: float
  accountant: str
  delta: float
  eval_accuracy: Optional[float]
  eval_loss: Optional[float]
  results: list[loop.RoundResult]
  model_weights: Any


@dataclasses.dataclass(frozen=True)
class PrivacyPlan:
  """A run's accountant, noise and aggregator, built from the privacy flags."""

  accountant: Any
  noise: float
  aggregator: Any
  dp_event_fn: Callable[[Any], Any]

  @classmethod
  def from_flags(cls, task: tasks.FederatedTask) -> 'PrivacyPlan':
    """Raises ValueError for a mechanism the sampling cannot account, too few
    bits for distributed DP, or an unmet calibration."""
    accountant = privacy_flags.build_accountant(len(task.train_data.client_ids))
    noise = privacy_flags.noise_parameter(accountant, task.update_dimension)
    aggregator, dp_event_fn = privacy_flags.build_aggregator(
        noise, accountant.clients_per_round, training_flags.SEED.value,
        stacked_users=training_flags.ENGINE.value == 'vectorized',
    )
    if privacy_flags.CALIBRATE.value == 'noise':
      logging.info(
          'calibrated noise multiplier %.6g: the smallest meeting epsilon=%g at '
          'delta=%g after %d rounds', noise,
          privacy_flags.TARGET_EPSILON.value, accountant.delta,
          privacy_flags.ROUNDS.value,
      )
    return cls(accountant, noise, aggregator, dp_event_fn)


def plan_or_exit(task: tasks.FederatedTask) -> PrivacyPlan:
  """`PrivacyPlan.from_flags`, exiting with one line on a ValueError."""
  try:
    return PrivacyPlan.from_flags(task)
  except ValueError as e:
    privacy_flags.exit_with_usage_error(str(e))


def flag_values(*modules) -> dict[str, Any]:
  """{name: value} of every flag defined in `modules` (and the shared ones)."""
  holders = [
      holder
      for module in (privacy_flags, training_flags, *modules)
      for holder in vars(module).values()
      if isinstance(holder, flags.FlagHolder)
  ]
  return {holder.name: holder.value for holder in holders}


@contextlib.contextmanager
def execution_context() -> Iterator[None]:
  """Where TFF runs for the flags: remote workers or one local worker.

  Says which in the log. Raises `execution.WorkerUnavailableError` when a
  remote worker cannot be reached.
  """
  if training_flags.WORKERS.value:
    logging.info(
        'running rounds on %d TFF workers: %s (clients split among them; the '
        'server step, noise included, runs once)',
        len(training_flags.WORKERS.value), ', '.join(training_flags.WORKERS.value),
    )
    with execution.remote_execution(training_flags.WORKERS.value):
      yield
    return
  secure = privacy_flags.uses_secure_aggregation()
  if secure:
    logging.info(
        '--aggregator=%s sums with secure aggregation: running in the context '
        'that simulates it (TFF\'s test compilation: secure sums become checked '
        'plain sums)', privacy_flags.AGGREGATOR.value,
    )
  with execution.local_execution(simulate_secure_aggregation=secure):
    yield


class Runner:
  """Runs trainings of one task, one after another.

  Must be built and used inside `execution_context()`.
  """

  def __init__(self, task: tasks.FederatedTask):
    self.task = task
    self.evaluator = process.FederatedEvaluator(
        task.model_fn, task.eval_client_datasets()
    )
    self._user_files = None
    self._user_data_tmp = None

  def _engine(self, privacy: PrivacyPlan, expected_clients_per_round: float):
    """The learning process of --engine and its client data function."""
    client_learning_rate = training_flags.CLIENT_LR.value
    server_learning_rate = training_flags.SERVER_LR.value
    server_momentum = training_flags.SERVER_MOMENTUM.value
    if training_flags.ENGINE.value == 'standard':
      return process.build_process(
          self.task.model_fn, privacy.aggregator, client_learning_rate,
          server_learning_rate, server_momentum,
      ), None
    learning_process = vectorized.build_process(
        self.task, privacy.aggregator, client_learning_rate,
        server_learning_rate, server_momentum,
        local_epochs=training_flags.LOCAL_EPOCHS.value,
        batch_size=training_flags.BATCH_SIZE.value,
    )
    if self._user_files is None:
      directory = training_flags.USER_DATA_DIR.value
      if not directory:
        # Removed with the Runner (or at exit); shared by a study's runs.
        self._user_data_tmp = tempfile.TemporaryDirectory(prefix='dp_fedavg_users_')
        directory = self._user_data_tmp.name
      self._user_files = vectorized.UserFiles(self.task, directory)
    users_per_client = (
        training_flags.USERS_PER_WORKER_CLIENT.value
        or vectorized.default_users_per_client(expected_clients_per_round)
    )
    logging.info(
        'vectorized engine: %d users per TFF client; user data in %s',
        users_per_client, self._user_files.directory,
    )
    files = self._user_files
    return learning_process, lambda cohort, shuffle_seed: vectorized.pack_cohort(
        files, cohort, users_per_client, shuffle_seed
    )

  def run(
      self,
      privacy: PrivacyPlan,
      output_dir: str,
      config: dict[str, Any],
      overwrite: bool = False,
      resume: bool = False,
      checkpoint_every: int = 0,
      on_round: Callable[[loop.RoundResult], None] = lambda result: None,
      inspect_round: Optional[Callable[..., None]] = None,
  ) -> RunSummary:
    """Trains with the current flags; results go to `output_dir`.

    Args:
      privacy: the accountant (fresh), noise and aggregator of the run.
      output_dir: metrics.csv, config.json, TensorBoard logs, checkpoints and
        the final model.
      config: written to config.json (with the noise multiplier used).
      overwrite: replace an earlier run's results in `output_dir`.
      resume: continue from the latest checkpoint in `output_dir`.
      checkpoint_every: save a checkpoint every this many rounds (0: never).
      on_round: also called with every round's result.
      inspect_round: see `dp_fedavg.loop.run_training`.

    Raises:
      ValueError: `resume` with no checkpoint in `output_dir`.
    """
    task = self.task
    seed = training_flags.SEED.value
    accountant, noise = privacy.accountant, privacy.noise
    run_outputs = outputs.RunOutputs(output_dir, overwrite=overwrite, resume=resume)
    run_outputs.write_config({**config, 'noise_multiplier_used': noise})
    logging.info(
        'task %s, %d clients, %s aggregator (noise multiplier %g), %s sampling '
        'of %d per round; epsilon at delta=%g under %s adjacency, accountant %s',
        task.name, accountant.num_clients, privacy_flags.AGGREGATOR.value,
        noise, accountant.scheme.value, accountant.clients_per_round,
        accountant.delta,
        'local-DP (replace one client\'s update; no sampling amplification)'
        if accountant.local_dp else accountant.neighboring_relation.name,
        accountant.kind.value,
    )
    # Model initialization draws from the global seed.
    tf.keras.utils.set_random_seed(seed)
    learning_process, client_data_fn = self._engine(
        privacy, accountant.clients_per_round
    )
    results = []

    def release(result: loop.RoundResult) -> None:
      results.append(result)
      run_outputs.release_round(result)
      on_round(result)

    outcome = loop.run_training(
        learning_process,
        task,
        sampling.ClientSampler(
            accountant.scheme, accountant.num_clients,
            accountant.clients_per_round, seed,
        ),
        accountant,
        privacy.dp_event_fn,
        self.evaluator,
        rounds=privacy_flags.ROUNDS.value,
        local_epochs=training_flags.LOCAL_EPOCHS.value,
        batch_size=training_flags.BATCH_SIZE.value,
        eval_every=training_flags.EVAL_EVERY.value,
        seed=seed,
        target_epsilon=privacy_flags.TARGET_EPSILON.value,
        on_round=release,
        # Only a run that saves or resumes gets a checkpoints/ directory.
        checkpointer=checkpoints.Checkpointer(output_dir)
        if checkpoint_every or resume else None,
        checkpoint_every=checkpoint_every,
        resume=resume,
        inspect_round=inspect_round,
        client_data_fn=client_data_fn,
    )
    model_weights = learning_process.get_model_weights(outcome.state)
    model_path = run_outputs.save_model(task, model_weights)
    epsilon, accountant_name = accountant.epsilon_and_accountant()
    logging.info(
        'done after %d of %d rounds (%s): epsilon %.4g at delta %g (%s); final '
        'model %s; metrics in %s', outcome.rounds_completed,
        privacy_flags.ROUNDS.value, outcome.stop_reason, epsilon,
        accountant.delta, accountant_name, model_path, output_dir,
    )
    evaluated = [r for r in results if r.eval_accuracy is not None]
    return RunSummary(
        rounds_completed=outcome.rounds_completed,
        stop_reason=outcome.stop_reason,
        noise=noise,
        epsilon=epsilon,
        accountant=accountant_name,
        delta=accountant.delta,
        eval_accuracy=evaluated[-1].eval_accuracy if evaluated else None,
        eval_loss=evaluated[-1].eval_loss if evaluated else None,
        results=results,
        model_weights=model_weights,
    )
