r"""A DP-SGD local step against a non-private step, side by side.

  python -m benchmarks.dp_sgd_step --output=BENCHMARKS.md --repeats=20

For the digits MLP (64-32-10) and the FEMNIST CNN (`tasks.models`), on a
batch of 256 random examples: one SGD step on the mean loss (what FedAvg's
clients take) against one DP-SGD step of `dp_fedavg.dp_sgd.LocalDpSgd`
(per-example gradients by each route that fits the model, clipping, noise on
the sum, the update), each a compiled `tf.function` on the same weights.
Steps of all variants alternate; the report gives each variant's median and
its ratio to the non-private step, and replaces its own section of
`--output` (between the markers below).
"""

import datetime
import json
import statistics
import sys
import time

from absl import app
from absl import flags
import numpy as np
import tensorflow as tf

from aggregators import clipping as clipping_lib
from benchmarks import report
from dp_fedavg import dp_sgd
from dp_fedavg.tasks import base
from dp_fedavg.tasks import models

_OUTPUT = flags.DEFINE_string('output', 'BENCHMARKS.md', 'Markdown report.')
_JSON = flags.DEFINE_string(
    'json', 'benchmarks/dp_sgd_step_results.json', 'Raw numbers.')
_REPEATS = flags.DEFINE_integer('repeats', 20, 'Timed steps per variant.')
_BATCH = flags.DEFINE_integer('batch', 256, 'Examples per step.')

BEGIN, END = '<!-- dp-sgd step: begin -->', '<!-- dp-sgd step: end -->'
_BASELINE = 'non-private step'


def _mlp():
  return tf.keras.Sequential([
      tf.keras.layers.InputLayer(input_shape=(64,)),
      tf.keras.layers.Dense(32, activation='relu'),
      tf.keras.layers.Dense(10),
  ])


# Name -> (Keras model, example shape, classes, DP-SGD variants as
# (route, clipping)).
_MODELS = {
    'digits MLP': (_mlp, (64,), 10, (
        (dp_sgd.Route.GHOST, 'flat'), (dp_sgd.Route.COPIES, 'flat'),
        (dp_sgd.Route.COPIES, 'per_layer_uniform'),
        (dp_sgd.Route.JACOBIAN, 'flat'))),
    'FEMNIST CNN': (lambda: models.group_norm_cnn((28, 28, 1), 62),
                    (28, 28, 1), 62, (
        (dp_sgd.Route.COPIES, 'flat'),
        (dp_sgd.Route.COPIES, 'per_layer_uniform'))),
}
# Not timed: the CNN's Jacobian route, which no run takes (the copies route
# fits it); one of its steps took 17.8 s here, 190x the non-private step.


def _task(keras_model_fn):
  return base.classification_task('benchmark', keras_model_fn, None, None)


def _steps(name, batch):
  """Variant name -> a step function of no arguments."""
  keras_model_fn, shape, classes, variants = _MODELS[name]
  rng = np.random.default_rng(0)
  features = tf.constant(rng.random((batch, *shape), np.float32))
  labels = tf.constant(rng.integers(0, classes, batch), tf.int32)
  task = _task(keras_model_fn)
  model = keras_model_fn()
  loss_fn = task.loss_fn()

  @tf.function
  def plain_step():
    with tf.GradientTape() as tape:
      loss = loss_fn(labels, model(features, training=True))
    for variable, gradient in zip(
        model.trainable_variables,
        tape.gradient(loss, model.trainable_variables)):
      variable.assign_sub(0.01 * gradient)

  steps = {_BASELINE: plain_step}
  for route, clipping in variants:
    local = dp_sgd.LocalDpSgd(
        task, dp_sgd.DpSgdConfig(1.0, 1.0, clipping, batch, 1), 0.01, route)
    shares = clipping_lib.uniform_shares(len(local.model.trainable_variables))

    @tf.function
    def dp_step(local=local, shares=shares):
      sums, _, _ = local.clipped_sum(features, labels, shares)
      for variable, total in zip(local.model.trainable_variables, sums):
        noise = tf.random.normal(tf.shape(total))
        variable.assign_sub(0.01 * (total + noise) / batch)

    steps[f'DP-SGD, {route.value} route, {clipping}'] = dp_step
  return steps


def _time(steps, repeats):
  for step in steps.values():  # Traced and warmed up.
    step()
    step()
  times = {name: [] for name in steps}
  for _ in range(repeats):
    for name, step in steps.items():
      start = time.perf_counter()
      step()
      times[name].append(time.perf_counter() - start)
  return times


def _report(results, command, batch):
  lines = [
      BEGIN,
      '## DP-SGD local step against a non-private step',
      '',
      f'`{command}`, {datetime.date.today()}: median milliseconds of one '
      f'local step on {batch} examples (ratio to the non-private step), '
      'variants alternating. The route each run takes is the first that fits '
      '(`dp_fedavg/dp_sgd.py`): ghost for flat clipping of Dense models, '
      'copies for the per-layer strategies and the CNN.',
      '',
      '| model | step | median ms | ratio |',
      '| --- | --- | --- | --- |',
  ]
  for model, times in results.items():
    baseline = statistics.median(times[_BASELINE])
    for name, values in times.items():
      median = statistics.median(values)
      lines.append(f'| {model} | {name} | {1000 * median:.2f} | '
                   f'{median / baseline:.2f}x |')
  lines.append(END)
  return '\n'.join(lines) + '\n'


def main(argv):
  del argv
  command = 'python -m benchmarks.dp_sgd_step ' + ' '.join(sys.argv[1:])
  results = {}
  for name in _MODELS:
    results[name] = _time(_steps(name, _BATCH.value), _REPEATS.value)
    for variant, times in results[name].items():
      print(f'{name} {variant}: median {1000 * statistics.median(times):.2f} ms',
            file=sys.stderr, flush=True)
  with open(_JSON.value, 'w') as f:
    json.dump(results, f, indent=1)
  report.replace_section(
      _OUTPUT.value, BEGIN, END, _report(results, command, _BATCH.value))


if __name__ == '__main__':
  app.run(main)
