r"""What the run-level privacy ledger costs per round, late in a long run.

  python -m benchmarks.ledger --output=BENCHMARKS.md --repeats=5

Tree aggregation and banded MF state one event for the whole run from the
realised participation (`accounting.RunLevel`), so each round the training
loop asks for the epsilon if the round ran (the budget stop), records the
round, and asks for the epsilon after it. This times those three calls,
every round as the loop makes them, with Shakespeare's population (715
clients, 50 per round, cyclic: each client every 14 rounds). Per mechanism
and checkpoint round: the median over the `--repeats` rounds up to it, and,
beside it, one epsilon of the same event by dp-accounting's discretised
`PLDAccountant`, which the ledger paid for every new event before it took a
single Gaussian's epsilon exactly (`accounting.gaussian_epsilon`). The
report replaces its own section of `--output`.
"""

import datetime
import statistics
import sys
import time

from absl import app
from absl import flags
import dp_accounting

from aggregators import registry
from benchmarks import report
from dp_fedavg import accounting
from dp_fedavg import sampling

_OUTPUT = flags.DEFINE_string('output', 'BENCHMARKS.md', 'Markdown report.')
_REPEATS = flags.DEFINE_integer('repeats', 5, 'Timed rounds per checkpoint.')

BEGIN = '<!-- run-level ledger: begin -->'
END = '<!-- run-level ledger: end -->'
_POPULATION, _COHORT, _DELTA = 715, 50, 1e-6
_CHECKPOINTS = (250, 500, 1000)
# Name -> (mechanism, its parameters).
_CONFIGURATIONS = {
    'dp_ftrl_tree': ('dp_ftrl_tree', {'noise_multiplier': 7.0}),
    'dp_ftrl_tree --tree_restart=epoch': (
        'dp_ftrl_tree', {'noise_multiplier': 7.0, 'tree_restart': 'epoch'}),
    'banded_mf --mf_bands=14': (
        'banded_mf', {'noise_multiplier': 7.0, 'mf_bands': 14}),
}


def _ledger(name: str) -> accounting.PrivacyLedger:
  mechanism_name, values = _CONFIGURATIONS[name]
  mechanism = registry.get(mechanism_name)
  setting = registry.Setting(
      expected_clients_per_round=_COHORT, rounds=max(_CHECKPOINTS),
      population=_POPULATION, sampling=sampling.SamplingScheme.CYCLIC)
  return accounting.PrivacyLedger(
      mechanism.build_ledger(mechanism.params(values), setting),
      sampling.SamplingScheme.CYCLIC, _POPULATION, _COHORT, _DELTA)


def _discretised_pld_seconds(ledger: accounting.PrivacyLedger) -> float:
  """One epsilon of the ledger's current event by dp-accounting's PLD."""
  # pylint: disable=protected-access
  event = ledger.ledger.event_of_participation(ledger._participation)
  start = time.monotonic()
  pld = dp_accounting.pld.PLDAccountant(value_discretization_interval=1e-4)
  pld.compose(dp_accounting.GaussianDpEvent(
      accounting._effective_gaussian(accounting.as_python_floats(event))))
  pld.get_epsilon(_DELTA)
  return time.monotonic() - start


def _measure(name: str, cohorts) -> dict[int, tuple[float, float]]:
  """{checkpoint: (median s per round before it, discretised PLD s)}."""
  ledger = _ledger(name)
  per_round = []
  results = {}
  for round_num, cohort in enumerate(cohorts, start=1):
    start = time.monotonic()
    ledger.epsilon_if_round(None, cohort)
    ledger.record_round(None, cohort)
    ledger.epsilon()
    per_round.append(time.monotonic() - start)
    if round_num in _CHECKPOINTS:
      results[round_num] = (statistics.median(per_round[-_REPEATS.value:]),
                            _discretised_pld_seconds(ledger))
      print(f'{name} at round {round_num}: {results[round_num][0]:.4f} s a '
            f'round, discretised PLD {results[round_num][1]:.2f} s',
            file=sys.stderr, flush=True)
  return results


def _report(results, command) -> str:
  lines = [
      BEGIN,
      '## Run-level privacy ledger, per round',
      '',
      f'`{command}`, {datetime.date.today()}: budget-stop epsilon, record and '
      f'epsilon each round, as the training loop asks; {_POPULATION} clients, '
      f'{_COHORT} per round, cyclic (every client every '
      f'{_POPULATION // _COHORT} rounds), z = 7. Median of the last '
      f'{_REPEATS.value} rounds before each checkpoint; beside it, one '
      'epsilon of the same Gaussian by dp-accounting\'s discretised PLD (what '
      'each new event cost before the exact Gaussian epsilon).',
      '',
      '| mechanism | round | ledger s per round | discretised PLD s per event |',
      '| --- | --- | --- | --- |',
  ]
  for name, by_round in results.items():
    for round_num, (seconds, pld_seconds) in by_round.items():
      lines.append(
          f'| {name} | {round_num} | {seconds:.4f} | {pld_seconds:.2f} |')
  lines.append(END)
  return '\n'.join(lines) + '\n'


def main(argv):
  del argv
  command = 'python -m benchmarks.ledger ' + ' '.join(sys.argv[1:])
  sampler = sampling.ClientSampler(
      sampling.SamplingScheme.CYCLIC, _POPULATION, _COHORT, 0, 0)
  cohorts = [sampler.sample(r) for r in range(1, max(_CHECKPOINTS) + 1)]
  results = {name: _measure(name, cohorts) for name in _CONFIGURATIONS}
  report.replace_section(_OUTPUT.value, BEGIN, END, _report(results, command))


if __name__ == '__main__':
  app.run(main)
