import collections

from absl.testing import parameterized
import dp_accounting
import numpy as np
import tensorflow as tf
import tensorflow_federated as tff

from aggregators import checks
from aggregators import gaussian
from aggregators import secure_encoding
from dp_fedavg import execution

_VECTOR = tff.TensorType(np.float32, [3])
_STRUCT = tff.types.to_type(
    collections.OrderedDict(w=(np.float32, [2, 2]), b=(np.float32, [3]))
)
def _state_type(num_layers):
  return tff.types.to_type(
      collections.OrderedDict(
          clip=np.float32,
          layer_shares=(np.float32, [num_layers]),
          noise_multiplier=np.float64,
          clipped_count_stddev=np.float64,
          noise_seed=(np.int64, [2]),
      )
  )


_MEASUREMENTS = tff.types.to_type(
    collections.OrderedDict(
        clip=np.float32,
        sum_noise_stddev=np.float32,
        clipped_count=np.int32,
        nonfinite_count=np.int32,
        unclipped_fraction=np.float32,
    )
)


def _global_norm(structure) -> float:
  return float(
      np.sqrt(sum(np.sum(np.square(x)) for x in tf.nest.flatten(structure)))
  )


def _clipped(structure, clip):
  scale = min(1.0, clip / _global_norm(structure))
  return tf.nest.map_structure(lambda x: x * scale, structure)


