"""Privacy spent by a run: mechanisms' ledgers, sampling, and epsilon(delta).

A mechanism declares how its privacy composes with one of three ledgers
(built by its registry entry, `aggregators.registry`, from the same
parameters as its factory):
* `SampledRounds`: independent rounds, each a DpEvent under
  add/remove-one-client adjacency, amplified by the run's sampling (below);
* `LocalRounds`: local DP, each participant's own message private on its
  own, composed per participation without amplification, under replace-one
  adjacency;
* `RunLevel`: one event for the whole run, built from the participation that
  actually happened, with no amplification, under the adjacency the
  mechanism names (zero-out for tree aggregation and matrix factorization).
`PrivacyLedger` binds a mechanism's ledger to a run: the loop records each
round (the aggregator's state and the cohort), asks for "epsilon if the next
round ran" for the budget stop, and `calibrate_noise` finds the noise that
meets a target, for every kind. The reported adjacency (`Adjacency`) follows
from the ledger and the sampling and is written with every result.

Per-round events are wrapped in the sampling that was actually used and
composed with dp-accounting (`PrivacyAccountant`):

* Poisson sampling with rate q: `PoissonSampledDpEvent(q, event)`, stated
  under add/remove-one-client adjacency.
* Fixed-size uniform sampling without replacement of n of N clients:
  `SampledWithoutReplacementDpEvent(N, n, event)`. dp-accounting analyses it
  only under replace-one adjacency, and there its Gaussian formula takes the
  noise relative to the replace-one sensitivity. Replacing one clipped update
  by another moves the sum by up to 2 * clip, twice the add/remove
  sensitivity, so every noise multiplier is halved before composing
  (dp-accounting 0.4.3 does not, and would understate epsilon; see
  google/differential-privacy issue 378). The guarantee is then stated under
  replace-one-client adjacency. Only RDP accounts this sampling.
* Full participation (every client every round): the event itself, under
  add/remove adjacency.
* Cyclic participation (`sampling.SamplingScheme.CYCLIC`, and
  `CYCLIC_POISSON`, Poisson sampling within the group whose turn it is):
  accounted only by run-level ledgers; independent-round mechanisms are
  refused under them.
* Local DP (`local_dp=True`, client-side noise): the aggregator's event
  already describes one client's own message under replacement of its update.
  The server knows who took part, so sampling amplifies nothing: the events
  of the rounds a client takes part in are composed as they are. The epsilon
  reported is for a client that takes part in every round.

Accountants: RDP (`dp_accounting.rdp`) and PLD (`dp_accounting.pld`). Both give
valid upper bounds on epsilon, so `AUTO` reports the smaller of those that
support the run's events. PLD needs two rewrites that RDP does internally:
a Poisson-sampled composition of Gaussians (adaptive clipping's event) is the
Gaussian mechanism with z_eff = (sum z_i^-2)^(-1/2), since both act on the same
sample; and events are otherwise passed as they are.

Distributed DP (`aggregators.distributed_dp.DistributedDpEvent`) is not a
dp-accounting event: it states its own RDP curve eps(alpha) (any event with
`rdp(order)` and `for_replace_one()` is treated so). Its noise is shared by a
fixed number of clients, so it is accounted only under fixed-size sampling
(replace-one adjacency): q = n / N, with the general bound for sampling
without replacement of Wang, Balle & Kasiviswanathan 2019 (Theorem 9),
eps'(alpha) <= log(1 + q^2 C(alpha, 2) min(4 (e^eps(2) - 1), 2 e^eps(2))
+ sum_{j=3}^alpha 2 q^j C(alpha, j) e^((j-1) eps(j))) / (alpha - 1), at
integer orders (a fractional order uses the next integer: RDP grows with the
order). RDP only.

Every parameter is cast to a Python float first: dp-accounting 0.4.3
silently mis-composes numpy float32 parameters.

Cost: composition is per distinct round event, not per round. The RDP vector
and the one-round PLD of each distinct event are computed once (0.25 s and
0.4 s for the slowest here); a round then costs a vector addition (RDP) or a
self-composition by the round count (PLD, ~0.1 s at 1,000 rounds).
Gaussian PLDs are built by `gaussian_pld`: dp-accounting's own construction
with its per-point Python loop vectorized, the same PMF (for q = 0.3: 1.3 s
to 0.07 s at z = 1, 27 s to 1.2-2.9 s at z = 0.1, where the first build in a
process pays for fresh memory), which also makes PLD noise calibration, one
PLD per trial z, that much faster.
A run-level event that is one Gaussian mechanism (tree aggregation and
matrix factorization) changes with the realised participation, up to every
round; its PLD epsilon is the Gaussian's exact one (`gaussian_epsilon`),
3 ms instead of 0.1 to 5 s for a discretised PLD.
"""

import dataclasses
import enum
import importlib
import json
import math
from typing import Any, Callable, Optional, Sequence, Union

import attr
import dp_accounting
from dp_accounting import mechanism_calibration
from dp_accounting.pld import common as pld_common
from dp_accounting.pld import pld_pmf
from dp_accounting.pld import privacy_loss_distribution
from dp_accounting.pld import privacy_loss_mechanism
from dp_accounting.rdp import rdp_privacy_accountant
import numpy as np
from scipy import fft as scipy_fft
from scipy import special

from dp_fedavg import correlated_noise
from dp_fedavg import gaussian_pld
from dp_fedavg import sampling

_NeighborRel = dp_accounting.NeighboringRelation
_PLD_DISCRETIZATION = 1e-4
# Below this, epsilon is huge and PLD discretization slow; a target that needs
# less noise is not a DP target.
_MIN_CALIBRATED_NOISE = 0.05


class AccountantKind(enum.Enum):
  AUTO = 'auto'
  RDP = 'rdp'
  PLD = 'pld'


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


def _has_rdp_curve(event: dp_accounting.DpEvent) -> bool:
  """Whether `event` states its own RDP (see the module docstring)."""
  return hasattr(event, 'rdp') and hasattr(event, 'for_replace_one')


def _curve_of(round_event) -> Optional[tuple[dp_accounting.DpEvent, float]]:
  """(curve event, sampling ratio q) of a round event built on one; or None."""
  if _has_rdp_curve(round_event):
    return round_event, 1.0
  if isinstance(
      round_event, dp_accounting.SampledWithoutReplacementDpEvent
  ) and _has_rdp_curve(round_event.event):
    return (
        round_event.event,
        round_event.sample_size / round_event.source_dataset_size,
    )
  return None


