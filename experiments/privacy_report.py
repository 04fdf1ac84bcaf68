r"""Prints the privacy a training run would spend, without training.

  python -m experiments.privacy_report --aggregator=gaussian_fixed \
      --noise_multiplier=1.2 --clients_per_round=120 --num_clients=3383 \
      --sampling=poisson --rounds=100 --delta=1e-5

Takes the mechanism and sampling flags of `experiments.train` (see
experiments/privacy_flags.py) and prints epsilon at --delta by RDP and PLD
after --rounds rounds, every --table_every rounds if set. With
--target_epsilon it also says how many rounds the budget allows, or, with
--calibrate=noise, which noise multiplier meets it.

The population is the task's: its data's clients for femnist, shakespeare
and --task=custom (read from the data, as training would), else
--num_clients (default 100) or --silos.

With --privacy_unit=example it reports one client's example-level epsilon:

  python -m experiments.privacy_report --privacy_unit=example \
      --examples_per_client=7500 --batch_size=256 --local_epochs=1 \
      --rounds=5 --noise_multiplier=1.0

a client of --examples_per_client examples taking part in every round, each
round --local_epochs epochs of DP-SGD steps with Poisson batches of expected
size --batch_size (dp_fedavg/example_privacy.py).
"""


from absl import app
from absl import flags

from dp_fedavg import run_config
from dp_fedavg import sampling
from dp_fedavg import tasks
from experiments import privacy_flags
from experiments import runner
from experiments import training_flags

_TABLE_EVERY = flags.DEFINE_integer(
    'table_every', 0, 'Also print epsilon every this many rounds (0: only at '
    '--rounds).')
_EXAMPLES_PER_CLIENT = flags.DEFINE_integer(
    'examples_per_client', None,
    '--privacy_unit=example: the examples of the client reported (it takes '
    'part in every round).')


def _format(epsilons: dict[str, float], name: str) -> str:
  return f'{epsilons[name]:12.4f}' if name in epsilons else f'{"-":>12}'


def _population(config: run_config.RunConfig) -> int:
  """The run's training clients, as training would have them: the data's
  (femnist, shakespeare, custom: the task is built, a custom task's held-out
  clients left out), else the size of the split."""
  if config.task in tasks.NATURAL_TASKS or config.task == 'custom':
    task = training_flags.build_task_or_exit(config)
    return len(task.train_data.client_ids)
  return config.silos or config.num_clients or tasks.DEFAULT_NUM_CLIENTS


def main(argv):
  privacy_flags.check_no_arguments(argv)
  config = training_flags.config_from_flags()
  error = training_flags.flag_error(config)
  if error:
    privacy_flags.exit_with_usage_error(error)
  num_clients = _population(config)
  error = run_config.population_error(config, num_clients) or (
      None if _TABLE_EVERY.value >= 0 else
      f'--table_every={_TABLE_EVERY.value} is out of range: must be an '
      'integer >= 0.'
  )
  examples = _EXAMPLES_PER_CLIENT.value
  if error is None and config.example_level:
    if examples is None or examples < 1:
      error = (
          f'--examples_per_client={examples} is out of range: '
          '--privacy_unit=example reports a client of that many examples, '
          'an integer >= 1.'
      )
    # One client, in every round.
    config = config.replace(sampling=sampling.SamplingScheme.FULL.value,
                            num_clients=1, clients_per_round=1)
    num_clients = 1
  elif error is None and examples is not None:
    error = '--examples_per_client applies to --privacy_unit=example only.'
  if error:
    privacy_flags.exit_with_usage_error(error)
  try:
    plan = runner.PrivacyPlan.build(
        config, num_clients,
        examples_per_client=[examples] if config.example_level else None,
    )
  except ValueError as e:
    privacy_flags.exit_with_usage_error(str(e))
  ledger, rounds = plan.ledger, config.rounds
  calibrated = ' (calibrated)' if config.calibrate == 'noise' else ''
  if config.example_level:
    dp_config = plan.config.example_dp
    print(
        f'example-level DP-SGD, noise multiplier {plan.noise:.6g}{calibrated}'
        f'; one client of {examples} examples in every round: '
        f'{dp_config.steps_per_round(examples)} steps per round, sampling '
        f'rate q={dp_config.sampling_rate(examples):.4g}; delta='
        f'{ledger.delta:g}; {ledger.adjacency.name} adjacency'
    )
  else:
    if ledger.scheme is sampling.SamplingScheme.CYCLIC:
      participation = (
          f'each every {ledger.num_clients // ledger.clients_per_round} rounds')
    elif ledger.scheme is sampling.SamplingScheme.CYCLIC_POISSON:
      groups = config.sampling_groups
      participation = (
          f'{groups} groups taking turns, q='
          f'{ledger.clients_per_round / (ledger.num_clients // groups):.4g} '
          'within a group')
    else:
      participation = f'q={ledger.clients_per_round / ledger.num_clients:.4g}'
    print(
        f'{config.aggregator}, noise multiplier {plan.noise:.6g}{calibrated}'
        f'; {ledger.scheme.value} sampling of {ledger.clients_per_round}'
        f' of {ledger.num_clients} clients ({participation}); delta='
        f'{ledger.delta:g}; {ledger.adjacency.name} adjacency '
        f'({ledger.composition.replace("_", " ")})'
    )
  print(f'per-round event: {ledger.describe()}')
  print(f'{"rounds":>8}{"epsilon_rdp":>12}{"epsilon_pld":>12}')
  budget = config.target_epsilon
  # The report plans the same cohorts training would draw (the plan drew
  # them already for a run-level mechanism).
  cohorts = plan.planned_cohorts
  if not cohorts:
    sampler = sampling.ClientSampler(
        ledger.scheme, ledger.num_clients, ledger.clients_per_round,
        config.seed, config.sampling_groups,
    )
    cohorts = [sampler.sample(r) for r in range(1, rounds + 1)]
  if budget is not None:
    rounds_within_budget = ledger.rounds_within_budget(budget, rounds, cohorts)
  for round_num, cohort in enumerate(cohorts, start=1):
    ledger.record_planned_round(cohort)
    if round_num == rounds or (
        _TABLE_EVERY.value and round_num % _TABLE_EVERY.value == 0
    ):
      epsilons = ledger.epsilons()
      print(f'{round_num:8d}{_format(epsilons, "rdp")}{_format(epsilons, "pld")}')
  for line in plan.utility_notes():
    print(line)
  if budget is not None:
    epsilon, name = ledger.epsilon_and_accountant()
    if rounds_within_budget == rounds:
      print(f'target epsilon {budget:g}: met after all {rounds} rounds '
            f'(epsilon {epsilon:.4f}, {name}).')
    else:
      print(f'target epsilon {budget:g}: allows {rounds_within_budget} of '
            f'{rounds} rounds.')


if __name__ == '__main__':
  app.run(main)
