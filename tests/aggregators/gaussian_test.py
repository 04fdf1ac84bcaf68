import collections

from absl.testing import parameterized
import dp_accounting
import numpy as np
import tensorflow as tf
import tensorflow_federated as tff

from aggregators import gaussian

_VECTOR = tff.TensorType(np.float32, [3])
_STRUCT = tff.types.to_type(
    collections.OrderedDict(w=(np.float32, [2, 2]), b=(np.float32, [3]))
)
_STATE = tff.types.to_type(
    collections.OrderedDict(
        clip=np.float32, noise_multiplier=np.float64, noise_seed=(np.int64, [2])
    )
)
_MEASUREMENTS = tff.types.to_type(
    collections.OrderedDict(
        clip=np.float32,
        sum_noise_stddev=np.float32,
        clipped_count=np.int32,
        nonfinite_count=np.int32,
    )
)


def _global_norm(structure) -> float:
  return float(
      np.sqrt(sum(np.sum(np.square(x)) for x in tf.nest.flatten(structure)))
  )


def _clipped(structure, clip):
  scale = min(1.0, clip / _global_norm(structure))
  return tf.nest.map_structure(lambda x: x * scale, structure)


class GaussianFixedClipFactoryTest(tf.test.TestCase, parameterized.TestCase):

  @parameterized.named_parameters(('vector', _VECTOR), ('struct', _STRUCT))
  def test_type_signature(self, value_type):
    process = gaussian.GaussianFixedClipFactory(1.0, 1.0, 5).create(value_type)
    server_state = tff.FederatedType(_STATE, tff.SERVER)
    self.assertTrue(
        process.initialize.type_signature.is_equivalent_to(
            tff.FunctionType(None, server_state)
        )
    )
    expected_next = tff.FunctionType(
        collections.OrderedDict(
            state=server_state,
            value=tff.FederatedType(value_type, tff.CLIENTS),
        ),
        tff.templates.MeasuredProcessOutput(
            state=server_state,
            result=tff.FederatedType(value_type, tff.SERVER),
            measurements=tff.FederatedType(_MEASUREMENTS, tff.SERVER),
        ),
    )
    self.assertTrue(process.next.type_signature.is_equivalent_to(expected_next))

  @parameterized.named_parameters(
      ('negative_noise', dict(noise_multiplier=-0.1), ValueError, 'noise_mult'),
      ('nan_noise', dict(noise_multiplier=float('nan')), ValueError, 'finite'),
      ('zero_clip', dict(clip=0.0), ValueError, 'clip must be > 0'),
      ('inf_clip', dict(clip=float('inf')), ValueError, 'finite'),
      ('string_clip', dict(clip='1'), TypeError, 'clip must be a number'),
      ('zero_clients', dict(expected_clients_per_round=0), ValueError,
       'expected_clients_per_round must be > 0'),
      ('float_seed', dict(noise_seed=1.5), TypeError, 'noise_seed'),
  )
  def test_invalid_arguments_raise(self, overrides, error, message):
    kwargs = dict(noise_multiplier=1.0, clip=1.0, expected_clients_per_round=2)
    kwargs.update(overrides)
    with self.assertRaisesRegex(error, message):
      gaussian.GaussianFixedClipFactory(**kwargs)

  def test_non_float_value_type_raises(self):
    factory = gaussian.GaussianFixedClipFactory(1.0, 1.0, 2)
    with self.assertRaisesRegex(TypeError, 'float tensors'):
      factory.create(tff.TensorType(np.int32, [3]))

  def test_clipped_norm_never_exceeds_clip(self):
    rng = np.random.default_rng(0)
    clip = 0.7
    process = gaussian.GaussianFixedClipFactory(0.0, clip, 1).create(_STRUCT)
    state = process.initialize()
    for _ in range(25):
      scale = 10.0 ** rng.uniform(-3, 3)
      value = collections.OrderedDict(
          w=(scale * rng.standard_normal([2, 2])).astype(np.float32),
          b=(scale * rng.standard_normal([3])).astype(np.float32),
      )
      output = process.next(state, [value])
      # One client and denominator 1: the result is that client's clipped update.
      self.assertLessEqual(_global_norm(output.result), clip * (1 + 1e-6))
      self.assertAllClose(output.result, _clipped(value, clip), rtol=1e-6)
      self.assertEqual(
          output.measurements['clipped_count'], int(_global_norm(value) > clip)
      )

  def test_without_noise_result_is_mean_of_clipped_updates(self):
    clip = 1.0
    values = [
        collections.OrderedDict(
            w=np.full([2, 2], 3.0, np.float32), b=np.zeros([3], np.float32)
        ),
        collections.OrderedDict(
            w=np.full([2, 2], 0.1, np.float32), b=np.full([3], -0.2, np.float32)
        ),
        collections.OrderedDict(
            w=np.zeros([2, 2], np.float32), b=np.array([0, 4, 0], np.float32)
        ),
    ]
    process = gaussian.GaussianFixedClipFactory(0.0, clip, 3).create(_STRUCT)
    output = process.next(process.initialize(), values)
    expected = tf.nest.map_structure(
        lambda *xs: np.mean(xs, axis=0), *[_clipped(v, clip) for v in values]
    )
    self.assertAllClose(output.result, expected, rtol=1e-6, atol=0)
    self.assertEqual(output.measurements['clipped_count'], 2)
    self.assertEqual(output.measurements['nonfinite_count'], 0)
    self.assertEqual(output.measurements['sum_noise_stddev'], 0.0)

  def test_denominator_is_expected_not_actual_cohort(self):
    process = gaussian.GaussianFixedClipFactory(0.0, 10.0, 4).create(_VECTOR)
    output = process.next(process.initialize(), [np.ones(3, np.float32)])
    self.assertAllClose(output.result, np.full(3, 0.25))

  def test_noise_stddev_matches_theory(self):
    noise_multiplier, clip, clients, size = 2.0, 0.5, 4, 20_000
    process = gaussian.GaussianFixedClipFactory(
        noise_multiplier, clip, clients, noise_seed=7
    ).create(tff.TensorType(np.float32, [size]))
    output = process.next(
        process.initialize(), [np.zeros(size, np.float32)] * clients
    )
    noise = np.asarray(output.result, np.float64)
    sigma = noise_multiplier * clip / clients
    # Standard errors of the sample mean and sample stddev of n normals.
    self.assertLess(abs(noise.mean()), 5 * sigma / np.sqrt(size))
    self.assertLess(abs(noise.std() - sigma), 5 * sigma / np.sqrt(2 * size))
    self.assertAllClose(
        output.measurements['sum_noise_stddev'], noise_multiplier * clip
    )

  def test_fixed_seed_reproduces_and_noise_changes_each_round(self):
    factory = gaussian.GaussianFixedClipFactory(1.0, 1.0, 1, noise_seed=3)
    process = factory.create(_VECTOR)
    zeros = [np.zeros(3, np.float32)]
    first = process.next(process.initialize(), zeros)
    again = process.next(process.initialize(), zeros)
    second = process.next(first.state, zeros)
    self.assertAllEqual(first.result, again.result)
    self.assertNotAllClose(first.result, second.result)

  @parameterized.named_parameters(('nan', np.nan), ('inf', np.inf))
  def test_nonfinite_update_is_dropped_and_counted(self, bad):
    process = gaussian.GaussianFixedClipFactory(0.0, 1.0, 2).create(_VECTOR)
    good = np.array([0.3, 0.0, 0.4], np.float32)
    output = process.next(
        process.initialize(), [good, np.array([1.0, bad, 0.0], np.float32)]
    )
    self.assertAllClose(output.result, good / 2)
    self.assertEqual(output.measurements['nonfinite_count'], 1)
    self.assertEqual(output.measurements['clipped_count'], 0)

  def test_dp_event_from_state_has_exact_python_float(self):
    process = gaussian.GaussianFixedClipFactory(1.2, 0.1, 5).create(_VECTOR)
    event = gaussian.dp_event_from_state(process.initialize())
    self.assertEqual(event, dp_accounting.GaussianDpEvent(1.2))
    self.assertIs(type(event.noise_multiplier), float)


if __name__ == '__main__':
  tf.test.main()
