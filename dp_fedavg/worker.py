r"""Serves TFF's C++ runtime on a port, for runs spread over several hosts.

  python -m dp_fedavg.worker --port=8000

The process becomes TFF's `worker_binary` (it replaces itself with it), so
stopping it (Ctrl-C, SIGTERM, kill) stops the worker; nothing is left
behind. Point a run at the workers with
`python -m experiments.train --workers=host1:8000,host2:8000`.
"""

import os
import sys

from absl import app
from absl import flags

_PORT = flags.DEFINE_integer('port', 8000, 'Port to serve on, in [1, 65535].')
_MAX_CONCURRENT = flags.DEFINE_integer(
    'max_concurrent_computation_calls', -1,
    'Computations the worker runs at once; nonpositive: no limit.')


def main(argv):
  if len(argv) > 1:
    sys.exit(f'worker: error: unexpected arguments: {" ".join(argv[1:])}')
  if not 1 <= _PORT.value <= 65535:
    sys.exit(f'worker: error: --port={_PORT.value} is out of range: must be in '
             '[1, 65535].')
  # Imported here: the flag checks above need no TensorFlow.
  from dp_fedavg import execution  # pylint: disable=g-import-not-at-top
  print(f'TFF worker serving on port {_PORT.value}', file=sys.stderr, flush=True)
  os.execv(execution.WORKER_BINARY, [
      execution.WORKER_BINARY,
      f'--port={_PORT.value}',
      f'--max_concurrent_computation_calls={_MAX_CONCURRENT.value}',
  ])


if __name__ == '__main__':
  app.run(main)
