import math

from absl.testing import absltest
from absl.testing import parameterized
import dp_accounting
import numpy as np

from aggregators import distributed_dp
from dp_fedavg import accounting
from dp_fedavg import correlated_noise
from dp_fedavg import sampling

_POISSON = sampling.SamplingScheme.POISSON
_UNIFORM = sampling.SamplingScheme.UNIFORM
_FULL = sampling.SamplingScheme.FULL


def _direct_epsilon(event, rounds, delta, relation):
  accountant = dp_accounting.rdp.RdpAccountant(neighboring_relation=relation)
  accountant.compose(event, rounds)
  return accountant.get_epsilon(delta)


def _two_gaussians(number):
  """Adaptive clipping's event shape: the update and the count mechanisms."""
  return dp_accounting.ComposedDpEvent([
      dp_accounting.GaussianDpEvent(number(1.0041)),
      dp_accounting.GaussianDpEvent(number(10.0)),
  ])


def _epsilon_after(accountant, event, rounds):
  for _ in range(rounds - 1):
    accountant.compose_round(event)
  return accountant.epsilon()


def _compose(accountant, event, rounds):
  for _ in range(rounds):
    accountant.compose_round(event)
  return accountant.epsilon()


class PrivacyAccountantTest(parameterized.TestCase):

  def test_tff_tutorial_setting_poisson(self):
    # TFF's DP tutorial: z=1.2, expected 120 of 3,383 clients, 100 rounds.
    event = dp_accounting.PoissonSampledDpEvent(
        120 / 3383, dp_accounting.GaussianDpEvent(1.2)
    )
    accountant = accounting.PrivacyAccountant(_POISSON, 3383, 120, 1e-5)
    _compose(accountant, dp_accounting.GaussianDpEvent(1.2), 100)
    epsilons = accountant.epsilons()
    rdp = _direct_epsilon(
        event, 100, 1e-5, dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE
    )
    pld = dp_accounting.pld.PLDAccountant(value_discretization_interval=1e-4)
    pld.compose(event, 100)
    self.assertAlmostEqual(epsilons['rdp'], rdp, places=12)
    self.assertAlmostEqual(epsilons['rdp'], 1.99, delta=0.01)
    self.assertAlmostEqual(epsilons['pld'], pld.get_epsilon(1e-5), places=6)
    self.assertAlmostEqual(epsilons['pld'], 1.71, delta=0.01)
    self.assertEqual(accountant.epsilon_and_accountant(), (epsilons['pld'], 'pld'))
    self.assertEqual(accountant.rounds, 100)

  @parameterized.parameters(
      (accounting.AccountantKind.RDP, 'rdp'), (accounting.AccountantKind.PLD, 'pld')
  )
  def test_chosen_accountant_is_the_one_reported(self, kind, name):
    accountant = accounting.PrivacyAccountant(_POISSON, 3383, 120, 1e-5, kind)
    _compose(accountant, dp_accounting.GaussianDpEvent(1.2), 10)
    self.assertEqual(list(accountant.epsilons()), [name])
    self.assertEqual(accountant.epsilon_and_accountant()[1], name)

  @parameterized.parameters(_POISSON, _UNIFORM)
  def test_float32_parameters_give_same_epsilon_as_python_floats(self, scheme):
    as_float = accounting.PrivacyAccountant(scheme, 3400, 50, 1e-5)
    as_float32 = accounting.PrivacyAccountant(scheme, 3400, 50, 1e-5)
    # The same values, once as Python floats and once as numpy float32.
    epsilon = _compose(
        as_float, _two_gaussians(lambda v: float(np.float32(v))), 30
    )
    epsilon32 = _compose(as_float32, _two_gaussians(np.float32), 30)
    self.assertEqual(epsilon, epsilon32)

  def test_dp_accounting_alone_miscomposes_float32(self):
    # Guards the test above: if dp-accounting stops mis-composing float32
    # parameters, the conversion is no longer needed and this fails.
    def raw_epsilon(number):
      return _direct_epsilon(
          dp_accounting.PoissonSampledDpEvent(50 / 3400, _two_gaussians(number)),
          30, 1e-5, dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE,
      )

    self.assertLess(raw_epsilon(np.float32), 0.99 * raw_epsilon(float))

  def test_as_python_floats_converts_nested_numpy_values(self):
    event = dp_accounting.ComposedDpEvent([
        dp_accounting.GaussianDpEvent(np.float32(0.5)),
        dp_accounting.SelfComposedDpEvent(
            dp_accounting.GaussianDpEvent(np.float64(2.0)), np.int32(3)
        ),
    ])
    converted = accounting.as_python_floats(event)
    self.assertIs(type(converted.events[0].noise_multiplier), float)
    self.assertIs(type(converted.events[1].event.noise_multiplier), float)
    self.assertIs(type(converted.events[1].count), int)

  def test_uniform_sampling_uses_replace_one_sensitivity(self):
    # Replace-one moves a sum of clip-bounded updates by up to 2 * clip, so the
    # noise relative to that sensitivity is z / 2.
    z, num_clients, cohort, rounds = 1.0, 1000, 50, 40
    accountant = accounting.PrivacyAccountant(_UNIFORM, num_clients, cohort, 1e-5)
    epsilon = _compose(accountant, dp_accounting.GaussianDpEvent(z), rounds)
    relation = dp_accounting.NeighboringRelation.REPLACE_ONE
    expected = _direct_epsilon(
        dp_accounting.SampledWithoutReplacementDpEvent(
            num_clients, cohort, dp_accounting.GaussianDpEvent(z / 2)
        ),
        rounds, 1e-5, relation,
    )
    understated = _direct_epsilon(
        dp_accounting.SampledWithoutReplacementDpEvent(
            num_clients, cohort, dp_accounting.GaussianDpEvent(z)
        ),
        rounds, 1e-5, relation,
    )
    self.assertAlmostEqual(epsilon, expected, places=12)
    self.assertGreater(epsilon, understated)
    self.assertIs(accountant.neighboring_relation, relation)

  def test_full_participation_uniform_is_gaussian_at_half_noise(self):
    accountant = accounting.PrivacyAccountant(_UNIFORM, 10, 10, 1e-5)
    epsilon = _compose(accountant, dp_accounting.GaussianDpEvent(2.0), 5)
    expected = _direct_epsilon(
        dp_accounting.GaussianDpEvent(1.0), 5, 1e-5,
        dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE,
    )
    self.assertAlmostEqual(epsilon, expected, places=9)

  @parameterized.product(
      scheme=(_POISSON, _UNIFORM),
      event=(
          dp_accounting.NonPrivateDpEvent(),
          dp_accounting.GaussianDpEvent(0.0),
          dp_accounting.ComposedDpEvent([
              dp_accounting.GaussianDpEvent(1.0),
              dp_accounting.GaussianDpEvent(0.0),
          ]),
      ),
  )
  def test_noiseless_rounds_have_infinite_epsilon(self, scheme, event):
    accountant = accounting.PrivacyAccountant(scheme, 100, 10, 1e-5)
    accountant.compose_round(dp_accounting.GaussianDpEvent(1.0))
    accountant.compose_round(event)
    self.assertEqual(accountant.epsilon(), float('inf'))

  @parameterized.parameters(_POISSON, _UNIFORM, _FULL)
  def test_cached_composition_matches_plain_accountants_for_mixed_rounds(
      self, scheme
  ):
    events = [dp_accounting.GaussianDpEvent(z) for z in (1.0, 2.0, 1.0, 0.7)]
    accountant = accounting.PrivacyAccountant(scheme, 500, 25, 1e-6)
    plain_rdp = dp_accounting.rdp.RdpAccountant(
        neighboring_relation=accountant.neighboring_relation
    )
    plain_pld = dp_accounting.pld.PLDAccountant(
        value_discretization_interval=1e-4
    )
    for event in events:
      accountant.compose_round(event)
      plain_rdp.compose(accountant.round_event(event))
      epsilons = accountant.epsilons()
      self.assertAlmostEqual(
          epsilons['rdp'], plain_rdp.get_epsilon(1e-6), places=10
      )
      if scheme is _UNIFORM:
        self.assertNotIn('pld', epsilons)  # PLD has no without-replacement.
      else:
        plain_pld.compose(accountant.round_event(event))
        self.assertAlmostEqual(
            epsilons['pld'], plain_pld.get_epsilon(1e-6), places=4
        )
      self.assertEqual(accountant.epsilon(), min(epsilons.values()))

  @parameterized.parameters(_POISSON, _UNIFORM)
  def test_restored_history_reports_the_same_epsilon_and_continues(self, scheme):
    events = [_two_gaussians(float), dp_accounting.GaussianDpEvent(0.9)] * 2
    original = accounting.PrivacyAccountant(scheme, 300, 20, 1e-5)
    for event in events:
      original.compose_round(event)
    restored = accounting.PrivacyAccountant(scheme, 300, 20, 1e-5)
    restored.restore_history(original.history_json())
    self.assertEqual(restored.rounds, 4)
    self.assertEqual(restored.epsilons(), original.epsilons())
    original.compose_round(events[0])
    restored.compose_round(events[0])
    self.assertEqual(restored.epsilons(), original.epsilons())

  @parameterized.parameters(
      dp_accounting.PoissonSampledDpEvent(0.1, _two_gaussians(float)),
      dp_accounting.SampledWithoutReplacementDpEvent(
          100, 10, dp_accounting.LaplaceDpEvent(2.0)),
      dp_accounting.NonPrivateDpEvent(),
  )
  def test_events_survive_json(self, event):
    self.assertEqual(
        accounting.event_from_json(accounting.event_to_json(event)), event
    )

  def test_no_rounds_spend_nothing(self):
    self.assertEqual(
        accounting.PrivacyAccountant(_POISSON, 10, 1, 1e-5).epsilon(), 0.0
    )

  def test_epsilon_grows_with_rounds(self):
    accountant = accounting.PrivacyAccountant(_POISSON, 100, 20, 1e-5)
    epsilons = [
        _compose(accountant, dp_accounting.GaussianDpEvent(1.0), 1)
        for _ in range(5)
    ]
    self.assertEqual(epsilons, sorted(epsilons))
    self.assertLess(epsilons[0], epsilons[-1])

  @parameterized.parameters(
      (_POISSON, accounting.AccountantKind.RDP),
      (_UNIFORM, accounting.AccountantKind.RDP),
      (_POISSON, accounting.AccountantKind.AUTO),
  )
  def test_calibrated_noise_meets_target_and_is_minimal(self, scheme, kind):
    target, rounds = 2.0, 100

    def epsilon_for(z):
      accountant = accounting.PrivacyAccountant(scheme, 3383, 120, 1e-5, kind)
      accountant.compose_round(dp_accounting.GaussianDpEvent(z))
      return accountant.epsilon() if rounds == 1 else _epsilon_after(
          accountant, dp_accounting.GaussianDpEvent(z), rounds
      )

    z = accounting.PrivacyAccountant(
        scheme, 3383, 120, 1e-5, kind
    ).calibrate_noise_multiplier(dp_accounting.GaussianDpEvent, target, rounds)
    self.assertLessEqual(epsilon_for(z), target)
    self.assertGreaterEqual(epsilon_for(z), 0.99 * target)
    self.assertGreater(epsilon_for(0.99 * z), target)

  @parameterized.parameters(20, 100)
  def test_calibrates_events_that_state_their_own_rdp(self, clients_per_round):
    # Distributed DP's event is no dp-accounting event: dp-accounting's
    # calibration cannot compose it; ours searches with its own composition.
    target, rounds = 2.0, 3

    def event(z):
      return distributed_dp.round_dp_event(z, 1.0, clients_per_round, 2410)

    def epsilon_for(z):
      accountant = accounting.PrivacyAccountant(
          _UNIFORM, 100, clients_per_round, 1e-5)
      return _compose(accountant, event(z), rounds)

    z = accounting.PrivacyAccountant(
        _UNIFORM, 100, clients_per_round, 1e-5
    ).calibrate_noise_multiplier(event, target, rounds)
    self.assertLessEqual(epsilon_for(z), target)
    self.assertGreater(epsilon_for(0.999 * z), target)

  def test_rdp_rounding_failure_leaves_the_pld_bound(self):
    # At z = 1e6, dp-accounting's sampled-Gaussian RDP over 20 rounds rounds
    # to a negative divergence and raises; PLD's bound is reported alone.
    accountant = accounting.PrivacyAccountant(_POISSON, 715, 100, 1e-5)
    for _ in range(20):
      accountant.compose_round(dp_accounting.GaussianDpEvent(1e6))
    epsilons = accountant.epsilons()
    self.assertEqual(list(epsilons), ['pld'])
    self.assertLess(epsilons['pld'], 1e-3)
    rdp_only = accounting.PrivacyAccountant(
        _POISSON, 715, 100, 1e-5, accounting.AccountantKind.RDP)
    for _ in range(20):
      rdp_only.compose_round(dp_accounting.GaussianDpEvent(1e6))
    with self.assertRaisesRegex(ValueError, 'cannot be negative'):
      rdp_only.epsilons()

  def test_large_target_below_the_first_bracket_is_met(self):
    # q = 100/715 over 20 rounds: epsilon 32 needs z below the first
    # bracket [0.5, 1]; searching upwards from it would reach z ~ 1e6, where
    # RDP raises. (PLD takes a minute here, at small noise.)
    kind = accounting.AccountantKind.RDP
    def epsilon_for(z):
      accountant = accounting.PrivacyAccountant(_POISSON, 715, 100, 1e-5,
                                                kind)
      return _compose(accountant, dp_accounting.GaussianDpEvent(z), 20)

    z = accounting.PrivacyAccountant(
        _POISSON, 715, 100, 1e-5, kind
    ).calibrate_noise_multiplier(dp_accounting.GaussianDpEvent, 32.0, 20)
    self.assertLessEqual(epsilon_for(z), 32.0)
    self.assertGreater(epsilon_for(0.999 * z), 32.0)

  def test_target_that_needs_less_than_half_the_first_guess_is_met(self):
    # The search starts from z = 1; a large target needs z ~ 0.21 (PLD).
    accountant = accounting.PrivacyAccountant(_FULL, 10, 10, 1e-5)
    z = accountant.calibrate_noise_multiplier(
        dp_accounting.GaussianDpEvent, 30.0, 1
    )
    self.assertLess(z, 0.5)
    pld = dp_accounting.pld.PLDAccountant(value_discretization_interval=1e-4)
    pld.compose(dp_accounting.GaussianDpEvent(z))
    self.assertBetween(pld.get_epsilon(1e-5), 0.99 * 30.0, 30.0)

  def test_unreachable_target_raises(self):
    accountant = accounting.PrivacyAccountant(_POISSON, 100, 100, 1e-5)
    with self.assertRaisesRegex(ValueError, 'no noise multiplier'):
      accountant.calibrate_noise_multiplier(
          lambda z: dp_accounting.NonPrivateDpEvent(), 1.0, 10
      )

  @parameterized.parameters((_POISSON, 1.0), (_UNIFORM, 5.0))
  def test_rounds_within_budget_matches_round_by_round(self, scheme, target):
    event = dp_accounting.GaussianDpEvent(2.0)
    accountant = accounting.PrivacyAccountant(scheme, 200, 20, 1e-5)
    accountant.compose_round(event)  # Counts from the rounds already spent.
    allowed = accountant.rounds_within_budget(event, target, max_rounds=60)
    for _ in range(allowed):
      accountant.compose_round(event)
    self.assertLessEqual(accountant.epsilon(), target)
    self.assertGreater(accountant.epsilon_after_round(event), target)
    self.assertBetween(allowed, 1, 59)

  def test_epsilon_after_round_does_not_compose(self):
    accountant = accounting.PrivacyAccountant(_POISSON, 100, 10, 1e-5)
    event = dp_accounting.GaussianDpEvent(1.0)
    accountant.compose_round(event)
    before = accountant.epsilon()
    peek = accountant.epsilon_after_round(event)
    self.assertEqual(accountant.epsilon(), before)
    self.assertEqual(accountant.rounds, 1)
    accountant.compose_round(event)
    self.assertEqual(accountant.epsilon(), peek)

  def test_full_participation_is_unsampled_add_remove_gaussian(self):
    accountant = accounting.PrivacyAccountant(_FULL, 50, 1, 1e-5)
    self.assertEqual(accountant.clients_per_round, 50)
    _compose(accountant, dp_accounting.GaussianDpEvent(5.0), 20)
    epsilons = accountant.epsilons()
    self.assertAlmostEqual(
        epsilons['rdp'],
        _direct_epsilon(
            dp_accounting.GaussianDpEvent(5.0), 20, 1e-5,
            dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE,
        ),
        places=10,
    )
    self.assertLess(epsilons['pld'], epsilons['rdp'])

  def test_pld_collapses_poisson_sampled_composed_gaussians(self):
    # PLD rejects Poisson(Composed(Gaussians)); one Gaussian with
    # z_eff = (sum z_i^-2)^(-1/2) is the same mechanism.
    accountant = accounting.PrivacyAccountant(
        _POISSON, 3400, 50, 1e-5, accounting.AccountantKind.PLD
    )
    _compose(accountant, _two_gaussians(float), 50)
    z_eff = (1.0041**-2 + 10.0**-2) ** -0.5
    reference = dp_accounting.pld.PLDAccountant(
        value_discretization_interval=1e-4
    )
    reference.compose(
        dp_accounting.PoissonSampledDpEvent(
            50 / 3400, dp_accounting.GaussianDpEvent(z_eff)
        ),
        50,
    )
    self.assertAlmostEqual(accountant.epsilon(), reference.get_epsilon(1e-5), 6)

  def test_pld_with_uniform_sampling_is_refused_with_the_alternative(self):
    accountant = accounting.PrivacyAccountant(
        _UNIFORM, 100, 10, 1e-5, accounting.AccountantKind.PLD
    )
    with self.assertRaisesRegex(ValueError, 'use one of: rdp'):
      accountant.check_supported(dp_accounting.GaussianDpEvent(1.0))

  def test_laplace_under_poisson_sampling_needs_pld(self):
    event = dp_accounting.LaplaceDpEvent(2.0)
    accountant = accounting.PrivacyAccountant(_POISSON, 1000, 50, 1e-5)
    self.assertEqual(accountant.supported_kinds(event),
                     [accounting.AccountantKind.PLD])
    _compose(accountant, event, 20)
    reference = dp_accounting.pld.PLDAccountant()
    reference.compose(dp_accounting.PoissonSampledDpEvent(0.05, event), 20)
    self.assertEqual(accountant.epsilon_and_accountant()[1], 'pld')
    self.assertAlmostEqual(accountant.epsilon(), reference.get_epsilon(1e-5), 6)
    with self.assertRaisesRegex(ValueError, 'use one of: pld'):
      accounting.PrivacyAccountant(
          _POISSON, 1000, 50, 1e-5, accounting.AccountantKind.RDP
      ).check_supported(event)
    with self.assertRaisesRegex(ValueError, '--sampling=poisson'):
      accounting.PrivacyAccountant(_UNIFORM, 1000, 50, 1e-5).check_supported(
          event
      )

  def test_local_dp_composes_without_sampling_under_replace_one(self):
    accountant = accounting.PrivacyAccountant(
        _POISSON, 1000, 10, 1e-5, local_dp=True
    )
    event = dp_accounting.GaussianDpEvent(1.5)
    self.assertEqual(accountant.round_event(event), event)
    self.assertIs(
        accountant.neighboring_relation,
        dp_accounting.NeighboringRelation.REPLACE_ONE,
    )
    _compose(accountant, event, 2)
    reference = dp_accounting.pld.PLDAccountant()
    reference.compose(event, 2)
    self.assertAlmostEqual(accountant.epsilon(), reference.get_epsilon(1e-5), 6)

  @parameterized.named_parameters(
      ('delta_zero', dict(delta=0.0), 'delta'),
      ('delta_one', dict(delta=1.0), 'delta'),
      ('cohort_too_large', dict(clients_per_round=11), 'clients_per_round'),
      ('cohort_zero', dict(clients_per_round=0), 'clients_per_round'),
  )
  def test_invalid_arguments_raise(self, overrides, message):
    kwargs = dict(scheme=_POISSON, num_clients=10, clients_per_round=5, delta=1e-5)
    kwargs.update(overrides)
    with self.assertRaisesRegex(ValueError, message):
      accounting.PrivacyAccountant(**kwargs)


