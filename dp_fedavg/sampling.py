"""Which clients take part in each round.

The accountant must be told the sampling that really happened, so each sampler
names its scheme (`SamplingScheme`) and the accountant derives the DpEvent
from it; see `dp_fedavg.accounting`.
"""

import enum

import numpy as np


# Keeps the dropout draws apart from the sampler's (seed, round) stream.
_DROPOUT_STREAM = 0xD40F


class SamplingScheme(enum.Enum):
  """How a round's cohort is drawn from the population."""

  # Exactly `clients_per_round` clients, uniformly without replacement.
  UNIFORM = 'uniform'
  # Each client independently with probability q = clients_per_round / N.
  POISSON = 'poisson'
  # Every client, every round (clients_per_round is ignored).
  FULL = 'full'
  # Groups of clients_per_round take turns in a fixed (seeded) order, as
  # devices eligible once per period do: no sampling to amplify privacy, but
  # each client's participations are `period` rounds apart.
  CYCLIC = 'cyclic'
  # `groups` groups take turns; each member of the group whose turn it is
  # takes part with probability q = clients_per_round / group size (amplified
  # banded MF, Choquette-Choo et al. 2023).
  CYCLIC_POISSON = 'cyclic_poisson'


CYCLIC_SCHEMES = (SamplingScheme.CYCLIC, SamplingScheme.CYCLIC_POISSON)


class ClientSampler:
  """Draws each round's cohort from client indices 0..num_clients-1.

  Round r's cohort is drawn from its own stream, seeded by (seed, r): a run is
  reproducible given its seed, and a run resumed at round r draws the cohorts
  the uninterrupted run would have. The streams are never shown to the
  aggregator.

  Cyclic: one seeded permutation of the population is cut into
  `period = num_clients // clients_per_round` groups of clients_per_round;
  round r takes group (r - 1) mod period, so a client takes part in rounds
  `period` apart, at most ceil(rounds / period) times. The last
  `num_clients mod clients_per_round` clients of the permutation never take
  part (`left_out`), which keeps every cohort exactly clients_per_round.

  Cyclic Poisson: the permutation is cut into `groups` groups of
  num_clients // groups (the rest left out); round r's cohort is each member
  of group (r - 1) mod groups with probability q = clients_per_round / group
  size, drawn from the round's own stream.
  """

  def __init__(
      self,
      scheme: SamplingScheme,
      num_clients: int,
      clients_per_round: int,
      seed: int,
      groups: int = 0,
  ):
    self.scheme = SamplingScheme(scheme)
    if num_clients < 1:
      raise ValueError(f'num_clients must be >= 1, got {num_clients}.')
    if self.scheme is SamplingScheme.FULL:
      clients_per_round = num_clients
    if not 1 <= clients_per_round <= num_clients:
      raise ValueError(
          f'clients_per_round must be in [1, num_clients={num_clients}], got '
          f'{clients_per_round}.'
      )
    if self.scheme is SamplingScheme.CYCLIC_POISSON:
      if not 1 <= groups <= num_clients // clients_per_round:
        raise ValueError(
            f'cyclic_poisson needs groups in [1, num_clients // '
            f'clients_per_round = {num_clients // clients_per_round}] (a group '
            f'of at least clients_per_round clients), got {groups}.')
    elif groups:
      raise ValueError(
          f'groups apply to cyclic_poisson sampling, not {self.scheme.value}.')
    self.num_clients = num_clients
    self.clients_per_round = clients_per_round
    self.seed = seed
    self.groups = groups
    if self.scheme in CYCLIC_SCHEMES:
      order = np.random.default_rng([seed, 0]).permutation(num_clients)
      self._groups = order[:self.period * self.group_size].reshape(
          self.period, self.group_size)

  @property
  def period(self) -> int:
    """Cyclic schemes: the rounds between two turns of one group."""
    if self.scheme is SamplingScheme.CYCLIC_POISSON:
      return self.groups
    return self.num_clients // self.clients_per_round

  @property
  def group_size(self) -> int:
    """Cyclic schemes: the clients in each group."""
    if self.scheme is SamplingScheme.CYCLIC:
      return self.clients_per_round
    return self.num_clients // self.period

  @property
  def left_out(self) -> int:
    """Cyclic schemes: the clients in no group."""
    return self.num_clients - self.period * self.group_size

  @property
  def sampling_probability(self) -> float:
    """q: each client's chance of taking part in a round (cyclic Poisson:
    in a round of its group's turn)."""
    if self.scheme is SamplingScheme.CYCLIC_POISSON:
      return self.clients_per_round / self.group_size
    return self.clients_per_round / self.num_clients

  def sample(self, round_num: int) -> np.ndarray:
    """Round `round_num`'s cohort (rounds count from 1), sorted client
    indices (may be empty if Poisson)."""
    if self.scheme is SamplingScheme.FULL:
      return np.arange(self.num_clients)
    if self.scheme is SamplingScheme.CYCLIC:
      return np.sort(self._groups[(round_num - 1) % self.period])
    rng = np.random.default_rng([self.seed, round_num])
    if self.scheme is SamplingScheme.CYCLIC_POISSON:
      group = self._groups[(round_num - 1) % self.period]
      return np.sort(
          group[rng.random(self.group_size) < self.sampling_probability])
    if self.scheme is SamplingScheme.UNIFORM:
      cohort = rng.choice(
          self.num_clients, size=self.clients_per_round, replace=False
      )
    else:
      cohort = np.flatnonzero(
          rng.random(self.num_clients) < self.sampling_probability
      )
    return np.sort(cohort)


def reporting_clients(cohort: np.ndarray, dropout_rate: float, seed: int,
                      round_num: int) -> np.ndarray:
  """The clients of round `round_num`'s `cohort` that report: each drops out
  with probability `dropout_rate`, independently, as devices that go offline
  do (seeded by the run's seed and the round, apart from the sampling)."""
  if not dropout_rate:
    return cohort
  rng = np.random.default_rng([seed, round_num, _DROPOUT_STREAM])
  return cohort[rng.random(len(cohort)) >= dropout_rate]
