"""Checkpoints of a run: the learning state, the round and the privacy spent.

Saved with `tff.program.FileProgramStateManager` under
OUTPUT_DIR/checkpoints/program_state_<round>. The privacy ledger's recorded
rounds are part of every checkpoint, so a resumed run reports the epsilon of
the rounds it actually ran, including those before the interruption. The
client sampler and the clients' shuffling are functions of (seed, round) and
the noise seed lives in the aggregator's state, so a resumed run continues
exactly as the uninterrupted one would have.
"""

import asyncio
import dataclasses
import os
import shutil
from typing import Optional

from absl import logging
import numpy as np
import tensorflow_federated as tff

from dp_fedavg import accounting

CHECKPOINT_DIR = 'checkpoints'
# Older checkpoints are deleted; the latest few survive a crash while saving.
_KEEP = 3
_PREFIX = 'program_state_'


def has_checkpoint(output_dir: str) -> bool:
  """Whether `output_dir` holds a saved checkpoint (creates nothing)."""
  directory = os.path.join(output_dir, CHECKPOINT_DIR)
  return os.path.isdir(directory) and any(
      name.startswith(_PREFIX) for name in os.listdir(directory)
  )


class CorruptCheckpointError(ValueError):
  """Checkpoints exist, but none of them loads."""


@dataclasses.dataclass(frozen=True)
class Restored:
  round: int
  state: tff.learning.templates.LearningAlgorithmState


class Checkpointer:
  """Saves and restores (round, learning state, privacy ledger history)."""

  def __init__(self, output_dir: str):
    self.directory = os.path.join(output_dir, CHECKPOINT_DIR)
    self._created_manager = None

  @property
  def _manager(self) -> tff.program.FileProgramStateManager:
    # Made on first use: it creates the directory, which only a run that
    # saves or resumes should get.
    if self._created_manager is None:
      self._created_manager = tff.program.FileProgramStateManager(
          self.directory, prefix=_PREFIX, keep_total=_KEEP, keep_first=False
      )
    return self._created_manager

  def save(
      self,
      round_num: int,
      state: tff.learning.templates.LearningAlgorithmState,
      ledger: accounting.PrivacyLedger,
  ) -> None:
    asyncio.run(self._manager.save(
        {'round': np.int64(round_num), 'state': state,
         'accountant': ledger.history_json()},
        round_num,
    ))

  def latest_round(self) -> Optional[int]:
    versions = asyncio.run(self._manager.get_versions())
    return max(versions) if versions else None

  def restore_latest(
      self,
      initial_state: tff.learning.templates.LearningAlgorithmState,
      ledger: accounting.PrivacyLedger,
  ) -> Optional[Restored]:
    """The latest checkpoint that loads, with `ledger` set to its history;
    None if there is none.

    A checkpoint that does not load (damaged, or cut short by a crash while
    it was written) is skipped with a warning for the one before it, and
    moved aside (renamed `damaged_<name>`) once an earlier one loads: the
    rounds after that one are run, and saved, again.

    Args:
      initial_state: a state of the same process, giving the structure.
      ledger: receives the checkpoint's recorded rounds.

    Raises:
      CorruptCheckpointError: there are checkpoints, and none loads.
    """
    structure = {'round': np.int64(0), 'state': initial_state, 'accountant': ''}
    versions = asyncio.run(self._manager.get_versions()) or []
    damaged = []
    for version in sorted(versions, reverse=True):
      path = os.path.join(self.directory, f'{_PREFIX}{version}')
      try:
        saved = asyncio.run(self._manager.load(version, structure))
        history = saved['accountant']
        ledger.restore_history(
            history.decode() if isinstance(history, bytes) else str(history)
        )
      # A damaged checkpoint fails in TensorFlow's, TFF's or the JSON reader,
      # with errors of many types; any of them means "not this one".
      except Exception as e:  # pylint: disable=broad-except
        logging.warning('checkpoint %s does not load (%s: %s); trying the one '
                        'before it', path, type(e).__name__,
                        str(e).splitlines()[0] if str(e) else '')
        damaged.append(path)
        continue
      for path in damaged:
        aside = os.path.join(self.directory,
                             f'damaged_{os.path.basename(path)}')
        if os.path.isdir(aside):  # From an earlier resumption.
          shutil.rmtree(aside)
        os.replace(path, aside)
      return Restored(round=int(version), state=saved['state'])
    if versions:
      raise CorruptCheckpointError(
          f'{self.directory}: none of its {len(versions)} checkpoints loads '
          '(damaged); the run cannot be resumed.')
    return None

  def remove_all(self) -> None:
    asyncio.run(self._manager.remove_all())
