"""Clip bounds for one client update: flat, per-layer uniform, per-layer adaptive.

A "layer" here is one tensor of the update (a kernel or a bias). With a total
bound S and m layers:

* flat: the whole update is scaled to L2 norm <= S;
* per_layer_uniform: layer j is scaled to L2 norm <= S_j = S / sqrt(m);
* per_layer_adaptive: S_j = S * w_j with w_j proportional to a per-layer scale
  M_j and ||w|| = 1. M_j is the largest magnitude in layer j of the previous
  round's *released* aggregate. That aggregate is already noised, so deriving
  M_j from it is post-processing and costs no privacy budget. Round 1 uses
  uniform shares.

In every strategy sqrt(sum_j S_j^2) = S, so a clipped update has L2 norm <= S
overall and the sum's L2 sensitivity (add/remove one client) is S. The noise
added for the flat bound S therefore gives the same guarantee in all three.
"""

import collections
import enum

import tensorflow as tf


class Clipping(enum.Enum):
  FLAT = 'flat'
  PER_LAYER_UNIFORM = 'per_layer_uniform'
  PER_LAYER_ADAPTIVE = 'per_layer_adaptive'


def uniform_shares(num_layers: int) -> tf.Tensor:
  """w_j = 1 / sqrt(m): S_j = S / sqrt(m)."""
  return tf.fill([num_layers], 1.0 / tf.sqrt(float(num_layers)))


def scales_to_bounds(norms: tf.Tensor, bounds: tf.Tensor) -> tf.Tensor:
  """min(1, bound / norm), elementwise: the factor that brings each norm within
  its bound; a zero bound gives zero, never 0 / 0."""
  return tf.math.divide_no_nan(bounds, tf.maximum(norms, bounds))


def clip_scales(
    norms: tf.Tensor,
    clip: tf.Tensor,
    layer_shares: tf.Tensor,
    clipping: Clipping,
) -> tuple[tf.Tensor, tf.Tensor]:
  """The factors that clip users' updates, and whether each was left as is.

  Args:
    norms: [users, layers], the L2 norm of each layer of each user's update
      (inf where too large to represent: that layer is scaled to zero).
    clip: the total bound S.
    layer_shares: w with ||w|| = 1 (per-layer strategies only).
    clipping: the strategy.

  Returns:
    ([users, layers] factors in [0, 1], [users] bool: no layer was scaled).
  """
  if clipping is Clipping.FLAT:
    total = tf.norm(norms, axis=1)
    scale = scales_to_bounds(total, clip)
    return tf.broadcast_to(scale[:, tf.newaxis], tf.shape(norms)), total <= clip
  bounds = clip * layer_shares
  return (scales_to_bounds(norms, bounds),
          tf.reduce_all(norms <= bounds, axis=1))


def adaptive_shares(released: list[tf.Tensor], previous: tf.Tensor) -> tf.Tensor:
  """w proportional to each layer's largest released magnitude, ||w|| = 1.

  Keeps `previous` when the released aggregate has no usable scale (all zero,
  or not finite).
  """
  scales = tf.stack([tf.reduce_max(tf.abs(t)) for t in released])
  total = tf.norm(scales)
  usable = tf.logical_and(total > 0, tf.math.is_finite(total))
  return tf.where(usable, scales / tf.where(usable, total, 1.0), previous)


def flat_clip_with_counts(norms: tf.Tensor, is_finite: tf.Tensor,
                          clip: tf.Tensor):
  """`skeleton.ClientStep`'s clip rule for one flat bound S: the factors and
  the counts of users scaled (`clipped`), replaced by zeros (`nonfinite`),
  left as they were (`unclipped`, for adaptive clipping) and of all users
  (`participants`)."""
  scales, unclipped = clip_scales(norms, clip, None, Clipping.FLAT)
  return scales, collections.OrderedDict(
      clipped=tf.cast(
          tf.logical_and(is_finite, tf.logical_not(unclipped)), tf.int32),
      nonfinite=tf.cast(tf.logical_not(is_finite), tf.int32),
      unclipped=tf.cast(tf.logical_and(is_finite, unclipped), tf.int32),
      participants=tf.ones_like(norms[:, 0], tf.int32),
  )
