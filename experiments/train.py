r"""Trains a model with DP-FedAvg and records the privacy it spent.

  python -m experiments.train --task=digits --aggregator=gaussian_fixed \
      --noise_multiplier=1.0 --clip=1.0 --clients_per_round=20 --rounds=30

Each round logs one line (round, loss, accuracy, epsilon so far, seconds, ETA)
and appends a row to OUTPUT_DIR/metrics.csv; OUTPUT_DIR/config.json holds every
flag, and OUTPUT_DIR/final_model.keras the final model. Flags are checked
before any work: a bad value exits with status 2 and one line naming the flag
and its allowed range. The privacy flags are in experiments/privacy_flags.py.
"""

import math
import os
from typing import Optional

from absl import app
from absl import flags
from absl import logging
import tensorflow as tf

from dp_fedavg import execution
from dp_fedavg import loop
from dp_fedavg import outputs
from dp_fedavg import process
from dp_fedavg import sampling
from dp_fedavg import tasks
from experiments import privacy_flags

TASKS = tasks.TASK_NAMES
PARTITIONS = tasks.digits.PARTITIONS

_TASK = flags.DEFINE_string('task', 'digits', f'One of {TASKS}.')
_PARTITION = flags.DEFINE_string(
    'partition', 'iid', f'How examples are split over clients: {PARTITIONS}.')
_DIRICHLET_ALPHA = flags.DEFINE_float(
    'dirichlet_alpha', 0.5, 'Label-skew concentration for --partition=dirichlet.')
_LOCAL_EPOCHS = flags.DEFINE_integer(
    'local_epochs', 2, 'Passes over its data each client makes per round.')
_BATCH_SIZE = flags.DEFINE_integer('batch_size', 8, 'Client batch size.')
_CLIENT_LR = flags.DEFINE_float('client_lr', 0.3, 'Client SGD learning rate.')
_SERVER_LR = flags.DEFINE_float('server_lr', 1.0, 'Server learning rate.')
_SERVER_MOMENTUM = flags.DEFINE_float(
    'server_momentum', 0.9, 'Server SGD momentum.')
_EVAL_EVERY = flags.DEFINE_integer(
    'eval_every', 1, 'Evaluate on the held-out clients every this many rounds.')
_SEED = flags.DEFINE_integer(
    'seed', 0, 'Seed of data split, sampling, shuffling, model init and noise.')
_OUTPUT_DIR = flags.DEFINE_string(
    'output_dir', 'runs/train', 'Where metrics.csv and config.json go.')
_OVERWRITE = flags.DEFINE_bool(
    'overwrite', False, 'Replace the results of an earlier run in output_dir.')

_RANGE_CHECKS = (
    (_TASK, lambda v: v in TASKS, f'one of {", ".join(TASKS)}'),
    (_PARTITION, lambda v: v in PARTITIONS, f'one of {", ".join(PARTITIONS)}'),
    (_DIRICHLET_ALPHA, lambda v: v > 0, '> 0'),
    (_LOCAL_EPOCHS, lambda v: v >= 1, 'an integer >= 1'),
    (_BATCH_SIZE, lambda v: v >= 1, 'an integer >= 1'),
    (_CLIENT_LR, lambda v: 0 < v < math.inf, 'a finite number > 0'),
    (_SERVER_LR, lambda v: 0 < v < math.inf, 'a finite number > 0'),
    (_SERVER_MOMENTUM, lambda v: 0 <= v < 1, 'in [0, 1)'),
    (_EVAL_EVERY, lambda v: v >= 1, 'an integer >= 1'),
)


def flag_error() -> Optional[str]:
  """The first problem with the parsed flags, as one line; None if none."""
  error = privacy_flags.range_error(_RANGE_CHECKS) or privacy_flags.flag_error()
  if error:
    return error
  metrics_path = os.path.join(_OUTPUT_DIR.value, outputs.METRICS_FILE)
  if os.path.exists(metrics_path) and not _OVERWRITE.value:
    return (
        f'--output_dir={_OUTPUT_DIR.value} already holds metrics.csv: choose '
        'another --output_dir or pass --overwrite.'
    )
  return None


