"""The benchmark's reference task: an MLP 784-200-10 on generated client data.

Every client holds `examples_per_client` examples drawn from stateless random
ops seeded by its id, so a client's data exists only while its dataset is
built and memory does not depend on the population. The setting is the one
the performance issues were measured on (50 clients x 64 examples, batch 16).
"""

import math
import statistics
import time

import tensorflow as tf
import tensorflow_federated as tff

from dp_fedavg.tasks import base

FEATURES = 784
HIDDEN = 200
CLASSES = 10
# The benchmarks' local training: one epoch of batch 16.
LOCAL_EPOCHS, BATCH = 1, 16


def _client_data(num_clients: int, examples_per_client: int, salt: int):
  def client_dataset(client_id):
    index = tf.strings.to_number(client_id, tf.int64)
    seed = tf.stack([index, tf.constant(salt, tf.int64)])
    features = tf.random.stateless_normal([examples_per_client, FEATURES], seed)
    labels = tf.random.stateless_uniform(
        [examples_per_client], seed + 1, maxval=CLASSES, dtype=tf.int32
    )
    return tf.data.Dataset.from_tensor_slices((features, labels))

  return tff.simulation.datasets.ClientData.from_clients_and_tf_fn(
      [str(i) for i in range(num_clients)], client_dataset
  )


def build_task(num_clients: int, examples_per_client: int = 64) -> base.FederatedTask:
  def keras_model_fn():
    return tf.keras.Sequential([
        tf.keras.layers.InputLayer(input_shape=(FEATURES,)),
        tf.keras.layers.Dense(HIDDEN, activation='relu'),
        tf.keras.layers.Dense(CLASSES),
    ])

  return base.classification_task(
      'synthetic_mlp', keras_model_fn,
      _client_data(num_clients, examples_per_client, salt=0),
      _client_data(1, examples_per_client, salt=1),
  )


def client_datasets(task: base.FederatedTask, client_ids) -> list:
  """The clients' preprocessed training data (shuffle seed 0)."""
  return [
      task.preprocess(
          task.train_data.create_tf_dataset_for_client(c), LOCAL_EPOCHS, BATCH, 0
      )
      for c in client_ids
  ]


def time_rounds_round_robin(processes: dict, initial_states: dict, task,
                            n: int, repeats: int, rng,
                            return_states: bool = False):
  """Seconds of `repeats` timed rounds of each learning process, after one
  warm-up round from its initial state; the processes take turns each
  round, so drift of the machine's speed affects all alike. Every process
  gets the same n clients' datasets each round. With `return_states`, also
  each process's last state."""
  ids = task.train_data.client_ids
  cohorts = [
      client_datasets(task, [ids[i] for i in rng.choice(len(ids), n,
                                                        replace=False)])
      for _ in range(repeats + 1)
  ]
  states = {name: processes[name].next(initial_states[name], cohorts[0]).state
            for name in processes}
  seconds = {name: [] for name in processes}
  for round_index in range(1, repeats + 1):
    for name, learning_process in processes.items():
      start = time.perf_counter()
      states[name] = learning_process.next(
          states[name], cohorts[round_index]).state
      seconds[name].append(time.perf_counter() - start)
  return (seconds, states) if return_states else seconds


def training_flops_per_example(model: tf.keras.Model) -> float:
  """Multiply-adds x 2 of one forward pass, x 3 for forward plus backward.

  Counts Dense (at every position it is applied to), Conv2D and GRU layers
  (the arithmetic that dominates); the backward pass costs about twice the
  forward one (gradients with respect to inputs and to weights).
  """
  forward = 0.0
  for layer in model.layers:
    if isinstance(layer, tf.keras.layers.Dense):
      positions = math.prod(layer.output_shape[1:-1])
      forward += 2.0 * layer.kernel.shape[0] * layer.kernel.shape[1] * positions
    elif isinstance(layer, tf.keras.layers.Conv2D):
      height, width, out_channels = layer.output_shape[1:]
      kernel_h, kernel_w, in_channels, _ = layer.kernel.shape
      forward += (
          2.0 * height * width * out_channels * kernel_h * kernel_w * in_channels
      )
    elif isinstance(layer, tf.keras.layers.GRU):
      steps = layer.input_shape[1]
      cell = layer.cell
      # Input and recurrent kernels, three gates each, at every step.
      forward += 2.0 * steps * (
          cell.kernel.shape[0] * cell.kernel.shape[1]
          + cell.recurrent_kernel.shape[0] * cell.recurrent_kernel.shape[1]
      )
  return 3 * forward


def matmul_gflops() -> float:
  """Float32 matmul throughput (1024x1024), median of 5, in GFLOP/s."""
  a = tf.random.normal([1024, 1024])
  b = tf.random.normal([1024, 1024])
  tf.matmul(a, b).numpy()
  runs = []
  for _ in range(5):
    start = time.perf_counter()
    for _ in range(10):
      c = tf.matmul(a, b)
    c.numpy()
    runs.append(10 * 2 * 1024**3 / (time.perf_counter() - start) / 1e9)
  return statistics.median(runs)
