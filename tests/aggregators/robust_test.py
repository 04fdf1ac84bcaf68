"""Robust aggregation composed with DP: processes, refusals and accounting."""

import collections

from absl.testing import parameterized
import dp_accounting
import numpy as np
import tensorflow as tf
import tensorflow_federated as tff

from aggregators import checks
from aggregators import gaussian
from aggregators import registry
from aggregators import robust
from dp_fedavg import accounting
from dp_fedavg import byzantine
from dp_fedavg import sampling

_VALUE = tff.to_type(collections.OrderedDict(
    a=tff.TensorType(np.float32, [2]), b=tff.TensorType(np.float32, [1])))
_STACKED = tff.to_type(collections.OrderedDict(
    a=tff.TensorType(np.float32, [None, 2]),
    b=tff.TensorType(np.float32, [None, 1])))


def _values(rows):
  return [collections.OrderedDict(a=np.array(r[:2], np.float32),
                                   b=np.array(r[2:], np.float32))
          for r in rows]


def _flat(result):
  return np.concatenate([result['a'], result['b']])


def _with_byzantine(state, count):
  state = collections.OrderedDict(state)
  state['byzantine_count'] = np.int32(count)
  return state


def _gaussian(robustness, noise_multiplier=0.0, clip=1.0, clients=1.0,
              placement='server', stacked=False):
  """The Gaussian factory the registry builds for `robustness`."""
  records, centered = robust.gaussian_composition(
      robustness, client_noise=placement == 'client', secure=False,
      adaptive=False)
  return gaussian.GaussianFactory(
      noise_multiplier, clip, clients, record_aggregation=records,
      noise_placement=placement, centered=centered, noise_seed=1,
      stacked_users=stacked)


class ProcessTest(parameterized.TestCase, tf.test.TestCase):

  def test_type_signatures(self):
    process = robust.RobustMeanFactory(
        robust.Robustness(rule='median')).create(_VALUE)
    self.assertEqual(
        str(process.next.type_signature.parameter[1]),
        '{<a=float32[2],b=float32[1]>}@CLIENTS')
    self.assertEqual(
        str(process.next.type_signature.result.result),
        '<a=float32[2],b=float32[1]>@SERVER')
    stacked = _gaussian(robust.Robustness(rule='krum'), placement='client',
                        stacked=True).create(_STACKED)
    self.assertEqual(
        str(stacked.next.type_signature.parameter[1]),
        '{<a=float32[?,2],b=float32[?,1]>}@CLIENTS')
    self.assertIn('byzantine_count=int32',
                  str(stacked.next.type_signature.parameter[0]))

  def test_the_first_records_of_the_cohort_are_the_byzantine_ones(self):
    # TFF's runtime gathers in cohort order: sign_flip negates exactly the
    # first k records, so the mean tells which ones were replaced.
    rows = [[float(i), 0.0, 0.0] for i in range(1, 31)]
    process = robust.RobustMeanFactory(
        robust.Robustness(attack='sign_flip')).create(_VALUE)
    output = process.next(_with_byzantine(process.initialize(), 4), _values(rows))
    self.assertAllClose(_flat(output.result),
                        [(sum(range(5, 31)) - sum(range(1, 5))) / 30, 0, 0])
    self.assertEqual(output.measurements['byzantine_count'], 4)

  def test_users_of_stacked_clients_are_gathered_in_order(self):
    process = robust.RobustMeanFactory(
        robust.Robustness(attack='sign_flip'), stacked_users=True
    ).create(_STACKED)
    clients = [
        collections.OrderedDict(a=np.array([[1, 0], [2, 0]], np.float32),
                                b=np.zeros([2, 1], np.float32)),
        collections.OrderedDict(a=np.array([[4, 0], [8, 0], [16, 0]], np.float32),
                                b=np.zeros([3, 1], np.float32)),
    ]
    output = process.next(_with_byzantine(process.initialize(), 3), clients)
    self.assertAllClose(_flat(output.result), [(-1 - 2 - 4 + 8 + 16) / 5, 0, 0])

  def test_attack_updates_are_clipped_like_honest_ones(self):
    # Central DP without noise, clip 1: three honest records of norm 0.5 and
    # one scaling attacker at 1000 x its record; the expected cohort is 4.
    process = _gaussian(robust.Robustness(attack='scaling', attack_scale=1000.0),
                        clients=4).create(_VALUE)
    rows = [[0.5, 0.0, 0.0]] * 4
    output = process.next(_with_byzantine(process.initialize(), 1), _values(rows))
    self.assertAllClose(_flat(output.result), [(1.0 + 3 * 0.5) / 4, 0, 0])

  def test_central_centered_clipping_moves_by_at_most_tau_per_client(self):
    # Randomized neighbouring cohorts, after a round that set the centre:
    # adding one client moves the noiseless pre-noise sum (here the result,
    # with an expected cohort of 1) by at most tau.
    tau = 0.7
    process = _gaussian(robust.Robustness(rule='centered_clipping'),
                        clip=tau).create(_VALUE)
    rng = np.random.default_rng(5)
    state = process.next(
        process.initialize(), _values(rng.normal(size=(4, 3)))).state
    self.assertGreater(np.linalg.norm(state['center']), 0)
    largest = 0.0
    for _ in range(10):
      rows = rng.normal(scale=3.0, size=(6, 3))
      with_all = _flat(process.next(state, _values(rows)).result)
      without_one = _flat(process.next(state, _values(rows[1:])).result)
      moved = np.linalg.norm(with_all - without_one)
      self.assertLessEqual(moved, tau * (1 + 1e-5))
      largest = max(largest, moved)
    # Large updates are clipped to exactly tau: the bound is reached.
    self.assertGreater(largest, 0.99 * tau)

  def test_central_centered_clipping_is_the_server_rule_with_that_centre(self):
    rows = np.random.default_rng(6).normal(size=(5, 3)).astype(np.float32)
    central = _gaussian(robust.Robustness(rule='centered_clipping'),
                        clip=0.5, clients=5).create(_VALUE)
    server_rule = robust.RobustMeanFactory(
        robust.Robustness(rule='centered_clipping', cc_radius=0.5)
    ).create(_VALUE)
    central_state, rule_state = central.initialize(), server_rule.initialize()
    for _ in range(2):  # The second round clips around the first's result.
      central_out = central.next(central_state, _values(rows))
      rule_out = server_rule.next(rule_state, _values(rows))
      self.assertAllClose(_flat(central_out.result), _flat(rule_out.result))
      central_state, rule_state = central_out.state, rule_out.state

  def test_local_dp_median_of_noised_records(self):
    process = _gaussian(robust.Robustness(rule='median'), noise_multiplier=1.0,
                        clip=1.0, clients=3, placement='client').create(_VALUE)
    rows = [[0.1, 0.0, 0.0]] * 3
    output = process.next(process.initialize(), _values(rows))
    # Each record carries N(0, 1) noise of its own: the median is noisy, and
    # the measurement reports the noise on the records' sum.
    self.assertNotAllClose(_flat(output.result), [0.1, 0.0, 0.0])
    self.assertAllClose(output.measurements['sum_noise_stddev'], np.sqrt(3))

  def test_empty_round_releases_zeros_or_keeps_the_centre(self):
    median = robust.RobustMeanFactory(
        robust.Robustness(rule='median')).create(_VALUE)
    self.assertAllClose(_flat(median.next(median.initialize(), []).result),
                        np.zeros(3))