def sampled_without_replacement_rdp(
    rdp_of_order: Callable[[int], float], q: float, orders: np.ndarray
) -> np.ndarray:
  """RDP at `orders` of a mechanism run on n of N records (q = n / N).

  The general upper bound of Wang, Balle & Kasiviswanathan 2019 (Theorem 9,
  for mechanisms with unbounded eps(inf)), never above the unsampled RDP.
  """
  integer_orders = np.ceil(np.asarray(orders, np.float64)).astype(int)
  highest = int(integer_orders.max())
  eps = np.array([0.0, 0.0] + [rdp_of_order(j) for j in range(2, highest + 1)])
  if q >= 1:
    return eps[integer_orders]
  log_q = math.log(q)
  result = []
  for alpha in integer_orders:
    terms = [0.0]
    if alpha >= 2:
      log_expm1_eps2 = eps[2] + math.log(-math.expm1(-eps[2])) if eps[2] > 0 else -math.inf
      terms.append(
          2 * log_q + _log_comb(alpha, 2)
          + min(math.log(4) + log_expm1_eps2, eps[2] + math.log(2))
      )
    for j in range(3, alpha + 1):
      terms.append(
          math.log(2) + j * log_q + _log_comb(alpha, j) + (j - 1) * eps[j]
      )
    sampled = special.logsumexp(terms) / (alpha - 1)
    result.append(min(sampled, eps[alpha]))
  return np.array(result)


def _log_comb(n: int, k: int) -> float:
  return special.gammaln(n + 1) - special.gammaln(k + 1) - special.gammaln(n - k + 1)


def _adds_no_noise(event: dp_accounting.DpEvent) -> bool:
  """Whether some part of `event` releases its input without noise."""
  if _has_rdp_curve(event):
    return event.adds_no_noise()
  if isinstance(event, dp_accounting.NonPrivateDpEvent):
    return True
  if isinstance(event, (dp_accounting.GaussianDpEvent,
                        dp_accounting.LaplaceDpEvent)):
    return event.noise_multiplier == 0
  if isinstance(event, dp_accounting.SelfComposedDpEvent):
    return _adds_no_noise(event.event)
  if isinstance(event, dp_accounting.ComposedDpEvent):
    return any(_adds_no_noise(e) for e in event.events)
  return False


def _for_replace_one(event: dp_accounting.DpEvent) -> dp_accounting.DpEvent:
  """Restates an add/remove event in replace-one terms (sensitivity doubles)."""
  if _has_rdp_curve(event):
    return event.for_replace_one()
  if isinstance(event, (dp_accounting.GaussianDpEvent,
                        dp_accounting.LaplaceDpEvent)):
    return type(event)(event.noise_multiplier / 2.0)
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


def _effective_gaussian(event: dp_accounting.DpEvent) -> Optional[float]:
  """z_eff if `event` is Gaussians composed on one input, else None.

  A single-epoch tree (no record twice in it) is the Gaussian mechanism on
  the tree's nodes with sensitivity^2 its depth, ceil(log2(steps + 1)) for
  the largest of its step counts: z / sqrt(depth), as dp-accounting's RDP
  of the event states.
  """
  if isinstance(event, dp_accounting.GaussianDpEvent):
    return event.noise_multiplier
  if isinstance(event, dp_accounting.SingleEpochTreeAggregationDpEvent):
    counts = event.step_counts
    steps = max(counts) if isinstance(counts, (list, tuple)) else counts
    return event.noise_multiplier / math.sqrt(math.ceil(math.log2(steps + 1)))
  if isinstance(event, dp_accounting.SelfComposedDpEvent):
    inner = _effective_gaussian(event.event)
    return None if inner is None else inner / math.sqrt(event.count)
  if isinstance(event, dp_accounting.ComposedDpEvent):
    parts = [_effective_gaussian(e) for e in event.events]
    if any(p is None for p in parts):
      return None
    return sum(p**-2 for p in parts) ** -0.5
  return None


def gaussian_epsilon(noise_multiplier: float, delta: float) -> float:
  """The exact epsilon at `delta` of one Gaussian mechanism with noise z.

  dp-accounting's hockey-stick divergence of `GaussianPrivacyLoss` is the
  analytic one (Balle & Wang 2018): delta(eps) = Phi(1/(2z) - eps z) -
  e^eps Phi(-1/(2z) - eps z). Its inverse is searched to 1e-9 (the returned
  epsilon meets `delta`). Why not `PLDAccountant`: it discretises the same
  loss, 0.1 s (z = 1) to 5 s (z = 0.09) per new z even as `gaussian_pld`
  builds it, and run-level ledgers ask for a new z up to every round; the
  discretised value is above this one by under 1e-6 relative for z <= 30.
  """
  if noise_multiplier == 0:
    return math.inf
  loss = privacy_loss_mechanism.GaussianPrivacyLoss(
      standard_deviation=float(noise_multiplier), sensitivity=1.0)
  epsilon = pld_common.inverse_monotone_function(
      loss.get_delta_for_epsilon, delta,
      pld_common.BinarySearchParameters(
          0.0, math.inf, initial_guess=1.0, tolerance=1e-9))
  return math.inf if epsilon is None else float(epsilon)


def _for_pld(event: dp_accounting.DpEvent) -> dp_accounting.DpEvent:
  if isinstance(event, dp_accounting.PoissonSampledDpEvent):
    z_eff = _effective_gaussian(event.event)
    if z_eff is not None:
      return dp_accounting.PoissonSampledDpEvent(
          event.sampling_probability, dp_accounting.GaussianDpEvent(z_eff)
      )
  return event


