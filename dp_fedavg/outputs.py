"""Where a run's results go: config.json, metrics.csv, TensorBoard, the model.

Each round's metrics are released through `tff.program` release managers,
keyed by round: a CSV file (`CSVFileReleaseManager`) and TensorBoard scalars
under tensorboard/ (`TensorBoardReleaseManager`). A row is written as soon as
its round ends, so a killed run keeps every finished round; a resumed run's
first release drops the CSV rows after its checkpoint.
"""

import asyncio
import collections
import csv
import dataclasses
import json
import os
import shutil
import tempfile
from typing import Any, Optional

import tensorflow_federated as tff

from dp_fedavg import checkpoints
from dp_fedavg import loop
from dp_fedavg.tasks import base

CONFIG_FILE = 'config.json'
METRICS_FILE = 'metrics.csv'
MODEL_FILE = 'final_model.keras'
TENSORBOARD_DIR = 'tensorboard'


def output_dir_error(output_dir: str, results_file: Optional[str] = None,
                     overwrite: bool = False, or_else: str = '') -> Optional[str]:
  """One line if `--output_dir` cannot be created and written to, or already
  holds `results_file` without `overwrite` (`or_else`: another way out, said
  after the others); None if it is usable (it then exists)."""
  try:
    os.makedirs(output_dir, exist_ok=True)
    with tempfile.TemporaryFile(dir=output_dir):
      pass
  except OSError as e:
    return (f'--output_dir={output_dir} cannot be created or written to: '
            f'{e.strerror or e}.')
  if results_file and os.path.exists(
      os.path.join(output_dir, results_file)) and not overwrite:
    return (f'--output_dir={output_dir} already holds {results_file}: choose '
            f'another --output_dir{", " if or_else else " or "}pass '
            f'--overwrite{", or " + or_else if or_else else ""}.')
  return None


def write_csv(path: str, rows: list[dict[str, Any]]) -> str:
  """Writes `rows` (dicts with the same keys, the first one's order) as a
  CSV file; returns its path. Written under a temporary name and renamed, so
  an interrupted write leaves no truncated table."""
  with open(path + '.partial', 'w', newline='') as f:
    writer = csv.DictWriter(f, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
  os.replace(path + '.partial', path)
  return path


class RunOutputs:
  """Writes one run's config and per-round metrics under `output_dir`.

  Args:
    output_dir: created if needed.
    overwrite: replace an earlier run's metrics, TensorBoard logs and
      checkpoints in `output_dir`.
    resume: continue an earlier run's metrics (rows after the checkpoint it
      resumes from are replaced as rounds are rerun).
  """

  def __init__(self, output_dir: str, overwrite: bool = False, resume: bool = False):
    if overwrite and resume:
      raise ValueError('choose one of overwrite and resume.')
    metrics_path = os.path.join(output_dir, METRICS_FILE)
    if os.path.exists(metrics_path) and not (overwrite or resume):
      raise FileExistsError(
          f'{metrics_path} exists; choose another output directory, resume the '
          'run or allow overwriting it.'
      )
    os.makedirs(output_dir, exist_ok=True)
    if overwrite:
      for name in (METRICS_FILE, TENSORBOARD_DIR, checkpoints.CHECKPOINT_DIR):
        path = os.path.join(output_dir, name)
        if os.path.isdir(path):
          shutil.rmtree(path)
        elif os.path.exists(path):
          os.remove(path)
    self.output_dir = output_dir
    self._metrics = tff.program.GroupingReleaseManager([
        tff.program.CSVFileReleaseManager(
            file_path=metrics_path,
            save_mode=tff.program.CSVSaveMode.APPEND,
            key_fieldname='round',
        ),
        # Non-numeric values (the accountant's name, missing evaluations) are
        # skipped by TensorBoard.
        tff.program.TensorBoardReleaseManager(
            os.path.join(output_dir, TENSORBOARD_DIR)
        ),
    ])

  def write_config(self, config: dict[str, Any]) -> None:
    with open(os.path.join(self.output_dir, CONFIG_FILE), 'w') as f:
      json.dump(config, f, indent=2, sort_keys=True)
      f.write('\n')

  def write_table(self, name: str, rows: list[dict[str, Any]]) -> str:
    """Writes `rows` to the CSV file `name` in the output directory."""
    return write_csv(os.path.join(self.output_dir, name), rows)

  def release_round(self, result: loop.RoundResult) -> None:
    row = collections.OrderedDict(
        (field.name, getattr(result, field.name))
        for field in dataclasses.fields(result)
        if field.name not in ('round', 'aggregator')
    )
    row.update(
        (f'aggregator_{name}', value) for name, value in result.aggregator.items()
    )
    row = collections.OrderedDict(
        (name, '' if value is None else value) for name, value in row.items()
    )
    asyncio.run(self._metrics.release(row, key=result.round))

  def save_model(
      self,
      task: base.FederatedTask,
      model_weights: tff.learning.models.ModelWeights,
  ) -> str:
    """Saves the weights as a whole Keras model; returns the file's path."""
    model = task.keras_model_fn()
    model_weights.assign_weights_to(model)
    path = os.path.join(self.output_dir, MODEL_FILE)
    model.save(path)
    return path
