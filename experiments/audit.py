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

import json
import sys
from typing import Optional

from absl import app
from absl import flags
import tensorflow as tf  # noqa: F401  # pylint: disable=unused-import  # Before absl starts: Keras breaks when TF is first imported inside main.

from dp_fedavg import execution
from dp_fedavg import interrupts
from dp_fedavg import outputs
from dp_fedavg import run_config
from experiments import auditing
from experiments import privacy_flags
from experiments import training_flags

_OUTPUT_DIR = flags.DEFINE_string(
    'output_dir', 'runs/audit',
    'Where audit.json, canaries.csv, canaries.png and the run\'s own outputs '
    'go.')
_OVERWRITE = flags.DEFINE_bool(
    'overwrite', False, 'Replace the results of an earlier run in output_dir.')
_CANARIES = flags.DEFINE_integer(
    'canaries', 500,
    f'Canary clients (>= {auditing.MIN_CANARIES}); each is inserted or held '
    'out by a fair coin.')
_CONFIDENCE = flags.DEFINE_float(
    'audit_confidence', 0.95,
    'Confidence of the lower bound, in (0, 1).')


def flag_error(config: run_config.RunConfig) -> Optional[str]:
  """The first problem with the parsed flags, as one line; None if none."""
  error = training_flags.flag_error(config)
  if error:
    return error
  if _CANARIES.value < auditing.MIN_CANARIES:
    return (f'--canaries={_CANARIES.value} is out of range: must be an '
            f'integer >= {auditing.MIN_CANARIES}.')
  if not 0 < _CONFIDENCE.value < 1:
    return (f'--audit_confidence={_CONFIDENCE.value} is out of range: must be '
            'in (0, 1).')
  return outputs.output_dir_error(
      _OUTPUT_DIR.value, outputs.METRICS_FILE, _OVERWRITE.value)


def main(argv):
  config = training_flags.config_from_flags()
  task = training_flags.start_or_exit(argv, flag_error(config), config)
  try:
    plan, canaries = auditing.plan_with_canaries(config, task, _CANARIES.value)
  except ValueError as e:
    privacy_flags.exit_with_usage_error(str(e))
  try:
    # An audit's statistics need its whole run: a signal abandons it.
    with interrupts.exit_on_signals('audit.py', lambda: (
        'stopped before the run ended, so nothing was audited; the rounds '
        f'done are in {_OUTPUT_DIR.value}')):
      result = auditing.run_audit(
          task, plan, canaries, _CONFIDENCE.value, _OUTPUT_DIR.value,
          training_flags.flag_values(sys.modules[__name__]),
          overwrite=_OVERWRITE.value,
      )
  except auditing.NothingToAuditError as e:
    privacy_flags.exit_with_usage_error(str(e))
  except execution.WorkerUnavailableError as e:
    print(f'audit.py: error: {e}', file=sys.stderr)
    sys.exit(1)
  print(json.dumps({k: v for k, v in result.as_json().items()
                    if not isinstance(v, dict)}, indent=2))


if __name__ == '__main__':
  app.run(main)
