import importlib.metadata
import os

from absl.testing import absltest
from packaging import requirements

from benchmarks import gpu_report

_CUDA_REQUIREMENTS = os.path.join(
    os.path.dirname(__file__), '..', '..', 'requirements', 'cuda.txt')


def _missing_driver(name):
  raise OSError(f'{name}: cannot open shared object file')


class CudaRequirementsTest(absltest.TestCase):

  def test_pins_tensorflows_cuda_extra_without_tensorrt(self):
    extra = {}
    for line in importlib.metadata.requires('tensorflow'):
      requirement = requirements.Requirement(line)
      if (requirement.marker is not None
          and requirement.marker.evaluate({'extra': 'and-cuda'})):
        extra[requirement.name] = str(requirement.specifier)
    with open(_CUDA_REQUIREMENTS) as f:
      pinned = {}
      for line in f:
        if line.strip() and not line.startswith('#'):
          requirement = requirements.Requirement(line)
          pinned[requirement.name] = str(requirement.specifier)
    self.assertIn('tensorrt', extra)
    del extra['tensorrt']
    self.assertEqual(pinned, extra)


class NoGpuReasonTest(absltest.TestCase):

  def _site_packages(self, libraries):
    site_packages = self.create_tempdir().full_path
    for folder, name in libraries:
      directory = os.path.join(site_packages, 'nvidia', folder, 'lib')
      os.makedirs(directory, exist_ok=True)
      open(os.path.join(directory, name), 'w').close()
    return site_packages

  def test_names_the_missing_driver_and_libraries(self):
    libraries = list(gpu_report.CUDA_LIBRARIES)
    cudnn = ('cudnn', 'libcudnn.so.8')
    libraries.remove(cudnn)
    reason = gpu_report.no_gpu_reason(
        self._site_packages(libraries), load_library=_missing_driver)
    self.assertIn('no NVIDIA driver here (libcuda.so.1 does not load', reason)
    self.assertIn('CUDA 11.8 libraries missing', reason)
    self.assertIn('libcudnn.so.8 (install requirements/cuda.txt', reason)
    self.assertNotIn('libcublas.so.11', reason)

  def test_driver_there_libraries_missing(self):
    reason = gpu_report.no_gpu_reason(
        self._site_packages([]), load_library=lambda name: None)
    self.assertNotIn('driver here', reason)
    for _, name in gpu_report.CUDA_LIBRARIES:
      self.assertIn(name, reason)

  def test_everything_there_points_at_tensorflows_log(self):
    reason = gpu_report.no_gpu_reason(
        self._site_packages(gpu_report.CUDA_LIBRARIES),
        load_library=lambda name: None)
    self.assertIn('TensorFlow\'s log above says why', reason)


class PlacedOpsTest(absltest.TestCase):

  def test_counts_each_placement_once_by_device(self):
    # TensorFlow 2.14's placement log: each placement printed, then logged.
    log = [
        'Conv2D: (Conv2D): /job:localhost/replica:0/task:0/device:GPU:0\n',
        '2026-12-07 02:25:38.190426: I tensorflow/core/common_runtime/'
        'placer.cc:125] Conv2D: (Conv2D): /job:localhost/replica:0/task:0/'
        'device:GPU:0\n',
        'clip/Sqrt: (Sqrt): /job:localhost/replica:0/task:0/device:GPU:0\n',
        'noise/StatelessRandomNormalV2: (StatelessRandomNormalV2): '
        '/job:localhost/replica:0/task:0/device:CPU:0\n',
        'Const: (Const): /job:localhost/replica:0/task:0/device:GPU:0\n',
        '2026-12-07 02:25:38.194052: I tensorflow/core/common_runtime/eager/'
        'execute.cc:1736] Executing op Conv2D in device /job:localhost/'
        'replica:0/task:0/device:GPU:0\n',
    ]
    self.assertEqual(gpu_report.placed_ops(log), {
        ('Conv2D', 'GPU'): 1,
        ('Sqrt', 'GPU'): 1,
        ('StatelessRandomNormalV2', 'CPU'): 1,
    })


if __name__ == '__main__':
  absltest.main()
