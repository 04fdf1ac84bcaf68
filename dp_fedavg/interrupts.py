"""Stopping a run cleanly on SIGINT (Ctrl-C) or SIGTERM.

The first signal asks training to stop once the round in progress ends:
that round is recorded and checkpointed as usual, the worker is stopped, and
the binary says where the checkpoint is and how to continue, then exits with
128 + the signal's number (130 for SIGINT, 143 for SIGTERM), as shells do.
A second signal abandons the round at once (the checkpoint is then the one
before it).

The local TFF worker runs in its own session (`dp_fedavg.execution`), so a
Ctrl-C at the terminal reaches only the training process, which finishes
the round with the worker still serving it.
"""

import contextlib
import signal
import sys
from typing import Callable, Iterator, Optional

from absl import logging

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopRequest:
  """Whether, and by which signal, a stop was asked for."""

  def __init__(self):
    self.signal: Optional[signal.Signals] = None

  def requested(self) -> bool:
    return self.signal is not None

  @property
  def exit_code(self) -> int:
    """128 + the signal's number (the shell's convention)."""
    return 128 + int(self.signal)


@contextlib.contextmanager
def stop_on_signals() -> Iterator[StopRequest]:
  """Within the block, SIGINT and SIGTERM ask for a stop after the round in
  progress; a second one raises KeyboardInterrupt where the program is.
  The previous handlers come back on leaving."""
  request = StopRequest()

  def handle(signum, unused_frame):
    if request.signal is not None:
      raise KeyboardInterrupt
    request.signal = signal.Signals(signum)
    logging.warning(
        '%s: stopping after the round in progress (send it again to stop at '
        'once)', request.signal.name)

  with _handled_by(handle):
    yield request


@contextlib.contextmanager
def exit_on_signals(binary: str, stopped: Callable[[], str]) -> Iterator[None]:
  """Within the block, SIGINT or SIGTERM abandons the work at once.

  The KeyboardInterrupt it raises unwinds the block (a local worker stops as
  its execution context exits), then one line, `<binary>: <SIGNAL>:
  <stopped()>` (what was kept and where), goes to stderr and the program
  exits with 128 + the signal's number. For work that cannot stop at a
  round's end and continue later (studies, audits).
  """
  received = []

  def handle(signum, unused_frame):
    received.append(signal.Signals(signum))
    raise KeyboardInterrupt

  try:
    with _handled_by(handle):
      yield
  except KeyboardInterrupt:
    stopped_by = received[0] if received else signal.SIGINT
    print(f'{binary}: {stopped_by.name}: {stopped()}', file=sys.stderr)
    sys.exit(128 + int(stopped_by))


@contextlib.contextmanager
def _handled_by(handle) -> Iterator[None]:
  """Within the block, SIGINT and SIGTERM go to `handle`; the previous
  handlers come back on leaving."""
  previous = {s: signal.signal(s, handle) for s in SIGNALS}
  try:
    yield
  finally:
    for s, handler in previous.items():
      signal.signal(s, handler)
