"""The robust rules, pre-aggregations and attacks as TF functions."""

from absl.testing import parameterized
import numpy as np
import scipy.stats
import tensorflow as tf

from aggregators import attacks
from aggregators import krum
from aggregators import preaggregation
from aggregators import robust

_RULES = dict(
    median=robust.Robustness(rule='median'),
    trimmed_mean=robust.Robustness(rule='trimmed_mean', trim_fraction=0.2),
    krum=robust.Robustness(rule='krum', assumed_byzantine=1),
    multi_krum=robust.Robustness(
        rule='multi_krum', assumed_byzantine=1, krum_selected=3),
    geometric_median=robust.Robustness(
        rule='geometric_median', gm_iterations=50),
    centered_clipping=robust.Robustness(
        rule='centered_clipping', cc_radius=1.0),
    bucketing_median=robust.Robustness(
        rule='median', preaggregation='bucketing', bucket_size=2),
    nnm_trimmed_mean=robust.Robustness(
        rule='trimmed_mean', trim_fraction=0.2, preaggregation='nnm',
        assumed_byzantine=2),
)
_SEED = tf.constant([3, 4], tf.int64)


def _apply(robustness, records, center=None):
  records = tf.constant(records, tf.float32)
  if center is None:
    center = tf.zeros([records.shape[1]])
  return robustness.apply(records, tf.constant(center, tf.float32), _SEED).numpy()


class RulesTest(parameterized.TestCase, tf.test.TestCase):

  @parameterized.named_parameters(
      # Columns sorted: (-1, 0, 2, 5, 100) and (4, 3, 2, 1, 0).
      ('median_odd', robust.Robustness(rule='median'), [2.0, 2.0]),
      # b = floor(0.2 * 5) = 1 value dropped at each end.
      ('trimmed_mean', robust.Robustness(rule='trimmed_mean', trim_fraction=0.2),
       [7 / 3, 2.0]),
      ('trimmed_mean_nothing_trimmed',
       robust.Robustness(rule='trimmed_mean', trim_fraction=0.1),
       [106 / 5, 2.0]),
  )
  def test_coordinatewise_rules(self, robustness, expected):
    records = [[0, 4], [100, 3], [2, 2], [-1, 1], [5, 0]]
    self.assertAllClose(_apply(robustness, records), expected)

  def test_median_of_an_even_number_averages_the_middle_two(self):
    self.assertAllClose(
        _apply(robust.Robustness(rule='median'), [[1.0], [4.0], [2.0], [10.0]]),
        [3.0])

  def test_krum_scores_and_selection(self):
    # Points on a line at 0, 1, 2, 3, 10; n - f - 2 = 2 neighbours (f = 1).
    # Squared distances: scores 0: 1+4=5, 1: 1+1=2, 2: 1+1=2, 3: 1+4=5,
    # 10: 49+64=113.
    records = [[0.0], [1.0], [2.0], [3.0], [10.0]]
    self.assertAllClose(
        krum.scores(tf.constant(records), 1), [5.0, 2.0, 2.0, 5.0, 113.0])
    self.assertAllClose(
        _apply(robust.Robustness(rule='krum', assumed_byzantine=1), records),
        [1.0])  # The first of the tied smallest scores.
    self.assertAllClose(
        _apply(robust.Robustness(
            rule='multi_krum', assumed_byzantine=1, krum_selected=4), records),
        [1.5])  # 0, 1, 2, 3.
    # m defaults to n - f = 4.
    self.assertAllClose(
        _apply(robust.Robustness(rule='multi_krum', assumed_byzantine=1),
               records), [1.5])

  def test_geometric_median_of_a_symmetric_set_is_its_centre(self):
    # Four corners of a square and a far point on the diagonal: the
    # Weiszfeld fixed point of the corners alone is the centre; with the
    # outlier it must stay within the square (breakdown point 1/2).
    corners = [[1.0, 1.0], [1.0, -1.0], [-1.0, 1.0], [-1.0, -1.0]]
    rule = robust.Robustness(rule='geometric_median', gm_iterations=100)
    self.assertAllClose(_apply(rule, corners), [0.0, 0.0], atol=1e-5)
    with_outlier = _apply(rule, corners + [[1000.0, 1000.0]])
    self.assertLess(np.max(np.abs(with_outlier)), 1.0)

  def test_geometric_median_of_three_collinear_points_is_the_middle_one(self):
    rule = robust.Robustness(rule='geometric_median', gm_iterations=200)
    self.assertAllClose(
        _apply(rule, [[0.0, 0.0], [1.0, 0.0], [5.0, 0.0]]), [1.0, 0.0],
        atol=1e-3)

  def test_centered_clipping(self):
    # Around centre (1, 0): differences (3, 4) (norm 5, clipped to (0.6,
    # 0.8)) and (0, 0.5) (kept).
    rule = robust.Robustness(rule='centered_clipping', cc_radius=1.0)
    self.assertAllClose(
        _apply(rule, [[4.0, 4.0], [1.0, 0.5]], center=[1.0, 0.0]),
        [1.0 + 0.3, 0.65])

  def test_nnm_replaces_each_record_by_its_neighbourhood_mean(self):
    mixed = preaggregation.nearest_neighbour_mixing(
        tf.constant([[0.0], [1.0], [3.0], [100.0]]), 1).numpy()
    # n - f = 3 nearest of each (itself included).
    self.assertAllClose(mixed, [[4 / 3], [4 / 3], [4 / 3], [104 / 3]])

  def test_bucketing_averages_groups_of_shuffled_records(self):
    records = tf.constant([[0.0], [1.0], [2.0], [3.0], [4.0]])
    buckets = preaggregation.bucketing(records, 2, _SEED).numpy()
    self.assertEqual(buckets.shape, (3, 1))
    # Two pairs and a single record, together every record once.
    self.assertAllClose(2 * buckets[0] + 2 * buckets[1] + buckets[2], [10.0])
    singles = {float(v) for v in buckets[2]}
    self.assertTrue(singles <= {0.0, 1.0, 2.0, 3.0, 4.0})

  @parameterized.named_parameters(*_RULES.items())
  def test_permutation_invariant(self, robustness):
    if robustness.preaggregation == 'bucketing':
      self.skipTest('bucketing shuffles with its seed: its buckets depend on '
                    'the order of the records by design.')
    rng = np.random.default_rng(0)
    records = rng.normal(size=(9, 4)).astype(np.float32)
    self.assertAllClose(
        _apply(robustness, records),
        _apply(robustness, records[rng.permutation(9)]), atol=1e-5)

  @parameterized.named_parameters(*_RULES.items())
  def test_identical_records_return_that_record(self, robustness):
    record = np.array([0.5, -2.0, 3.0], np.float32)
    center = record if robustness.rule == 'centered_clipping' else None
    self.assertAllClose(
        _apply(robustness, np.tile(record, (7, 1)), center), record,
        atol=1e-5)

  @parameterized.named_parameters(*_RULES.items())
  def test_bounded_when_a_few_records_are_huge(self, robustness):
    # 9 honest records in [-1, 1]^4 and 2 Byzantine ones of size 1e6: the
    # output stays within the honest range (mean-based centered clipping
    # moves by at most 2 tau / n), where the mean moves by ~2e5.
    rng = np.random.default_rng(1)
    honest = rng.uniform(-1, 1, size=(9, 4)).astype(np.float32)
    huge = np.full((2, 4), 1e6, np.float32)
    output = _apply(robustness, np.concatenate([huge, honest]))
    self.assertLess(np.max(np.abs(output)), 1.0 + 1e-5)


