"""Empirical privacy from canary statistics: estimates and lower bounds.

An accountant's epsilon is an upper bound under its assumptions. These
functions turn what a run's canaries show (the cosine between each canary's
direction and the model delta) into an estimate or a lower bound on the
epsilon of the run as it was implemented.

* `epsilon_two_gaussians(mu0, s0, mu1, s1, delta)`: the exact epsilon at
  delta between N(mu0, s0^2) and N(mu1, s1^2), in both directions (Steinke
  2022, "Composition of Differential Privacy & Privacy Amplification by
  Subsampling", section on the privacy loss of Gaussians). The privacy loss
  log p1(y) / p0(y) is a quadratic a y^2 + b y + c, so delta(eps) =
  P1[loss > eps] - e^eps P0[loss > eps] is a sum of normal tail masses
  outside or between the quadratic's roots; eps is found by root finding on
  log delta. With equal variances it is the analytic Gaussian mechanism of
  sensitivity |mu1 - mu0| / s.
* One-shot estimate (Andrew, Kairouz, Oh, Oprea, McMahan & Suriyakumar, ICLR
  2024): inserted canaries' cosines fitted by N(mu, s^2) against the null of
  a random direction's cosine, whose density is proportional to
  (1 - t^2)^((d - 3) / 2) on [-1, 1] (`cosine_null_log_sf`: the regularized
  incomplete beta function). For d >= 1000 the null is N(0, 1/d) to many
  digits and `epsilon_two_gaussians` is used; below, the best threshold
  test t: eps(t) = max(log(1 - delta - FNR) - log FPR,
  log(1 - delta - FPR) - log FNR) with FPR the null's mass above t and FNR
  the fit's below (`epsilon_closed_form_null`).
* One-run lower bound (Steinke, Nasr & Jagielski, NeurIPS 2023, Theorem 3.3
  and Appendix D): m canaries each inserted by a fair coin; the auditor
  guesses r of them and gets v right. If the run were (eps, delta)-DP, the
  chance of v or more right would be at most
  P[Binomial(r, q) >= v] + 2 m delta max_{1 <= i <= v} P[v - i <=
  Binomial(r, q) < v] / i, with q = e^eps / (1 + e^eps); the lower bound is
  the largest eps whose chance is still below 1 - confidence
  (`one_run_epsilon_lower_bound`).
* Threshold lower bound (Jagielski, Ullman & Oprea 2020): at each threshold,
  Clopper-Pearson upper bounds on the false positive and negative rates of
  "inserted iff cosine >= t" give eps >= max(log((1 - delta - FNR) / FPR),
  log((1 - delta - FPR) / FNR)); scanning the thresholds is paid for by a
  Bonferroni correction (`threshold_epsilon_lower_bound`).

An estimate is not a guarantee; a lower bound above the accountant's epsilon
means the implementation does not do what its accounting assumes.
"""

import math
from typing import Sequence

import numpy as np
from scipy import optimize
from scipy import special
from scipy import stats

_norm_logcdf = stats.norm.logcdf


def _log_mass_above(threshold: float, mean: float, std: float) -> float:
  """log P[N(mean, std^2) > threshold], accurate far in the tail."""
  return _norm_logcdf((mean - threshold) / std)


def _log_mass_below(threshold: float, mean: float, std: float) -> float:
  return _norm_logcdf((threshold - mean) / std)


def _log_mass_between(low: float, high: float, mean: float, std: float
                      ) -> float:
  upper, lower = _log_mass_below(high, mean, std), _log_mass_below(
      low, mean, std)
  remaining = -math.expm1(lower - upper) if lower < upper else 0.0
  return upper + math.log(remaining) if remaining > 0 else -math.inf