def _dense_epsilon_for_delta(pmf, delta: float) -> float:
  """dp-accounting's `DensePLDPmf.get_epsilon_for_delta`, vectorized.

  dp-accounting 0.4.3 walks the PMF in a Python loop (about 40 ms per call
  on a 30-round composition, each round in the training loop); this is its
  scan with cumulative sums, in the same order of additions, so the masses
  are the same floats. The scan goes from the largest loss down: it stops
  before the first loss l with log((M_up - delta) / M_low) >= l, or returns
  that loss after the first one whose added mass leaves M_low at 0.
  """
  # pylint: disable=protected-access
  infinity_mass = pmf._infinity_mass
  if infinity_mass > delta:
    return math.inf
  probs = np.flip(pmf._probs)
  step = pmf._discretization
  upper_loss = (pmf._lower_loss + len(probs) - 1) * step
  # itertools.count(upper_loss, -step), as the library counts: by additions.
  losses = np.cumsum(np.concatenate([[upper_loss], np.full(len(probs) - 1, -step)]))
  mass_upper = np.cumsum(np.concatenate([[infinity_mass], probs]))
  mass_lower = np.cumsum(np.concatenate([[0.0], np.exp(-losses) * probs]))
  before_upper, before_lower = mass_upper[:-1], mass_lower[:-1]
  with np.errstate(divide='ignore', invalid='ignore'):
    stops = ((before_upper > delta) & (before_lower > 0)
             & (np.log((before_upper - delta) / before_lower) >= losses))
  vanishing = (mass_upper[1:] >= delta) & (mass_lower[1:] == 0)
  first_stop = int(np.argmax(stops)) if stops.any() else len(probs)
  first_vanishing = int(np.argmax(vanishing)) if vanishing.any() else len(probs)
  if first_vanishing < first_stop:
    return max(0, float(losses[first_vanishing]))
  upper, lower = mass_upper[first_stop], mass_lower[first_stop]
  if upper <= lower + delta:
    return 0
  return math.log((upper - delta) / lower)


class _DenseSelfComposition:
  """dp-accounting's `DensePLDPmf.self_compose(count)` of one PMF, any count.

  The training loop composes the same round's PMF once more every round.
  dp-accounting 0.4.3 then recomputes the PMF's log moment-generating
  function at 40 orders (its Chernoff truncation bounds; 20 ms of a 60 ms
  epsilon at round 20) and transforms the real PMF with a complex FFT. Here
  the log-MGFs are computed once, and the FFT is a real one (half the
  work): the same bounds, the same truncation, the same PMF up to float64
  rounding (tested against the library's).
  """

  _TAIL_MASS_TRUNCATION = 1e-15  # DensePLDPmf.self_compose's default.

  def __init__(self, pmf: pld_pmf.DensePLDPmf):
    # pylint: disable=protected-access
    self._pmf = pmf
    probs = pmf._probs
    # pld_common.compute_self_convolve_bounds's orders.
    self._orders = np.concatenate(
        (np.arange(-20, 0), np.arange(1, 21))) / len(probs)
    self._log_mgfs = [
        special.logsumexp(np.arange(len(probs)) * order, b=probs)
        for order in self._orders
    ]

  def _bounds(self, count: int) -> tuple[int, int]:
    """pld_common.compute_self_convolve_bounds with the cached log-MGFs."""
    lower, upper = 0, (len(self._pmf._probs) - 1) * count  # pylint: disable=protected-access
    for order, log_mgf in zip(self._orders, self._log_mgfs):
      bound = (count * log_mgf
               + math.log(2 / self._TAIL_MASS_TRUNCATION)) / order
      if order > 0:
        upper = min(upper, math.ceil(bound))
      else:
        lower = max(lower, math.floor(bound))
    return lower, upper

  def __call__(self, count: int) -> pld_pmf.DensePLDPmf:
    # pylint: disable=protected-access
    pmf = self._pmf
    lower, upper = self._bounds(count)
    output_len = upper - lower + 1
    fast_len = scipy_fft.next_fast_len(
        max(output_len, len(pmf._probs)), real=True)
    convolution = scipy_fft.irfft(
        scipy_fft.rfft(pmf._probs, fast_len) ** count, fast_len)
    probs = np.roll(convolution, -lower)[:output_len]
    infinity_mass = (self._TAIL_MASS_TRUNCATION
                     - math.expm1(count * math.log1p(-pmf._infinity_mass)))
    return pld_pmf.DensePLDPmf(
        pmf._discretization, pmf._lower_loss * count + lower, probs,
        infinity_mass, pmf._pessimistic_estimate)


def _self_composition(pld) -> Callable[[int], Any]:
  """count -> `pld.self_compose(count)`, by `_DenseSelfComposition` where
  the PMFs are dense."""
  # pylint: disable=protected-access
  pmfs = [pld._pmf_remove] + ([] if pld._symmetric else [pld._pmf_add])
  if not all(isinstance(pmf, pld_pmf.DensePLDPmf) for pmf in pmfs):
    return pld.self_compose
  composers = [_DenseSelfComposition(pmf) for pmf in pmfs]
  return lambda count: privacy_loss_distribution.PrivacyLossDistribution(
      *(compose(count) for compose in composers))


def pld_epsilon(pld, delta: float) -> float:
  """`pld.get_epsilon_for_delta(delta)`, dense PMFs by the vectorized scan."""
  # pylint: disable=protected-access
  pmfs = [pld._pmf_remove] + ([] if pld._symmetric else [pld._pmf_add])
  return max(
      _dense_epsilon_for_delta(pmf, delta)
      if isinstance(pmf, pld_pmf.DensePLDPmf) else pmf.get_epsilon_for_delta(delta)
      for pmf in pmfs
  )


