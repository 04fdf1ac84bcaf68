"""TFF's worker where only loopback exists, reached through a Unix socket.

  unshare --user --net --map-root-user python -m dp_fedavg.isolated_worker \
      SOCKET PORT [WORKER_ARGS...]

`worker_binary` takes only `--port` and listens on every interface without
authentication: whoever reaches the port can run TensorFlow graphs as the
user and receives each round's client data. Run in a new user and network
namespace, as above, it has no interface but loopback, which this program
brings up. The run reaches it through SOCKET, a Unix socket on the shared
file system (mode 0600, the user's only), which this program relays to the
worker's PORT on loopback inside the namespace. No network port of the
host is opened.

The worker is this program's child and dies with it (and it with its
parent, `dp_fedavg.execution`); SIGINT or SIGTERM stops both.
"""

import ctypes
import fcntl
import os
import selectors
import signal
import socket
import struct
import subprocess
import sys
import threading
import time

_SIOCGIFFLAGS = 0x8913
_SIOCSIFFLAGS = 0x8914
_IFF_UP = 0x1
_PR_SET_PDEATHSIG = 1
_CHUNK = 1 << 20


def _bring_up_loopback() -> None:
  # A new network namespace's loopback is down; `ip link set lo up` without
  # needing `ip`.
  with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
    request = struct.pack('16sH14s', b'lo', 0, b'')
    flags = struct.unpack('16sH14s', fcntl.ioctl(s, _SIOCGIFFLAGS, request))[1]
    fcntl.ioctl(s, _SIOCSIFFLAGS,
                struct.pack('16sH14s', b'lo', flags | _IFF_UP, b''))


def _die_with_parent() -> None:
  ctypes.CDLL('libc.so.6').prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def _pump(source: socket.socket, sink: socket.socket) -> None:
  """Copies `source` to `sink` until either side closes."""
  try:
    while data := source.recv(_CHUNK):
      sink.sendall(data)
  except OSError:
    pass
  finally:
    for s in (source, sink):
      try:
        s.shutdown(socket.SHUT_RDWR)
      except OSError:
        pass


def _relay(client: socket.socket, port: int) -> None:
  worker = socket.create_connection(('127.0.0.1', port))
  worker.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
  for source, sink in ((client, worker), (worker, client)):
    threading.Thread(target=_pump, args=(source, sink), daemon=True).start()


def _wait_for_port(port: int, worker: subprocess.Popen) -> None:
  while worker.poll() is None:
    try:
      socket.create_connection(('127.0.0.1', port), timeout=1).close()
      return
    except OSError:
      time.sleep(0.05)
  sys.exit(f'isolated_worker: the worker exited with {worker.returncode}.')


def main(argv: list[str]) -> None:
  socket_path, port, worker_args = argv[1], int(argv[2]), argv[3:]
  _bring_up_loopback()
  worker = subprocess.Popen(
      [worker_args[0], f'--port={port}', *worker_args[1:]],
      stdin=subprocess.DEVNULL, preexec_fn=_die_with_parent)

  def stop(unused_signum, unused_frame):
    worker.send_signal(signal.SIGINT)
    try:
      worker.wait(timeout=10)
    except subprocess.TimeoutExpired:
      worker.kill()
    sys.exit(0)

  for s in (signal.SIGINT, signal.SIGTERM):
    signal.signal(s, stop)
  _wait_for_port(port, worker)
  listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
  old_mask = os.umask(0o177)  # The socket file: the user's only.
  listener.bind(socket_path)
  os.umask(old_mask)
  listener.listen()
  selector = selectors.DefaultSelector()
  selector.register(listener, selectors.EVENT_READ)
  while worker.poll() is None:
    if selector.select(timeout=0.5):
      client, _ = listener.accept()
      _relay(client, port)
  sys.exit(f'isolated_worker: the worker exited with {worker.returncode}.')


if __name__ == '__main__':
  main(sys.argv)