def _log_delta(mu0: float, s0: float, mu1: float, s1: float,
               epsilon: float) -> float:
  """log of P1[L > eps] - e^eps P0[L > eps], L = log p1 / p0 (-inf if <= 0)."""
  # L(y) = a y^2 + b y + c.
  a = 0.5 * (s0**-2 - s1**-2)
  b = mu1 / s1**2 - mu0 / s0**2
  c = 0.5 * ((mu0 / s0)**2 - (mu1 / s1)**2) + math.log(s0 / s1)
  if a == 0:
    if b == 0:
      return -math.inf  # Identical distributions.
    # L > eps on one side of a point.
    point = (epsilon - c) / b
    if b > 0:
      log_p1 = _log_mass_above(point, mu1, s1)
      log_p0 = _log_mass_above(point, mu0, s0)
    else:
      log_p1 = _log_mass_below(point, mu1, s1)
      log_p0 = _log_mass_below(point, mu0, s0)
  else:
    discriminant = b * b - 4 * a * (c - epsilon)
    if discriminant <= 0:
      # L - eps keeps the sign of a everywhere.
      if a < 0:
        return -math.inf
      log_p1, log_p0 = 0.0, 0.0
    else:
      roots = sorted(((-b - math.sqrt(discriminant)) / (2 * a),
                      (-b + math.sqrt(discriminant)) / (2 * a)))
      if a > 0:  # L > eps outside the roots.
        log_p1 = np.logaddexp(_log_mass_below(roots[0], mu1, s1),
                              _log_mass_above(roots[1], mu1, s1))
        log_p0 = np.logaddexp(_log_mass_below(roots[0], mu0, s0),
                              _log_mass_above(roots[1], mu0, s0))
      else:  # Between them.
        log_p1 = _log_mass_between(roots[0], roots[1], mu1, s1)
        log_p0 = _log_mass_between(roots[0], roots[1], mu0, s0)
  if log_p1 == -math.inf:
    return -math.inf
  remaining = -math.expm1(epsilon + log_p0 - log_p1)
  return float(log_p1 + math.log(remaining)) if remaining > 0 else -math.inf


def epsilon_two_gaussians(mu0: float, s0: float, mu1: float, s1: float,
                          delta: float) -> float:
  """The smallest eps >= 0 with N(mu0, s0^2) and N(mu1, s1^2) (eps,
  delta)-indistinguishable in both directions.

  Raises:
    ValueError: a stddev <= 0 or delta outside (0, 1).
  """
  if not (s0 > 0 and s1 > 0):
    raise ValueError(f'stddevs must be > 0, got {s0} and {s1}.')
  if not 0 < delta < 1:
    raise ValueError(f'delta must be in (0, 1), got {delta}.')
  log_delta = math.log(delta)

  def excess(epsilon):
    return max(_log_delta(mu0, s0, mu1, s1, epsilon),
               _log_delta(mu1, s1, mu0, s0, epsilon)) - log_delta

  if excess(0.0) <= 0:
    return 0.0
  high = 1.0
  while excess(high) > 0:
    high *= 2
  return float(optimize.brentq(excess, high / 2 if high > 1 else 0.0, high,
                               xtol=1e-12))


def cosine_null_log_sf(threshold: float, dimension: int) -> float:
  """log P[X >= t], X the cosine between a fixed vector and a uniformly
  random direction in R^d (density proportional to (1 - t^2)^((d-3)/2)).

  P[X >= t] = I_{1 - t^2}((d - 1) / 2, 1 / 2) / 2 for t >= 0 (regularized
  incomplete beta), and 1 minus that of -t below 0.
  """
  if threshold >= 1:
    return -math.inf
  if threshold <= -1:
    return 0.0
  half_tail = 0.5 * special.betainc((dimension - 1) / 2, 0.5,
                                    1 - threshold**2)
  if threshold >= 0:
    return math.log(half_tail) if half_tail > 0 else -math.inf
  return math.log1p(-half_tail)


def _threshold_epsilon(log_fpr, fnr, delta: float):
  """eps(t) of a threshold test from its log false positive and false
  negative rates (0 where the bound is vacuous)."""
  log_fpr, fnr = np.asarray(log_fpr, float), np.asarray(fnr, float)
  fpr = np.exp(log_fpr)
  with np.errstate(divide='ignore', invalid='ignore'):
    first = np.log(1 - delta - fnr) - log_fpr
    second = np.log(1 - delta - fpr) - np.log(fnr)
  both = np.stack([first, second])
  both[~np.isfinite(both) & ~(both == np.inf)] = -np.inf
  return np.clip(np.max(both, axis=0), 0, None)


def epsilon_closed_form_null(mu: float, std: float, dimension: int,
                             delta: float, grid: int = 10000) -> float:
  """The one-shot estimate for canary cosines fitted by N(mu, std^2) in
  dimension d (module docstring).

  Below d = 1000 the threshold is searched on `grid` points from the null's
  delta quantile to the fit's 1 - delta quantile.

  Raises:
    ValueError: mu <= 0 below d = 1000 (the canaries do not stand out from
      the null), std <= 0, d < 2.
  """
  if dimension < 2:
    raise ValueError(f'dimension must be >= 2, got {dimension}.')
  if dimension >= 1000:
    return epsilon_two_gaussians(0.0, dimension**-0.5, mu, std, delta)
  if not std > 0:
    raise ValueError(f'std must be > 0, got {std}.')
  if not mu > 0:
    raise ValueError(f'the fitted mean cosine must be > 0, got {mu}.')
  # FPR(t) = P[X >= t] runs from 1 - delta down; FNR from 0 up to 1 - delta.
  low = optimize.brentq(
      lambda t: cosine_null_log_sf(t, dimension) - math.log(1 - delta),
      -1 + 1e-12, 1 - 1e-12)
  high = stats.norm.ppf(1 - delta, loc=mu, scale=std)
  thresholds = np.linspace(low, high, grid)
  log_fpr = np.array([cosine_null_log_sf(t, dimension) for t in thresholds])
  fnr = stats.norm.cdf(thresholds, loc=mu, scale=std)
  return float(np.max(_threshold_epsilon(log_fpr, fnr, delta)))