class PrivacyAccountant:
  """Composes per-round events under the run's sampling; reports epsilon."""

  def __init__(
      self,
      scheme: sampling.SamplingScheme,
      num_clients: int,
      clients_per_round: int,
      delta: float,
      kind: AccountantKind = AccountantKind.AUTO,
      local_dp: bool = False,
  ):
    if not 0 < delta < 1:
      raise ValueError(f'delta must be in (0, 1), got {delta}.')
    self.scheme = sampling.SamplingScheme(scheme)
    if self.scheme is not sampling.SamplingScheme.FULL and not (
        1 <= clients_per_round <= num_clients
    ):
      raise ValueError(
          f'clients_per_round must be in [1, num_clients={num_clients}], got '
          f'{clients_per_round}.'
      )
    self.num_clients = int(num_clients)
    self.clients_per_round = (
        self.num_clients if self.scheme is sampling.SamplingScheme.FULL
        else int(clients_per_round)
    )
    self.delta = float(delta)
    self.kind = AccountantKind(kind)
    self.local_dp = local_dp
    self.neighboring_relation = (
        _NeighborRel.REPLACE_ONE
        if local_dp or self.scheme is sampling.SamplingScheme.UNIFORM
        else _NeighborRel.ADD_OR_REMOVE_ONE
    )
    self._orders = np.asarray(rdp_privacy_accountant.DEFAULT_RDP_ORDERS)
    # Distinct round events (by repr) -> [event, rounds composed].
    self._history: dict[str, list] = {}
    self._rdp_of_event: dict[str, np.ndarray] = {}
    self._pld_of_event: dict[str, object] = {}
    self._last_epsilons: tuple[tuple, dict[str, float]] = ((), {})
    self.rounds = 0

  def round_event(self, event: dp_accounting.DpEvent) -> dp_accounting.DpEvent:
    """One round's aggregator event wrapped in this run's sampling."""
    event = as_python_floats(event)
    if _adds_no_noise(event):
      # No sampling makes a noiseless release private; and dp-accounting
      # divides by the noise multiplier for without-replacement sampling.
      return dp_accounting.NonPrivateDpEvent()
    if _has_rdp_curve(event) and (
        self.local_dp or self.scheme is not sampling.SamplingScheme.UNIFORM
    ):
      raise ValueError(
          f'{type(event).__name__}: the noise is shared by a fixed number of '
          'clients, so it is accounted only under fixed-size sampling; use '
          '--sampling=uniform (with --clients_per_round=--num_clients for '
          'every client every round).'
      )
    if self.local_dp:
      return event
    if self.scheme in sampling.CYCLIC_SCHEMES:
      raise ValueError(
          f'{self.scheme.value} participation is accounted by the '
          'correlated-noise mechanisms (dp_ftrl_tree, banded_mf; '
          'banded_mf with --mf_bands=1 is DP-SGD without amplification); '
          'independent-round mechanisms are accounted with --sampling='
          'poisson, uniform or full.'
      )
    if self.scheme is sampling.SamplingScheme.POISSON:
      return dp_accounting.PoissonSampledDpEvent(
          self.clients_per_round / self.num_clients, event
      )
    if self.scheme is sampling.SamplingScheme.UNIFORM:
      return dp_accounting.SampledWithoutReplacementDpEvent(
          self.num_clients, self.clients_per_round, _for_replace_one(event)
      )
    return event

  def supported_kinds(self, event: dp_accounting.DpEvent) -> list[AccountantKind]:
    """The accountants that can account a round with aggregator `event`."""
    return self._supported_kinds_of([self.round_event(event)])

  def check_supported(self, event: dp_accounting.DpEvent) -> None:
    """Raises ValueError if this accountant cannot account `event` rounds."""
    supported = self.supported_kinds(event)
    if not supported:
      raise ValueError(
          f'no accountant supports {self.round_event(event)} under '
          f'{self.scheme.value} sampling; use --sampling=poisson or '
          '--sampling=full.'
      )
    if self.kind is not AccountantKind.AUTO and self.kind not in supported:
      raise ValueError(
          f'the {self.kind.value} accountant does not support '
          f'{self.round_event(event)} under {self.scheme.value} sampling; '
          f'use one of: {", ".join(k.value for k in supported)}.'
      )

  def _supported_kinds_of(self, round_events) -> list[AccountantKind]:
    kinds = []
    rdp = dp_accounting.rdp.RdpAccountant(
        neighboring_relation=self.neighboring_relation
    )
    if all(
        _curve_of(e) is not None or rdp.supports(e) for e in round_events
    ):
      kinds.append(AccountantKind.RDP)
    if any(_curve_of(e) is not None for e in round_events):
      return kinds
    # PLD's own sampled events assume add/remove; unsampled Gaussian and
    # Laplace PLDs are symmetric, so they also serve local (replace) DP.
    pld_relation_ok = (
        self.local_dp
        or self.neighboring_relation is _NeighborRel.ADD_OR_REMOVE_ONE
    )
    if pld_relation_ok and all(
        dp_accounting.pld.PLDAccountant().supports(_for_pld(e))
        for e in round_events
    ):
      kinds.append(AccountantKind.PLD)
    return kinds

  def _kinds_in_use(self, round_events) -> list[AccountantKind]:
    """The supported accountants, narrowed to the chosen one unless AUTO."""
    return [
        kind for kind in self._supported_kinds_of(round_events)
        if self.kind in (AccountantKind.AUTO, kind)
    ]

  def _new_accountant(self, kind: AccountantKind):
    return _new_accountant(kind, self.neighboring_relation)

  def _single_round_rdp(self, key: str, round_event) -> np.ndarray:
    curve = _curve_of(round_event)
    if key not in self._rdp_of_event and curve is not None:
      event, q = curve
      self._rdp_of_event[key] = sampled_without_replacement_rdp(
          event.rdp, q, self._orders
      )
    if key not in self._rdp_of_event:
      single = self._new_accountant(AccountantKind.RDP)
      single.compose(round_event)
      # RdpAccountant keeps its RDP vector private; composition adds these
      # vectors, which is what compose() itself does.
      self._rdp_of_event[key] = single._rdp  # pylint: disable=protected-access
    return self._rdp_of_event[key]

  def _single_round_pld(self, key: str, round_event) -> Callable[[int], Any]:
    """count -> the PLD of `count` rounds of `round_event`."""
    if key not in self._pld_of_event:
      single = self._new_accountant(AccountantKind.PLD)
      single.compose(_for_pld(round_event))
      # As above: the accountant's PrivacyLossDistribution is private; its
      # self_compose(count) is what compose(event, count) does.
      self._pld_of_event[key] = _self_composition(single._pld)  # pylint: disable=protected-access
    return self._pld_of_event[key]

  def _epsilons_of(self, history: dict[str, list]) -> dict[str, float]:
    """Epsilon at `delta` by every accountant that supports `history`."""
    if not history:
      kind = AccountantKind.RDP if self.kind is AccountantKind.AUTO else self.kind
      return {kind.value: 0.0}
    key = tuple((k, count) for k, (_, count) in history.items())
    if self._last_epsilons[0] == key:
      return self._last_epsilons[1]
    events = [event for event, _ in history.values()]
    if any(isinstance(e, dp_accounting.NonPrivateDpEvent) for e in events):
      result = {AccountantKind.RDP.value: math.inf,
                AccountantKind.PLD.value: math.inf}
      self._last_epsilons = (key, result)
      return result
    kinds = self._kinds_in_use(events)
    if not kinds:
      raise ValueError(
          f'the {self.kind.value} accountant cannot account {events}; see '
          'check_supported().'
      )
    result = {}
    if AccountantKind.RDP in kinds:
      try:
        rdp = sum(
            (count * self._single_round_rdp(k, event)
             for k, (event, count) in history.items()),
            np.zeros_like(self._orders, dtype=np.float64),
        )
        result[AccountantKind.RDP.value] = float(
            rdp_privacy_accountant.compute_epsilon(
                self._orders, rdp, self.delta)[0])
      except ValueError:
        # dp-accounting's sampled-Gaussian RDP fails on its own rounding
        # ("Renyi divergence cannot be negative") at huge noise; PLD's
        # bound alone is still a bound.
        if AccountantKind.PLD not in kinds:
          raise
    if AccountantKind.PLD in kinds:
      pld = None
      for k, (event, count) in history.items():
        part = self._single_round_pld(k, event)(count)
        pld = part if pld is None else pld.compose(part)
      result[AccountantKind.PLD.value] = (
          0.0 if pld is None else float(pld_epsilon(pld, self.delta))
      )
    self._last_epsilons = (key, result)
    return result

  def _with_round(
      self, event: dp_accounting.DpEvent, count: int = 1
  ) -> dict[str, list]:
    round_event = self.round_event(event)
    key = repr(round_event)
    history = {k: list(v) for k, v in self._history.items()}
    history.setdefault(key, [round_event, 0])[1] += count
    return history

  def compose_round(self, event: dp_accounting.DpEvent) -> None:
    """Adds one round whose aggregator emitted `event` (before sampling)."""
    self._history = self._with_round(event)
    self.rounds += 1

  def history_json(self) -> str:
    """The rounds composed so far, as JSON (checkpointed with the model)."""
    return json.dumps({
        'rounds': self.rounds,
        'events': [
            [event_to_json(event), count] for event, count in self._history.values()
        ],
    })

  def restore_history(self, history_json: str) -> None:
    """Replaces the composed rounds by those of `history_json`."""
    history = json.loads(history_json)
    self._history = {}
    for encoded, count in history['events']:
      event = event_from_json(encoded)
      self._history[repr(event)] = [event, int(count)]
    self.rounds = int(history['rounds'])

  def epsilons(self) -> dict[str, float]:
    """{'rdp': eps, 'pld': eps} for the accountants in use that apply."""
    return self._epsilons_of(self._history)

  def epsilon_and_accountant(self) -> tuple[float, str]:
    """The reported epsilon after all rounds and the accountant giving it."""
    return _tightest(self._epsilons_of(self._history))

  def epsilon(self) -> float:
    """The reported epsilon at `delta` after all rounds."""
    return self.epsilon_and_accountant()[0]

  def epsilon_after_round(
      self, event: dp_accounting.DpEvent, rounds: int = 1
  ) -> float:
    """Epsilon if `rounds` more rounds with aggregator `event` were composed."""
    return _tightest(self._epsilons_of(self._with_round(event, rounds)))[0]

  def rounds_within_budget(
      self, event: dp_accounting.DpEvent, target_epsilon: float,
      max_rounds: int,
  ) -> int:
    """How many more rounds with `event` keep epsilon <= target (<= max).

    Epsilon grows with every round, so this is a binary search: about
    log2(max_rounds) evaluations instead of one per round.
    """
    return _largest_within(
        lambda rounds: self.epsilon_after_round(event, rounds),
        target_epsilon, max_rounds,
    )

  def calibrate_noise_multiplier(
      self,
      event_for_noise_multiplier: Callable[[float], dp_accounting.DpEvent],
      target_epsilon: float,
      rounds: int,
  ) -> float:
    """The smallest noise multiplier whose `rounds` rounds meet the target.

    Runs dp-accounting's `calibrate_dp_mechanism` once per accountant in use
    and returns the smallest result: the reported epsilon is the smallest
    bound, so that is the smallest z it allows.

    Args:
      event_for_noise_multiplier: the aggregator's per-round event for a
        noise multiplier z (before sampling).
      target_epsilon: epsilon at this accountant's delta, > 0.
      rounds: planned rounds, >= 1.

    Raises:
      ValueError: if the target cannot be met by any z in [0.05, 2^30].
    """
    if not target_epsilon > 0:
      raise ValueError(f'target_epsilon must be > 0, got {target_epsilon}.')
    if rounds < 1:
      raise ValueError(f'rounds must be >= 1, got {rounds}.')
    if _curve_of(self.round_event(event_for_noise_multiplier(1.0))):
      # dp-accounting's accountants cannot compose an event that states its
      # own RDP curve: search with this accountant's composition instead.
      def epsilon_of(z):
        round_event = self.round_event(event_for_noise_multiplier(float(z)))
        return _tightest(self._epsilons_of(
            {repr(round_event): [round_event, rounds]}))[0]

      return _bisect_noise(epsilon_of, target_epsilon, self.delta, rounds)
    kinds = self._kinds_in_use(
        [self.round_event(event_for_noise_multiplier(1.0))]
    )
    prepare = {AccountantKind.RDP: lambda e: e, AccountantKind.PLD: _for_pld}
    # RDP first: it is fast, and PLD's bound is never looser, so PLD's answer
    # lies below RDP's and the slow PLD search can start just under it.
    kinds.sort(key=lambda k: k is AccountantKind.PLD)
    results = []
    for kind in kinds:
      def make_event(z, kind=kind):
        round_event = prepare[kind](
            self.round_event(event_for_noise_multiplier(float(z)))
        )
        return dp_accounting.SelfComposedDpEvent(round_event, rounds)

      results.append(_calibrate(
          lambda kind=kind: self._new_accountant(kind), make_event,
          target_epsilon, self.delta, rounds, kind,
          guess=results[-1] if results else 1.0,
      ))
    return float(min(results))


