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

from dp_fedavg import tasks
from experiments import privacy_flags

_TABLE_EVERY = flags.DEFINE_integer(
    'table_every', 0, 'Also print epsilon every this many rounds (0: only at '
    '--rounds).')


def _format(epsilons: dict[str, float], name: str) -> str:
  return f'{epsilons[name]:12.4f}' if name in epsilons else f'{"-":>12}'


def main(argv):
  privacy_flags.check_no_arguments(argv)
  num_clients = privacy_flags.NUM_CLIENTS.value or tasks.DEFAULT_NUM_CLIENTS
  error = privacy_flags.flag_error() or privacy_flags.population_error(
      num_clients
  ) or (
      None if _TABLE_EVERY.value >= 0 else
      f'--table_every={_TABLE_EVERY.value} is out of range: must be an '
      'integer >= 0.'
  )
  if error:
    privacy_flags.exit_with_usage_error(error)

  accountant = privacy_flags.build_accountant(num_clients)
  try:
    noise = privacy_flags.noise_parameter(accountant)
  except ValueError as e:
    privacy_flags.exit_with_usage_error(str(e))
  rounds = privacy_flags.ROUNDS.value
  round_event = privacy_flags.event_for_noise_multiplier(
      accountant.clients_per_round
  )(noise)

  q = accountant.clients_per_round / accountant.num_clients
  print(
      f'{privacy_flags.AGGREGATOR.value}, noise multiplier '
      f'{noise:.6g}'
      + (' (calibrated)' if privacy_flags.CALIBRATE.value == 'noise' else '')
      + f'; {accountant.scheme.value} sampling of {accountant.clients_per_round}'
      f' of {accountant.num_clients} clients (q={q:.4g}); delta='
      f'{accountant.delta:g}; {accountant.neighboring_relation.name} adjacency'
  )
  print(f'per-round event: {accountant.round_event(round_event)}')
  print(f'{"rounds":>8}{"epsilon_rdp":>12}{"epsilon_pld":>12}')
  budget = privacy_flags.TARGET_EPSILON.value
  if budget is not None:
    rounds_within_budget = accountant.rounds_within_budget(
        round_event, budget, rounds
    )
  for round_num in range(1, rounds + 1):
    accountant.compose_round(round_event)
    if round_num == rounds or (
        _TABLE_EVERY.value and round_num % _TABLE_EVERY.value == 0
    ):
      epsilons = accountant.epsilons()
      print(f'{round_num:8d}{_format(epsilons, "rdp")}{_format(epsilons, "pld")}')
  if budget is not None:
    epsilon, name = accountant.epsilon_and_accountant()
    if rounds_within_budget == rounds:
      print(f'target epsilon {budget:g}: met after all {rounds} rounds '
            f'(epsilon {epsilon:.4f}, {name}).')
    else:
      print(f'target epsilon {budget:g}: allows {rounds_within_budget} of '
            f'{rounds} rounds.')


if __name__ == '__main__':
  app.run(main)