def main(argv):
  privacy_flags.check_no_arguments(argv)
  error = flag_error()
  if error:
    privacy_flags.exit_with_usage_error(error)

  tf.keras.utils.set_random_seed(_SEED.value)
  try:
    task = tasks.build_task(
        _TASK.value,
        num_clients=privacy_flags.NUM_CLIENTS.value,
        partition=_PARTITION.value,
        dirichlet_alpha=_DIRICHLET_ALPHA.value,
        seed=_SEED.value,
    )
  except ValueError as e:
    privacy_flags.exit_with_usage_error(f'--task={_TASK.value}: {e}')

  accountant = privacy_flags.build_accountant()
  try:
    noise = privacy_flags.noise_parameter(accountant)
    aggregator, dp_event_fn = privacy_flags.build_aggregator(
        noise, accountant.clients_per_round, _SEED.value
    )
  except ValueError as e:
    privacy_flags.exit_with_usage_error(str(e))
  if privacy_flags.CALIBRATE.value == 'noise':
    logging.info(
        'calibrated noise multiplier %.6g: the smallest meeting epsilon=%g at '
        'delta=%g after %d rounds', noise,
        privacy_flags.TARGET_EPSILON.value, accountant.delta,
        privacy_flags.ROUNDS.value,
    )

  scheme = accountant.scheme
  run_outputs = outputs.RunOutputs(_OUTPUT_DIR.value, overwrite=_OVERWRITE.value)
  config = {name: flags.FLAGS[name].value for name in _flag_names()}
  config['noise_multiplier_used'] = noise
  run_outputs.write_config(config)
  logging.info(
      'task %s, %d clients, %s aggregator (noise multiplier %g), %s sampling '
      'of %d per round; epsilon at delta=%g under %s adjacency, accountant %s',
      task.name, accountant.num_clients, privacy_flags.AGGREGATOR.value,
      noise, scheme.value, accountant.clients_per_round,
      accountant.delta,
      'local-DP (replace one client\'s update; no sampling amplification)'
      if accountant.local_dp else accountant.neighboring_relation.name,
      accountant.kind.value,
  )
  with execution.local_execution():
    learning_process = process.build_process(
        task.model_fn,
        aggregator,
        client_learning_rate=_CLIENT_LR.value,
        server_learning_rate=_SERVER_LR.value,
        server_momentum=_SERVER_MOMENTUM.value,
    )
    evaluator = process.FederatedEvaluator(
        task.model_fn, task.eval_client_datasets()
    )
    outcome = loop.run_training(
        learning_process,
        task,
        sampling.ClientSampler(
            scheme, accountant.num_clients, accountant.clients_per_round,
            _SEED.value,
        ),
        accountant,
        dp_event_fn,
        evaluator,
        rounds=privacy_flags.ROUNDS.value,
        local_epochs=_LOCAL_EPOCHS.value,
        batch_size=_BATCH_SIZE.value,
        eval_every=_EVAL_EVERY.value,
        seed=_SEED.value,
        target_epsilon=privacy_flags.TARGET_EPSILON.value,
        on_round=run_outputs.release_round,
    )
    model_path = run_outputs.save_model(
        task, learning_process.get_model_weights(outcome.state)
    )
  epsilon, accountant_name = accountant.epsilon_and_accountant()
  logging.info(
      'done after %d of %d rounds (%s): epsilon %.4g at delta %g (%s); final '
      'model %s; metrics in %s', outcome.rounds_completed,
      privacy_flags.ROUNDS.value, outcome.stop_reason, epsilon,
      accountant.delta, accountant_name, model_path, _OUTPUT_DIR.value,
  )


def _flag_names() -> list[str]:
  """This binary's flags and the shared privacy flags."""
  holders = list(globals().values()) + list(vars(privacy_flags).values())
  return sorted(
      holder.name for holder in holders if isinstance(holder, flags.FlagHolder)
  )


if __name__ == '__main__':
  app.run(main)
