r"""The per-user GRU's local step: hand-written backpropagation through time
(and, up to 8 users, Eigen's step products) against autodiff of the
recurrence.

  python -m benchmarks.gru_step --output=BENCHMARKS.md --repeats=15

One SGD step's gradient (forward and backward) of a group of 25 users of
the Shakespeare GRU (`tasks.shakespeare.keras_model_fn`: embedding 8, GRU
128, Dense over the vocabulary), and of 3 users (a round's last steps, where
only a group's largest users still have batches), 16 sequences of 80 tokens
each, with `dp_fedavg.per_user_model`'s forward pass; two such groups at
once on two threads (the in-process engine runs a TFF client per core). The
baseline is the recurrence `per_user_model` used before: `tf.scan` over the
steps, differentiated by TensorFlow. Calls of the two variants alternate; the
report gives each one's median wall time and process CPU time per call (of
both groups), and replaces its own section of `--output`.
"""

import concurrent.futures
import datetime
import json
import resource
import statistics
import sys
import time
from unittest import mock

from absl import app
from absl import flags
import numpy as np
import tensorflow as tf

from benchmarks import report
from dp_fedavg import per_user_model
from dp_fedavg.tasks import shakespeare

_OUTPUT = flags.DEFINE_string('output', 'BENCHMARKS.md', 'Markdown report.')
_JSON = flags.DEFINE_string(
    'json', 'benchmarks/gru_step_results.json', 'Raw numbers.')
_REPEATS = flags.DEFINE_integer('repeats', 15, 'Timed calls per variant.')

BEGIN, END = '<!-- gru step: begin -->', '<!-- gru step: end -->'
_HAND = ('per_user_model: hand-written BPTT, Eigen products up to '
         # pylint: disable-next=protected-access
         f'{per_user_model._FEW_USERS} users')
_AUTODIFF = 'autodiff of tf.scan (before)'
_USER_COUNTS, _BATCH, _GROUPS = (25, 3), 16, 2


def _autodiff_recurrence(inputs, recurrent_kernel, recurrent_bias):
  """The GRU's states as `per_user_model` computed them before, for
  TensorFlow to differentiate."""
  units = recurrent_kernel.shape[1]

  def step(state, x):
    recurrent = tf.matmul(state, recurrent_kernel) + recurrent_bias
    x_z, x_r, x_h = tf.split(x, 3, axis=-1)
    recurrent_z, recurrent_r, recurrent_h = tf.split(recurrent, 3, axis=-1)
    z = tf.sigmoid(x_z + recurrent_z)
    r = tf.sigmoid(x_r + recurrent_r)
    candidate = tf.tanh(x_h + r * recurrent_h)
    return z * state + (1 - z) * candidate

  shape = tf.shape(inputs)
  initial = tf.zeros(tf.stack([shape[1], shape[2], units]), inputs.dtype)
  return tf.scan(step, inputs, initializer=initial)


def _gradient_fn(recurrence, users):
  """A compiled step's gradient of `users` users with `recurrence` as the
  GRU's."""
  # `forward` looks `_gru_recurrence` up when traced, under the patch below.
  forward = per_user_model.build_forward(shakespeare.keras_model_fn)
  rng = np.random.default_rng(0)
  shape = (users, _BATCH, shakespeare.SEQUENCE_LENGTH)
  tokens = tf.constant(rng.integers(0, shakespeare.VOCAB_SIZE, size=shape),
                       tf.int32)
  labels = tf.constant(rng.integers(0, shakespeare.VOCAB_SIZE, size=shape),
                       tf.int32)

  @tf.function
  def gradient(weights):
    with mock.patch.object(per_user_model, '_gru_recurrence', recurrence):
      with tf.GradientTape() as tape:
        tape.watch(weights)
        loss = tf.reduce_sum(tf.keras.losses.sparse_categorical_crossentropy(
            labels, forward(weights, tokens), from_logits=True))
      return tape.gradient(loss, weights)

  return gradient


def _time(users, repeats):
  model = shakespeare.keras_model_fn()
  weights = [tf.constant(np.repeat(w[np.newaxis], users, axis=0))
             for w in model.get_weights()]
  variants = {
      _HAND: _gradient_fn(
          per_user_model._gru_recurrence,  # pylint: disable=protected-access
          users),
      _AUTODIFF: _gradient_fn(_autodiff_recurrence, users),
  }
  threads = concurrent.futures.ThreadPoolExecutor(_GROUPS)

  def call(gradient):
    return list(threads.map(
        lambda _: [g.numpy() for g in gradient(weights)], range(_GROUPS)))

  results = {name: dict(wall=[], cpu=[]) for name in variants}
  first = {name: call(gradient)[0] for name, gradient in variants.items()}
  reference, other = first.values()
  relative = max(float(np.max(np.abs(a - b)) / np.max(np.abs(b)))
                 for a, b in zip(reference, other))
  for repeat in range(repeats):
    for name in list(variants)[::1 if repeat % 2 else -1]:
      before = resource.getrusage(resource.RUSAGE_SELF)
      start = time.perf_counter()
      call(variants[name])
      results[name]['wall'].append(time.perf_counter() - start)
      after = resource.getrusage(resource.RUSAGE_SELF)
      results[name]['cpu'].append(
          after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime)
  return results, relative


def _report(results, command):
  date = datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d')
  relative = max(r['max_relative_difference'] for r in results.values())
  lines = [
      BEGIN, '## The per-user GRU\'s local step: hand-written BPTT', '',
      f'`{command}`, {date}: one SGD step\'s gradient of a group of users '
      f'of the Shakespeare GRU ({_BATCH} sequences of '
      f'{shakespeare.SEQUENCE_LENGTH} tokens each), {_GROUPS} groups at once '
      'on as many threads; calls alternate, medians per call of both groups. '
      'The gradients of the two differ by at most '
      f'{relative:.1e} of their largest entry.', '',
      '| users per group | recurrence | wall, median ms | CPU, median ms '
      '| CPU ratio |',
      '| --- | --- | --- | --- | --- |',
  ]
  for users, result in results.items():
    baseline = statistics.median(result['times'][_AUTODIFF]['cpu'])
    for name, times in result['times'].items():
      cpu = statistics.median(times['cpu'])
      lines.append(
          f'| {users} | {name} | {1000 * statistics.median(times["wall"]):.0f}'
          f' | {1000 * cpu:.0f} | {cpu / baseline:.2f} |')
  lines.append(END)
  return '\n'.join(lines) + '\n'


def main(argv):
  del argv
  command = 'python -m benchmarks.gru_step ' + ' '.join(sys.argv[1:])
  results = {}
  for users in _USER_COUNTS:
    times, relative = _time(users, _REPEATS.value)
    results[users] = dict(times=times, max_relative_difference=relative)
    for name, values in times.items():
      print(f'{users} users, {name}: wall '
            f'{1000 * statistics.median(values["wall"]):.0f} ms, CPU '
            f'{1000 * statistics.median(values["cpu"]):.0f} ms',
            file=sys.stderr, flush=True)
  with open(_JSON.value, 'w') as f:
    json.dump(dict(results=results, command=command), f, indent=1)
  report.replace_section(_OUTPUT.value, BEGIN, END, _report(results, command))


if __name__ == '__main__':
  app.run(main)
