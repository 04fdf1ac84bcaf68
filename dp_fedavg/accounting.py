"""Privacy spent by a run: per-round DpEvents, sampling, and epsilon(delta).

The aggregator states its per-round mechanism as a DpEvent under
add/remove-one-client adjacency. This module wraps it in the sampling that was
actually used and composes the rounds with dp-accounting's RDP accountant:

* Poisson sampling with rate q: `PoissonSampledDpEvent(q, event)`, add/remove
  adjacency.
* Fixed-size uniform sampling without replacement of n of N clients:
  `SampledWithoutReplacementDpEvent(N, n, event)`. dp-accounting analyses it
  only under replace-one adjacency, and there its Gaussian formula takes the
  noise relative to the replace-one sensitivity. Replacing one clipped update
  by another moves the sum by up to 2 * clip, twice the add/remove
  sensitivity, so every noise multiplier is halved before composing
  (dp-accounting 0.4.3 does not, and would understate epsilon; see
  google/differential-privacy issue 378). The guarantee is then stated under
  replace-one-client adjacency.

Every parameter is cast to a Python float first: dp-accounting 0.4.3's RDP
accountant silently mis-composes numpy float32 parameters.

RDP composes by addition, so the RDP vector of each distinct round event is
computed once and added per round. Recomposing it each round would cost a full
RDP evaluation per round: 0.25 s for a without-replacement Gaussian over the
default orders (measured here), as long as a training round.
"""

import attr
import dp_accounting
from dp_accounting.rdp import rdp_privacy_accountant
import numpy as np

from dp_fedavg import sampling

_NeighborRel = dp_accounting.NeighboringRelation


def as_python_floats(event: dp_accounting.DpEvent) -> dp_accounting.DpEvent:
  """Returns `event` with every numpy number in it replaced by a Python one."""

  def convert(value):
    if isinstance(value, dp_accounting.DpEvent):
      return as_python_floats(value)
    if isinstance(value, (list, tuple)):
      return type(value)(convert(v) for v in value)
    if isinstance(value, np.integer):
      return int(value)
    if isinstance(value, (np.floating, np.ndarray)):
      return float(value)
    return value

  return attr.evolve(
      event,
      **{f.name: convert(getattr(event, f.name)) for f in attr.fields(type(event))},
  )


def _adds_no_noise(event: dp_accounting.DpEvent) -> bool:
  """Whether some part of `event` releases its input without noise."""
  if isinstance(event, dp_accounting.NonPrivateDpEvent):
    return True
  if isinstance(event, dp_accounting.GaussianDpEvent):
    return event.noise_multiplier == 0
  if isinstance(event, dp_accounting.SelfComposedDpEvent):
    return _adds_no_noise(event.event)
  if isinstance(event, dp_accounting.ComposedDpEvent):
    return any(_adds_no_noise(e) for e in event.events)
  return False


def _for_replace_one(event: dp_accounting.DpEvent) -> dp_accounting.DpEvent:
  """Restates an add/remove event in replace-one terms (sensitivity doubles)."""
  if isinstance(event, dp_accounting.GaussianDpEvent):
    return dp_accounting.GaussianDpEvent(event.noise_multiplier / 2.0)
  if isinstance(event, dp_accounting.SelfComposedDpEvent):
    return dp_accounting.SelfComposedDpEvent(
        _for_replace_one(event.event), event.count
    )
  if isinstance(event, dp_accounting.ComposedDpEvent):
    return dp_accounting.ComposedDpEvent(
        [_for_replace_one(e) for e in event.events]
    )
  raise ValueError(
      f'{event} has no replace-one restatement here; use --sampling=poisson.'
  )


class PrivacyAccountant:
  """Composes per-round events under the run's sampling; reports epsilon."""

  def __init__(
      self,
      scheme: sampling.SamplingScheme,
      num_clients: int,
      clients_per_round: int,
      delta: float,
  ):
    if not 0 < delta < 1:
      raise ValueError(f'delta must be in (0, 1), got {delta}.')
    if not 1 <= clients_per_round <= num_clients:
      raise ValueError(
          f'clients_per_round must be in [1, num_clients={num_clients}], got '
          f'{clients_per_round}.'
      )
    self.scheme = sampling.SamplingScheme(scheme)
    self.num_clients = int(num_clients)
    self.clients_per_round = int(clients_per_round)
    self.delta = float(delta)
    self.neighboring_relation = (
        _NeighborRel.ADD_OR_REMOVE_ONE
        if self.scheme is sampling.SamplingScheme.POISSON
        else _NeighborRel.REPLACE_ONE
    )
    self._orders = np.asarray(rdp_privacy_accountant.DEFAULT_RDP_ORDERS)
    self._rdp = np.zeros_like(self._orders, dtype=np.float64)
    self._rdp_of_round_event: dict[str, np.ndarray] = {}
    self.rounds = 0

  def round_event(self, event: dp_accounting.DpEvent) -> dp_accounting.DpEvent:
    """One round's aggregator event wrapped in this run's sampling."""
    event = as_python_floats(event)
    if _adds_no_noise(event):
      # No sampling makes a noiseless release private; and dp-accounting
      # divides by the noise multiplier for without-replacement sampling.
      return dp_accounting.NonPrivateDpEvent()
    if self.scheme is sampling.SamplingScheme.POISSON:
      return dp_accounting.PoissonSampledDpEvent(
          self.clients_per_round / self.num_clients, event
      )
    return dp_accounting.SampledWithoutReplacementDpEvent(
        self.num_clients, self.clients_per_round, _for_replace_one(event)
    )

  def _rdp_of(self, round_event: dp_accounting.DpEvent) -> np.ndarray:
    key = repr(round_event)
    if key not in self._rdp_of_round_event:
      single = dp_accounting.rdp.RdpAccountant(
          self._orders, neighboring_relation=self.neighboring_relation
      )
      single.compose(round_event)  # Raises for events RDP cannot account.
      # RdpAccountant keeps its RDP vector private; composition adds these
      # vectors, which is what compose() itself does.
      self._rdp_of_round_event[key] = single._rdp  # pylint: disable=protected-access
    return self._rdp_of_round_event[key]

  def compose_round(self, event: dp_accounting.DpEvent) -> None:
    """Adds one round whose aggregator emitted `event` (before sampling)."""
    self._rdp = self._rdp + self._rdp_of(self.round_event(event))
    self.rounds += 1

  def epsilon(self) -> float:
    """Epsilon at `delta` after the composed rounds (inf if none is private)."""
    if self.rounds == 0:
      return 0.0
    epsilon, _ = rdp_privacy_accountant.compute_epsilon(
        self._orders, self._rdp, self.delta
    )
    return float(epsilon)
