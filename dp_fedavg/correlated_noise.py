"""Privacy of noise correlated across rounds: tree aggregation and banded MF.

DP-FTRL with tree aggregation (Kairouz et al. 2021, "Practical and Private
(Deep) Learning without Sampling or Shuffling") and banded matrix
factorization (Choquette-Choo et al. 2023, "(Amplified) Banded Matrix
Factorization") release, for the rounds' sums of clipped client updates
x_1, ..., x_T (each client's update has L2 norm at most S), a linear
transform of x plus Gaussian noise. Adjacency is *zero-out*: one client's
contributions replaced by zeros (dp-accounting's REPLACE_SPECIAL), stated as
such in every report.

Derivation. Both releases have the form M x + z with z ~ N(0, (sigma S)^2)
on every entry (M: the tree's 0/1 node matrix, or the MF strategy C;
the model is post-processing of the release). A client that takes part in
the rounds of a pattern pi changes x by Delta_j (norm <= S) in each round
j of pi, so the release moves by sum_{j in pi} M[:, j] Delta_j^T, whose
squared Frobenius norm is at most S^2 * sens^2 with

  sens^2 = max over allowed patterns of the largest such norm / S^2.

The release is then a Gaussian mechanism with L2 sensitivity S sqrt(sens^2)
and noise sigma S: its privacy loss distribution is exactly that of
`GaussianDpEvent(sigma / sqrt(sens^2))`, so both dp-accounting's PLD and its
RDP (rho = sens^2 / (2 sigma^2) zCDP) apply, and the report takes the tighter.

* Tree, no restart. The allowed patterns are those of at most k
  participations at least b rounds apart; tensorflow-privacy computes the
  tree's sens^2 for them (`compute_zcdp_single_tree`, whose `min_separation`
  is b - 1: the rounds *between* two participations).
* Tree restarted every epoch (each client at most once per epoch): one tree
  per epoch, each a `SingleEpochTreeAggregationDpEvent` (sens^2 = the tree's
  depth, ceil(log2(steps + 1))), composed over the epochs; dp-accounting's
  RDP accountant states it only under REPLACE_SPECIAL. It is also the
  Gaussian above with sens^2 = the sum of the depths.
* Banded MF: C lower-triangular with B bands (column j is non-zero only in
  rows j..j+B-1). Two participations at least b >= B rounds apart touch
  disjoint rows, so the norm above is at most S^2 sum_{j in pi} ||C[:, j]||^2
  and sens^2 is the largest sum of squared column norms over patterns of at
  most k rounds at least b apart (`banded_sensitivity_squared`, a dynamic
  program). With b < B the columns overlap and this bound does not hold:
  refused.

After t rounds only the first t rows of the release exist; the sensitivities
are those of the rounds so far.
"""

import collections
import dataclasses
import functools
import math
from typing import Sequence

import dp_accounting
import numpy as np
from tensorflow_privacy.privacy.analysis import tree_aggregation_accountant


@dataclasses.dataclass(frozen=True)
class Schedule:
  """How often and how close together any one client took part.

  Attributes:
    rounds: T, the rounds released so far, >= 1.
    max_participations: k, the most rounds any one client took part in, >= 1.
    min_gap: b, the fewest rounds between two participations of one client
      (participations in rounds r and r + b); T when no client took part
      twice.
  """

  rounds: int
  max_participations: int
  min_gap: int

  def __post_init__(self):
    if self.rounds < 1:
      raise ValueError(f'rounds must be >= 1, got {self.rounds}.')
    if not 1 <= self.max_participations <= self.rounds:
      raise ValueError(
          f'max_participations must be in [1, rounds={self.rounds}], got '
          f'{self.max_participations}.')
    if self.min_gap < 1:
      raise ValueError(f'min_gap must be >= 1, got {self.min_gap}.')
    if (self.max_participations - 1) * self.min_gap > self.rounds - 1:
      raise ValueError(
          f'{self.max_participations} participations at least {self.min_gap} '
          f'rounds apart do not fit in {self.rounds} rounds.')

  @property
  def min_separation(self) -> int:
    """tensorflow-privacy's convention: the rounds between two
    participations, b - 1."""
    return self.min_gap - 1


