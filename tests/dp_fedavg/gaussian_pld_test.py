import math

from absl.testing import absltest
from absl.testing import parameterized
import dp_accounting
from dp_accounting.pld import privacy_loss_distribution
from dp_accounting.pld import privacy_loss_mechanism
import numpy as np

from dp_fedavg import gaussian_pld

_ADD = privacy_loss_mechanism.AdjacencyType.ADD
_REMOVE = privacy_loss_mechanism.AdjacencyType.REMOVE


def _privacy_losses(noise_multiplier, sampling_prob, adjacency):
  """The library's Gaussian privacy loss, ours, and the subsampling edge
  (-log(1 - q) for ADD, log(1 - q) for REMOVE; 0 without subsampling)."""
  library = privacy_loss_mechanism.GaussianPrivacyLoss(
      noise_multiplier, sampling_prob=sampling_prob, adjacency_type=adjacency)
  ours = gaussian_pld._GaussianPrivacyLoss(  # pylint: disable=protected-access
      noise_multiplier, sampling_prob=sampling_prob, adjacency_type=adjacency)
  edge = ((-math.log(1 - sampling_prob) if adjacency == _ADD
           else math.log(1 - sampling_prob)) if sampling_prob < 1 else 0.0)
  return library, ours, edge


class FromGaussianMechanismTest(parameterized.TestCase):
  """The PLD is dp-accounting's own: the same PMFs and epsilons."""

  @parameterized.parameters(
      (0.7, 0.5, 1e-4),  # Small noise, large rate: the widest grid here.
      (1.0, 1.0, 1e-4),  # No subsampling: REMOVE equals ADD.
      (2.0, 0.01, 1e-4),
      (5.0, 0.999, 1e-4),
      (1.3, 0.2, 1e-3),
  )
  def test_same_pld_as_dp_accounting(self, noise_multiplier, sampling_prob,
                                     interval):
    library = privacy_loss_distribution.from_gaussian_mechanism(
        noise_multiplier, value_discretization_interval=interval,
        sampling_prob=sampling_prob)
    ours = gaussian_pld.from_gaussian_mechanism(
        noise_multiplier, interval, sampling_prob)
    # pylint: disable=protected-access
    self.assertEqual(ours._symmetric, library._symmetric)
    for side in ('_pmf_remove', '_pmf_add'):
      mine, theirs = getattr(ours, side), getattr(library, side)
      self.assertEqual(mine._lower_loss, theirs._lower_loss)
      self.assertEqual(len(mine._probs), len(theirs._probs))
      self.assertEqual(mine._infinity_mass, theirs._infinity_mass)
      # The same formulas in numpy arrays instead of scalars: equal up to
      # float64 round-off of a mass (at most 1).
      np.testing.assert_allclose(mine._probs, theirs._probs, rtol=0,
                                 atol=4 * np.finfo(np.float64).eps)
    for delta in (1e-9, 1e-5, 0.1):
      expected = library.get_epsilon_for_delta(delta)
      self.assertAlmostEqual(ours.get_epsilon_for_delta(delta), expected,
                             delta=1e-12 * max(1.0, expected))

  @parameterized.product(adjacency=(_ADD, _REMOVE), sampling_prob=(0.3, 1.0))
  def test_deltas_match_the_library_at_and_near_the_edges(
      self, adjacency, sampling_prob):
    library, ours, edge = _privacy_losses(0.8, sampling_prob, adjacency)
    epsilons = np.array([
        -3.0, -0.5, 0.0, 0.25, 2.0, 6.0, edge, edge * (1 + 1e-12),
        edge * (1 - 1e-11), edge * (1 - 1e-6), edge * (1 + 1e-6)])
    expected = library.get_delta_for_epsilon(epsilons)
    np.testing.assert_allclose(ours.get_delta_for_epsilon(epsilons), expected,
                               rtol=1e-12, atol=1e-300)
    for epsilon, delta in zip(epsilons, expected):
      self.assertAlmostEqual(ours.get_delta_for_epsilon(float(epsilon)),
                             delta, delta=1e-12 * max(delta, 1e-300))

  @parameterized.product(adjacency=(_ADD, _REMOVE),
                         sampling_prob=(0.01, 0.3, 0.7, 0.999))
  def test_inverse_privacy_losses_are_the_librarys_up_to_the_edge(
      self, adjacency, sampling_prob):
    library, ours, edge = _privacy_losses(1.1, sampling_prob, adjacency)
    # Where the library inverts: below the edge (ADD) or above it (REMOVE),
    # the edge itself and the float next to it included.
    inward = -1.0 if adjacency == _ADD else 1.0
    epsilons = np.array([
        edge, np.nextafter(edge, inward * math.inf),
        edge + inward * 1e-12 * abs(edge), edge + inward * 0.5,
        edge + inward * 3.0, 0.0])
    expected = [library.inverse_privacy_loss(float(e)) for e in epsilons]
    np.testing.assert_allclose(
        ours._inverse_privacy_losses(epsilons),  # pylint: disable=protected-access
        expected, rtol=1e-12)


class PLDAccountantTest(parameterized.TestCase):

  @parameterized.named_parameters(
      ('gaussian', dp_accounting.GaussianDpEvent(1.5), 3),
      ('poisson_gaussian', dp_accounting.PoissonSampledDpEvent(
          0.1, dp_accounting.GaussianDpEvent(1.2)), 4),
      ('composed', dp_accounting.ComposedDpEvent([
          dp_accounting.PoissonSampledDpEvent(
              0.05, dp_accounting.GaussianDpEvent(2.0)),
          dp_accounting.GaussianDpEvent(8.0)]), 2),
      ('laplace', dp_accounting.LaplaceDpEvent(3.0), 2),
      ('poisson_laplace', dp_accounting.PoissonSampledDpEvent(
          0.2, dp_accounting.LaplaceDpEvent(4.0)), 2),
      ('never_sampled', dp_accounting.PoissonSampledDpEvent(
          0.0, dp_accounting.GaussianDpEvent(1.0)), 2),
  )
  def test_same_epsilon_as_dp_accounting(self, event, count):
    library = dp_accounting.pld.PLDAccountant()
    library.compose(event, count)
    ours = gaussian_pld.PLDAccountant()
    ours.compose(event, count)
    for delta in (1e-6, 1e-3):
      expected = library.get_epsilon(delta)
      self.assertAlmostEqual(ours.get_epsilon(delta), expected,
                             delta=1e-12 * max(1.0, expected))

  def test_no_noise_is_not_private(self):
    ours = gaussian_pld.PLDAccountant()
    ours.compose(dp_accounting.PoissonSampledDpEvent(
        0.5, dp_accounting.GaussianDpEvent(0.0)))
    self.assertEqual(ours.get_epsilon(1e-5), math.inf)

  def test_poisson_sampling_under_replace_one_is_refused_as_by_the_library(
      self):
    event = dp_accounting.PoissonSampledDpEvent(
        0.1, dp_accounting.GaussianDpEvent(1.0))
    relation = dp_accounting.NeighboringRelation.REPLACE_ONE
    self.assertFalse(gaussian_pld.PLDAccountant(relation).supports(event))
    self.assertEqual(
        gaussian_pld.PLDAccountant(relation).supports(event),
        dp_accounting.pld.PLDAccountant(relation).supports(event))
    with self.assertRaisesRegex(dp_accounting.UnsupportedEventError,
                                'ADD_OR_REMOVE_ONE'):
      gaussian_pld.PLDAccountant(relation).compose(event)


if __name__ == '__main__':
  absltest.main()
