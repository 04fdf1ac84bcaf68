"""Per-user forward passes compute each user's Keras model on its examples."""

from absl.testing import parameterized
import numpy as np
import tensorflow as tf

from dp_fedavg import per_user_model
from dp_fedavg.tasks import models
from dp_fedavg.tasks import shakespeare


def _strided_same_conv():
  return tf.keras.Sequential([
      tf.keras.layers.InputLayer(input_shape=(9, 7, 2)),
      tf.keras.layers.Conv2D(6, 3, strides=2, padding='same',
                             activation='relu'),
      tf.keras.layers.GroupNormalization(3, epsilon=0.01),
      tf.keras.layers.MaxPooling2D(2, strides=1, padding='same'),
      tf.keras.layers.Flatten(),
      tf.keras.layers.Dense(5, activation='tanh'),
      tf.keras.layers.Dense(4),
  ])


def _mlp():
  return tf.keras.Sequential([
      tf.keras.layers.InputLayer(input_shape=(12,)),
      tf.keras.layers.Dense(8, activation='relu'),
      tf.keras.layers.Dense(3),
  ])


def _valid_conv():
  return tf.keras.Sequential([
      tf.keras.layers.InputLayer(input_shape=(6, 5, 3)),
      tf.keras.layers.Conv2D(4, (3, 2), strides=(1, 2), padding='valid'),
      tf.keras.layers.Flatten(),
      tf.keras.layers.Dense(2),
  ])


def _token_gru(return_sequences):
  return lambda: tf.keras.Sequential([
      tf.keras.layers.InputLayer(input_shape=(7,), dtype=tf.int32),
      tf.keras.layers.Embedding(11, 4),
      tf.keras.layers.GRU(6, return_sequences=return_sequences),
      tf.keras.layers.Dense(5, activation='relu'),
      tf.keras.layers.Dense(11),
  ])


_COVERED = (
    ('femnist_cnn', lambda: models.group_norm_cnn((28, 28, 1), 62)),
    ('shakespeare_gru', shakespeare.keras_model_fn),
    ('gru_on_every_position', _token_gru(return_sequences=True)),
    ('gru_last_state', _token_gru(return_sequences=False)),
    ('strided_same_conv', _strided_same_conv),
    ('valid_conv', _valid_conv),
    ('mlp', _mlp),
)


def _users(keras_model_fn, users=3, batch=5):
  """`users` Keras models with their own weights, and examples for each."""
  rng = np.random.default_rng(0)
  # Every user's own weights: the model's initial weights, perturbed.
  keras_models = [keras_model_fn() for _ in range(users)]
  for model in keras_models:
    model.set_weights([
        w + rng.normal(scale=0.1, size=w.shape).astype(np.float32)
        for w in model.get_weights()
    ])
  shape = (users, batch, *keras_models[0].input_shape[1:])
  if keras_models[0].inputs[0].dtype.is_integer:
    vocabulary = keras_models[0].layers[0].input_dim
    features = rng.integers(0, vocabulary, size=shape).astype(np.int32)
  else:
    features = rng.normal(size=shape).astype(np.float32)
  return keras_models, tf.constant(features)


def _skip_convolutions_without_gradients(test, keras_model_fn):
  convolutional = any(isinstance(layer, tf.keras.layers.Conv2D)
                      for layer in keras_model_fn().layers)
  if convolutional and not per_user_model.grouped_conv_has_gradients():
    test.skipTest(
        'TF has no CPU gradient for grouped convolutions without oneDNN (not '
        'on this CPU): convolutional models train user by user here.'
    )