class PldEpsilonTest(parameterized.TestCase):
  """The vectorized epsilon(delta) scan is dp-accounting's, to float ulps."""

  @parameterized.product(
      sampling_rate=(0.01, 1.0), noise_multiplier=(0.5, 3.0), rounds=(1, 10))
  def test_same_epsilon_as_dp_accounting(self, sampling_rate, noise_multiplier,
                                         rounds):
    event = dp_accounting.GaussianDpEvent(noise_multiplier)
    if sampling_rate < 1:
      event = dp_accounting.PoissonSampledDpEvent(sampling_rate, event)
    accountant = dp_accounting.pld.PLDAccountant()
    accountant.compose(event, rounds)
    pld = accountant._pld  # pylint: disable=protected-access
    for delta in (1e-9, 1e-5, 0.5):
      expected = pld.get_epsilon_for_delta(delta)
      self.assertAlmostEqual(
          accounting.pld_epsilon(pld, delta), expected,
          delta=1e-12 * max(1.0, expected), msg=f'delta={delta}')

  @parameterized.product(
      scheme=(_POISSON, _FULL), noise_multiplier=(0.7, 2.0),
      rounds=(1, 2, 10, 60))
  def test_repeated_rounds_compose_as_dp_accounting(
      self, scheme, noise_multiplier, rounds):
    # The ledger self-composes a round's PLD with cached truncation bounds
    # and a real FFT: the same epsilon as the library's self-composition.
    accountant = accounting.PrivacyAccountant(
        scheme, 500, 25, 1e-6, accounting.AccountantKind.PLD)
    event = dp_accounting.GaussianDpEvent(noise_multiplier)
    for _ in range(rounds):
      accountant.compose_round(event)
    library = dp_accounting.pld.PLDAccountant(
        value_discretization_interval=1e-4)
    library.compose(accountant.round_event(event), rounds)
    expected = library.get_epsilon(1e-6)
    # Both PMFs come out of an FFT (PMF test below): the epsilons agree to
    # what its round-off moves a log-ratio of tail masses, well below the
    # 1e-4 discretisation of the losses.
    self.assertAlmostEqual(accountant.epsilons()['pld'], expected,
                           delta=1e-7 * expected)

  @parameterized.product(
      sampling_rate=(0.05, 1.0), noise_multiplier=(0.7, 2.0),
      rounds=(1, 2, 10, 60))
  def test_self_composition_is_dp_accountings_up_to_fft_round_off(
      self, sampling_rate, noise_multiplier, rounds):
    event = dp_accounting.GaussianDpEvent(noise_multiplier)
    if sampling_rate < 1:
      event = dp_accounting.PoissonSampledDpEvent(sampling_rate, event)
    single = dp_accounting.pld.PLDAccountant(
        value_discretization_interval=1e-4)
    single.compose(event)
    pld = single._pld  # pylint: disable=protected-access
    ours = accounting._self_composition(pld)(rounds)  # pylint: disable=protected-access
    library = pld.self_compose(rounds)
    for side in ('_pmf_remove', '_pmf_add'):
      mine, theirs = getattr(ours, side), getattr(library, side)
      # pylint: disable=protected-access
      self.assertEqual(mine._lower_loss, theirs._lower_loss)
      self.assertEqual(mine._infinity_mass, theirs._infinity_mass)
      self.assertEqual(len(mine._probs), len(theirs._probs))
      # An FFT's round-off per entry: about machine epsilon x log2(length)
      # x the PMF's L2 norm (at most 1).
      bound = np.finfo(np.float64).eps * math.log2(len(mine._probs))
      self.assertLess(np.max(np.abs(mine._probs - theirs._probs)), bound)

  def test_infinite_and_zero_epsilon(self):
    accountant = dp_accounting.pld.PLDAccountant()
    accountant.compose(dp_accounting.GaussianDpEvent(0.1))
    pld = accountant._pld  # pylint: disable=protected-access
    self.assertEqual(accounting.pld_epsilon(pld, 1 - 1e-12),
                     pld.get_epsilon_for_delta(1 - 1e-12))
    self.assertEqual(accounting.pld_epsilon(pld, 0.0), math.inf)



