import collections
import math

from absl.testing import parameterized
import dp_accounting
from dp_accounting.rdp import rdp_privacy_accountant
import numpy as np
import tensorflow as tf
import tensorflow_federated as tff

from aggregators import distributed_dp
from dp_fedavg import accounting
from dp_fedavg import execution
from dp_fedavg import sampling

_STRUCT = tff.types.to_type(
    collections.OrderedDict(w=(np.float32, [3, 4]), b=(np.float32, [5]))
)
_DIMENSION = 17  # Padded to 32.
_STATE = tff.types.to_type(collections.OrderedDict(
    rotation_seed=(np.int64, [2]),
    l2_sensitivity=np.float64,
    l1_sensitivity=np.float64,
    local_variance=np.float64,
    num_clients=np.float64,
    dimension=np.float64,
    skellam=np.float64,
))
_MEASUREMENTS = tff.types.to_type(collections.OrderedDict(
    clip=np.float32, scale=np.float32, sum_noise_stddev=np.float32,
    clipped_count=np.int32, nonfinite_count=np.int32,
))


def _flat(structure):
  return np.concatenate([np.ravel(x) for x in tf.nest.flatten(structure)])


def _random_updates(rng, count, scales):
  return [
      collections.OrderedDict(
          w=(scale * rng.standard_normal([3, 4])).astype(np.float32),
          b=(scale * rng.standard_normal([5])).astype(np.float32),
      )
      for scale in scales[:count]
  ]