def one_run_p_value(canaries: int, guesses: int, correct: int,
                    epsilon: float, delta: float) -> float:
  """The most an (eps, delta)-DP run allows P[>= `correct` right of
  `guesses`] to be, `canaries` inserted by fair coins (module docstring)."""
  if not 0 <= correct <= guesses <= canaries:
    raise ValueError(
        f'need 0 <= correct <= guesses <= canaries, got {correct}, '
        f'{guesses}, {canaries}.')
  q = 1.0 / (1.0 + math.exp(-epsilon))
  p_value = stats.binom.sf(correct - 1, guesses, q)
  if delta > 0 and correct > 0:
    steps = np.arange(1, correct + 1)
    # scipy's binomial cdf warns on its own underflow far in the tail.
    with np.errstate(divide='ignore'):
      below = stats.binom.cdf(correct - 1, guesses, q)
      # P[correct - i <= B < correct] for i = 1..correct.
      window = below - stats.binom.cdf(correct - 1 - steps, guesses, q)
    p_value += 2 * canaries * delta * float(np.max(window / steps))
  return float(min(p_value, 1.0))


def one_run_epsilon_lower_bound(canaries: int, guesses: int, correct: int,
                                delta: float, confidence: float) -> float:
  """The largest eps whose p-value is below 1 - `confidence`; 0 if none.

  With every guess right the bound is finite: it is the most `guesses`
  can show at this confidence (its ceiling).
  """
  if not 0 < confidence < 1:
    raise ValueError(f'confidence must be in (0, 1), got {confidence}.')
  alpha = 1 - confidence

  def rejected(epsilon):
    return one_run_p_value(canaries, guesses, correct, epsilon, delta) < alpha

  if not rejected(0.0):
    return 0.0
  low, high = 0.0, 1.0
  while rejected(high):
    low, high = high, high * 2
  for _ in range(60):
    middle = (low + high) / 2
    if rejected(middle):
      low = middle
    else:
      high = middle
  return low


def _clopper_pearson_upper(failures, trials: int, alpha: float):
  """One-sided 1 - alpha Clopper-Pearson upper bounds on rates."""
  failures = np.asarray(failures)
  upper = stats.beta.ppf(1 - alpha, failures + 1, trials - failures)
  return np.where(failures >= trials, 1.0, upper)


def threshold_epsilon_lower_bound(inserted: Sequence[float],
                                  held_out: Sequence[float], delta: float,
                                  confidence: float) -> float:
  """Jagielski et al.'s bound over every threshold between the scores,
  with Clopper-Pearson rates Bonferroni-corrected for the thresholds tried.

  Raises:
    ValueError: no inserted or no held-out canaries.
  """
  inserted = np.sort(np.asarray(inserted, float))
  held_out = np.sort(np.asarray(held_out, float))
  if not len(inserted) or not len(held_out):
    raise ValueError('need inserted and held-out canaries.')
  thresholds = np.unique(np.concatenate([inserted, held_out]))
  alpha = (1 - confidence) / (2 * len(thresholds))
  # "Inserted" iff score >= t.
  false_positives = len(held_out) - np.searchsorted(held_out, thresholds)
  false_negatives = np.searchsorted(inserted, thresholds)
  fpr = _clopper_pearson_upper(false_positives, len(held_out), alpha)
  fnr = _clopper_pearson_upper(false_negatives, len(inserted), alpha)
  return float(np.max(_threshold_epsilon(np.log(fpr), fnr, delta)))


def one_shot_epsilon(inserted: Sequence[float], delta: float,
                     dimension: int | None = None,
                     held_out: Sequence[float] | None = None) -> float:
  """The one-shot estimate (Andrew et al. 2024) from inserted canaries'
  cosines: N(mean, std^2) fitted to them, against the closed-form null of
  `dimension` (final model), or against N fitted to the held-out canaries'
  statistics (all iterates, whose null has no closed form).

  Raises:
    ValueError: fewer than 2 inserted (or held-out) canaries, or neither or
      both of `dimension` and `held_out`.
  """
  if (dimension is None) == (held_out is None):
    raise ValueError('give exactly one of dimension and held_out.')
  inserted = np.asarray(inserted, float)
  if len(inserted) < 2:
    raise ValueError(f'need >= 2 inserted canaries, got {len(inserted)}.')
  mean, std = float(np.mean(inserted)), float(np.std(inserted, ddof=1))
  if held_out is None:
    if mean <= 0:
      return 0.0  # The canaries do not stand out from a random direction.
    return epsilon_closed_form_null(mean, std, dimension, delta)
  held_out = np.asarray(held_out, float)
  if len(held_out) < 2:
    raise ValueError(f'need >= 2 held-out canaries, got {len(held_out)}.')
  return epsilon_two_gaussians(float(np.mean(held_out)),
                               float(np.std(held_out, ddof=1)), mean, std,
                               delta)


