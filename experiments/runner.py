"""One DP-FedAvg run from a `RunConfig`: mechanism, process, loop, outputs.

A `Runner` holds what runs of one study share (the task's data and the
evaluation process), so a study runs its runs one after another in one process
and builds only what differs: the aggregator, the learning process and the
privacy ledger. Nothing here reads flags: each binary builds its
configuration in `main`, and a study derives one per run.
"""

import contextlib
import dataclasses
import hashlib
import math
import tempfile
from typing import Any, Callable, Iterator, Optional, Sequence, Union

from absl import logging
import numpy as np
import tensorflow as tf

from aggregators import attacks
from aggregators import registry
from dp_fedavg import accounting
from dp_fedavg import byzantine as byzantine_lib
from dp_fedavg import canaries as canaries_lib
from dp_fedavg import checkpoints
from dp_fedavg import dp_sgd
from dp_fedavg import example_privacy
from dp_fedavg import execution
from dp_fedavg import inprocess
from dp_fedavg import loop
from dp_fedavg import outputs
from dp_fedavg import process
from dp_fedavg import run_config
from dp_fedavg import sampling
from dp_fedavg import tasks
from dp_fedavg import vectorized


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
  # Stopped by a signal (`dp_fedavg.interrupts`); the checkpoint, if any, is
  # of the last round completed, and no final model is saved.
  interrupted: bool = False
  # Stopped because every client's update was not finite for
  # `max_diverged_rounds` rounds in a row.
  diverged: bool = False


@dataclasses.dataclass(frozen=True)
class PrivacyPlan:
  """A run's mechanism parameters (calibrated if asked), factory and ledger.

  The factory and the ledger both come from the mechanism's registry entry
  and the same parameters, so they cannot be paired wrongly.
  """

  config: run_config.RunConfig
  params: Any
  noise: float
  aggregator: Any
  ledger: Union[accounting.PrivacyLedger, example_privacy.ExampleLedger]
  # What the factory was built for (None at the example level).
  setting: Optional[registry.Setting] = None
  # Run-level mechanisms: the seeded cohorts of the planned rounds, drawn
  # once here (the loop draws the same ones); empty otherwise.
  planned_cohorts: tuple[tuple[int, ...], ...] = ()

  def utility_notes(self) -> list[str]:
    """The mechanism's lines on its expected error for the planned
    cohorts."""
    if self.setting is None or not self.planned_cohorts:
      return []
    return self.config.mechanism.utility_notes(
        self.params, self.setting,
        accounting.Participation(self.planned_cohorts))

  @classmethod
  def build(
      cls,
      config: run_config.RunConfig,
      num_clients: int,
      model_dimension: Optional[int] = None,
      examples_per_client: Optional[Sequence[int]] = None,
  ) -> 'PrivacyPlan':
    """The plan for a population of `num_clients`.

    `examples_per_client` (one count per client) is needed by
    `--privacy_unit=example`, whose ledger is per client.

    Raises:
      ValueError: a mechanism the sampling cannot account, too few bits for
        distributed DP, or an unmet calibration.
    """
    mechanism = config.mechanism
    scheme = config.sampling_scheme
    expected = (
        num_clients if scheme is sampling.SamplingScheme.FULL
        else config.clients_per_round
    )
    if config.example_level:
      return cls._example_level(config, scheme, expected, examples_per_client)
    setting = registry.Setting(
        expected_clients_per_round=expected,
        model_dimension=model_dimension,
        noise_seed=config.seed,
        stacked_users=run_config.choose_engine(config).stacked_users,
        robustness=config.robustness(expected),
        rounds=config.rounds,
        population=num_clients,
        sampling=scheme,
        sampling_groups=config.sampling_groups,
    )
    run = (scheme, num_clients, config.clients_per_round, config.delta,
           config.accountant_kind)
    params = config.params
    # Also checks that the sampling and the accountant support it.
    ledger = accounting.PrivacyLedger(mechanism.build_ledger(params, setting), *run)
    planned_cohorts = ()
    if isinstance(ledger.ledger, accounting.RunLevel):
      sampler = sampling.ClientSampler(scheme, num_clients, expected,
                                       config.seed, config.sampling_groups)
      planned_cohorts = tuple(
          tuple(int(c) for c in sampler.sample(r))
          for r in range(1, config.rounds + 1))
      # The cohorts are seeded: a schedule the mechanism refuses (matrix
      # factorization's participations closer than its bands) is refused
      # before training, not at the round that breaks it.
      ledger.ledger.event_of_participation(
          accounting.Participation(planned_cohorts))
    if config.calibrate == 'noise':
      noise = accounting.calibrate_noise(
          lambda z: mechanism.build_ledger(mechanism.with_noise(params, z), setting),
          *run, config.target_epsilon, config.rounds, planned_cohorts,
      )
      params = mechanism.with_noise(params, noise)
      ledger = accounting.PrivacyLedger(
          mechanism.build_ledger(params, setting), *run
      )
      logging.info(
          'calibrated noise multiplier %.6g: the smallest meeting epsilon=%g '
          'at delta=%g after %d rounds', noise, config.target_epsilon,
          config.delta, config.rounds,
      )
    return cls(
        config, params, mechanism.noise_of(params),
        mechanism.factory(params, setting), ledger, setting, planned_cohorts,
    )


  @classmethod
  def _example_level(cls, config, scheme, expected, examples_per_client):
    """The plan of DP-SGD inside every client, with its per-client ledger;
    the server takes the plain mean (no aggregator)."""
    examples = np.asarray(examples_per_client, np.int64)
    dp_config = config.example_dp
    if config.calibrate == 'noise':
      planned = example_privacy.planned_rounds(
          scheme, len(examples), expected, config.rounds, config.seed)
      noise = example_privacy.calibrate_noise(
          dp_config, examples, planned, config.delta, config.accountant_kind,
          config.target_epsilon,
      )
      config = config.replace(noise_multiplier=noise)
      dp_config = config.example_dp
      logging.info(
          'calibrated noise multiplier %.6g: the smallest keeping every '
          'client within epsilon=%g at delta=%g after its planned rounds (at '
          'most %d)', noise, config.target_epsilon, config.delta,
          int(planned.max()),
      )
    ledger = example_privacy.ExampleLedger(
        dp_config, examples, scheme, expected, config.delta,
        config.accountant_kind,
    )
    return cls(config, config.params, dp_config.noise_multiplier, None, ledger)