def event_to_json(event: dp_accounting.DpEvent) -> dict:
  """A DpEvent as JSON-ready values: class name plus fields, recursively."""

  def encode(value):
    if isinstance(value, dp_accounting.DpEvent):
      return event_to_json(value)
    if isinstance(value, (list, tuple)):
      return [encode(v) for v in value]
    return value

  fields = attr.asdict(event, recurse=False)
  # Events of dp-accounting are found by name; others by their module.
  if not hasattr(dp_accounting, type(event).__name__):
    fields['module'] = type(event).__module__
  return {'class_name': type(event).__name__,
          **{name: encode(value) for name, value in fields.items()}}


def event_from_json(encoded: dict) -> dp_accounting.DpEvent:
  """Inverse of `event_to_json`."""

  def decode(value):
    if isinstance(value, dict):
      return event_from_json(value)
    if isinstance(value, list):
      return [decode(v) for v in value]
    return value

  fields = dict(encoded)
  event_class = getattr(
      importlib.import_module(fields.pop('module', 'dp_accounting')),
      fields.pop('class_name'),
  )
  return event_class(**{name: decode(value) for name, value in fields.items()})


def _tightest(epsilons: dict[str, float]) -> tuple[float, str]:
  name = min(epsilons, key=lambda k: (epsilons[k], k))
  return epsilons[name], name