class GaussianEpsilonTest(parameterized.TestCase):
  """The exact epsilon of one Gaussian against dp-accounting's discretised
  PLD, which bounds it from above and converges to it."""

  @parameterized.product(noise_multiplier=(0.3, 1.0, 4.26, 20.0),
                         delta=(1e-10, 1e-5))
  def test_matches_dp_accountings_pld(self, noise_multiplier, delta):
    pld = dp_accounting.pld.PLDAccountant(value_discretization_interval=1e-4)
    pld.compose(dp_accounting.GaussianDpEvent(noise_multiplier))
    discretised = pld.get_epsilon(delta)
    exact = accounting.gaussian_epsilon(noise_multiplier, delta)
    self.assertLessEqual(exact, discretised + 1e-9)
    self.assertAlmostEqual(exact, discretised, delta=1e-5 * discretised)

  def test_meets_delta_by_the_closed_form(self):
    """Balle & Wang 2018: delta(eps) = Phi(1/(2z) - eps z)
    - e^eps Phi(-1/(2z) - eps z)."""
    z, delta = 1.3, 1e-6
    epsilon = accounting.gaussian_epsilon(z, delta)
    phi = lambda x: 0.5 * math.erfc(-x / math.sqrt(2))
    delta_of = lambda e: phi(0.5 / z - e * z) - math.exp(e) * phi(-0.5 / z - e * z)
    self.assertLessEqual(delta_of(epsilon), delta)
    self.assertGreater(delta_of(epsilon - 1e-6), delta)

  def test_no_noise_is_infinite(self):
    self.assertEqual(accounting.gaussian_epsilon(0.0, 1e-5), math.inf)