def plan_or_exit(
    config: run_config.RunConfig, task: tasks.FederatedTask,
    exit_with_usage_error: Callable[[str], None],
) -> PrivacyPlan:
  """`PrivacyPlan.build` for `task`, exiting with one line on a ValueError
  or an attack the task cannot take."""
  if config.attack == 'label_flip' and task.regression:
    exit_with_usage_error(
        f'--attack=label_flip flips class labels; --task={config.task} is a '
        'regression (--loss=mse): choose another attack.')
  try:
    return PrivacyPlan.build(
        config, len(task.train_data.client_ids), task.update_dimension,
        task.examples_per_client if config.example_level else None,
    )
  except ValueError as e:
    exit_with_usage_error(str(e))


@contextlib.contextmanager
def execution_context(config: run_config.RunConfig) -> Iterator[None]:
  """Where TFF runs for `config`: remote workers, or one local worker started
  when a TFF computation first runs (never on the in-process engine).

  Says which in the log. Raises `execution.WorkerUnavailableError` when a
  remote worker cannot be reached.
  """
  if config.workers:
    logging.info(
        'running rounds on %d TFF workers: %s (clients split among them; the '
        'server step, noise included, runs once)',
        len(config.workers), ', '.join(config.workers),
    )
    with execution.remote_execution(list(config.workers)):
      yield
    return
  secure = config.mechanism.secure_sums
  if secure:
    logging.info(
        '--aggregator=%s sums with secure aggregation: running in the context '
        'that simulates it (TFF\'s test compilation: secure sums become checked '
        'plain sums)', config.aggregator,
    )
  with execution.on_demand_execution(simulate_secure_aggregation=secure):
    yield


def resolved_values(task: tasks.FederatedTask, ledger) -> dict[str, Any]:
  """What a run used where its flags leave a default: the population, the
  model's size, the evaluation clients and the data files' SHA-256."""
  values = {
      'population': ledger.num_clients,
      'clients_per_round': ledger.clients_per_round,
      'model_parameters': task.update_dimension,
      'eval_clients': len(task.eval_data.client_ids),
  }
  if task.data_files:
    values['data_sha256'] = {}
    for path in task.data_files:
      with open(path, 'rb') as f:
        values['data_sha256'][path] = hashlib.file_digest(
            f, 'sha256').hexdigest()
  return values


