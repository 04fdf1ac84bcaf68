"""Example-level privacy: each client's epsilon from its own DP-SGD steps.

Under `--privacy_unit=example` (`dp_fedavg.dp_sgd`) the neighbouring datasets
differ in one example of one client (add/remove). A client's steps are the
only mechanism that touches its examples, so client i's guarantee is that of
its own steps, composed over the rounds it took part in:

    SelfComposedDpEvent(PoissonSampledDpEvent(q_i, GaussianDpEvent(z)),
                        R_i * E * ceil(n_i / B)),

with q_i = min(1, B / n_i), n_i its examples, R_i its rounds so far, E the
local epochs and B the batch size. No credit is taken for the sampling of
clients (which clients take part is not treated as secret). The run's
guarantee holds for every example of every client at the largest of the
clients' epsilons, which is what the ledger reports; `client_rows` gives
each client's.

Each client's epsilon is the smaller of the RDP and PLD bounds (both are
upper bounds; `AccountantKind` restricts to one). Clients with the same
(n_i, R_i) share a value, and one step's PLD is built once per sampling rate
and self-composed. RDP is cheap and evaluated for every client; PLD
is evaluated in decreasing order of the RDP bound and stops at the first
client whose RDP bound is no larger than the largest epsilon found, because
a client's epsilon is at most its RDP bound: the largest is exact without a
PLD for every client.

Calibration (`calibrate_noise`) finds, per client and accountant, the
smallest z meeting the target with dp-accounting's `calibrate_dp_mechanism`;
a client's z is the smaller over accountants, and the run's the largest over
clients (epsilon falls as z grows, so that z meets every client), with the
same pruning.
"""

import json
import math
from typing import Optional, Sequence

import dp_accounting
import numpy as np

from dp_fedavg import accounting
from dp_fedavg import dp_sgd
from dp_fedavg import gaussian_pld
from dp_fedavg import sampling

AccountantKind = accounting.AccountantKind
COMPOSITION = 'example_steps'


def client_event(
    noise_multiplier: float, sampling_rate: float, steps: int
) -> dp_accounting.DpEvent:
  """The DpEvent of a client's `steps` DP-SGD steps."""
  return dp_accounting.SelfComposedDpEvent(
      dp_accounting.PoissonSampledDpEvent(
          float(sampling_rate),
          dp_accounting.GaussianDpEvent(float(noise_multiplier)),
      ),
      int(steps),
  )


def _kinds(kind: AccountantKind) -> list[AccountantKind]:
  if kind is AccountantKind.AUTO:
    return [AccountantKind.RDP, AccountantKind.PLD]
  return [kind]


def _new_accountant(kind: AccountantKind):
  return accounting._new_accountant(  # pylint: disable=protected-access
      kind, dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE)


