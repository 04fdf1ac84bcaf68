"""What the study binaries share: their output directory, flags.json,
results.csv and progress across runs.

A study builds its runs' configurations from the one its binary built
(`RunConfig.replace`); it never changes flag values.
"""

import dataclasses
import datetime
import json
import os
import time
from typing import Any, Optional

from absl import flags
from absl import logging

from dp_fedavg import interrupts
from dp_fedavg import outputs
from dp_fedavg import tasks
from experiments import training_flags

FLAGS_FILE = 'flags.json'
RESULTS_FILE = 'results.csv'


@dataclasses.dataclass(frozen=True)
class Utility:
  """What a study compares its runs by: a key of results.csv's rows (and of
  a run's summary), its axis label, and which way is better."""

  key: str
  label: str
  higher_is_better: bool

  def worse(self, value: float, than: float) -> bool:
    return value < than if self.higher_is_better else value > than


def utility(task: tasks.FederatedTask) -> Utility:
  """Accuracy for classification; the loss for regression (which has none)."""
  if task.regression:
    return Utility('eval_loss', 'test loss (mean squared error)', False)
  return Utility('eval_accuracy', 'test accuracy', True)


def output_dir_error(output_dir: str, overwrite: bool) -> Optional[str]:
  return outputs.output_dir_error(output_dir, RESULTS_FILE, overwrite)


def write_flags(output_dir: str, *modules) -> dict[str, Any]:
  """Writes every flag of the study (and the shared ones) to flags.json."""
  values = training_flags.flag_values(*modules)
  os.makedirs(output_dir, exist_ok=True)
  with open(os.path.join(output_dir, FLAGS_FILE), 'w') as f:
    json.dump(values, f, indent=2, sort_keys=True)
    f.write('\n')
  return values


def write_results(
    output_dir: str, rows: list[dict[str, Any]], name: str = RESULTS_FILE
) -> str:
  """Writes `rows` (one per run in results.csv) to the CSV file `name`;
  returns its path."""
  return outputs.write_csv(os.path.join(output_dir, name), rows)


class Progress:
  """Logs each finished run with the time the remaining runs should take,
  and keeps results.csv holding every finished run's row."""

  def __init__(self, total_runs: int, output_dir: str):
    self._total = total_runs
    self._output_dir = output_dir
    self._done = 0
    self._start = time.monotonic()

  def stopping_on_signals(self, binary: str):
    """SIGINT or SIGTERM stops the study at once: the run in progress is
    abandoned (its worker stopped as the execution context unwinds), the
    finished runs keep their outputs and rows, and one line says so; exit
    128 + the signal. Studies have no --resume: their runs are short, and
    a rerun with the finished points left out continues one."""
    return interrupts.exit_on_signals(binary, lambda: (
        f'stopped with {self._done} of {self._total} runs finished; their '
        f'rows are in {os.path.join(self._output_dir, RESULTS_FILE)}'))

  def run_finished(self, description: str, rows: list[dict[str, Any]]) -> None:
    """Logs a run that finished; `rows`: the study's rows so far, written to
    results.csv at once (nothing finished is lost if the study stops)."""
    write_results(self._output_dir, rows)
    self._done += 1
    elapsed = time.monotonic() - self._start
    eta = elapsed / self._done * (self._total - self._done)
    logging.info(
        'run %d/%d done: %s  (elapsed %s, ETA %s)', self._done, self._total,
        description, datetime.timedelta(seconds=round(elapsed)),
        datetime.timedelta(seconds=round(eta)),
    )


def parse_floats(flag: flags.FlagHolder) -> list[float]:
  """A list flag's values as floats; raises ValueError naming the flag."""
  try:
    return [float(v) for v in flag.value or []]
  except ValueError as e:
    raise ValueError(f'--{flag.name}: {e}') from e
