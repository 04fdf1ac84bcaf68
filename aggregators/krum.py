"""Krum and Multi-Krum (Blanchard, El Mhamdi, Guerraoui & Stainer 2017).

Every record i gets the score s_i = sum of its squared L2 distances to its
n - f - 2 nearest other records, f the number of Byzantine records the rule
assumes. Krum returns the record of smallest score; Multi-Krum the mean of
the m records of smallest scores (m = 1 is Krum). With n > 2f + 2 the
selected record is close to the honest ones whatever the f others send.

In federated rounds the cohort size varies (Poisson sampling), so the number
of neighbours is clamped to [1, n - 1] and m to n: a round with too few
records for the assumed f still aggregates, with a weaker guarantee (the
measurements report the cohort). The output is one client's record (Krum),
so one client changing moves it by up to the clip; `aggregators.robust`
refuses central noise after it.

Cost: the n x n distance matrix, O(n^2 d) per round.
"""

import tensorflow as tf


def scores(records: tf.Tensor, assumed_byzantine: int) -> tf.Tensor:
  """[n]: each record's sum of squared distances to its nearest neighbours."""
  n = tf.shape(records)[0]
  squared_norms = tf.reduce_sum(tf.square(records), axis=1)
  distances = (
      squared_norms[:, tf.newaxis] + squared_norms[tf.newaxis, :]
      - 2.0 * tf.matmul(records, records, transpose_b=True)
  )
  distances = tf.maximum(distances, 0.0)  # Rounding can make them negative.
  neighbours = tf.clip_by_value(n - assumed_byzantine - 2, 1, tf.maximum(n - 1, 1))
  # Each row's smallest value is its zero distance to itself: skip it.
  nearest = -tf.math.top_k(-distances, k=tf.minimum(neighbours + 1, n)).values
  return tf.reduce_sum(nearest[:, 1:], axis=1)


def multi_krum(
    records: tf.Tensor, assumed_byzantine: int, selected: int
) -> tf.Tensor:
  """[d]: the mean of the `selected` records of smallest Krum score."""
  n = tf.shape(records)[0]
  best = tf.math.top_k(
      -scores(records, assumed_byzantine), k=tf.minimum(selected, n)
  ).indices
  return tf.reduce_mean(tf.gather(records, best), axis=0)


def krum(records: tf.Tensor, assumed_byzantine: int) -> tf.Tensor:
  """[d]: the record of smallest Krum score."""
  return multi_krum(records, assumed_byzantine, 1)
