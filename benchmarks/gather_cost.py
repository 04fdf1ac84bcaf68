"""How the gathering rules' cost grows with the cohort, aggregation alone.

  python -m benchmarks.gather_cost

Times one `process.next` of the aggregation process alone (no training) on
updates of the synthetic MLP's size (159,010 values) at 50, 100 and 200
clients: gaussian_fixed (a sum) against the median and Krum without DP, which
gather every client's record (`aggregators.robust.GatheredRecords`). One
warm-up round, then the median of three.
"""

import statistics
import time

import numpy as np
import tensorflow_federated as tff

from aggregators import gaussian
from aggregators import robust
from dp_fedavg import execution

_DIMENSION = 159_010


def main() -> None:
  value_type = tff.TensorType(np.float32, [_DIMENSION])
  with execution.local_execution():
    for n in (50, 100, 200):
      values = [np.random.default_rng(i).normal(size=_DIMENSION).astype(np.float32)
                for i in range(n)]
      factories = {
          'gaussian_fixed': gaussian.GaussianFactory(1.0, 1.0, n, noise_seed=0),
          'median': robust.RobustMeanFactory(robust.Robustness(rule='median')),
          'krum': robust.RobustMeanFactory(
              robust.Robustness(rule='krum', assumed_byzantine=2)),
      }
      for name, factory in factories.items():
        process = factory.create(value_type)
        state = process.initialize()
        process.next(state, values)
        seconds = []
        for _ in range(3):
          start = time.perf_counter()
          process.next(state, values)
          seconds.append(time.perf_counter() - start)
        print(f'n={n} {name}: median {statistics.median(seconds):.2f}s',
              flush=True)


if __name__ == '__main__':
  main()
