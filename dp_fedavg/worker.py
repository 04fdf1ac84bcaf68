r"""Serves TFF's C++ runtime, for runs spread over several hosts.

  python -m dp_fedavg.worker --socket=/run/user/$UID/dp_fedavg.sock
  python -m dp_fedavg.worker --port=8000

`worker_binary` listens on every interface without authentication: whoever
reaches its port can run TensorFlow graphs as the user running it (reading
and writing files) and receives each round's client data. With --socket the
worker runs in a user and network namespace of its own, where only loopback
exists, and is reached only through that Unix socket (mode 0600), which
`ssh -L 8000:/run/user/UID/dp_fedavg.sock host` brings to the driving
machine as localhost:8000 (`dp_fedavg.isolated_worker`). With --port it
listens on that port of every interface, and says so.

The process becomes the worker (or its namespace's relay; it replaces itself
with it), so stopping it (Ctrl-C, SIGTERM, kill) stops the worker; nothing
is left behind. Point a run at the workers with
`python -m experiments.train --workers=host1:8000,host2:8000`.
"""

import os
import sys

from absl import app
from absl import flags

_PORT = flags.DEFINE_integer(
    'port', 8000, 'Port to serve on, in [1, 65535], on every interface.')
_SOCKET = flags.DEFINE_string(
    'socket', None,
    'Serve only on this Unix socket, the worker in a network namespace of its '
    'own (needs unshare with user namespaces); --port is then unused.')
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
  worker = [execution.WORKER_BINARY,
            f'--max_concurrent_computation_calls={_MAX_CONCURRENT.value}']
  if _SOCKET.value:
    if not execution.isolation_available():
      sys.exit('worker: error: --socket needs a user and network namespace, '
               'which this kernel does not allow (unshare --user --net); '
               'serve on --port behind a firewall instead.')
    print(f'TFF worker serving on {_SOCKET.value} only (its own network '
          'namespace)', file=sys.stderr, flush=True)
    command = execution.isolated_worker_command(_SOCKET.value, worker)
  else:
    print(f'TFF worker serving on port {_PORT.value} of every interface, '
          'without authentication: whoever reaches it can run TensorFlow '
          'graphs as you; prefer --socket with an SSH tunnel.',
          file=sys.stderr, flush=True)
    command = [worker[0], f'--port={_PORT.value}', *worker[1:]]
  os.execvp(command[0], command)


if __name__ == '__main__':
  app.run(main)