class RefusalTest(parameterized.TestCase):

  @parameterized.named_parameters(
      ('median_central', 'gaussian_fixed', {}, dict(rule='median'),
       'understate epsilon'),
      ('krum_central', 'gaussian_fixed', {}, dict(rule='krum'), 'unsound'),
      ('trimmed_mean_central', 'gaussian_fixed', {},
       dict(rule='trimmed_mean'), 'unsound'),
      ('geometric_median_central', 'gaussian_fixed', {},
       dict(rule='geometric_median'), 'unsound'),
      ('multi_krum_central', 'gaussian_fixed', {}, dict(rule='multi_krum'),
       'unsound'),
      ('bucketing_central', 'gaussian_fixed', {},
       dict(rule='centered_clipping', preaggregation='bucketing'),
       'twice the clip'),
      ('cc_radius_central', 'gaussian_fixed', {},
       dict(rule='centered_clipping', cc_radius=1.0), 'leave --cc_radius unset'),
      ('cc_without_radius_local', 'gaussian_fixed',
       dict(noise_placement='client'), dict(rule='centered_clipping'),
       'needs --cc_radius'),
      ('cc_radius_of_another_rule', 'none', {},
       dict(rule='median', cc_radius=1.0), 'would ignore it'),
      ('median_secure', 'secure_gaussian', {}, dict(rule='median'), 'unsound'),
      ('attack_secure', 'secure_gaussian', {},
       dict(rule='centered_clipping', attack='alie'), 'never sees a record'),
      ('secure_adaptive', 'secure_gaussian', dict(adaptive_clip=True),
       dict(rule='centered_clipping'), 'fixed clip'),
      ('adaptive', 'gaussian_adaptive', {}, dict(rule='centered_clipping'),
       'robust rules and attacks run with'),
      ('laplace', 'laplace', {}, dict(attack='sign_flip'),
       'robust rules and attacks run with'),
      ('distributed_dp', 'distributed_dp', {}, dict(rule='median'),
       'robust rules and attacks run with'),
  )
  def test_refused_with_the_reason(self, name, params, robustness, reason):
    mechanism = registry.get(name)
    setting = registry.Setting(
        expected_clients_per_round=10, model_dimension=100,
        robustness=robust.Robustness(**robustness))
    with self.assertRaisesRegex(checks.UnsupportedError, reason):
      mechanism.check(mechanism.params(params), setting)

  @parameterized.named_parameters(
      ('none_median', 'none', {}, dict(rule='median')),
      ('local_krum_nnm', 'gaussian_fixed', dict(noise_placement='client'),
       dict(rule='multi_krum', preaggregation='nnm', attack='alie')),
      ('central_cc_attack', 'gaussian_fixed', {},
       dict(rule='centered_clipping', attack='ipm')),
      ('secure_cc', 'secure_gaussian', {}, dict(rule='centered_clipping')),
      ('central_mean_attack', 'gaussian_fixed', {}, dict(attack='mimic')),
  )
  def test_sound_combinations_build(self, name, params, robustness):
    mechanism = registry.get(name)
    setting = registry.Setting(
        expected_clients_per_round=10, model_dimension=100,
        robustness=robust.Robustness(**robustness))
    mechanism.check(mechanism.params(params), setting)
    if not mechanism.secure_sums:  # Secure sums refuse stacks of users.
      self.assertIsNone(
          mechanism.engine_refusal(mechanism.params(params), setting))

  def test_arguments_out_of_range_name_their_flag(self):
    for field, value, flag in (
        ('trim_fraction', 0.5, 'trim_fraction'),
        ('rule', 'mean', 'robust_rule'),
        ('assumed_byzantine', -1, 'robust_assumed_byzantine'),
        ('preaggregation', 'sort', 'robust_preaggregation'),
        ('attack', 'backdoor', 'attack'),
        ('bucket_size', 0, 'bucket_size'),
    ):
      with self.assertRaises(checks.ArgumentError) as raised:
        robust.Robustness(**{field: value})
      self.assertEqual(raised.exception.name, flag)