def realised_schedule(cohorts: Sequence[Sequence[int]]) -> Schedule:
  """The schedule of the rounds that ran: `cohorts[r]`, the clients of round
  r + 1."""
  if not cohorts:
    raise ValueError('no rounds yet.')
  rounds_of = collections.defaultdict(list)
  for round_index, cohort in enumerate(cohorts):
    for client in cohort:
      rounds_of[client].append(round_index)
  gaps = [later - earlier for rounds in rounds_of.values()
          for earlier, later in zip(rounds, rounds[1:])]
  return Schedule(
      rounds=len(cohorts),
      max_participations=max((len(r) for r in rounds_of.values()), default=1),
      min_gap=min(gaps, default=len(cohorts)),
  )


@functools.lru_cache(maxsize=64)
def tree_sensitivity_squared(schedule: Schedule) -> float:
  """The tree's sens^2 (in units of S^2) for the worst allowed pattern.

  Cached: the budget stop and the round's epsilon ask for the same schedule.

  tensorflow-privacy's zCDP of the tree is rho = sens^2 / (2 sigma^2); at
  sigma = 1 that is sens^2 / 2.
  """
  return 2.0 * float(tree_aggregation_accountant.compute_zcdp_single_tree(
      noise_multiplier=1.0, total_steps=schedule.rounds,
      max_participation=schedule.max_participations,
      min_separation=schedule.min_separation))


def gaussian_event(noise_multiplier: float,
                   sensitivity_squared: float) -> dp_accounting.DpEvent:
  """The release as one Gaussian mechanism (see the module docstring)."""
  if noise_multiplier == 0:
    return dp_accounting.NonPrivateDpEvent()
  return dp_accounting.GaussianDpEvent(
      float(noise_multiplier) / math.sqrt(float(sensitivity_squared)))


def tree_event(noise_multiplier: float,
               schedule: Schedule) -> dp_accounting.DpEvent:
  """A tree over all rounds (no restart)."""
  return gaussian_event(noise_multiplier, tree_sensitivity_squared(schedule))


def tree_restart_event(noise_multiplier: float,
                       epoch_rounds: Sequence[int]) -> dp_accounting.DpEvent:
  """A tree restarted at every epoch; `epoch_rounds`: the rounds of each
  epoch so far. Each client must take part at most once per epoch."""
  if noise_multiplier == 0:
    return dp_accounting.NonPrivateDpEvent()
  return dp_accounting.ComposedDpEvent([
      dp_accounting.SingleEpochTreeAggregationDpEvent(
          float(noise_multiplier), int(steps))
      for steps in epoch_rounds if steps > 0
  ])


def column_norms_squared(strategy: np.ndarray) -> np.ndarray:
  """||C[:, j]||^2 of a strategy matrix C."""
  return np.sum(np.square(np.asarray(strategy, np.float64)), axis=0)


def banded_sensitivity_squared(norms_squared: Sequence[float], bands: int,
                               schedule: Schedule) -> float:
  """Banded MF's sens^2: the largest sum of `norms_squared[j]` (columns of C
  restricted to the rounds so far) over at most k rounds at least b apart.

  Raises:
    ValueError: b < B (the participations' columns would overlap), or fewer
      norms than rounds.
  """
  if bands < 1:
    raise ValueError(f'bands must be >= 1, got {bands}.')
  if schedule.max_participations > 1 and schedule.min_gap < bands:
    raise ValueError(
        f'participations {schedule.min_gap} rounds apart with {bands} bands: '
        'banded MF\'s sensitivity needs participations at least as many '
        'rounds apart as the bands (min gap >= bands).')
  weights = np.asarray(norms_squared, np.float64)[:schedule.rounds]
  if len(weights) < schedule.rounds:
    raise ValueError(
        f'{len(weights)} column norms for {schedule.rounds} rounds.')
  rounds, gap = schedule.rounds, schedule.min_gap
  # best[j]: the largest sum of m picks whose last pick is round j.
  best = weights.copy()
  answer = float(best.max())
  for _ in range(1, schedule.max_participations):
    # The best sum of m - 1 picks ending at or before each round.
    best_until = np.maximum.accumulate(best)
    following = np.full(rounds, -np.inf)
    following[gap:] = best_until[:rounds - gap] + weights[gap:]
    best = following
    if np.all(np.isinf(best)):
      break
    answer = max(answer, float(best.max()))
  return answer


def banded_event(noise_multiplier: float, norms_squared: Sequence[float],
                 bands: int, schedule: Schedule) -> dp_accounting.DpEvent:
  return gaussian_event(
      noise_multiplier,
      banded_sensitivity_squared(norms_squared, bands, schedule))


def zcdp_rho(noise_multiplier: float, sensitivity_squared: float) -> float:
  """rho-zCDP of the release: sens^2 / (2 sigma^2)."""
  return float(sensitivity_squared) / (2.0 * float(noise_multiplier) ** 2)
