import collections

from absl.testing import parameterized
import dp_accounting
import numpy as np
from scipy import stats
import tensorflow as tf
import tensorflow_federated as tff

from aggregators import laplace

_VECTOR = tff.TensorType(np.float32, [4])
_STRUCT = tff.types.to_type(
    collections.OrderedDict(w=(np.float32, [2, 3]), b=(np.float32, [3]))
)


def _l1(structure) -> float:
  return float(sum(np.sum(np.abs(x)) for x in tf.nest.flatten(structure)))


class LaplaceFactoryTest(tf.test.TestCase, parameterized.TestCase):

  @parameterized.named_parameters(('vector', _VECTOR), ('struct', _STRUCT))
  def test_type_signature(self, value_type):
    process = laplace.LaplaceFactory(1.0, 1.0, 3).create(value_type)
    state = tff.FederatedType(
        tff.types.to_type(collections.OrderedDict(
            l1_clip=np.float32, epsilon_per_round=np.float64,
            noise_seed=(np.int64, [2]),
        )),
        tff.SERVER,
    )
    measurements = tff.FederatedType(
        tff.types.to_type(collections.OrderedDict(
            l1_clip=np.float32, noise_scale=np.float32,
            clipped_count=np.int32, nonfinite_count=np.int32,
        )),
        tff.SERVER,
    )
    self.assertTrue(process.initialize.type_signature.is_equivalent_to(
        tff.FunctionType(None, state)
    ))
    self.assertTrue(process.next.type_signature.is_equivalent_to(
        tff.FunctionType(
            collections.OrderedDict(
                state=state, value=tff.FederatedType(value_type, tff.CLIENTS)
            ),
            tff.templates.MeasuredProcessOutput(
                state=state,
                result=tff.FederatedType(value_type, tff.SERVER),
                measurements=measurements,
            ),
        )
    ))

  @parameterized.named_parameters(
      ('zero_epsilon', dict(epsilon_per_round=0.0), ValueError,
       'epsilon_per_round must be a finite number > 0'),
      ('inf_epsilon', dict(epsilon_per_round=float('inf')), ValueError, 'finite'),
      ('negative_clip', dict(l1_clip=-1.0), ValueError, 'l1_clip must be a finite number > 0'),
      ('string_clip', dict(l1_clip='1'), TypeError, 'l1_clip must be a number'),
      ('zero_clients', dict(expected_clients_per_round=0), ValueError,
       'expected_clients_per_round'),
  )
  def test_invalid_arguments_raise(self, overrides, error, message):
    kwargs = dict(epsilon_per_round=1.0, l1_clip=1.0, expected_clients_per_round=2)
    kwargs.update(overrides)
    with self.assertRaisesRegex(error, message):
      laplace.LaplaceFactory(**kwargs)

  def test_l1_norm_never_exceeds_clip(self):
    rng = np.random.default_rng(0)
    l1_clip = 0.6
    # A huge epsilon makes the noise negligible (scale 0.6e-9).
    process = laplace.LaplaceFactory(1e9, l1_clip, 1).create(_STRUCT)
    state = process.initialize()
    for _ in range(20):
      value = collections.OrderedDict(
          w=(10.0 ** rng.uniform(-3, 2) * rng.standard_normal([2, 3])).astype(
              np.float32),
          b=(10.0 ** rng.uniform(-3, 2) * rng.standard_normal([3])).astype(
              np.float32),
      )
      output = process.next(state, [value])
      self.assertLessEqual(_l1(output.result), l1_clip * (1 + 1e-5))
      scale = min(1.0, l1_clip / _l1(value))
      self.assertAllClose(
          output.result,
          tf.nest.map_structure(lambda x: x * scale, value),
          rtol=1e-5, atol=1e-6,
      )
      self.assertEqual(
          output.measurements['clipped_count'], int(_l1(value) > l1_clip)
      )

  def test_noise_is_laplace_with_l1_scale(self):
    epsilon, l1_clip, clients, size = 0.5, 2.0, 4, 20_000
    process = laplace.LaplaceFactory(
        epsilon, l1_clip, clients, noise_seed=5
    ).create(tff.TensorType(np.float32, [size]))
    output = process.next(
        process.initialize(), [np.zeros(size, np.float32)] * clients
    )
    noise = np.asarray(output.result, np.float64) * clients  # Noise on the sum.
    scale = l1_clip / epsilon
    self.assertAllClose(output.measurements['noise_scale'], scale)
    # Laplace(b) has stddev b sqrt(2); the sample stddev's standard error is
    # sqrt((kurtosis - 1) / 4n) sigma, with kurtosis 6.
    sigma = scale * np.sqrt(2)
    self.assertLess(abs(noise.std() - sigma), 5 * sigma * np.sqrt(5 / (4 * size)))
    self.assertGreater(stats.kstest(noise, 'laplace', args=(0, scale)).pvalue, 1e-3)
    # A Gaussian of the same stddev has a different shape.
    self.assertLess(stats.kstest(noise, 'norm', args=(0, sigma)).pvalue, 1e-6)

  def test_nonfinite_update_is_dropped_and_counted(self):
    process = laplace.LaplaceFactory(1e9, 10.0, 2).create(_VECTOR)
    good = np.array([0.2, 0, 0, 0.4], np.float32)
    output = process.next(
        process.initialize(), [good, np.array([np.nan, 0, 0, 0], np.float32)]
    )
    self.assertAllClose(output.result, good / 2, atol=1e-6)
    self.assertEqual(output.measurements['nonfinite_count'], 1)

  def test_dp_event_is_laplace_relative_to_l1_sensitivity(self):
    process = laplace.LaplaceFactory(0.25, 3.0, 2).create(_VECTOR)
    event = laplace.dp_event_from_state(process.initialize())
    self.assertEqual(event, dp_accounting.LaplaceDpEvent(4.0))
    self.assertIs(type(event.noise_multiplier), float)
    # One unsampled round of Laplace(1/eps) is pure eps-DP.
    accountant = dp_accounting.pld.PLDAccountant()
    accountant.compose(event)
    self.assertAlmostEqual(accountant.get_epsilon(1e-9), 0.25, places=3)


if __name__ == '__main__':
  tf.test.main()