class ExampleLedger:
  """A run's example-level privacy, client by client.

  The loop's interface of `accounting.PrivacyLedger`: `record_round(state,
  cohort)` counts the cohort's participations (the aggregator's state plays
  no part), `epsilon_if_round`, `epsilon_and_accountant` (the largest
  client's), the history for checkpoints.
  """

  def __init__(
      self,
      config: dp_sgd.DpSgdConfig,
      examples_per_client: Sequence[int],
      scheme: sampling.SamplingScheme,
      clients_per_round: int,
      delta: float,
      kind: AccountantKind = AccountantKind.AUTO,
  ):
    self.config = config
    self.examples = np.asarray(examples_per_client, np.int64)
    self.scheme = scheme
    self.num_clients = len(self.examples)
    self.clients_per_round = clients_per_round
    self.delta = delta
    self.kind = kind
    self.adjacency = accounting.Adjacency.ADD_OR_REMOVE_ONE_EXAMPLE
    self.composition = COMPOSITION
    self._participations = np.zeros(self.num_clients, np.int64)
    self._rounds = 0
    self._cache: dict[tuple[int, int, str], float] = {}
    self._step_plds = {}

  @property
  def rounds(self) -> int:
    return self._rounds

  def sampling_rate(self, client: int) -> float:
    return self.config.sampling_rate(max(int(self.examples[client]), 1))

  def steps(self, client: int, rounds: int) -> int:
    return rounds * self.config.steps_per_round(int(self.examples[client]))

  def describe(self) -> str:
    client = int(np.argmax(self.examples))
    example = client_event(self.config.noise_multiplier,
                           self.sampling_rate(client), self.steps(client, 1))
    return (
        f'per client i with n_i examples, after R_i rounds: '
        f'SelfComposedDpEvent(PoissonSampledDpEvent(q_i = min(1, '
        f'{self.config.batch_size} / n_i), GaussianDpEvent('
        f'{self.config.noise_multiplier:g})), R_i * '
        f'{self.config.local_epochs} * ceil(n_i / {self.config.batch_size}));'
        f' e.g. client {client} (n_i = {self.examples[client]}) after one '
        f'round: {example}'
    )

  def _epsilon(self, client: int, rounds: int, kind: AccountantKind) -> float:
    """Client `client`'s epsilon after `rounds` rounds by one accountant."""
    examples = int(self.examples[client])
    steps = self.steps(client, rounds)
    key = (examples, steps, kind.value)
    if key not in self._cache:
      if steps == 0:
        value = 0.0
      elif self.config.noise_multiplier == 0:
        value = math.inf
      elif kind is AccountantKind.PLD:
        value = float(accounting.pld_epsilon(
            self._step_pld(self.sampling_rate(client)).self_compose(steps),
            self.delta))
      else:
        accountant = _new_accountant(kind)
        accountant.compose(client_event(
            self.config.noise_multiplier, self.sampling_rate(client), steps))
        value = float(accountant.get_epsilon(self.delta))
      self._cache[key] = value
    return self._cache[key]

  def _step_pld(self, rate: float):
    """One step's PLD, as dp-accounting's PLDAccountant builds it for
    `client_event` (`gaussian_pld`). The accountant builds it anew for every
    composition, while a client's steps grow every round: kept per rate."""
    if rate not in self._step_plds:
      self._step_plds[rate] = gaussian_pld.from_gaussian_mechanism(
          float(self.config.noise_multiplier),
          accounting._PLD_DISCRETIZATION,  # pylint: disable=protected-access
          float(rate),
      )
    return self._step_plds[rate]

  def _client_epsilons(self, client: int, rounds: int) -> dict[str, float]:
    return {k.value: self._epsilon(client, rounds, k) for k in _kinds(self.kind)}

  def _worst(self, participations: np.ndarray) -> dict[str, float]:
    """The epsilons of the client whose tightest epsilon is largest."""
    kinds = _kinds(self.kind)
    first = kinds[0]
    # One representative per distinct (examples, rounds).
    keys = {}
    for client in range(self.num_clients):
      keys.setdefault((self.examples[client], participations[client]), client)
    clients = sorted(
        keys.values(),
        key=lambda c: -self._epsilon(c, int(participations[c]), first),
    )
    worst_epsilons, worst_value = None, -1.0
    for client in clients:
      rounds = int(participations[client])
      if self._epsilon(client, rounds, first) <= worst_value:
        break  # Its tightest epsilon is at most this bound.
      epsilons = self._client_epsilons(client, rounds)
      value = min(epsilons.values())
      if value > worst_value:
        worst_epsilons, worst_value = epsilons, value
    return worst_epsilons

  def record_round(self, aggregator_state, cohort,
                   reporting: Optional[int] = None) -> None:
    # The clients' DP-SGD depends on neither; a sampled client that dropped
    # out ran no step, and counting its participation is conservative.
    del aggregator_state, reporting
    self.record_planned_round(cohort)

  def record_planned_round(self, cohort) -> None:
    self._participations = self._with([cohort])
    self._rounds += 1

  def _with(self, cohorts) -> np.ndarray:
    participations = self._participations.copy()
    for cohort in cohorts:
      np.add.at(participations, np.asarray(cohort, np.int64), 1)
    return participations

  def epsilon_if_round(self, aggregator_state, cohort,
                       reporting: Optional[int] = None) -> float:
    del aggregator_state, reporting
    return min(self._worst(self._with([cohort])).values())

  def rounds_within_budget(
      self, target_epsilon: float, max_rounds: int, planned_cohorts=()
  ) -> int:
    """How many of `planned_cohorts` keep every client within the target."""
    return accounting._largest_within(  # pylint: disable=protected-access
        lambda count: min(self._worst(
            self._with(planned_cohorts[:count])).values()),
        target_epsilon, max_rounds,
    )

  def epsilons(self) -> dict[str, float]:
    """The largest client's epsilon by each accountant."""
    return self._worst(self._participations)

  def epsilon_and_accountant(self) -> tuple[float, str]:
    return accounting._tightest(self.epsilons())  # pylint: disable=protected-access

  def epsilon(self) -> float:
    return self.epsilon_and_accountant()[0]

  def client_rows(self, client_ids: Sequence[str]) -> list[dict]:
    """Every client's privacy: the rows of client_epsilons.csv."""
    rows = []
    for client, client_id in enumerate(client_ids):
      rounds = int(self._participations[client])
      epsilons = self._client_epsilons(client, rounds)
      name = min(epsilons, key=lambda k: (epsilons[k], k))
      rows.append({
          'client_id': client_id,
          'examples': int(self.examples[client]),
          'rounds': rounds,
          'steps': self.steps(client, rounds),
          'sampling_rate': self.sampling_rate(client),
          **{f'epsilon_{k}': v for k, v in sorted(epsilons.items())},
          'epsilon': epsilons[name],
          'accountant': name,
          'delta': self.delta,
      })
    return rows

  def history_json(self) -> str:
    return json.dumps({'participations': self._participations.tolist(),
                       'rounds': self._rounds})

  def restore_history(self, history_json: str) -> None:
    history = json.loads(history_json)
    self._participations = np.asarray(history['participations'], np.int64)
    self._rounds = int(history['rounds'])


