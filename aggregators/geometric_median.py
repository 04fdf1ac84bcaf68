"""The geometric median by smoothed Weiszfeld iterations (RFA).

Robust Federated Aggregation (Pillutla, Kakade & Harchaoui 2022) approximates
argmin_z sum_i ||z - x_i|| with a fixed number of Weiszfeld steps,
  z <- sum_i w_i x_i / sum_i w_i,   w_i = 1 / max(nu, ||z - x_i||),
from the mean; the smoothing nu > 0 keeps a weight finite when z reaches a
record. The geometric median has breakdown point 1/2: fewer than n / 2
Byzantine records move it a bounded distance from the honest ones. One record
changing can move it by up to about the clip, so `aggregators.robust` refuses
central noise after it.

Cost: `iterations` passes over the [n, d] records.
"""

import tensorflow as tf


def geometric_median(
    records: tf.Tensor, iterations: int, smoothing: float
) -> tf.Tensor:
  """[d]: the smoothed Weiszfeld estimate after `iterations` steps."""

  def step(estimate):
    distances = tf.norm(records - estimate[tf.newaxis], axis=1)
    weights = 1.0 / tf.maximum(distances, smoothing)
    return tf.linalg.matvec(records, weights, transpose_a=True) / tf.reduce_sum(
        weights
    )

  return tf.while_loop(
      lambda i, _: i < iterations,
      lambda i, estimate: (i + 1, step(estimate)),
      (tf.constant(0), tf.reduce_mean(records, axis=0)),
  )[1]
