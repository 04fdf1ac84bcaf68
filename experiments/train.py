r"""Trains a model with DP-FedAvg and records the privacy it spent.

  python -m experiments.train --task=digits --aggregator=gaussian_fixed \
      --noise_multiplier=1.0 --clip=1.0 --clients_per_round=20 --rounds=30

Each round logs one line (round, loss, accuracy, epsilon so far, seconds, ETA)
and appends a row to OUTPUT_DIR/metrics.csv and to TensorBoard logs in
OUTPUT_DIR/tensorboard; OUTPUT_DIR/config.json holds every flag, and
OUTPUT_DIR/final_model.keras the final model. With --checkpoint_every=K the
state (model, optimizer, aggregator, privacy spent) is saved every K rounds;
--resume continues a killed run from its latest checkpoint with the same flags.
Flags are checked before any work: a bad value exits with status 2 and one
line naming the flag and its allowed range. The task flags are in
experiments/training_flags.py, the privacy flags in experiments/privacy_flags.py
(the mechanisms' own flags come from their registry entries).
"""

import json
import os
import sys
from typing import Optional

from absl import app
from absl import flags
import tensorflow as tf  # noqa: F401  # pylint: disable=unused-import  # Before absl starts: Keras breaks when TF is first imported inside main.

from dp_fedavg import checkpoints
from dp_fedavg import execution
from dp_fedavg import outputs
from dp_fedavg import run_config
from experiments import privacy_flags
from experiments import runner
from experiments import training_flags

_OUTPUT_DIR = flags.DEFINE_string(
    'output_dir', 'runs/train',
    'Where metrics.csv, config.json, tensorboard/, checkpoints/ and the final '
    'model go.')
_OVERWRITE = flags.DEFINE_bool(
    'overwrite', False, 'Replace the results of an earlier run in output_dir.')
_CHECKPOINT_EVERY = flags.DEFINE_integer(
    'checkpoint_every', 0,
    'Save a checkpoint every this many rounds and after the last (0: never).')
_RESUME = flags.DEFINE_bool(
    'resume', False,
    'Continue the run in --output_dir from its latest checkpoint; every other '
    'flag must equal the run\'s config.json.')

# Flags that may differ between a run and its resumption (where it runs is
# not part of what it computes).
_NOT_PART_OF_THE_RUN = ('overwrite', 'resume', 'checkpoint_every', 'workers')


def _resume_error() -> Optional[str]:
  config_path = os.path.join(_OUTPUT_DIR.value, outputs.CONFIG_FILE)
  if _OVERWRITE.value:
    return 'choose one of --resume and --overwrite.'
  if not os.path.isfile(config_path):
    return f'--resume: {config_path} does not exist; there is no run to resume.'
  with open(config_path) as f:
    saved = json.load(f)
  current = training_flags.flag_values(sys.modules[__name__])
  differing = sorted(
      name for name, value in current.items()
      if name not in _NOT_PART_OF_THE_RUN and saved.get(name) != value
  )
  if differing:
    return (
        '--resume needs the flags of the run it continues; these differ from '
        f'{config_path}: ' + ', '.join(
            f'--{name} (run: {saved.get(name)!r}, now: {current[name]!r})'
            for name in differing
        )
    )
  if not checkpoints.has_checkpoint(_OUTPUT_DIR.value):
    return (
        f'--resume: no checkpoints in {_OUTPUT_DIR.value}; the run was started '
        'without --checkpoint_every.'
    )
  return None


def flag_error(config: run_config.RunConfig) -> Optional[str]:
  """The first problem with the parsed flags, as one line; None if none."""
  error = training_flags.flag_error(config)
  if error:
    return error
  if _CHECKPOINT_EVERY.value < 0:
    return (
        f'--checkpoint_every={_CHECKPOINT_EVERY.value} is out of range: must be '
        'an integer >= 0.'
    )
  if _RESUME.value:
    return _resume_error()
  metrics_path = os.path.join(_OUTPUT_DIR.value, outputs.METRICS_FILE)
  if os.path.exists(metrics_path) and not _OVERWRITE.value:
    return (
        f'--output_dir={_OUTPUT_DIR.value} already holds metrics.csv: choose '
        'another --output_dir, pass --overwrite, or --resume a checkpointed run.'
    )
  return None


def main(argv):
  config = training_flags.config_from_flags()
  task = training_flags.start_or_exit(argv, flag_error(config), config)
  plan = runner.plan_or_exit(config, task, privacy_flags.exit_with_usage_error)
  try:
    with runner.execution_context(config):
      runner.Runner(task).run(
          plan,
          _OUTPUT_DIR.value,
          training_flags.flag_values(sys.modules[__name__]),
          overwrite=_OVERWRITE.value,
          resume=_RESUME.value,
          checkpoint_every=_CHECKPOINT_EVERY.value,
      )
  except execution.WorkerUnavailableError as e:
    if _CHECKPOINT_EVERY.value:
      advice = (
          'once the workers are back, continue from the last checkpoint: '
          'rerun with --resume'
      )
    else:
      advice = 'use --checkpoint_every so that a run can be resumed'
    print(f'train.py: error: {e} {advice}.', file=sys.stderr)
    sys.exit(1)


if __name__ == '__main__':
  app.run(main)