class Runner:
  """Runs trainings of one task, one after another.

  Must be built and used inside `execution_context()`.
  """

  def __init__(self, task: tasks.FederatedTask):
    self.task = task
    # Built on first use, one per kind: in process or through TFF's worker.
    self._evaluators = {}
    self._user_files = None
    self._user_data_tmp = None

  def evaluator(self, in_process: bool) -> Callable[..., dict[str, float]]:
    """Held-out loss and accuracy of model weights, on the engine's side."""
    if in_process not in self._evaluators:
      evaluator_type = (inprocess.InProcessEvaluator if in_process
                        else process.FederatedEvaluator)
      self._evaluators[in_process] = evaluator_type(
          self.task.model_fn, self.task.eval_client_datasets())
    return self._evaluators[in_process]

  def _engine(
      self, plan: PrivacyPlan, choice: run_config.EngineChoice,
      byzantine: Optional[byzantine_lib.ByzantineClients],
      canaries: Optional[canaries_lib.Canaries] = None,
  ):
    """The learning process of the chosen engine, its client data function,
    and whether it runs in process. With `canaries`, the process's client
    work sends the inserted canaries' updates (`dp_fedavg.canaries`).

    Under --engine=auto, a process the in-process engine cannot run runs on
    TFF's worker instead, with the reason in the log.

    Raises:
      inprocess.UnsupportedProcessError: --engine=inprocess cannot run the
        process (the reason is in the message).
    """
    config, task = plan.config, self.task
    wrap_client_work = None
    if canaries is not None:
      wrap_client_work = (
          lambda client_work, weights_type: canaries_lib.with_canaries(
              client_work, weights_type.trainable, canaries.seed,
              choice.stacked_users))
    if choice.stacked_users:
      learning_process, client_data_fn = self._stacked_users_engine(
          plan, byzantine, wrap_client_work, canaries)
    elif canaries is not None:
      learning_process = process.build_process_with_client_work(
          task, wrap_client_work, plan.aggregator, config.client_lr,
          config.server_lr, config.server_momentum,
      )
      real_client = task.train_data.client_ids[0]
      client_data_fn = canaries_lib.client_data_fn(
          canaries,
          loop.standard_client_data(
              task, config.local_epochs, config.batch_size, byzantine),
          lambda: task.preprocess(
              task.train_data.create_tf_dataset_for_client(real_client)
              .take(0), config.local_epochs, config.batch_size, seed=0),
      )
    elif config.example_level:
      learning_process = dp_sgd.build_process(
          task, config.example_dp, config.client_lr, config.server_lr,
          config.server_momentum,
      )
      client_data_fn = (
          lambda cohort, shuffle_seed, byzantine_count: dp_sgd.client_datasets(
              task, cohort, shuffle_seed))
    else:
      learning_process, client_data_fn = process.build_process_with_client_work(
          task, lambda client_work, unused_weights_type: client_work,
          plan.aggregator, config.client_lr, config.server_lr,
          config.server_momentum,
      ), None
    if not choice.in_process:
      return learning_process, client_data_fn, False
    try:
      return (inprocess.InProcessLearningProcess(learning_process),
              client_data_fn, True)
    except inprocess.UnsupportedProcessError as e:
      if config.engine != 'auto':
        raise
      logging.warning('engine: running on TFF\'s worker instead: %s', e)
      return learning_process, client_data_fn, False

  @staticmethod
  def _fewest_reporting(plan) -> Optional[Callable[[int], int]]:
    """For noise added by the clients: the fewest reporting clients that
    keep the stated epsilon, as the mechanism's ledger states it."""
    mechanism_ledger = getattr(plan.ledger, 'ledger', None)
    if isinstance(mechanism_ledger, accounting.SampledRounds):
      return mechanism_ledger.fewest_reporting
    return None

  def _stacked_users_engine(self, plan, byzantine, wrap_client_work=None,
                            canaries=None):
    """The vectorized process and its groups of users (`pack_cohort`)."""
    config = plan.config
    learning_process = vectorized.build_process(
        self.task, plan.aggregator, config.client_lr, config.server_lr,
        config.server_momentum, local_epochs=config.local_epochs,
        batch_size=config.batch_size,
        example_dp=config.example_dp if config.example_level else None,
        wrap_client_work=wrap_client_work,
    )
    if self._user_files is None:
      directory = config.user_data_dir
      if not directory:
        # Removed with the Runner (or at exit); shared by a study's runs.
        self._user_data_tmp = tempfile.TemporaryDirectory(prefix='dp_fedavg_users_')
        directory = self._user_data_tmp.name
      self._user_files = vectorized.UserFiles(self.task, directory)
    users_per_client = (
        config.users_per_worker_client
        or vectorized.default_users_per_client(plan.ledger.clients_per_round)
    )
    logging.info(
        '%d users per TFF client (the vectorized process); user data in %s',
        users_per_client, self._user_files.directory,
    )
    files = self._user_files
    flip_labels = None
    if byzantine is not None and byzantine.poisons_data:
      flip_labels = byzantine.flip_labels
    return learning_process, (
        lambda cohort, shuffle_seed, byzantine_count: vectorized.pack_cohort(
            files, cohort, users_per_client, shuffle_seed, byzantine_count,
            flip_labels, with_user_indices=config.example_level,
            canaries=canaries,
        )
    )

  def _byzantine(
      self, config: run_config.RunConfig
  ) -> Optional[byzantine_lib.ByzantineClients]:
    """The run's simulated Byzantine clients; None without an attack."""
    if config.attack == 'none':
      return None
    num_classes = None
    if config.attack == 'label_flip':
      num_classes = int(self.task.keras_model_fn().output_shape[-1])
    return byzantine_lib.ByzantineClients(
        len(self.task.train_data.client_ids), config.byzantine_fraction,
        config.attack, config.seed, num_classes,
    )

  def run(
      self,
      plan: PrivacyPlan,
      output_dir: str,
      config_json: dict[str, Any],
      overwrite: bool = False,
      resume: bool = False,
      checkpoint_every: int = 0,
      on_round: Callable[[loop.RoundResult], None] = lambda result: None,
      inspect_round: Optional[Callable[..., None]] = None,
      canaries: Optional[canaries_lib.Canaries] = None,
      stop_requested: Callable[[], bool] = lambda: False,
  ) -> RunSummary:
    """Trains as `plan.config` says; results go to `output_dir`.

    Args:
      plan: the run's configuration, mechanism and (fresh) privacy ledger.
      output_dir: metrics.csv, config.json, TensorBoard logs, checkpoints and
        the final model.
      config_json: written to config.json, with the noise used and the
        privacy ledger's composition and adjacency.
      overwrite: replace an earlier run's results in `output_dir`.
      resume: continue from the latest checkpoint in `output_dir`.
      checkpoint_every: save a checkpoint every this many rounds (0: never).
      on_round: also called with every round's result.
      inspect_round: see `dp_fedavg.loop.run_training`.
      canaries: an audit's canary clients, the last clients of the plan's
        population (`dp_fedavg.canaries`).
      stop_requested: see `dp_fedavg.loop.run_training`; an interrupted run
        is checkpointed after its last round, even without
        `checkpoint_every`.

    Raises:
      ValueError: `resume` with no checkpoint in `output_dir`.
    """
    task, config, ledger = self.task, plan.config, plan.ledger
    seed = config.seed
    run_outputs = outputs.RunOutputs(output_dir, overwrite=overwrite, resume=resume)
    run_outputs.write_config({
        **config_json, 'noise_multiplier_used': plan.noise,
        'privacy_composition': ledger.composition,
        'adjacency': ledger.adjacency.value,
        'resolved': resolved_values(task, ledger),
    })
    if config.example_level:
      dp_config = config.example_dp
      logging.info(
          'task %s, %d clients, example-level DP-SGD on every client (noise '
          'multiplier %g, clip %g, %s clipping, expected batch %d; per-example '
          'gradients by the %s route), plain mean on the server, %s sampling '
          'of %d per round; epsilon of the most exposed client at delta=%g '
          'under %s adjacency, accountant %s',
          task.name, ledger.num_clients, plan.noise, dp_config.clip,
          dp_config.clipping, dp_config.batch_size,
          dp_sgd.choose_route(task.keras_model_fn, dp_config.clipping).value,
          ledger.scheme.value, ledger.clients_per_round, ledger.delta,
          ledger.adjacency.name, ledger.kind.value,
      )
    else:
      logging.info(
          'task %s, %d clients, %s aggregator (noise multiplier %g), %s '
          'sampling of %d per round; epsilon at delta=%g under %s adjacency '
          '(%s), accountant %s',
          task.name, ledger.num_clients, config.aggregator, plan.noise,
          ledger.scheme.value, ledger.clients_per_round, ledger.delta,
          ledger.adjacency.name, ledger.composition.replace('_', ' '),
          ledger.kind.value,
      )
      if ledger.scheme in sampling.CYCLIC_SCHEMES:
        sampler = sampling.ClientSampler(
            ledger.scheme, ledger.num_clients, ledger.clients_per_round, seed,
            config.sampling_groups)
        logging.info(
            '%s participation: %d groups of %d take turns (each member taking '
            'part with probability %.4g), each client at most every %d '
            'rounds, at most %d times in %d rounds; %d clients in no group',
            ledger.scheme.value, sampler.period, sampler.group_size,
            sampler.sampling_probability if ledger.scheme is
            sampling.SamplingScheme.CYCLIC_POISSON else 1.0, sampler.period,
            math.ceil(config.rounds / sampler.period), config.rounds,
            sampler.left_out)
      for line in plan.utility_notes():
        logging.info('%s', line)
    # Model initialization draws from the global seed.
    tf.keras.utils.set_random_seed(seed)
    byzantine = self._byzantine(config)
    if config.robust_rule != 'none' or byzantine is not None:
      logging.info(
          'robust rule %s (pre-aggregation %s); attack %s by %d Byzantine '
          'clients of %d', config.robust_rule, config.robust_preaggregation,
          config.attack, len(byzantine.members) if byzantine else 0,
          ledger.num_clients,
      )
    central = plan.noise > 0 and getattr(
        plan.params, 'noise_placement', 'server') == 'server'
    if central and config.attack in attacks.READS_HONEST_RECORDS:
      logging.warning(
          '--attack=%s reads the honest clients\' un-noised records: under '
          'central DP the simulated release also depends on them through the '
          'attack updates, so epsilon holds against an attacker that cannot '
          'read honest updates, not for this simulation (README, Byzantine '
          'robustness)', config.attack,
      )
    drift = plan.noise * math.sqrt(task.update_dimension) / ledger.clients_per_round
    if config.robust_rule == 'centered_clipping' and central and drift > 1:
      logging.warning(
          'centered clipping under central DP: the noise left in the centre '
          '(z sqrt(d) / n = %.3g times the clip) exceeds what one round\'s '
          'clipped differences remove, so the centre will drift; use more '
          'clients per round or less noise (aggregators/centered_clipping.py)',
          drift,
      )
    choice = run_config.choose_engine(config)
    logging.info('engine %s (%s)', choice.engine, choice.reason)
    learning_process, client_data_fn, in_process = self._engine(
        plan, choice, byzantine, canaries)
    results = []

    def release(result: loop.RoundResult) -> None:
      results.append(result)
      run_outputs.release_round(result)
      on_round(result)

    outcome = loop.run_training(
        learning_process,
        task,
        sampling.ClientSampler(
            ledger.scheme, ledger.num_clients, ledger.clients_per_round, seed,
            config.sampling_groups,
        ),
        ledger,
        self.evaluator(in_process),
        rounds=config.rounds,
        local_epochs=config.local_epochs,
        batch_size=config.batch_size,
        eval_every=config.eval_every,
        max_diverged_rounds=config.max_diverged_rounds,
        dropout_rate=config.dropout_rate,
        fewest_reporting=self._fewest_reporting(plan),
        seed=seed,
        target_epsilon=config.target_epsilon,
        on_round=release,
        # Its directory is made when it first saves or resumes.
        checkpointer=checkpoints.Checkpointer(output_dir),
        checkpoint_every=checkpoint_every,
        resume=resume,
        inspect_round=inspect_round,
        client_data_fn=client_data_fn,
        byzantine=byzantine,
        stop_requested=stop_requested,
    )
    model_weights = learning_process.get_model_weights(outcome.state)
    model_path = (None if outcome.interrupted
                  else run_outputs.save_model(task, model_weights))
    if config.example_level:
      table = run_outputs.write_table(
          'client_epsilons.csv', ledger.client_rows(task.train_data.client_ids))
      logging.info('each client\'s epsilon: %s', table)
    epsilon, accountant_name = ledger.epsilon_and_accountant()
    logging.info(
        'done after %d of %d rounds (%s): epsilon %.4g at delta %g (%s); final '
        'model %s; metrics in %s', outcome.rounds_completed, config.rounds,
        outcome.stop_reason, epsilon, ledger.delta, accountant_name, model_path,
        output_dir,
    )
    evaluated = [r for r in results if r.eval_loss is not None]
    return RunSummary(
        rounds_completed=outcome.rounds_completed,
        stop_reason=outcome.stop_reason,
        noise=plan.noise,
        epsilon=epsilon,
        accountant=accountant_name,
        delta=ledger.delta,
        eval_accuracy=evaluated[-1].eval_accuracy if evaluated else None,
        eval_loss=evaluated[-1].eval_loss if evaluated else None,
        results=results,
        model_weights=model_weights,
        interrupted=outcome.interrupted,
        diverged=outcome.diverged,
    )
