"""Centered clipping (Karimireddy, He & Jaggi 2021, "Learning from History
for Byzantine Robust Optimization").

  v + (1/n) sum_i clip_tau(x_i - v),   clip_tau(u) = u min(1, tau / ||u||),

with the centre v the previous round's released aggregate (zero in round 1).
A Byzantine record moves the result by at most tau / n, whatever it sends.

It is a sum of clipped differences from a public centre, so it also gives
central DP: adding or removing one client moves sum_i clip_tau(x_i - v) by at
most tau, and Gaussian noise z tau on that sum is the Gaussian mechanism of
`aggregators.gaussian` with the same per-round event (DP-BREM, Gu, Li &
Xiong). The centre is post-processing of released rounds. That form is
`GaussianFactory(centered=True)`: the clients clip around the broadcast
centre. This module is the rule applied on the server to gathered records
(no DP, or records already noised by their clients).

Utility under central DP: the centre carries the previous round's noise, of
norm about z tau sqrt(d) / n for d parameters. Each honest difference is
clipped to tau, so a round removes at most about tau of it: when
z sqrt(d) / n exceeds about 1 the centre drifts from round to round, and the
released aggregate with it. Centered clipping with central noise needs
n >~ z sqrt(d) (the README's digits runs: n = 25, d = 2410, so z = 1 drifts
and z = 0.3 does not).
"""

import tensorflow as tf


def centered_clipping(
    records: tf.Tensor, center: tf.Tensor, radius: float
) -> tf.Tensor:
  """[d]: center + the mean of the records' differences from it clipped to
  L2 norm `radius`."""
  differences = records - center[tf.newaxis]
  norms = tf.norm(differences, axis=1, keepdims=True)
  scales = tf.minimum(1.0, radius / tf.maximum(norms, 1e-30))
  return center + tf.reduce_mean(differences * scales, axis=0)
