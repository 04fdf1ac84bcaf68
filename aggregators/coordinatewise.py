"""Coordinate-wise robust rules: the median and the trimmed mean.

Each coordinate of the aggregate is computed from that coordinate of the n
records alone (Yin, Chen, Ramchandran & Bartlett 2018, "Byzantine-Robust
Distributed Learning: Towards Optimal Statistical Rates").

* Median: the middle value of each coordinate (the mean of the two middle
  values when n is even). With f < n / 2 Byzantine records, every coordinate
  of the output lies between two honest values.
* Trimmed mean with trim fraction beta in [0, 1/2): in each coordinate the
  b = floor(beta n) largest and b smallest values are dropped and the rest
  averaged. With f <= b Byzantine records, each coordinate lies between the
  honest minimum and maximum.

Neither is a sum: changing one record can move the median of a coordinate
from one middle value to the next, up to the spread of the records (about the
clip), not clip / n. Central noise calibrated for the mean is therefore not
enough after them; `aggregators.robust` refuses that combination.

Records are a [n, d] float32 matrix, n >= 1.
"""

import tensorflow as tf

from aggregators import checks


def median(records: tf.Tensor) -> tf.Tensor:
  """[d]: the coordinate-wise median of the [n, d] records."""
  n = tf.shape(records)[0]
  ordered = tf.sort(records, axis=0)
  return 0.5 * (ordered[(n - 1) // 2] + ordered[n // 2])


def check_trim_fraction(trim_fraction: float) -> float:
  return checks.check_number(
      trim_fraction, 'trim_fraction', 0, strict=False, maximum=0.5,
      strict_maximum=True,
  )


def trimmed_mean(records: tf.Tensor, trim_fraction: float) -> tf.Tensor:
  """[d]: the mean of each coordinate without its b largest and b smallest
  values, b = floor(trim_fraction * n)."""
  n = tf.shape(records)[0]
  trimmed = tf.cast(
      tf.floor(trim_fraction * tf.cast(n, tf.float64)), tf.int32
  )
  # trim_fraction < 1/2 keeps n - 2b >= 1 for every n >= 1.
  kept = tf.sort(records, axis=0)[trimmed:n - trimmed]
  return tf.reduce_mean(kept, axis=0)