class ParticipationTest(parameterized.TestCase):
  """The incrementally kept schedule is the one recounted from the cohorts."""

  def _cohorts(self, rounds, seed):
    rng = np.random.default_rng(seed)
    return [tuple(rng.choice(30, size=4, replace=False)) for _ in range(rounds)]

  @parameterized.parameters(0, 1, 2)
  def test_schedule_as_recounted(self, seed):
    cohorts = self._cohorts(25, seed)
    participation = accounting.Participation(cohorts[:10]).with_rounds(
        cohorts[10:20])
    for cohort in cohorts[20:]:
      participation = participation.with_round(cohort)
    self.assertEqual(participation.schedule(),
                     correlated_noise.realised_schedule(cohorts))
    self.assertEqual(participation.max_participations(),
                     participation.schedule().max_participations)
    self.assertEqual(
        participation.period_schedules(7),
        [correlated_noise.realised_schedule(cohorts[s:s + 7])
         for s in range(0, 25, 7)])

  def test_extending_leaves_the_original_as_it_was(self):
    base = accounting.Participation([(0,), (1,)])
    base.period_schedules(2)
    extended = base.with_rounds([(0,), (2,), (0,)])
    self.assertEqual(base.schedule(), correlated_noise.Schedule(2, 1, 2))
    self.assertEqual(base.cohorts, ((0,), (1,)))
    self.assertEqual(extended.schedule(), correlated_noise.Schedule(5, 3, 2))
    self.assertEqual(extended.period_schedules(2), [
        correlated_noise.Schedule(2, 1, 2), correlated_noise.Schedule(2, 1, 2),
        correlated_noise.Schedule(1, 1, 1)])

  def test_no_rounds_has_no_schedule(self):
    with self.assertRaisesRegex(ValueError, 'no rounds'):
      accounting.Participation().schedule()


if __name__ == '__main__':
  absltest.main()
