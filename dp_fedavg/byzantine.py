"""The simulated Byzantine clients of a run: a fixed set, chosen by seed.

`round(fraction * N)` clients of the population of N are Byzantine for the
whole run. Each round the training loop puts the sampled Byzantine clients
first in the cohort (`arrange`) and tells the aggregator how many there are
(`with_count`, the aggregator state's `byzantine_count`): TFF's runtime
gathers the clients' records in cohort order, so the aggregator knows which
records to replace with attack updates (`aggregators.robust`). Under
label_flip the Byzantine clients' data is poisoned instead (`flip_labels`).
"""

import collections
from typing import Optional

import numpy as np
import tensorflow as tf

from aggregators import attacks


class ByzantineClients:
  """Which clients of the population are Byzantine, and what they do."""

  def __init__(
      self, num_clients: int, fraction: float, attack: str, seed: int,
      num_classes: Optional[int] = None,
  ):
    """Initializes the set.

    Args:
      num_clients: the population N.
      fraction: in [0, 1); round(fraction * N) clients are Byzantine.
      attack: one of `attacks.ATTACKS`.
      seed: the run's seed (the set is drawn from its own stream).
      num_classes: C, for label_flip (labels y become C - 1 - y).
    """
    if not 0 <= fraction < 1:
      raise ValueError(f'byzantine_fraction must be in [0, 1), got {fraction}.')
    attacks.check_attack(attack)
    if attack == 'label_flip' and not (num_classes and num_classes >= 2):
      raise ValueError('label_flip needs the task\'s number of classes (>= 2).')
    rng = np.random.default_rng([seed, 0xB12])
    count = round(fraction * num_clients)
    self.members = frozenset(
        rng.choice(num_clients, count, replace=False).tolist())
    self.attack = attack
    self.num_classes = num_classes

  @property
  def poisons_data(self) -> bool:
    return self.attack == 'label_flip'

  def arrange(self, cohort) -> tuple[np.ndarray, int]:
    """(the cohort with its Byzantine clients first, how many they are);
    each part keeps its order."""
    cohort = np.asarray(cohort)
    byzantine = np.array([c in self.members for c in cohort.tolist()], bool)
    return (
        np.concatenate([cohort[byzantine], cohort[~byzantine]]),
        int(byzantine.sum()),
    )

  @staticmethod
  def with_count(state, count: int):
    """The learning state with the aggregator told `count` (no change for an
    aggregator that does not simulate attacks)."""
    aggregator = state.aggregator
    if not isinstance(aggregator, dict) or 'byzantine_count' not in aggregator:
      return state
    aggregator = collections.OrderedDict(aggregator)
    aggregator['byzantine_count'] = np.int32(count)
    return state._replace(aggregator=aggregator)

  def flip_labels(self, labels: tf.Tensor) -> tf.Tensor:
    """label_flip: y -> C - 1 - y."""
    return tf.cast(self.num_classes - 1, labels.dtype) - labels

  def poison(self, dataset: tf.data.Dataset) -> tf.data.Dataset:
    """A client's (features, labels) batches with flipped labels."""
    return dataset.map(lambda x, y: (x, self.flip_labels(y)))
