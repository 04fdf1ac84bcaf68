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
from typing import Optional

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


@dataclasses.dataclass(frozen=True)
class Restored:
  round: int
  state: tff.learning.templates.LearningAlgorithmState


class Checkpointer:
  """Saves and restores (round, learning state, privacy ledger history)."""

  def __init__(self, output_dir: str):
    self.directory = os.path.join(output_dir, CHECKPOINT_DIR)
    self._manager = tff.program.FileProgramStateManager(
        self.directory, prefix=_PREFIX, keep_total=_KEEP, keep_first=False
    )

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
    """The latest checkpoint, with `ledger` set to its history; None if none.

    Args:
      initial_state: a state of the same process, giving the structure.
      ledger: receives the checkpoint's recorded rounds.
    """
    structure = {'round': np.int64(0), 'state': initial_state, 'accountant': ''}
    saved, round_num = asyncio.run(self._manager.load_latest(structure))
    if saved is None:
      return None
    history = saved['accountant']
    ledger.restore_history(
        history.decode() if isinstance(history, bytes) else str(history)
    )
    return Restored(round=int(round_num), state=saved['state'])

  def remove_all(self) -> None:
    asyncio.run(self._manager.remove_all())