# The fractions of the canaries the one-run audit guesses about, fixed in
# advance (half on the top scores, half on the bottom ones); the confidence
# is split between them (Bonferroni).
GUESS_FRACTIONS = (0.02, 0.05, 0.1, 0.2, 0.5, 1.0)


def one_run_epsilon_from_scores(inserted: Sequence[float],
                                held_out: Sequence[float], delta: float,
                                confidence: float,
                                guess_fractions: Sequence[float] = GUESS_FRACTIONS
                                ) -> float:
  """Steinke et al.'s one-run bound from the canaries' scores.

  For each fraction f, the auditor guesses r = max(2, round(f m)) canaries:
  "inserted" for the r // 2 highest scores, "held out" for the r - r // 2
  lowest; the bound is the largest over the fractions, each at confidence
  1 - (1 - `confidence`) / len(fractions).
  """
  truth = np.concatenate([np.ones(len(inserted), bool),
                          np.zeros(len(held_out), bool)])
  scores = np.concatenate([np.asarray(inserted, float),
                           np.asarray(held_out, float)])
  canaries = len(scores)
  if canaries < 2:
    raise ValueError(f'need >= 2 canaries, got {canaries}.')
  # Ties are broken by a fixed permutation, not by the canaries' coins.
  order = np.lexsort((np.arange(canaries), -scores))
  each = 1 - (1 - confidence) / len(guess_fractions)
  best = 0.0
  for fraction in guess_fractions:
    guesses = min(canaries, max(2, round(fraction * canaries)))
    top = guesses // 2
    correct = (int(truth[order[:top]].sum())
               + int((~truth[order[canaries - (guesses - top):]]).sum()))
    best = max(best, one_run_epsilon_lower_bound(
        canaries, guesses, correct, delta, each))
  return best


def epsilon_lower_bound(scores: dict[str, tuple[Sequence[float],
                                                 Sequence[float]]],
                        delta: float, confidence: float
                        ) -> tuple[float, dict[str, float]]:
  """The largest of the one-run and the threshold bounds over the named
  statistics ({name: (inserted scores, held-out scores)}), each of the
  2 * len(scores) bounds at confidence 1 - (1 - `confidence`) / their
  number, so that all hold together with probability `confidence`.

  Returns (the bound, each bound by '<statistic>/one_run' or
  '<statistic>/threshold').
  """
  each = 1 - (1 - confidence) / (2 * len(scores))
  bounds = {}
  for name, (inserted, held_out) in scores.items():
    bounds[f'{name}/one_run'] = one_run_epsilon_from_scores(
        inserted, held_out, delta, each)
    bounds[f'{name}/threshold'] = threshold_epsilon_lower_bound(
        inserted, held_out, delta, each)
  return max(bounds.values()), bounds


def one_shot_epsilon_interval(inserted: Sequence[float], delta: float,
                              confidence: float,
                              dimension: int | None = None,
                              held_out: Sequence[float] | None = None,
                              resamples: int = 200,
                              seed: int = 0) -> tuple[float, float]:
  """A percentile bootstrap interval of `one_shot_epsilon` at `confidence`.

  The estimate fits a mean and a variance to the canaries, and at small
  delta the fitted variance's sampling error alone moves epsilon by units
  with a hundred canaries; resampling the canaries (inserted and held-out
  apart) shows that noise. Approximate: a bootstrap, not a bound.
  """
  if not 0 < confidence < 1:
    raise ValueError(f'confidence must be in (0, 1), got {confidence}.')
  rng = np.random.default_rng(seed)
  inserted = np.asarray(inserted, float)
  estimates = []
  for _ in range(resamples):
    resampled_held_out = None if held_out is None else rng.choice(
        np.asarray(held_out, float), len(held_out))
    estimates.append(one_shot_epsilon(
        rng.choice(inserted, len(inserted)), delta, dimension,
        resampled_held_out))
  low, high = np.quantile(
      estimates, [(1 - confidence) / 2, (1 + confidence) / 2],
      method='inverted_cdf')
  return float(low), float(high)