def _largest_within(
    epsilon_after: Callable[[int], float], target_epsilon: float,
    max_rounds: int,
) -> int:
  """The most rounds m <= max_rounds with epsilon_after(m) <= target; epsilon
  grows with the rounds, so a binary search."""
  within, beyond = 0, max_rounds + 1
  while beyond - within > 1:
    middle = (within + beyond) // 2
    if epsilon_after(middle) <= target_epsilon:
      within = middle
    else:
      beyond = middle
  return within


def _calibrate(
    new_accountant, make_event, target_epsilon: float, delta: float,
    rounds: int, kind: AccountantKind, guess: float,
) -> float:
  """dp-accounting's calibration from `guess`, its failures as one ValueError.

  The search starts in [guess / 2, guess] and grows upwards, or, when
  guess / 2 already meets the target, in [0.05, guess / 2].
  """
  lower = max(_MIN_CALIBRATED_NOISE, guess / 2)

  def calibrate(bracket_interval):
    return mechanism_calibration.calibrate_dp_mechanism(
        new_accountant, make_event, target_epsilon, delta,
        bracket_interval=bracket_interval, tol=1e-4,
    )

  def epsilon_at(noise):
    accountant = new_accountant()
    accountant.compose(make_event(noise))
    return accountant.get_epsilon(delta)

  try:
    # An answer below `lower` is searched for below it at once: upwards,
    # dp-accounting would double the noise to ~1e6 first, where its RDP
    # rounds to a negative divergence and raises.
    if lower > _MIN_CALIBRATED_NOISE and epsilon_at(lower) <= target_epsilon:
      return calibrate(mechanism_calibration.ExplicitBracketInterval(
          _MIN_CALIBRATED_NOISE, lower))
    return calibrate(mechanism_calibration.LowerEndpointAndGuess(lower, guess))
  except (ValueError, mechanism_calibration.NoBracketIntervalFoundError,
          mechanism_calibration.NoOptimumFoundError) as e:
    raise ValueError(
        f'no noise multiplier in [{_MIN_CALIBRATED_NOISE}, 2^30] meets '
        f'epsilon={target_epsilon} at delta={delta} over {rounds} rounds '
        f'({kind.value}): {e}'
    ) from e


def _bisect_noise(epsilon_of: Callable[[float], float], target_epsilon: float,
                  delta: float, rounds: int) -> float:
  """The smallest noise in [0.05, 2^30] with epsilon_of(noise) <= target,
  to a relative 1e-4 (epsilon decreases as the noise grows)."""
  low = high = _MIN_CALIBRATED_NOISE
  if epsilon_of(low) <= target_epsilon:
    return low
  while epsilon_of(high) > target_epsilon:
    low, high = high, high * 2
    if high > 2**30:
      raise ValueError(
          f'no noise multiplier in [{_MIN_CALIBRATED_NOISE}, 2^30] meets '
          f'epsilon={target_epsilon} at delta={delta} over {rounds} rounds.')
  while high / low - 1 > 1e-4:
    middle = math.sqrt(low * high)
    if epsilon_of(middle) <= target_epsilon:
      high = middle
    else:
      low = middle
  return high


def _new_accountant(kind: AccountantKind, relation: _NeighborRel):
  if kind is AccountantKind.RDP:
    return dp_accounting.rdp.RdpAccountant(
        np.asarray(rdp_privacy_accountant.DEFAULT_RDP_ORDERS),
        neighboring_relation=relation,
    )
  return gaussian_pld.PLDAccountant(
      value_discretization_interval=_PLD_DISCRETIZATION
  )


class Adjacency(enum.Enum):
  """Which datasets a reported (epsilon, delta) calls neighbours."""

  # One client's data added or removed.
  ADD_OR_REMOVE_ONE = 'add_or_remove_one'
  # One client's data replaced by another's.
  REPLACE_ONE = 'replace_one'
  # One client's contributions replaced by zeros (tree aggregation and matrix
  # factorization; dp-accounting's REPLACE_SPECIAL).
  ZERO_OUT = 'zero_out'
  # One example of one client added or removed (--privacy_unit=example;
  # dp_fedavg.example_privacy).
  ADD_OR_REMOVE_ONE_EXAMPLE = 'add_or_remove_one_example'


class Participation:
  """Which clients (indices) took part in each round so far.

  The schedule they realised (`schedule`) is kept up to date as rounds are
  added: a round costs its cohort, not the rounds before it (run-level
  ledgers ask for it up to twice a round; recounting every cohort made a
  2,000-round run quadratic). Rounds are only ever appended: `with_round`
  returns an extended copy and leaves this one as it is.
  """

  def __init__(self, cohorts: Sequence[Sequence[int]] = ()):
    self._cohorts: list[tuple[int, ...]] = []
    self._last_round: dict[int, int] = {}
    self._counts: dict[int, int] = {}
    self._max_participations = 0
    self._min_gap: Optional[int] = None
    # Schedules of whole restart periods, {(period, start): Schedule}: they
    # never change once their last round is in.
    self._closed_periods: dict[tuple[int, int], correlated_noise.Schedule] = {}
    for cohort in cohorts:
      self._append(cohort)

  def _append(self, cohort) -> None:
    round_index = len(self._cohorts)
    cohort = tuple(int(c) for c in cohort)
    self._cohorts.append(cohort)
    for client in cohort:
      if client in self._last_round:
        gap = round_index - self._last_round[client]
        self._min_gap = gap if self._min_gap is None else min(self._min_gap, gap)
      self._last_round[client] = round_index
      self._counts[client] = self._counts.get(client, 0) + 1
      self._max_participations = max(
          self._max_participations, self._counts[client])

  @property
  def cohorts(self) -> tuple[tuple[int, ...], ...]:
    return tuple(self._cohorts)

  @property
  def rounds(self) -> int:
    return len(self._cohorts)

  def with_round(self, cohort) -> 'Participation':
    return self.with_rounds([cohort])

  def with_rounds(self, cohorts) -> 'Participation':
    """This participation followed by `cohorts`."""
    extended = Participation()
    extended._cohorts = list(self._cohorts)
    extended._last_round = dict(self._last_round)
    extended._counts = dict(self._counts)
    extended._max_participations = self._max_participations
    extended._min_gap = self._min_gap
    extended._closed_periods = dict(self._closed_periods)
    for cohort in cohorts:
      extended._append(cohort)
    return extended

  def max_participations(self) -> int:
    """The most rounds any one client took part in."""
    return self._max_participations

  def schedule(self) -> correlated_noise.Schedule:
    """The realised schedule of all rounds so far (at least one)."""
    if not self._cohorts:
      raise ValueError('no rounds yet.')
    return correlated_noise.Schedule(
        rounds=len(self._cohorts),
        max_participations=max(1, self._max_participations),
        min_gap=len(self._cohorts) if self._min_gap is None else self._min_gap,
    )

  def period_schedules(self, period: int) -> list[correlated_noise.Schedule]:
    """The realised schedule of each `period` rounds from the first (the
    last one as far as it went)."""
    schedules = []
    for start in range(0, len(self._cohorts), period):
      cohorts = self._cohorts[start:start + period]
      if len(cohorts) < period:
        schedules.append(correlated_noise.realised_schedule(cohorts))
        continue
      if (period, start) not in self._closed_periods:
        self._closed_periods[period, start] = (
            correlated_noise.realised_schedule(cohorts))
      schedules.append(self._closed_periods[period, start])
    return schedules


