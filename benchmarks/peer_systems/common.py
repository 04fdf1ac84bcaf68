"""What both peers share: the workload and the round protocol.

The workload is the issue's: an MLP 784-200-10, a population of users with 64
examples each, 50 users per round, 4 SGD steps of batch 16 (one local epoch),
learning rate 0.1, each user's delta clipped to norm 1, Gaussian noise of
standard deviation 1 (noise multiplier 1) on the sum, server learning rate 1.

The protocol lets the driver (`benchmarks.peers`) alternate rounds between
systems that live in different Python environments: the peer prints
`@@ready` once warmed up, then for every `round` line on stdin runs one round
and prints `@@` and its seconds; `stop` ends it. (The `@@` marks the
protocol's lines among what a framework prints itself.)

Runs in the peers' own environment (torch, pfl), not the project's.
"""

import sys

import numpy as np

FEATURES, HIDDEN, CLASSES = 784, 200, 10
EXAMPLES_PER_USER, BATCH, STEPS = 64, 16, 4
USERS_PER_ROUND, POPULATION = 50, 1000
LEARNING_RATE, CLIP, NOISE_MULTIPLIER = 0.1, 1.0, 1.0


def user_data(user: int) -> tuple[np.ndarray, np.ndarray]:
  rng = np.random.default_rng(user)
  return (rng.standard_normal((EXAMPLES_PER_USER, FEATURES), np.float32),
          rng.integers(0, CLASSES, EXAMPLES_PER_USER).astype(np.int64))


PREFIX = '@@'


def say(line: str) -> None:
  print(PREFIX + line, flush=True)


def wait_for_round() -> bool:
  """True when the driver asks for another round, False when it says stop."""
  line = sys.stdin.readline().strip()
  return line == 'round'
