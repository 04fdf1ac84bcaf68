r"""Trains a model with DP-FedAvg and records the privacy it spent.

  python -m experiments.train --task=digits --aggregator=gaussian_fixed \
      --noise_multiplier=1.0 --clip=1.0 --clients_per_round=20 --rounds=30

Each round logs one line (round, loss, accuracy, epsilon so far, seconds, ETA)
and appends a row to OUTPUT_DIR/metrics.csv and to TensorBoard logs in
OUTPUT_DIR/tensorboard; OUTPUT_DIR/config.json holds every flag, and
OUTPUT_DIR/final_model.keras the final model. With --checkpoint_every=K the
state (model, optimizer, aggregator, privacy spent) is saved every K rounds;
--resume continues a stopped run from its latest checkpoint with the same
flags, or extends it: --rounds, --eval_every and --target_epsilon may change
(not where they would change rounds already run). SIGINT or SIGTERM stops a
run after the round in progress, checkpointed (dp_fedavg/interrupts.py).
Flags are checked before any work: a bad value exits with status 2 and one
line naming the flag and its allowed range. The task flags are in
experiments/training_flags.py, the privacy flags in experiments/privacy_flags.py
(the mechanisms' own flags come from their registry entries).
"""

import json
import os
import shlex
import sys
from typing import Any, Optional

from absl import app
from absl import flags
import tensorflow as tf  # noqa: F401  # pylint: disable=unused-import  # Before absl starts: Keras breaks when TF is first imported inside main.

from dp_fedavg import checkpoints
from dp_fedavg import execution
from dp_fedavg import interrupts
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
    'flag must equal the run\'s config.json but --rounds, --eval_every, '
    '--target_epsilon (extending the run) and --checkpoint_every.')

# Flags that may differ between a run and its resumption (where it runs is
# not part of what it computes).
_NOT_PART_OF_THE_RUN = ('overwrite', 'resume', 'checkpoint_every', 'workers')
# Flags a resumed run may change, extending the run: they act only on rounds
# not yet run (unless _extension_error says otherwise).
_EXTENDING = ('rounds', 'eval_every', 'target_epsilon',
              'max_diverged_rounds')


def _extension_error(saved: dict[str, Any], current: dict[str, Any],
                     changed: list[str]) -> Optional[str]:
  """Why the `changed` extending flags would change rounds already run; None
  if they do not."""
  if current['calibrate'] == 'noise' and {'rounds', 'target_epsilon'} & set(
      changed):
    return ('--resume with --calibrate=noise keeps --rounds and '
            '--target_epsilon: together they set the noise of the rounds '
            'already run.')
  if current['aggregator'] == 'banded_mf' and 'rounds' in changed:
    return ('--resume keeps --rounds for --aggregator=banded_mf: its '
            'strategy matrix, and so the noise of the rounds already run, is '
            'sized for the rounds.')
  done = checkpoints.Checkpointer(_OUTPUT_DIR.value).latest_round()
  if done is not None and current['rounds'] < done:
    return (f'--rounds={current["rounds"]} is below the {done} rounds the run '
            f'has done (run: --rounds={saved["rounds"]}).')
  return None


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
  refused = [name for name in differing if name not in _EXTENDING]
  if refused:
    return (
        '--resume needs the flags of the run it continues, but for '
        f'--{", --".join(_EXTENDING)} and --checkpoint_every; these differ '
        f'from {config_path}: ' + ', '.join(
            f'--{name} (run: {saved.get(name)!r}, now: {current[name]!r})'
            for name in refused
        )
    )
  if not checkpoints.has_checkpoint(_OUTPUT_DIR.value):
    return (
        f'--resume: no checkpoints in {_OUTPUT_DIR.value}; the run was started '
        'without --checkpoint_every.'
    )
  return _extension_error(saved, current, differing)


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
    return outputs.output_dir_error(_OUTPUT_DIR.value) or _resume_error()
  return outputs.output_dir_error(
      _OUTPUT_DIR.value, outputs.METRICS_FILE, _OVERWRITE.value,
      '--resume a checkpointed run')


def _continue_command() -> str:
  """The command line that resumes this run."""
  args = [arg for arg in sys.argv[1:]
          if arg not in ('--overwrite', '--resume', '--noresume')]
  return ' '.join(shlex.quote(arg) for arg in (
      'python', '-m', 'experiments.train', *args, '--resume'))


def _exit_interrupted(stop: interrupts.StopRequest, rounds_done: str) -> None:
  if checkpoints.has_checkpoint(_OUTPUT_DIR.value):
    where = (f'last checkpoint in '
             f'{os.path.join(_OUTPUT_DIR.value, checkpoints.CHECKPOINT_DIR)}; '
             f'continue with: {_continue_command()}')
  else:
    where = ('no checkpoint was saved, so the run cannot be continued (one '
             'is saved when a round ends after the first signal, and every '
             '--checkpoint_every rounds)')
  print(f'train.py: {stop.signal.name}: stopped {rounds_done}; {where}',
        file=sys.stderr)
  sys.exit(stop.exit_code)


def main(argv):
  config = training_flags.config_from_flags()
  task = training_flags.start_or_exit(argv, flag_error(config), config)
  plan = runner.plan_or_exit(config, task, privacy_flags.exit_with_usage_error)
  with interrupts.stop_on_signals() as stop:
    try:
      with runner.execution_context(config):
        summary = runner.Runner(task).run(
            plan,
            _OUTPUT_DIR.value,
            training_flags.flag_values(sys.modules[__name__]),
            overwrite=_OVERWRITE.value,
            resume=_RESUME.value,
            checkpoint_every=_CHECKPOINT_EVERY.value,
            stop_requested=stop.requested,
        )
    except KeyboardInterrupt:  # A second signal (interrupts.stop_on_signals).
      _exit_interrupted(stop, 'in the middle of a round')
    except checkpoints.CorruptCheckpointError as e:
      privacy_flags.exit_with_usage_error(f'--resume: {e}')
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
  if summary.interrupted:
    _exit_interrupted(stop, f'after round {summary.rounds_completed}')
  if summary.diverged:
    print(f'train.py: error: {summary.stop_reason}; try a smaller '
          f'--client_lr (now {config.client_lr:g}). Metrics are in '
          f'{_OUTPUT_DIR.value}.', file=sys.stderr)
    sys.exit(1)


if __name__ == '__main__':
  app.run(main)