@dataclasses.dataclass(frozen=True)
class SampledRounds:
  """Independent rounds, each amplified by the run's sampling.

  `planned_event` is one round for the mechanism's parameters and
  `event_of_state` the round an aggregator state runs, both before sampling
  and under add/remove-one adjacency; `PrivacyAccountant.round_event` wraps
  them in the sampling (and restates them for replace-one under uniform
  sampling).
  """

  planned_event: dp_accounting.DpEvent
  event_of_state: Callable[[Any], dp_accounting.DpEvent]
  # For noise added by the clients (distributed DP): the round's event when
  # only some of the sampled clients report, given the state and how many
  # did; None: dropouts do not change the round's event.
  event_of_reporting: Optional[
      Callable[[Any, int], dp_accounting.DpEvent]] = None
  # With `event_of_reporting`: the fewest of n sampled clients whose
  # reports keep `planned_event`'s privacy (the loop logs rounds below it).
  fewest_reporting: Optional[Callable[[int], int]] = None


@dataclasses.dataclass(frozen=True)
class LocalRounds:
  """Local DP: each participant's own message is private on its own.

  The events are per participation, under replacement of the client's
  update; the server knows who took part, so sampling amplifies nothing.
  Epsilon is that of a client taking part in every round.
  """

  planned_event: dp_accounting.DpEvent
  event_of_state: Callable[[Any], dp_accounting.DpEvent]


@dataclasses.dataclass(frozen=True)
class RunLevel:
  """One event for the whole run, from the participation that happened.

  For noise correlated across rounds (tree aggregation, matrix
  factorization): `event_of_participation` states the privacy of all rounds
  so far for the clients' realised participation, with no sampling
  amplification, under `adjacency`.
  """

  event_of_participation: Callable[[Participation], dp_accounting.DpEvent]
  adjacency: Adjacency = Adjacency.ZERO_OUT


MechanismLedger = Union[SampledRounds, LocalRounds, RunLevel]

_COMPOSITION_NAMES = {
    SampledRounds: 'sampled_rounds', LocalRounds: 'local_rounds',
    RunLevel: 'run_level',
}
_NEIGHBOR_RELATIONS = {
    Adjacency.ADD_OR_REMOVE_ONE: _NeighborRel.ADD_OR_REMOVE_ONE,
    Adjacency.REPLACE_ONE: _NeighborRel.REPLACE_ONE,
    Adjacency.ZERO_OUT: _NeighborRel.REPLACE_SPECIAL,
}