class DistributedDpFactoryTest(tf.test.TestCase, parameterized.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.enterClassContext(
        execution.local_execution(simulate_secure_aggregation=True)
    )

  @parameterized.parameters('ddgauss', 'skellam')
  def test_type_signature(self, mechanism):
    process = distributed_dp.DistributedDpFactory(
        1.0, 1.0, 4, mechanism=mechanism
    ).create(_STRUCT)
    server_state = tff.FederatedType(_STATE, tff.SERVER)
    self.assertTrue(process.initialize.type_signature.is_equivalent_to(
        tff.FunctionType(None, server_state)
    ))
    self.assertTrue(process.next.type_signature.is_equivalent_to(
        tff.FunctionType(
            collections.OrderedDict(
                state=server_state,
                value=tff.FederatedType(_STRUCT, tff.CLIENTS),
            ),
            tff.templates.MeasuredProcessOutput(
                state=server_state,
                result=tff.FederatedType(_STRUCT, tff.SERVER),
                measurements=tff.FederatedType(_MEASUREMENTS, tff.SERVER),
            ),
        )
    ))

  def test_server_sees_only_secure_sums(self):
    process = distributed_dp.DistributedDpFactory(1.0, 1.0, 4).create(_STRUCT)
    body = process.next.to_building_block().compact_representation()
    self.assertIn('federated_secure_modular_sum', body)
    self.assertNotIn('federated_sum', body.replace('federated_secure_', ''))

  @parameterized.product(mechanism=('ddgauss', 'skellam'), beta=(0.0, 0.6))
  def test_without_noise_decodes_the_clipped_mean_within_rounding(
      self, mechanism, beta
  ):
    clip, clients = 1.0, 4
    factory = distributed_dp.DistributedDpFactory(
        0.0, clip, clients, bits=16, mechanism=mechanism, beta=beta,
        rotation_seed=5,
    )
    process = factory.create(_STRUCT)
    values = _random_updates(
        np.random.default_rng(0), clients, (0.01, 0.2, 3.0, 1e5)
    )
    output = process.next(process.initialize(), values)
    clipped = [
        _flat(v) * min(1.0, clip / np.linalg.norm(_flat(v))) for v in values
    ]
    expected = np.mean(clipped, axis=0)
    # Each client rounds every one of the d padded coordinates by less than
    # one grid step 1/s, so its error has L2 norm < sqrt(d) / s; the rotation
    # keeps norms, and the mean of the errors is no larger.
    params = factory.parameters(_DIMENSION)
    bound = math.sqrt(params['padded_dimension']) / params['scale'] + 1e-5
    error = np.linalg.norm(_flat(output.result) - expected)
    self.assertLess(error, bound)
    self.assertEqual(output.measurements['clipped_count'], 2)
    self.assertEqual(output.measurements['sum_noise_stddev'], 0.0)

  @parameterized.parameters('ddgauss', 'skellam')
  def test_decoded_noise_variance_is_the_summed_shares(self, mechanism):
    size, clients, noise_multiplier, clip = 4096, 5, 1.0, 0.5
    factory = distributed_dp.DistributedDpFactory(
        noise_multiplier, clip, clients, bits=20, mechanism=mechanism,
        rotation_seed=1,
    )
    process = factory.create(tff.TensorType(np.float32, [size]))
    state = process.initialize()
    samples = []
    for _ in range(2):
      output = process.next(state, [np.zeros(size, np.float32)] * clients)
      state = output.state
      # The mean times n is the summed noise, in update units.
      samples.append(np.asarray(output.result, np.float64) * clients)
    samples = np.concatenate(samples)
    params = factory.parameters(size)
    # n independent shares of variance v each, divided by s^2; shares that
    # were not independent would give n^2 v.
    variance = clients * params['local_variance'] / params['scale'] ** 2
    self.assertAllClose(
        output.measurements['sum_noise_stddev'], math.sqrt(variance), rtol=1e-5
    )
    # Standard error of a sample variance of m near-normal values.
    self.assertLess(
        abs(samples.var() - variance),
        5 * variance * math.sqrt(2 / len(samples)),
    )
    self.assertLess(abs(samples.mean()), 5 * math.sqrt(variance / len(samples)))

  def test_nonfinite_update_is_dropped_and_counted(self):
    process = distributed_dp.DistributedDpFactory(0.0, 1.0, 2).create(_STRUCT)
    good, bad = _random_updates(np.random.default_rng(2), 2, (0.1, 0.1))
    bad['b'][0] = np.nan
    output = process.next(process.initialize(), [good, bad])
    self.assertEqual(output.measurements['nonfinite_count'], 1)
    self.assertLess(
        np.linalg.norm(_flat(output.result) - _flat(good) / 2), 1e-3
    )

  def test_event_from_state_matches_round_dp_event(self):
    factory = distributed_dp.DistributedDpFactory(1.2, 0.5, 6, bits=18)
    state = factory.create(_STRUCT).initialize()
    self.assertEqual(
        distributed_dp.dp_event_from_state(state),
        distributed_dp.round_dp_event(1.2, 0.5, 6, _DIMENSION, bits=18),
    )

  def test_too_few_bits_names_the_bits_that_suffice(self):
    with self.assertRaisesRegex(ValueError, r'bits=6 is too small.*bits=(\d+)') as raised:
      distributed_dp.check_bits(6, 1.0, 1.0, 100, 10_000, 1e-6)
    enough = int(raised.exception.args[0].rsplit('bits=', 1)[1].split()[0])
    distributed_dp.check_bits(enough, 1.0, 1.0, 100, 10_000, 1e-6)
    with self.assertRaises(ValueError):
      distributed_dp.check_bits(enough - 1, 1.0, 1.0, 100, 10_000, 1e-6)
    with self.assertRaisesRegex(ValueError, 'bits=6 is too small'):
      distributed_dp.DistributedDpFactory(1.0, 1.0, 100, bits=6).create(
          tff.TensorType(np.float32, [10_000])
      )

  @parameterized.named_parameters(
      ('bits_too_many', dict(bits=31), 'bits must be an integer in'),
      ('bits_float', dict(bits=16.0), 'bits must be an integer in'),
      ('unknown_mechanism', dict(mechanism='laplace'), 'mechanism'),
      ('beta_one', dict(beta=1.0), r'beta must be in \[0, 1\)'),
      ('modclip_zero', dict(modclip_prob=0.0), r'modclip_prob must be in \(0, 1\)'),
      ('fractional_clients', dict(expected_clients_per_round=2.5),
       'an integer >= 1'),
      ('negative_noise', dict(noise_multiplier=-1.0), 'noise_multiplier'),
  )
  def test_invalid_arguments_raise(self, overrides, message):
    kwargs = dict(noise_multiplier=1.0, clip=1.0, expected_clients_per_round=4)
    kwargs.update(overrides)
    with self.assertRaisesRegex((ValueError, TypeError), message):
      distributed_dp.DistributedDpFactory(**kwargs)


class DistributedDpAccountingTest(parameterized.TestCase):

  @parameterized.parameters('ddgauss', 'skellam')
  def test_large_noise_shares_approach_the_gaussian_mechanism(self, mechanism):
    # With plenty of bits the rounding slack vanishes, and with large local
    # noise tau (ddgauss) and the Skellam correction vanish: the round is the
    # Gaussian mechanism with noise multiplier z.
    event = distributed_dp.round_dp_event(
        1.0, 1.0, 50, 1000, bits=30, mechanism=mechanism
    )
    for order in (2, 8, 32):
      self.assertAlmostEqual(event.rdp(order) / (order / 2), 1.0, delta=0.01)

  def test_coarse_local_noise_costs_more_than_the_gaussian(self):
    # 200 clients sharing z=1 at 8 bits: each share is a small integer noise,
    # and the sum is further from a Gaussian.
    coarse = distributed_dp.DistributedDpEvent(
        'ddgauss', l2_sensitivity=4.0, l1_sensitivity=16.0, local_variance=0.5,
        num_clients=32, dimension=64,
    )
    gaussian_rdp = 2 * 4.0**2 / (2 * 32 * 0.5)
    self.assertGreater(coarse.rdp(2), gaussian_rdp)

  def test_sampled_bound_equals_dp_accounting_for_the_gaussian(self):
    orders = np.array([1.5, 2, 3, 8, 32, 256])
    for q, z in ((0.01, 0.8), (0.1, 1.0), (0.5, 2.0)):
      ours = accounting.sampled_without_replacement_rdp(
          lambda a, z=z: a / (2 * z * z), q, orders
      )
      reference = dp_accounting.rdp.RdpAccountant(
          np.ceil(orders),
          neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE,
      )
      reference.compose(dp_accounting.SampledWithoutReplacementDpEvent(
          1000, int(q * 1000), dp_accounting.GaussianDpEvent(z)
      ))
      # dp-accounting's own bound for the Gaussian is never looser.
      self.assertTrue(np.all(ours >= reference._rdp - 1e-12))  # pylint: disable=protected-access
      unsampled = np.ceil(orders) / (2 * z * z)
      self.assertTrue(np.all(ours <= unsampled))
      if q <= 0.1:  # Small samples amplify, even by the general bound.
        self.assertLess(ours[2], unsampled[2] / 5)

  def test_accountant_composes_distributed_rounds_under_uniform_sampling(self):
    event = distributed_dp.round_dp_event(1.0, 1.0, 20, 2410)
    accountant = accounting.PrivacyAccountant(
        sampling.SamplingScheme.UNIFORM, 100, 20, 1e-5
    )
    for _ in range(5):
      accountant.compose_round(event)
    self.assertEqual(list(accountant.epsilons()), ['rdp'])
    orders = np.asarray(rdp_privacy_accountant.DEFAULT_RDP_ORDERS)
    expected = rdp_privacy_accountant.compute_epsilon(
        orders,
        5 * accounting.sampled_without_replacement_rdp(
            event.for_replace_one().rdp, 0.2, orders
        ),
        1e-5,
    )[0]
    self.assertAlmostEqual(accountant.epsilon(), expected, places=10)
    restored = accounting.PrivacyAccountant(
        sampling.SamplingScheme.UNIFORM, 100, 20, 1e-5
    )
    restored.restore_history(accountant.history_json())
    self.assertEqual(restored.epsilon(), accountant.epsilon())

  def test_dropout_tolerance_keeps_the_stated_round_for_the_fewest_shares(self):
    # With 30 bits rounding vanishes, and so does the discrete correction:
    # m shares of variance v are the Gaussian mechanism with noise
    # sqrt(m v) / s on the sum, for add/remove sensitivity c. Each share is
    # sized for the fewest, 15 of 20, so that 15 give noise z c.
    z, clip, clients, dimension, tolerance = 1.0, 1.0, 20, 1000, 0.25
    self.assertEqual(distributed_dp.fewest_reporting(clients, tolerance), 15)
    params = distributed_dp.DistributedDpFactory(
        z, clip, clients, bits=30, dropout_tolerance=tolerance,
    ).parameters(dimension)
    state = collections.OrderedDict(
        l2_sensitivity=params['l2_sensitivity'],
        l1_sensitivity=params['l1_sensitivity'],
        local_variance=params['local_variance'], num_clients=clients,
        dimension=params['padded_dimension'], skellam=0.0)
    stated = distributed_dp.round_dp_event(
        z, clip, clients, dimension, bits=30, dropout_tolerance=tolerance)
    self.assertEqual(stated, distributed_dp.dp_event_from_state(state, 15))
    for reporting in (20, 15, 10):
      noise = math.sqrt(reporting * params['local_variance']) / params['scale']
      gaussian_rdp = 8 * clip**2 / (2 * noise**2)  # Order 8.
      event = distributed_dp.dp_event_from_state(state, reporting)
      self.assertAlmostEqual(event.rdp(8) / gaussian_rdp, 1.0, delta=0.01)
    # The stated round is the z one: more shares only add noise, fewer than
    # the tolerance allows take the round past it.
    plain = 8 / (2 * z**2)
    self.assertAlmostEqual(stated.rdp(8) / plain, 1.0, delta=0.01)
    self.assertGreater(distributed_dp.dp_event_from_state(state, 10).rdp(8),
                       1.4 * plain)

  def test_ledger_composes_the_rounds_of_the_shares_that_arrived(self):
    factory = distributed_dp.DistributedDpFactory(
        1.0, 1.0, 20, bits=20, dropout_tolerance=0.2)
    state = factory.create(_STRUCT).initialize()
    planned = distributed_dp.dp_event_from_state(state, 16)
    ledger = accounting.PrivacyLedger(
        accounting.SampledRounds(
            planned, distributed_dp.dp_event_from_state,
            event_of_reporting=distributed_dp.dp_event_from_state),
        sampling.SamplingScheme.UNIFORM, 100, 20, 1e-5)
    direct = accounting.PrivacyAccountant(
        sampling.SamplingScheme.UNIFORM, 100, 20, 1e-5)
    cohort = np.arange(20)
    for reporting in (20, 17, 9):
      ledger.record_round(state, cohort, reporting)
      direct.compose_round(distributed_dp.dp_event_from_state(state, reporting))
    self.assertEqual(ledger.epsilon(), direct.epsilon())
    # The round with 9 of 20 (below the 16 tolerated) costs more than a
    # round as stated.
    as_stated = accounting.PrivacyAccountant(
        sampling.SamplingScheme.UNIFORM, 100, 20, 1e-5)
    for _ in range(3):
      as_stated.compose_round(planned)
    self.assertGreater(ledger.epsilon(), as_stated.epsilon())

  @parameterized.parameters(
      sampling.SamplingScheme.POISSON, sampling.SamplingScheme.FULL
  )
  def test_other_sampling_is_refused_with_the_alternative(self, scheme):
    accountant = accounting.PrivacyAccountant(scheme, 100, 20, 1e-5)
    with self.assertRaisesRegex(ValueError, '--sampling=uniform'):
      accountant.check_supported(distributed_dp.round_dp_event(1.0, 1.0, 20, 100))


if __name__ == '__main__':
  tf.test.main()
