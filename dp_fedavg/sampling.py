"""Which clients take part in each round.

The accountant must be told the sampling that really happened, so each sampler
names its scheme (`SamplingScheme`) and the accountant derives the DpEvent
from it; see `dp_fedavg.accounting`.
"""

import enum

import numpy as np


class SamplingScheme(enum.Enum):
  """How a round's cohort is drawn from the population."""

  # Exactly `clients_per_round` clients, uniformly without replacement.
  UNIFORM = 'uniform'
  # Each client independently with probability q = clients_per_round / N.
  POISSON = 'poisson'
  # Every client, every round (clients_per_round is ignored).
  FULL = 'full'


class ClientSampler:
  """Draws each round's cohort from client indices 0..num_clients-1.

  Round r's cohort is drawn from its own stream, seeded by (seed, r): a run is
  reproducible given its seed, and a run resumed at round r draws the cohorts
  the uninterrupted run would have. The streams are never shown to the
  aggregator.
  """

  def __init__(
      self,
      scheme: SamplingScheme,
      num_clients: int,
      clients_per_round: int,
      seed: int,
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
    self.num_clients = num_clients
    self.clients_per_round = clients_per_round
    self.seed = seed

  @property
  def sampling_probability(self) -> float:
    """q: each client's chance of taking part in a round."""
    return self.clients_per_round / self.num_clients

  def sample(self, round_num: int) -> np.ndarray:
    """Round `round_num`'s cohort, sorted client indices (may be empty if Poisson)."""
    if self.scheme is SamplingScheme.FULL:
      return np.arange(self.num_clients)
    rng = np.random.default_rng([self.seed, round_num])
    if self.scheme is SamplingScheme.UNIFORM:
      cohort = rng.choice(
          self.num_clients, size=self.clients_per_round, replace=False
      )
    else:
      cohort = np.flatnonzero(
          rng.random(self.num_clients) < self.sampling_probability
      )
    return np.sort(cohort)