class PrivacyLedger:
  """A run's privacy: one mechanism's ledger bound to the run's sampling.

  The training loop records each round with the aggregator's state and the
  cohort; the ledger turns them into events as its mechanism declared, so the
  pairing of a factory with its accounting is made once, in the registry.

  Raises (at construction):
    ValueError: no accountant (or not the chosen one) supports the
      mechanism under this sampling.
  """

  def __init__(
      self,
      ledger: MechanismLedger,
      scheme: sampling.SamplingScheme,
      num_clients: int,
      clients_per_round: int,
      delta: float,
      kind: AccountantKind = AccountantKind.AUTO,
  ):
    self.ledger = ledger
    self._events = PrivacyAccountant(
        scheme, num_clients, clients_per_round, delta, kind,
        local_dp=isinstance(ledger, LocalRounds),
    )
    self._participation = Participation()
    self._run_epsilons: dict[str, dict[str, float]] = {}
    if isinstance(ledger, RunLevel):
      first = Participation(((0,),))
      if not self._run_level_kinds(ledger.event_of_participation(first)):
        raise ValueError(
            f'the {self.kind.value} accountant does not support '
            f'{ledger.event_of_participation(first)}.'
        )
    else:
      self._events.check_supported(ledger.planned_event)

  scheme = property(lambda self: self._events.scheme)
  num_clients = property(lambda self: self._events.num_clients)
  clients_per_round = property(lambda self: self._events.clients_per_round)
  delta = property(lambda self: self._events.delta)
  kind = property(lambda self: self._events.kind)

  @property
  def rounds(self) -> int:
    if isinstance(self.ledger, RunLevel):
      return self._participation.rounds
    return self._events.rounds

  @property
  def composition(self) -> str:
    """How the mechanism's privacy composes: sampled_rounds, local_rounds or
    run_level."""
    return _COMPOSITION_NAMES[type(self.ledger)]

  @property
  def adjacency(self) -> Adjacency:
    """The adjacency of the reported epsilon."""
    if isinstance(self.ledger, RunLevel):
      return self.ledger.adjacency
    if self._events.neighboring_relation is _NeighborRel.REPLACE_ONE:
      return Adjacency.REPLACE_ONE
    return Adjacency.ADD_OR_REMOVE_ONE

  def describe(self) -> str:
    """The per-round event after sampling, or the run-level statement."""
    if isinstance(self.ledger, RunLevel):
      return (
          'one event for the whole run (run level), e.g. '
          f'{self.ledger.event_of_participation(Participation(((0,),)))} '
          'after one round'
      )
    return str(self._events.round_event(self.ledger.planned_event))

  def _round_event(self, aggregator_state, reporting: Optional[int]):
    if (reporting is not None and isinstance(self.ledger, SampledRounds)
        and self.ledger.event_of_reporting is not None):
      return self.ledger.event_of_reporting(aggregator_state, reporting)
    return self.ledger.event_of_state(aggregator_state)

  def record_round(self, aggregator_state, cohort,
                   reporting: Optional[int] = None) -> None:
    """Adds a round that ran from `aggregator_state` with `cohort` sampled,
    of whom `reporting` reported (None: all). A sampled client that dropped
    out counts as taking part: its absence only removes data."""
    if isinstance(self.ledger, RunLevel):
      self._participation = self._participation.with_round(cohort)
    else:
      self._events.compose_round(
          self._round_event(aggregator_state, reporting))

  def record_planned_round(self, cohort) -> None:
    """Adds a round as the mechanism's parameters plan it (no state: the
    privacy report)."""
    if isinstance(self.ledger, RunLevel):
      self._participation = self._participation.with_round(cohort)
    else:
      self._events.compose_round(self.ledger.planned_event)

  def epsilon_if_round(self, aggregator_state, cohort,
                       reporting: Optional[int] = None) -> float:
    """Epsilon if a round from `aggregator_state` with `cohort` (of whom
    `reporting` report) ran next."""
    if isinstance(self.ledger, RunLevel):
      return _tightest(self._run_level_epsilons(
          self._participation.with_round(cohort)))[0]
    return self._events.epsilon_after_round(
        self._round_event(aggregator_state, reporting))

  def rounds_within_budget(
      self, target_epsilon: float, max_rounds: int, planned_cohorts=()
  ) -> int:
    """How many more rounds as planned keep epsilon <= target (<= max).

    Run-level mechanisms need `planned_cohorts`, the cohorts of the next
    rounds (at least `max_rounds` of them).
    """
    if not isinstance(self.ledger, RunLevel):
      return self._events.rounds_within_budget(
          self.ledger.planned_event, target_epsilon, max_rounds
      )

    def epsilon_after(count):
      return _tightest(self._run_level_epsilons(
          self._participation.with_rounds(planned_cohorts[:count])))[0]

    return _largest_within(epsilon_after, target_epsilon, max_rounds)

  def epsilons(self) -> dict[str, float]:
    if isinstance(self.ledger, RunLevel):
      return self._run_level_epsilons(self._participation)
    return self._events.epsilons()

  def epsilon_and_accountant(self) -> tuple[float, str]:
    return _tightest(self.epsilons())

  def epsilon(self) -> float:
    return self.epsilon_and_accountant()[0]

  def history_json(self) -> str:
    """What was recorded so far, as JSON (checkpointed with the model)."""
    if isinstance(self.ledger, RunLevel):
      return json.dumps({'cohorts': [list(c) for c in self._participation.cohorts]})
    return self._events.history_json()

  def restore_history(self, history_json: str) -> None:
    if isinstance(self.ledger, RunLevel):
      self._participation = Participation(
          json.loads(history_json)['cohorts'])
    else:
      self._events.restore_history(history_json)

  def _run_level_kinds(self, event) -> list[AccountantKind]:
    relation = _NEIGHBOR_RELATIONS[self.ledger.adjacency]
    kinds = []
    if dp_accounting.rdp.RdpAccountant(neighboring_relation=relation).supports(event):
      kinds.append(AccountantKind.RDP)
    # dp-accounting's PLD takes add/remove or replace-one; a Gaussian or
    # Laplace PLD is symmetric, so it serves every adjacency whose
    # sensitivity the event already states.
    if _effective_gaussian(event) is not None or isinstance(
        event, dp_accounting.LaplaceDpEvent) or (
            relation is _NeighborRel.ADD_OR_REMOVE_ONE
            and dp_accounting.pld.PLDAccountant().supports(event)):
      kinds.append(AccountantKind.PLD)
    return [k for k in kinds if self.kind in (AccountantKind.AUTO, k)]

  def _run_level_epsilons(self, participation: Participation) -> dict[str, float]:
    if not participation.rounds:
      return self._events.epsilons()  # No rounds: zero.
    event = as_python_floats(self.ledger.event_of_participation(participation))
    key = repr(event)
    if key not in self._run_epsilons:
      if _adds_no_noise(event):
        result = {AccountantKind.RDP.value: math.inf,
                  AccountantKind.PLD.value: math.inf}
      else:
        result = {
            kind.value: _run_level_epsilon(
                kind, self.ledger.adjacency, event, self.delta)
            for kind in self._run_level_kinds(event)
        }
      self._run_epsilons[key] = result
    return self._run_epsilons[key]


def _run_level_epsilon(kind: AccountantKind, adjacency: Adjacency,
                       event: dp_accounting.DpEvent, delta: float) -> float:
  """`kind`'s epsilon of a run-level event; a Gaussian's PLD epsilon is its
  exact one."""
  if kind is AccountantKind.PLD and _effective_gaussian(event) is not None:
    return gaussian_epsilon(_effective_gaussian(event), delta)
  accountant = _new_accountant(kind, _NEIGHBOR_RELATIONS[adjacency])
  accountant.compose(event)
  return float(accountant.get_epsilon(delta))


def calibrate_noise(
    ledger_for_noise: Callable[[float], MechanismLedger],
    scheme: sampling.SamplingScheme,
    num_clients: int,
    clients_per_round: int,
    delta: float,
    kind: AccountantKind,
    target_epsilon: float,
    rounds: int,
    planned_cohorts=(),
) -> float:
  """The smallest noise whose planned run meets `target_epsilon` at `delta`.

  Args:
    ledger_for_noise: the mechanism's ledger for a noise parameter.
    scheme, num_clients, clients_per_round, delta, kind: the run's.
    target_epsilon: > 0.
    rounds: planned rounds, >= 1.
    planned_cohorts: run-level mechanisms: the cohorts of the planned rounds.

  Raises:
    ValueError: if no noise in [0.05, 2^30] meets the target.
  """
  ledger = ledger_for_noise(1.0)
  if not isinstance(ledger, RunLevel):
    events = PrivacyAccountant(
        scheme, num_clients, clients_per_round, delta, kind,
        local_dp=isinstance(ledger, LocalRounds),
    )
    return events.calibrate_noise_multiplier(
        lambda z: ledger_for_noise(z).planned_event, target_epsilon, rounds
    )
  participation = Participation(planned_cohorts[:rounds])
  run = PrivacyLedger(ledger, scheme, num_clients, clients_per_round, delta, kind)
  relation = _NEIGHBOR_RELATIONS[ledger.adjacency]

  def event_of(z):
    return as_python_floats(
        ledger_for_noise(float(z)).event_of_participation(participation))

  def calibrated(kind):
    if kind is AccountantKind.PLD and _effective_gaussian(event_of(1.0)):
      return _bisect_noise(
          lambda z: gaussian_epsilon(_effective_gaussian(event_of(z)), delta),
          target_epsilon, delta, rounds)
    return _calibrate(lambda: _new_accountant(kind, relation), event_of,
                      target_epsilon, delta, rounds, kind, guess=1.0)

  return float(min(
      calibrated(kind) for kind in run._run_level_kinds(  # pylint: disable=protected-access
          ledger.event_of_participation(participation))))