class AttacksTest(parameterized.TestCase, tf.test.TestCase):

  _RECORDS = np.array(
      [[1.0, 2.0], [3.0, -1.0], [0.0, 0.0], [2.0, 2.0], [4.0, 1.0]], np.float32)

  def _attack(self, attack, byzantine=2, **kwargs):
    return attacks.attack_updates(
        attack, tf.constant(self._RECORDS), tf.constant(byzantine), _SEED,
        **kwargs).numpy()

  def test_sign_flip_and_scaling_use_their_own_records(self):
    self.assertAllClose(self._attack('sign_flip'), -self._RECORDS[:2])
    self.assertAllClose(
        self._attack('scaling', attack_scale=-3.0), -3.0 * self._RECORDS[:2])

  def test_omniscient_attacks_use_the_honest_records(self):
    honest = self._RECORDS[2:]  # Mean (2, 1), population stddev.
    mean, stddev = honest.mean(axis=0), honest.std(axis=0)
    self.assertAllClose(self._attack('ipm', ipm_epsilon=0.5),
                        np.tile(-0.5 * mean, (2, 1)))
    self.assertAllClose(self._attack('mimic'), np.tile(honest[0], (2, 1)))
    # n = 5, f = 2: s = floor(5 / 2 + 1) - 2 = 1, z = Phi^-1(4 / 5).
    z = scipy.stats.norm.ppf(4 / 5)
    self.assertAllClose(self._attack('alie'), np.tile(mean - z * stddev, (2, 1)),
                        atol=1e-5)

  def test_alie_z_of_the_paper(self):
    # Baruch et al.: n = 50, f = 12 (24%): s = 26 - 12 = 14, z = Phi^-1(36/50).
    self.assertAllClose(attacks.alie_z(50, 12), scipy.stats.norm.ppf(0.72),
                        atol=1e-6)

  def test_gaussian_draws_independent_noise_of_the_stddev(self):
    records = tf.zeros([5000, 40])
    sent = attacks.attack_updates(
        'gaussian', records, tf.constant(4000), _SEED, attack_stddev=2.0
    ).numpy()
    self.assertEqual(sent.shape, (4000, 40))
    # 160000 draws: the stddev's standard error is 2 / sqrt(2 * 160000).
    self.assertAllClose(sent.std(), 2.0, atol=5 * 2.0 / np.sqrt(2 * 160000))
    self.assertAllClose(sent.mean(), 0.0, atol=5 * 2.0 / np.sqrt(160000))

  @parameterized.parameters('sign_flip', 'ipm', 'alie', 'mimic', 'gaussian')
  def test_no_byzantine_record_sends_nothing(self, attack):
    self.assertEqual(self._attack(attack, byzantine=0).shape, (0, 2))

  def test_only_byzantine_records_leave_nothing_to_imitate(self):
    self.assertAllClose(self._attack('ipm', byzantine=5), np.zeros((5, 2)))


if __name__ == '__main__':
  tf.test.main()
