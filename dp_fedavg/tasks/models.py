"""Model architectures shared by tasks."""

import tensorflow as tf


def group_norm_cnn(
    input_shape: tuple[int, ...], num_classes: int, groups: int = 4
) -> tf.keras.Model:
  """The DP-FL study's CNN: 2 conv + 3 dense layers, GroupNorm, tanh.

  GroupNorm instead of BatchNorm because batch statistics mix examples across
  a batch; tanh because bounded activations keep clipped updates informative
  (Papernot et al. 2021, "Tempered sigmoid activations for deep learning with
  differential privacy").
  """
  return tf.keras.Sequential([
      tf.keras.layers.InputLayer(input_shape=input_shape),
      tf.keras.layers.Conv2D(16, 5, activation='tanh'),
      tf.keras.layers.GroupNormalization(groups),
      tf.keras.layers.MaxPooling2D(2),
      tf.keras.layers.Conv2D(32, 5, activation='tanh'),
      tf.keras.layers.GroupNormalization(groups),
      tf.keras.layers.MaxPooling2D(2),
      tf.keras.layers.Flatten(),
      tf.keras.layers.Dense(120, activation='tanh'),
      tf.keras.layers.Dense(84, activation='tanh'),
      tf.keras.layers.Dense(num_classes),
  ])

