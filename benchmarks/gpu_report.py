"""What `benchmarks.gpu_check` finds out about a machine, apart from its
flags (absl flags are global, so tests import this module, not that one):
why TensorFlow sees no GPU, and where TensorFlow placed a round's ops."""

import collections
import ctypes
import os
import re

# Op types of the client training and of the clipping and noise.
_WATCHED = ('Conv2D', 'Conv2DBackpropFilter', 'Conv2DBackpropInput', 'MatMul',
            'BatchMatMulV2', 'Einsum', 'StatelessRandomNormalV2',
            'StatelessRandomNormalV3', 'Sqrt', 'Maximum', 'Minimum', 'Sum')
# The CUDA libraries that TensorFlow 2.14 opens for a GPU, by the folder of
# site-packages/nvidia where requirements/cuda.txt installs each, which is
# where TensorFlow's RUNPATH looks (`readelf -d libtensorflow_framework.so.2`).
CUDA_LIBRARIES = (('cuda_runtime', 'libcudart.so.11.0'),
                  ('cublas', 'libcublas.so.11'),
                  ('cublas', 'libcublasLt.so.11'),
                  ('cudnn', 'libcudnn.so.8'),
                  ('cufft', 'libcufft.so.10'),
                  ('cusolver', 'libcusolver.so.11'),
                  ('cusparse', 'libcusparse.so.11'))
_DRIVER = 'libcuda.so.1'


def no_gpu_reason(site_packages: str, load_library=ctypes.CDLL) -> str:
  """Why TensorFlow (installed in `site_packages`) sees no GPU, as far as
  this machine tells: the NVIDIA driver, the CUDA libraries, or neither."""
  reasons = []
  try:
    load_library(_DRIVER)
  except OSError as e:
    reasons.append(f'no NVIDIA driver here ({_DRIVER} does not load: {e})')
  missing = [name for folder, name in CUDA_LIBRARIES if not os.path.exists(
      os.path.join(site_packages, 'nvidia', folder, 'lib', name))]
  if missing:
    reasons.append(
        f'CUDA 11.8 libraries missing from {site_packages}/nvidia: '
        f'{", ".join(missing)} (install requirements/cuda.txt: make gpu-check)')
  if not reasons:
    reasons.append('the NVIDIA driver and the CUDA libraries are there; '
                   'TensorFlow\'s log above says why it opened no GPU')
  return '; '.join(reasons)


def placed_ops(log_lines) -> collections.Counter:
  """(op type, device type) -> how often TensorFlow's placement log (of
  `tf.debugging.set_log_device_placement`) places an op of `_WATCHED`.

  TensorFlow's placer prints each placement to stdout ("name: (type):
  device") and logs it again with a timestamp; only the first is counted.
  """
  placed = collections.Counter()
  for line in log_lines:
    match = re.match(r'\S+: \((\w+)\): /job:\S*device:(\w+):\d', line)
    if match and match.group(1) in _WATCHED:
      placed[(match.group(1), match.group(2))] += 1
  return placed
