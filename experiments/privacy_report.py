r"""Prints the privacy a training run would spend, without training.

  python -m experiments.privacy_report --aggregator=gaussian_fixed \
      --noise_multiplier=1.2 --clients_per_round=120 --num_clients=3383 \
      --sampling=poisson --rounds=100 --delta=1e-5

Takes the mechanism and sampling flags of `experiments.train` (see
experiments/privacy_flags.py) and prints epsilon at --delta by RDP and PLD
after --rounds rounds, every --table_every rounds if set. With
--target_epsilon it also says how many rounds the budget allows, or, with
--calibrate=noise, which noise multiplier meets it.
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


def _format(epsilons: dict[str, float], name: str) -> str:
  return f'{epsilons[name]:12.4f}' if name in epsilons else f'{"-":>12}'


def main(argv):
  privacy_flags.check_no_arguments(argv)
  config = training_flags.config_from_flags()
  num_clients = config.num_clients or tasks.DEFAULT_NUM_CLIENTS
  error = privacy_flags.flag_error(config) or run_config.population_error(
      config, num_clients
  ) or (
      None if _TABLE_EVERY.value >= 0 else
      f'--table_every={_TABLE_EVERY.value} is out of range: must be an '
      'integer >= 0.'
  )
  if error:
    privacy_flags.exit_with_usage_error(error)
  try:
    plan = runner.PrivacyPlan.build(config, num_clients)
  except ValueError as e:
    privacy_flags.exit_with_usage_error(str(e))
  ledger, rounds = plan.ledger, config.rounds
  q = ledger.clients_per_round / ledger.num_clients
  print(
      f'{config.aggregator}, noise multiplier {plan.noise:.6g}'
      + (' (calibrated)' if config.calibrate == 'noise' else '')
      + f'; {ledger.scheme.value} sampling of {ledger.clients_per_round}'
      f' of {ledger.num_clients} clients (q={q:.4g}); delta='
      f'{ledger.delta:g}; {ledger.adjacency.name} adjacency '
      f'({ledger.composition.replace("_", " ")})'
  )
  print(f'per-round event: {ledger.describe()}')
  print(f'{"rounds":>8}{"epsilon_rdp":>12}{"epsilon_pld":>12}')
  budget = config.target_epsilon
  # The report plans the same cohorts training would draw.
  sampler = sampling.ClientSampler(
      ledger.scheme, ledger.num_clients, ledger.clients_per_round, config.seed
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