class PerUserForwardTest(tf.test.TestCase, parameterized.TestCase):

  def test_convolutions_are_covered_where_tf_differentiates_them(self):
    self.assertEqual(
        per_user_model.build_forward(
            lambda: models.group_norm_cnn((28, 28, 1), 62)) is not None,
        per_user_model.grouped_conv_has_gradients(),
    )

  @parameterized.named_parameters(*_COVERED)
  def test_each_user_gets_its_own_models_output(self, keras_model_fn):
    _skip_convolutions_without_gradients(self, keras_model_fn)
    forward = per_user_model.build_forward(keras_model_fn)
    self.assertIsNotNone(forward)
    keras_models, features = _users(keras_model_fn)
    stacked_weights = [
        tf.stack(per_layer)
        for per_layer in zip(*[m.trainable_weights for m in keras_models])
    ]
    logits = forward(stacked_weights, features)
    for user, model in enumerate(keras_models):
      self.assertAllClose(logits[user], model(features[user]),
                          atol=1e-5, rtol=1e-5)

  @parameterized.named_parameters(
      [(f'{name}_{mode}', keras_model_fn, in_graph, 3)
       for name, keras_model_fn in _COVERED
       # Training runs in a graph, where a custom gradient (the GRU's) takes
       # another route than in eager mode.
       for mode, in_graph in (('eager', False), ('graph', True))]
      # The GRU's step products run on another kernel past a few users.
      + [(f'gru_past_few_users_{mode}', _token_gru(return_sequences=True),
          in_graph, per_user_model._FEW_USERS + 1)  # pylint: disable=protected-access
         for mode, in_graph in (('eager', False), ('graph', True))])
  def test_each_user_gets_its_own_models_gradients(self, keras_model_fn,
                                                   in_graph, users):
    """Training differentiates the forward pass, user by user."""
    _skip_convolutions_without_gradients(self, keras_model_fn)
    forward = per_user_model.build_forward(keras_model_fn)
    keras_models, features = _users(keras_model_fn, users)
    stacked_weights = [
        tf.Variable(tf.stack(per_layer))
        for per_layer in zip(*[m.trainable_weights for m in keras_models])
    ]

    def differentiate():
      with tf.GradientTape() as tape:
        # Each user's loss depends on its own weights only.
        total = tf.reduce_sum(tf.square(forward(stacked_weights, features)))
      return tape.gradient(total, stacked_weights)

    gradients = (tf.function(differentiate)() if in_graph
                 else differentiate())
    for user, model in enumerate(keras_models):
      with tf.GradientTape() as tape:
        loss = tf.reduce_sum(tf.square(model(features[user])))
      expected = tape.gradient(loss, model.trainable_weights)
      for stacked, want in zip(gradients, expected):
        # An embedding's gradient comes as IndexedSlices.
        self.assertAllClose(stacked[user], tf.convert_to_tensor(want),
                            atol=1e-4, rtol=1e-4)

  @parameterized.parameters(True, False)
  def test_step_products_are_matmuls_on_either_kernel(self, few_users):
    rng = np.random.default_rng(0)
    a = rng.normal(size=(4, 5, 6)).astype(np.float32)
    b = rng.normal(size=(4, 6, 7)).astype(np.float32)
    product = tf.function(per_user_model._step_product)(  # pylint: disable=protected-access
        a, b, tf.constant(few_users))
    self.assertAllClose(product, np.matmul(a, b), atol=1e-5, rtol=1e-5)

  @parameterized.named_parameters(
      ('gru_reset_before', lambda: tf.keras.Sequential([
          tf.keras.layers.InputLayer(input_shape=(6,), dtype=tf.int32),
          tf.keras.layers.Embedding(5, 4),
          tf.keras.layers.GRU(3, reset_after=False),
          tf.keras.layers.Dense(2),
      ])),
      ('gru_relu_candidate', lambda: tf.keras.Sequential([
          tf.keras.layers.InputLayer(input_shape=(6,), dtype=tf.int32),
          tf.keras.layers.Embedding(5, 4),
          tf.keras.layers.GRU(3, activation='relu'),
          tf.keras.layers.Dense(2),
      ])),
      ('gru_hard_sigmoid_gates', lambda: tf.keras.Sequential([
          tf.keras.layers.InputLayer(input_shape=(6,), dtype=tf.int32),
          tf.keras.layers.Embedding(5, 4),
          tf.keras.layers.GRU(3, recurrent_activation='hard_sigmoid'),
          tf.keras.layers.Dense(2),
      ])),
      ('lstm', lambda: tf.keras.Sequential([
          tf.keras.layers.InputLayer(input_shape=(6,), dtype=tf.int32),
          tf.keras.layers.Embedding(5, 4),
          tf.keras.layers.LSTM(3),
          tf.keras.layers.Dense(2),
      ])),
      ('masked_embedding', lambda: tf.keras.Sequential([
          tf.keras.layers.InputLayer(input_shape=(6,), dtype=tf.int32),
          tf.keras.layers.Embedding(5, 4, mask_zero=True),
          tf.keras.layers.GRU(3),
          tf.keras.layers.Dense(2),
      ])),
      ('tokens_without_embedding', lambda: tf.keras.Sequential([
          tf.keras.layers.InputLayer(input_shape=(6,), dtype=tf.int32),
          tf.keras.layers.Dense(2),
      ])),
      ('dilated_conv', lambda: tf.keras.Sequential([
          tf.keras.layers.InputLayer(input_shape=(8, 8, 1)),
          tf.keras.layers.Conv2D(2, 3, dilation_rate=2),
          tf.keras.layers.Flatten(),
          tf.keras.layers.Dense(2),
      ])),
      ('dropout', lambda: tf.keras.Sequential([
          tf.keras.layers.InputLayer(input_shape=(4,)),
          tf.keras.layers.Dropout(0.5),
          tf.keras.layers.Dense(2),
      ])),
      ('dense_on_sequences', lambda: tf.keras.Sequential([
          tf.keras.layers.InputLayer(input_shape=(3, 4)),
          tf.keras.layers.Dense(2),
      ])),
      ('dense_on_images', lambda: tf.keras.Sequential([
          tf.keras.layers.InputLayer(input_shape=(4, 4, 1)),
          tf.keras.layers.Dense(2),
      ])),
      ('functional', lambda: tf.keras.Model(*(
          lambda x: (x, tf.keras.layers.Dense(2)(x)))(
              tf.keras.Input(shape=(4,))))),
  )
  def test_other_models_are_not_covered(self, keras_model_fn):
    self.assertIsNone(per_user_model.build_forward(keras_model_fn))


if __name__ == '__main__':
  tf.test.main()