def calibrate_noise(
    config: dp_sgd.DpSgdConfig,
    examples_per_client: Sequence[int],
    rounds_per_client: Sequence[int],
    delta: float,
    kind: AccountantKind,
    target_epsilon: float,
) -> float:
  """The smallest noise multiplier that keeps every client within the target.

  Client i takes part in `rounds_per_client[i]` rounds (the plan: every
  round, for full participation).

  Raises:
    ValueError: no noise multiplier in [0.05, 2^30] meets the target.
  """
  if not target_epsilon > 0:
    raise ValueError(f'target_epsilon must be > 0, got {target_epsilon}.')
  kinds = _kinds(kind)
  # RDP first where both are used: it is fast and bounds the other.
  kinds.sort(key=lambda k: k is AccountantKind.PLD)
  keys = sorted({
      (max(int(n), 1), int(r)) for n, r in zip(examples_per_client, rounds_per_client)
      if int(n) > 0 and int(r) > 0
  })
  if not keys:
    raise ValueError('no client takes part in any round: nothing to calibrate.')

  def calibrated(key, k, guess):
    examples, rounds = key
    steps = rounds * config.steps_per_round(examples)
    rate = config.sampling_rate(examples)
    return accounting._calibrate(  # pylint: disable=protected-access
        lambda: _new_accountant(k),
        lambda z: client_event(float(z), rate, steps),
        target_epsilon, delta, rounds, k, guess=guess,
    )

  first = {key: calibrated(key, kinds[0], 1.0) for key in keys}
  best = 0.0
  for key in sorted(keys, key=lambda key: -first[key]):
    if first[key] <= best:
      break  # This client's noise is at most its first accountant's.
    noise = min([first[key]] + [
        calibrated(key, k, first[key]) for k in kinds[1:]])
    best = max(best, noise)
  return float(best)


def planned_rounds(
    scheme: sampling.SamplingScheme, num_clients: int, clients_per_round: int,
    rounds: int, seed: int,
) -> np.ndarray:
  """Each client's rounds in the run the sampler would draw: the plan that
  calibration meets (training draws the same cohorts)."""
  sampler = sampling.ClientSampler(scheme, num_clients, clients_per_round, seed)
  participations = np.zeros(num_clients, np.int64)
  for round_num in range(1, rounds + 1):
    np.add.at(participations, np.asarray(sampler.sample(round_num), np.int64), 1)
  return participations