class GaussianFactoryTest(tf.test.TestCase, parameterized.TestCase):

  @parameterized.product(
      value=(('vector', _VECTOR, 1), ('struct', _STRUCT, 2)),
      clipping=('flat', 'per_layer_uniform', 'per_layer_adaptive'),
      adaptive=(None, gaussian.AdaptiveClipping()),
  )
  def test_type_signature(self, value, clipping, adaptive):
    _, value_type, num_layers = value
    process = gaussian.GaussianFactory(
        1.0, 1.0, 5, clipping=clipping, adaptive=adaptive
    ).create(value_type)
    server_state = tff.FederatedType(_state_type(num_layers), tff.SERVER)
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
      ('zero_clip', dict(clip=0.0), ValueError,
       'clip must be a finite number > 0'),
      ('inf_clip', dict(clip=float('inf')), ValueError, 'finite'),
      ('string_clip', dict(clip='1'), TypeError, 'clip must be a number'),
      ('zero_clients', dict(expected_clients_per_round=0), ValueError,
       'expected_clients_per_round must be a finite number > 0'),
      ('float_seed', dict(noise_seed=1.5), TypeError, 'noise_seed'),
      ('unknown_clipping', dict(clipping='per_unit'), checks.ArgumentError,
       'clipping must be one of flat, per_layer_uniform, per_layer_adaptive'),
      ('unknown_placement', dict(noise_placement='edge'), checks.ArgumentError,
       'noise_placement must be one of server, client'),
      ('quantile_above_one',
       dict(adaptive=gaussian.AdaptiveClipping(target_quantile=1.5)),
       checks.ArgumentError, r'target_quantile must be in \[0, 1\]'),
      ('negative_rate',
       dict(adaptive=gaussian.AdaptiveClipping(learning_rate=-0.1)),
       checks.ArgumentError, 'learning_rate must be a finite number >= 0'),
      ('count_noise_too_small',
       dict(adaptive=gaussian.AdaptiveClipping(clipped_count_stddev=0.4)),
       ValueError, 'must exceed noise_multiplier / 2 = 0.5'),
      ('adaptive_client_noise',
       dict(adaptive=gaussian.AdaptiveClipping(), noise_placement='client'),
       checks.UnsupportedError, 'fixed clip'),
  )
  def test_invalid_arguments_raise(self, overrides, error, message):
    kwargs = dict(noise_multiplier=1.0, clip=1.0, expected_clients_per_round=2)
    kwargs.update(overrides)
    with self.assertRaisesRegex(error, message):
      gaussian.GaussianFactory(**kwargs)

  def test_non_float_value_type_raises(self):
    factory = gaussian.GaussianFactory(1.0, 1.0, 2)
    with self.assertRaisesRegex(TypeError, 'float tensors'):
      factory.create(tff.TensorType(np.int32, [3]))

  def test_clipped_norm_never_exceeds_clip(self):
    rng = np.random.default_rng(0)
    clip = 0.7
    process = gaussian.GaussianFactory(0.0, clip, 1).create(_STRUCT)
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
    process = gaussian.GaussianFactory(0.0, clip, 3).create(_STRUCT)
    output = process.next(process.initialize(), values)
    expected = tf.nest.map_structure(
        lambda *xs: np.mean(xs, axis=0), *[_clipped(v, clip) for v in values]
    )
    self.assertAllClose(output.result, expected, rtol=1e-6, atol=0)
    self.assertEqual(output.measurements['clipped_count'], 2)
    self.assertEqual(output.measurements['nonfinite_count'], 0)
    self.assertEqual(output.measurements['sum_noise_stddev'], 0.0)

  def test_denominator_is_expected_not_actual_cohort(self):
    process = gaussian.GaussianFactory(0.0, 10.0, 4).create(_VECTOR)
    output = process.next(process.initialize(), [np.ones(3, np.float32)])
    self.assertAllClose(output.result, np.full(3, 0.25))

  def test_noise_stddev_matches_theory(self):
    noise_multiplier, clip, clients, size = 2.0, 0.5, 4, 20_000
    process = gaussian.GaussianFactory(
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
    factory = gaussian.GaussianFactory(1.0, 1.0, 1, noise_seed=3)
    process = factory.create(_VECTOR)
    zeros = [np.zeros(3, np.float32)]
    first = process.next(process.initialize(), zeros)
    again = process.next(process.initialize(), zeros)
    second = process.next(first.state, zeros)
    self.assertAllEqual(first.result, again.result)
    self.assertNotAllClose(first.result, second.result)

  @parameterized.named_parameters(('nan', np.nan), ('inf', np.inf))
  def test_nonfinite_update_is_dropped_and_counted(self, bad):
    process = gaussian.GaussianFactory(0.0, 1.0, 2).create(_VECTOR)
    good = np.array([0.3, 0.0, 0.4], np.float32)
    output = process.next(
        process.initialize(), [good, np.array([1.0, bad, 0.0], np.float32)]
    )
    self.assertAllClose(output.result, good / 2)
    self.assertEqual(output.measurements['nonfinite_count'], 1)
    self.assertEqual(output.measurements['clipped_count'], 0)

  def test_dp_event_from_state_has_exact_python_float(self):
    process = gaussian.GaussianFactory(1.2, 0.1, 5).create(_VECTOR)
    event = gaussian.dp_event_from_state(process.initialize())
    self.assertEqual(event, dp_accounting.GaussianDpEvent(1.2))
    self.assertIs(type(event.noise_multiplier), float)
    self.assertEqual(event, gaussian.round_dp_event(1.2))

  @parameterized.parameters(('per_layer_uniform',), ('per_layer_adaptive',))
  def test_per_layer_norms_never_exceed_layer_bounds(self, clipping):
    rng = np.random.default_rng(1)
    clip = 0.8
    process = gaussian.GaussianFactory(
        0.0, clip, 1, clipping=clipping
    ).create(_STRUCT)
    state = process.initialize()
    for _ in range(15):
      value = collections.OrderedDict(
          w=(10.0 ** rng.uniform(-2, 2) * rng.standard_normal([2, 2])).astype(
              np.float32
          ),
          b=(10.0 ** rng.uniform(-2, 2) * rng.standard_normal([3])).astype(
              np.float32
          ),
      )
      bounds = clip * state['layer_shares']
      self.assertAlmostEqual(float(np.linalg.norm(bounds)), clip, places=5)
      output = process.next(state, [value])
      for j, name in enumerate(('b', 'w')):  # Flattened in key order.
        self.assertLessEqual(
            np.linalg.norm(output.result[name]), bounds[j] * (1 + 1e-5)
        )
        self.assertAllClose(
            output.result[name],
            value[name] * min(1.0, bounds[j] / np.linalg.norm(value[name])),
            rtol=1e-5,
        )
      self.assertLessEqual(_global_norm(output.result), clip * (1 + 1e-5))
      state = output.state

  def test_per_layer_adaptive_shares_follow_released_magnitudes(self):
    process = gaussian.GaussianFactory(
        0.0, 10.0, 1, clipping='per_layer_adaptive'
    ).create(_STRUCT)
    value = collections.OrderedDict(
        w=np.full([2, 2], 0.3, np.float32), b=np.array([0, -0.4, 0], np.float32)
    )
    output = process.next(process.initialize(), [value])
    # Layer order is (b, w); maximum magnitudes 0.4 and 0.3.
    self.assertAllClose(output.state['layer_shares'], [0.8, 0.6])

  @parameterized.parameters(('flat',), ('per_layer_uniform',))
  def test_per_layer_noise_has_the_flat_scale(self, clipping):
    # sqrt(sum_j S_j^2) = S, so the joint sensitivity is S and the noise on
    # every coordinate is z S, as for flat clipping.
    noise_multiplier, clip, size = 1.5, 0.4, 10_000
    value_type = tff.types.to_type(
        [(np.float32, [size]), (np.float32, [size])]
    )
    process = gaussian.GaussianFactory(
        noise_multiplier, clip, 1, clipping=clipping, noise_seed=11
    ).create(value_type)
    output = process.next(
        process.initialize(), [[np.zeros(size, np.float32)] * 2]
    )
    noise = np.concatenate(output.result).astype(np.float64)
    sigma = noise_multiplier * clip
    self.assertLess(abs(noise.std() - sigma), 5 * sigma / np.sqrt(2 * noise.size))

  def test_adaptive_clip_trajectory_equals_tff_without_noise(self):
    rng = np.random.default_rng(0)
    value_type = tff.types.to_type([(np.float32, [3]), (np.float32, [2])])
    ours = gaussian.GaussianFactory(
        0.0, 0.5, 5, adaptive=gaussian.AdaptiveClipping(0.5, 0.2)
    ).create(value_type)
    theirs = tff.aggregators.DifferentiallyPrivateFactory.gaussian_adaptive(
        noise_multiplier=0.0, clients_per_round=5.0, initial_l2_norm_clip=0.5,
        target_unclipped_quantile=0.5, learning_rate=0.2,
    ).create(value_type)
    our_state, their_state = ours.initialize(), theirs.initialize()
    clips = set()
    for _ in range(6):
      values = [
          [(rng.standard_normal(3) * s).astype(np.float32),
           (rng.standard_normal(2) * s).astype(np.float32)]
          for s in rng.uniform(0.1, 3, size=5)
      ]
      our_output = ours.next(our_state, values)
      their_output = theirs.next(their_state, values)
      our_state, their_state = our_output.state, their_output.state
      self.assertAllClose(
          our_state['clip'],
          their_output.measurements['dp_query_metrics']['clip'],
          rtol=1e-6,
      )
      for ours_part, theirs_part in zip(our_output.result, their_output.result):
        self.assertAllClose(ours_part, theirs_part, rtol=1e-5, atol=1e-7)
      clips.add(round(float(our_state['clip']), 6))
    self.assertLen(clips, 6)  # The clip really moved every round.

  @parameterized.parameters((1.0, 100, None), (1.0, 2, None), (2.0, 10, 3.0),
                            (0.7, 1000, None))
  def test_adaptive_split_composes_back_to_requested_noise(
      self, noise_multiplier, clients, count_stddev
  ):
    update, count = gaussian.adaptive_noise_split(
        noise_multiplier, clients, count_stddev
    )
    if count_stddev is not None:
      self.assertEqual(count, count_stddev)
    self.assertAlmostEqual(update**-2 + (2 * count) ** -2, noise_multiplier**-2)
    event = gaussian.round_dp_event(
        noise_multiplier, clients,
        gaussian.AdaptiveClipping(clipped_count_stddev=count_stddev),
    )
    self.assertEqual(
        event,
        dp_accounting.ComposedDpEvent([
            dp_accounting.GaussianDpEvent(update),
            dp_accounting.GaussianDpEvent(2 * count),
        ]),
    )
    # The default split spends at most 1% of z^-2 on the count.
    if count_stddev is None:
      self.assertLessEqual((2 * count) ** -2, 0.01 * noise_multiplier**-2 + 1e-15)

  def test_adaptive_event_from_state_matches_factory(self):
    factory = gaussian.GaussianFactory(
        1.0, 0.1, 2, adaptive=gaussian.AdaptiveClipping()
    )
    process = factory.create(_VECTOR)
    self.assertEqual(
        gaussian.dp_event_from_state(process.initialize()),
        gaussian.composed_event(
            factory.update_noise_multiplier, factory.clipped_count_stddev
        ),
    )

  def test_client_noise_is_added_by_each_client(self):
    size, clients, noise_multiplier, clip = 5_000, 4, 1.0, 0.5
    process = gaussian.GaussianFactory(
        noise_multiplier, clip, clients, noise_placement='client'
    ).create(tff.TensorType(np.float32, [size]))
    output = process.next(
        process.initialize(), [np.zeros(size, np.float32)] * clients
    )
    noise = np.asarray(output.result, np.float64)
    # Four independent N(0, (z S)^2) draws summed, then divided by 4.
    sigma = noise_multiplier * clip * np.sqrt(clients) / clients
    self.assertLess(abs(noise.std() - sigma), 5 * sigma / np.sqrt(2 * size))
    self.assertAllClose(
        output.measurements['sum_noise_stddev'],
        noise_multiplier * clip * np.sqrt(clients),
    )
    self.assertEqual(
        gaussian.local_dp_event_from_state(output.state),
        dp_accounting.GaussianDpEvent(noise_multiplier / 2),
    )


class SecureSumTest(tf.test.TestCase, parameterized.TestCase):
  """A `GridSecureSum` inner aggregation: the updates reach the server only as
  secure sums."""

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.enterClassContext(
        execution.local_execution(simulate_secure_aggregation=True)
    )

  def test_type_signature_adds_the_secure_clip_count(self):
    process = gaussian.GaussianFactory(
        1.0, 1.0, 5, record_aggregation=secure_encoding.GridSecureSum()
    ).create(_STRUCT)
    measurements = tff.types.to_type(collections.OrderedDict(
        list(tff.structure.iter_elements(_MEASUREMENTS))
        + [('secure_clipped_count', tff.TensorType(np.int32))]
    ))
    self.assertTrue(process.next.type_signature.result.measurements.member
                    .is_equivalent_to(measurements))
    self.assertTrue(process.next.type_signature.result.result.member
                    .is_equivalent_to(_STRUCT))

  def test_values_cross_only_through_secure_sums(self):
    process = gaussian.GaussianFactory(
        1.0, 1.0, 5, record_aggregation=secure_encoding.GridSecureSum()
    ).create(_STRUCT)
    body = process.next.to_building_block().compact_representation()
    self.assertIn('federated_secure_sum_bitwidth', body)
    self.assertNotIn('federated_sum', body.replace('federated_secure_sum', ''))
    plain = gaussian.GaussianFactory(1.0, 1.0, 5).create(_STRUCT)
    self.assertIn(
        'federated_sum', plain.next.to_building_block().compact_representation()
    )

  def test_without_noise_decodes_the_clipped_mean_within_the_grid(self):
    rng = np.random.default_rng(1)
    clip, clients = 0.8, 4
    values = [
        collections.OrderedDict(
            w=(scale * rng.standard_normal([2, 2])).astype(np.float32),
            b=(scale * rng.standard_normal([3])).astype(np.float32),
        )
        for scale in (0.01, 0.3, 5.0, 1e4)
    ]
    process = gaussian.GaussianFactory(
        0.0, clip, clients, record_aggregation=secure_encoding.GridSecureSum()
    ).create(_STRUCT)
    output = process.next(process.initialize(), values)
    expected = tf.nest.map_structure(
        lambda *xs: np.mean(xs, axis=0), *[_clipped(v, clip) for v in values]
    )
    # Each client's value is off by at most half a grid step, S / (2 K f);
    # the mean of the errors is too. f > 0.99 for 7 values.
    bound = clip / (2 * secure_encoding.SECURE_LEVELS * 0.99) + 1e-6
    for got, want in zip(tf.nest.flatten(output.result), tf.nest.flatten(expected)):
      self.assertLess(np.max(np.abs(got - want)), bound)
    # An update 10^4 above the clip is clipped first, never wrapped.
    self.assertEqual(output.measurements['secure_clipped_count'], 0)
    self.assertEqual(output.measurements['clipped_count'], 2)

  def test_noise_and_event_are_those_of_the_central_mechanism(self):
    noise_multiplier, clip, clients, size = 1.5, 0.5, 3, 20_000
    factory = gaussian.GaussianFactory(
        noise_multiplier, clip, clients, noise_seed=2,
        record_aggregation=secure_encoding.GridSecureSum(),
    )
    process = factory.create(tff.TensorType(np.float32, [size]))
    output = process.next(
        process.initialize(), [np.zeros(size, np.float32)] * clients
    )
    noise = np.asarray(output.result, np.float64)
    # The server divides the noised sum by the shrink f afterwards.
    shrink = (1 - np.sqrt(size) / (2 * secure_encoding.SECURE_LEVELS)) / (1 + 1e-6)
    sigma = noise_multiplier * clip / clients / shrink
    self.assertLess(abs(noise.std() - sigma), 5 * sigma / np.sqrt(2 * size))
    self.assertEqual(
        gaussian.dp_event_from_state(output.state),
        dp_accounting.GaussianDpEvent(noise_multiplier),
    )

  @parameterized.named_parameters(
      ('client_noise', dict(noise_placement='client'), 'noise_placement=server'),
      ('cohort_too_large', dict(expected_clients_per_round=20_000),
       'at most 32768'),
      ('stacked_users', dict(stacked_users=True), 'stacked users'),
      ('not_an_aggregation', dict(record_aggregation='secure'),
       'record_aggregation must be'),
  )
  def test_invalid_arguments_raise(self, overrides, message):
    kwargs = dict(
        noise_multiplier=1.0, clip=1.0, expected_clients_per_round=2,
        record_aggregation=secure_encoding.GridSecureSum(),
    )
    kwargs.update(overrides)
    with self.assertRaisesRegex((ValueError, TypeError), message):
      gaussian.GaussianFactory(**kwargs)


if __name__ == '__main__':
  tf.test.main()
