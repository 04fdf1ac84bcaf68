from absl.testing import absltest
from absl.testing import parameterized
import numpy as np

from dp_fedavg import correlated_noise
from dp_fedavg import sampling


class ClientSamplerTest(parameterized.TestCase):

  def test_uniform_draws_exact_distinct_sorted_cohorts(self):
    sampler = sampling.ClientSampler('uniform', 50, 7, seed=1)
    for round_num in range(20):
      cohort = sampler.sample(round_num)
      self.assertLen(cohort, 7)
      self.assertLen(set(cohort.tolist()), 7)
      self.assertTrue(np.all(np.diff(cohort) > 0))
      self.assertTrue(np.all((cohort >= 0) & (cohort < 50)))

  def test_uniform_covers_population_evenly(self):
    num_clients, cohort, rounds = 20, 5, 4000
    sampler = sampling.ClientSampler('uniform', num_clients, cohort, seed=2)
    counts = np.bincount(
        np.concatenate([sampler.sample(r) for r in range(rounds)]),
        minlength=num_clients,
    )
    q = cohort / num_clients
    standard_error = np.sqrt(rounds * q * (1 - q))
    self.assertLess(np.max(np.abs(counts - rounds * q)), 5 * standard_error)

  def test_poisson_cohort_size_is_binomial(self):
    num_clients, expected, rounds = 200, 10, 2000
    sampler = sampling.ClientSampler('poisson', num_clients, expected, seed=3)
    sizes = np.array([len(sampler.sample(r)) for r in range(rounds)])
    q = expected / num_clients
    self.assertAlmostEqual(sampler.sampling_probability, q)
    self.assertLess(
        abs(sizes.mean() - expected),
        5 * np.sqrt(num_clients * q * (1 - q) / rounds),
    )
    self.assertGreater(sizes.std(), 0)

  @parameterized.parameters('uniform', 'poisson')
  def test_same_seed_same_cohorts(self, scheme):
    first = sampling.ClientSampler(scheme, 30, 5, seed=4)
    second = sampling.ClientSampler(scheme, 30, 5, seed=4)
    for round_num in range(5):
      np.testing.assert_array_equal(
          first.sample(round_num), second.sample(round_num)
      )

  def test_rounds_differ_and_do_not_depend_on_earlier_draws(self):
    sampler = sampling.ClientSampler('uniform', 100, 10, seed=5)
    in_order = [sampler.sample(r) for r in range(1, 4)]
    self.assertFalse(np.array_equal(in_order[0], in_order[1]))
    np.testing.assert_array_equal(sampler.sample(3), in_order[2])

  @parameterized.named_parameters(
      ('no_clients', 0, 1, 'num_clients'),
      ('cohort_above_population', 5, 6, 'clients_per_round'),
      ('empty_cohort', 5, 0, 'clients_per_round'),
  )
  def test_invalid_arguments_raise(self, num_clients, cohort, message):
    with self.assertRaisesRegex(ValueError, message):
      sampling.ClientSampler('uniform', num_clients, cohort, seed=0)

  def test_cyclic_groups_take_turns(self):
    # 23 clients in groups of 5: 4 groups, 3 clients left out.
    sampler = sampling.ClientSampler('cyclic', 23, 5, seed=6)
    self.assertEqual((sampler.period, sampler.left_out), (4, 3))
    cohorts = [sampler.sample(r) for r in range(1, 11)]
    for cohort in cohorts:
      self.assertLen(cohort, 5)
      self.assertTrue(np.all(np.diff(cohort) > 0))
    self.assertLen(set(np.concatenate(cohorts[:4]).tolist()), 20)
    for r in range(4, 10):
      np.testing.assert_array_equal(cohorts[r], cohorts[r - 4])
    np.testing.assert_array_equal(
        sampling.ClientSampler('cyclic', 23, 5, seed=6).sample(7), cohorts[6])
    self.assertFalse(np.array_equal(
        sampling.ClientSampler('cyclic', 23, 5, seed=7).sample(1), cohorts[0]))

  def test_cyclic_realised_schedule(self):
    """k = ceil(T / period) participations, period rounds apart."""
    sampler = sampling.ClientSampler('cyclic', 30, 10, seed=0)
    cohorts = [sampler.sample(r) for r in range(1, 8)]
    self.assertEqual(correlated_noise.realised_schedule(cohorts),
                     correlated_noise.Schedule(7, 3, 3))

  def test_cyclic_poisson_samples_within_the_group_of_the_turn(self):
    # 103 clients in 4 groups of 25 (3 left out); q = 5 / 25 within a group.
    sampler = sampling.ClientSampler('cyclic_poisson', 103, 5, seed=8,
                                     groups=4)
    self.assertEqual((sampler.period, sampler.group_size, sampler.left_out),
                     (4, 25, 3))
    self.assertAlmostEqual(sampler.sampling_probability, 0.2)
    rounds = 2000
    cohorts = [sampler.sample(r) for r in range(1, rounds + 1)]
    groups = [set() for _ in range(4)]
    for r, cohort in enumerate(cohorts):
      groups[r % 4].update(cohort.tolist())
    self.assertEqual(sum(len(g) for g in groups), 100)
    self.assertEqual(len(set().union(*groups)), 100)  # disjoint groups
    sizes = np.array([len(c) for c in cohorts])
    standard_error = np.sqrt(25 * 0.2 * 0.8 / rounds)
    self.assertLess(abs(sizes.mean() - 5), 5 * standard_error)
    schedule = correlated_noise.realised_schedule(cohorts)
    self.assertGreaterEqual(schedule.min_gap, 4)
    self.assertLessEqual(schedule.max_participations, rounds // 4)

  @parameterized.named_parameters(
      ('no_groups', 'cyclic_poisson', 0, 'groups in'),
      ('groups_smaller_than_the_cohort', 'cyclic_poisson', 21, 'groups in'),
      ('groups_without_cyclic_poisson', 'poisson', 2, 'apply to'),
  )
  def test_invalid_groups(self, scheme, groups, message):
    with self.assertRaisesRegex(ValueError, message):
      sampling.ClientSampler(scheme, 100, 5, seed=0, groups=groups)

  def test_unknown_scheme_raises(self):
    with self.assertRaisesRegex(ValueError, 'shuffle'):
      sampling.ClientSampler('shuffle', 5, 1, seed=0)


if __name__ == '__main__':
  absltest.main()
