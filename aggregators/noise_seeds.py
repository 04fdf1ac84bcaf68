"""The seeds of the factories' server noise streams."""

from typing import Optional

import tensorflow as tf


def initial_seed(noise_seed: Optional[int]) -> tf.Tensor:
  """The first state's int64[2] seed; None draws one (no graph seed is set)."""
  if noise_seed is None:
    return tf.random.uniform(
        [2], minval=tf.int64.min, maxval=tf.int64.max, dtype=tf.int64
    )
  return tf.constant([noise_seed, 0], tf.int64)