class AccountingTest(parameterized.TestCase):
  """A robust rule never changes the mechanism's privacy statement."""

  @parameterized.named_parameters(
      ('central_cc', dict(), dict(rule='centered_clipping', attack='alie'),
       dp_accounting.GaussianDpEvent(1.3)),
      # Local DP: one client's message, replace-one, z / 2.
      ('local_median', dict(noise_placement='client'),
       dict(rule='median', attack='ipm'), dp_accounting.GaussianDpEvent(0.65)),
  )
  def test_event_is_the_gaussian_mechanisms(self, params, robustness, event):
    mechanism = registry.get('gaussian_fixed')
    params = mechanism.params(dict(noise_multiplier=1.3, **params))
    setting = registry.Setting(
        expected_clients_per_round=10,
        robustness=robust.Robustness(**robustness))
    mechanism.check(params, setting)
    self.assertEqual(mechanism.build_ledger(params, setting).planned_event, event)

  def test_epsilon_equals_gaussian_fixed(self):
    # Poisson sampling q = 0.1, z = 1.3, 50 rounds; the same ledger as
    # gaussian_fixed, so the same epsilon as dp-accounting's for the event.
    mechanism = registry.get('gaussian_fixed')
    params = mechanism.params(dict(noise_multiplier=1.3))
    setting = registry.Setting(
        expected_clients_per_round=10,
        robustness=robust.Robustness(rule='centered_clipping'))
    ledger = accounting.PrivacyLedger(
        mechanism.build_ledger(params, setting),
        sampling.SamplingScheme.POISSON, 100, 10, 1e-5,
        accounting.AccountantKind.RDP)
    for _ in range(50):
      ledger.record_planned_round(list(range(10)))
    expected = dp_accounting.rdp.RdpAccountant()
    expected.compose(dp_accounting.PoissonSampledDpEvent(
        0.1, dp_accounting.GaussianDpEvent(1.3)), 50)
    self.assertAlmostEqual(ledger.epsilon(), expected.get_epsilon(1e-5), places=6)


class ByzantineClientsTest(tf.test.TestCase):

  def test_fixed_set_first_in_the_cohort(self):
    clients = byzantine.ByzantineClients(100, 0.2, 'alie', seed=3)
    self.assertLen(clients.members, 20)
    self.assertEqual(
        clients.members,
        byzantine.ByzantineClients(100, 0.2, 'ipm', seed=3).members)
    cohort = np.arange(0, 100, 3)
    arranged, count = clients.arrange(cohort)
    self.assertEqual(count, sum(c in clients.members for c in cohort))
    self.assertTrue(all(c in clients.members for c in arranged[:count]))
    self.assertFalse(any(c in clients.members for c in arranged[count:]))
    self.assertCountEqual(arranged, cohort)

  def test_label_flip(self):
    clients = byzantine.ByzantineClients(10, 0.5, 'label_flip', 0, num_classes=10)
    self.assertAllEqual(clients.flip_labels(tf.constant([0, 3, 9])), [9, 6, 0])
