"""Empirical privacy estimates and lower bounds against published values."""

import math

from absl.testing import absltest
from absl.testing import parameterized
import numpy as np
from scipy import integrate
from scipy import optimize
from scipy import stats

from dp_fedavg import empirical_privacy


def _analytic_gaussian_sigma(epsilon: float, delta: float,
                             sensitivity: float) -> float:
  """Balle & Wang 2018: the sigma at which the Gaussian mechanism is exactly
  (epsilon, delta)-DP: delta = Phi(D/(2s) - e s/D) - e^e Phi(-D/(2s) - e s/D).
  """
  def delta_of(sigma):
    ratio = sensitivity / sigma
    return (stats.norm.cdf(ratio / 2 - epsilon / ratio)
            - math.exp(epsilon) * stats.norm.cdf(-ratio / 2 - epsilon / ratio))
  return optimize.brentq(lambda s: delta_of(s) - delta, 1e-3, 1e3, xtol=1e-14)


class TwoGaussiansTest(parameterized.TestCase):

  @parameterized.product(epsilon=[0.5, 1.0, 5.0], delta=[1e-5, 1e-2])
  def test_recovers_the_analytic_gaussian(self, epsilon, delta):
    sensitivity = 0.7
    sigma = _analytic_gaussian_sigma(epsilon, delta, sensitivity)
    self.assertAlmostEqual(
        empirical_privacy.epsilon_two_gaussians(0, sigma, sensitivity, sigma,
                                                delta), epsilon, places=6)

  def test_unequal_variances_match_numerical_integration(self):
    """delta(eps) = integral of max(0, p1 - e^eps p0), both directions."""
    mu0, s0, mu1, s1, delta = 0.0, 1.0, 1.5, 0.6, 1e-3
    epsilon = empirical_privacy.epsilon_two_gaussians(mu0, s0, mu1, s1, delta)

    def hockey_stick(p, q):
      return integrate.quad(
          lambda y: max(0.0, p.pdf(y) - math.exp(epsilon) * q.pdf(y)),
          -15, 15, points=[mu0, mu1], limit=400)[0]

    first, second = stats.norm(mu0, s0), stats.norm(mu1, s1)
    self.assertAlmostEqual(
        max(hockey_stick(first, second), hockey_stick(second, first)), delta,
        delta=1e-7)

  def test_same_distribution_is_zero(self):
    self.assertEqual(
        empirical_privacy.epsilon_two_gaussians(0.3, 1.0, 0.3, 1.0, 1e-5), 0)


class ClosedFormNullTest(parameterized.TestCase):

  @parameterized.parameters((200, 2.375326), (2000, 2.317789))
  def test_published_values(self, dimension, expected):
    """The issue's reference values: mu = std = d^-1/2, delta = 1e-2."""
    self.assertAlmostEqual(
        empirical_privacy.epsilon_closed_form_null(
            dimension**-0.5, dimension**-0.5, dimension, 1e-2),
        expected, places=5)

  @parameterized.parameters(3, 20, 500)
  def test_null_tail_matches_the_density(self, dimension):
    density = lambda t: (1 - t * t) ** ((dimension - 3) / 2)
    total = integrate.quad(density, -1, 1)[0]
    for threshold in (-0.5, 0.0, 0.1, 0.4):
      tail = integrate.quad(density, threshold, 1)[0] / total
      self.assertAlmostEqual(
          math.exp(empirical_privacy.cosine_null_log_sf(threshold, dimension)),
          tail, places=8)


class OneRunTest(parameterized.TestCase):

  @parameterized.parameters(
      # (canaries m, guesses r, correct v, confidence, expected): the issue's
      # values from Steinke, Nasr & Jagielski 2023, delta = 1e-5.
      (500, 100, 100, 0.95, 3.479), (500, 100, 100, 0.99, 3.023),
      (1000, 1000, 1000, 0.95, 5.78), (1000, 100, 90, 0.95, 1.63),
  )
  def test_published_values(self, canaries, guesses, correct, confidence,
                            expected):
    self.assertAlmostEqual(
        empirical_privacy.one_run_epsilon_lower_bound(
            canaries, guesses, correct, 1e-5, confidence),
        expected, delta=0.005)

  def test_pure_dp_all_correct_is_the_binomial_tail(self):
    """delta = 0, all r right: q^r = 1 - confidence at the bound."""
    bound = empirical_privacy.one_run_epsilon_lower_bound(
        100, 50, 50, 0.0, 0.95)
    q = 1 / (1 + math.exp(-bound))
    self.assertAlmostEqual(q**50, 0.05, places=6)

  def test_chance_guesses_give_nothing(self):
    self.assertEqual(empirical_privacy.one_run_epsilon_lower_bound(
        1000, 200, 100, 1e-5, 0.95), 0.0)

  def test_invalid_counts(self):
    with self.assertRaisesRegex(ValueError, 'correct <= guesses'):
      empirical_privacy.one_run_p_value(10, 5, 6, 1.0, 0.0)


class ThresholdBoundTest(absltest.TestCase):

  def test_separated_scores_give_a_positive_bound_below_the_truth(self):
    """Scores of a Gaussian mechanism with mu = 3 (true eps at 1e-5 about
    10.9): the bound is positive and below it."""
    rng = np.random.default_rng(0)
    inserted, held_out = rng.normal(3, 1, 500), rng.normal(0, 1, 500)
    bound = empirical_privacy.threshold_epsilon_lower_bound(
        inserted, held_out, 1e-5, 0.95)
    truth = empirical_privacy.epsilon_two_gaussians(0, 1, 3, 1, 1e-5)
    self.assertGreater(bound, 1.0)
    self.assertLess(bound, truth)

  def test_identical_scores_give_zero(self):
    rng = np.random.default_rng(1)
    scores = rng.normal(0, 1, 400)
    self.assertEqual(empirical_privacy.threshold_epsilon_lower_bound(
        scores[:200], scores[200:], 1e-5, 0.95), 0.0)


if __name__ == '__main__':
  absltest.main()
