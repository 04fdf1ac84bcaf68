"""DP-FTRL: tree-aggregated Gaussian noise on the prefix sums of client sums.

Kairouz, McMahan, Song, Thakkar, Thakurta & Xu 2021, "Practical and Private
(Deep) Learning without Sampling or Shuffling"; in production for Gboard (Xu
et al. 2023). No sampling is needed for its privacy: it suits clients that
take part when eligible (`--sampling=cyclic`).

Mechanism. Each client's update is clipped to L2 norm S (flat); an update
holding a NaN or an Inf is replaced by zeros and counted. Round t's sum of
clipped updates is x_t. A binary tree over the rounds holds one
N(0, (z S)^2) draw per node (tensorflow-privacy's `TreeAggregator`, seeded;
by default its `EfficientTreeAggregator`, Honaker's estimator, which
combines the same nodes with less variance: post-processing). The tree's
noisy prefix sum is s_t = x_1 + ... + x_t + n_t, and round t releases the
residual s_t - s_{t-1} = x_t + n_t - n_{t-1}, divided by the expected cohort
n (a constant). A server SGD step with learning rate eta then gives
theta_t = theta_0 - eta s_t / n: DP-FTRL. Server momentum (DP-FTRLM) is
post-processing of the residuals. With `restart_period` p the tree restarts
after every p rounds (tensorflow-privacy's `RestartQuery` semantics): a new
tree, and the previous trees' noise stays in the model.

Privacy, under zero-out adjacency (one client's contributions replaced by
zeros). The residuals are post-processing of the tree's nodes, so the
release is the Gaussian mechanism on the nodes with sensitivity^2 the most
any allowed participation pattern puts on them
(`dp_fedavg.correlated_noise`): without restarts, tensorflow-privacy's
worst case for the realised (rounds, participations k, min gap b); with
restarts, the sum over trees of each tree's worst case, which is the depth
of each tree when no client takes part twice in one tree
(`SingleEpochTreeAggregationDpEvent`, composed per tree). The ledger is
run-level: the event is rebuilt from the participation that happened, with
no sampling amplification.

Adaptive clipping (Andrew et al. 2021, as `aggregators.gaussian`), with
restarts only: every round each client also reports b_i = 1 if its update
was not clipped, the server releases sum_i (b_i - 1/2) + N(0, sigma_b^2)
(one client moves it by 1/2) and moves a clip estimate geometrically toward
the target quantile; a new tree starts with the estimate as its clip and
z times it as its nodes' stddev, so each tree is the Gaussian mechanism above
in units of its own clip (the clip is post-processing of earlier releases).
A client that takes part k times adds k / (2 sigma_b)^2 to the
sensitivity^2 / noise^2 of the release: with the trees' worst cases the run
is one Gaussian of multiplier (sens_trees^2 / z^2 + k / (2 sigma_b)^2)^-1/2,
each part bounded by its own worst client.

Parameters: noise multiplier z (node stddev z S), clip S, n, restart period,
Honaker's estimator or the plain tree, noise seed; adaptive: initial clip,
target quantile, learning rate, sigma_b (default max(0.05 n, 5 z)).
"""

import collections
import dataclasses
from typing import Optional

import dp_accounting
import numpy as np
import tensorflow as tf
import tensorflow_federated as tff
from tensorflow_privacy.privacy.dp_query import tree_aggregation

from aggregators import checks
from aggregators import clipping
from aggregators import gaussian
from aggregators import noise_seeds
from aggregators import registry
from aggregators import skeleton
from dp_fedavg import accounting
from dp_fedavg import correlated_noise

TREE_RESTARTS = ('none', 'epoch')


class TreeAggregationFactory(tff.aggregators.UnweightedAggregationFactory):
  """Clips each client update; adds tree-aggregated noise; see the module
  docstring.

  The created process maps client values at `tff.CLIENTS` to
  `(x_t + n_t - n_{t-1}) / expected_clients_per_round` at `tff.SERVER`.

  State: `clip` (float32), `noise_multiplier` (float64), `tree` (the tree's
  `TreeState`: its level buffer, whose first axis grows and shrinks with the
  levels, and the noise generator's seed and stddev), `previous_noise` (the
  previous round's cumulative tree noise n_{t-1}) and `rounds_in_tree`
  (int32).

  Measurements: `clip`; `node_noise_stddev` (z S); `clipped_count`, finite
  updates that were scaled; `nonfinite_count`, updates replaced by zeros;
  `rounds_in_tree`, the rounds in the current tree after this one.
  """

  def __init__(
      self,
      noise_multiplier: float,
      clip: float,
      expected_clients_per_round: float,
      restart_period: Optional[int] = None,
      efficient: bool = True,
      noise_seed: Optional[int] = None,
      stacked_users: bool = False,
      adaptive: Optional[gaussian.AdaptiveClipping] = None,
  ):
    """Initializes the factory.

    Args:
      noise_multiplier: z >= 0, the stddev of each tree node in units of S.
      clip: the L2 bound S of one client's update, > 0.
      expected_clients_per_round: the constant denominator of the mean, > 0.
      restart_period: restart the tree after every this many rounds (>= 1);
        None never restarts it.
      efficient: Honaker's estimator (`EfficientTreeAggregator`) instead of
        the plain tree sums; the same nodes, so the same privacy.
      noise_seed: seed of the tree's noise; None draws one.
      stacked_users: each client's value is a stack of users' updates (the
        vectorized engine); each user is clipped on its own.
      adaptive: track a quantile of the update norms (module docstring);
        the clip changes only when the tree restarts. None keeps `clip`.

    Raises:
      TypeError: if an argument is not of its type.
      checks.ArgumentError: if an argument is outside its range.
      checks.UnsupportedError: adaptive clipping without restarts.
    """
    self._noise_multiplier = checks.check_number(
        noise_multiplier, 'noise_multiplier', 0, strict=False)
    self._clip = checks.check_number(clip, 'clip', 0, strict=True)
    self._expected_clients_per_round = checks.check_number(
        expected_clients_per_round, 'expected_clients_per_round', 0,
        strict=True)
    if restart_period is not None:
      checks.check_integer(restart_period, 'restart_period', 1, 2**31 - 1)
    self._restart_period = restart_period
    self._efficient = checks.check_bool(efficient, 'efficient')
    self._noise_seed = checks.check_seed(noise_seed)
    self._stacked_users = checks.check_bool(stacked_users, 'stacked_users')
    self._adaptive = adaptive
    self._count_stddev = 0.0
    if adaptive is not None:
      if restart_period is None:
        raise checks.UnsupportedError(
            'adaptive clipping needs tree restarts: one tree\'s nodes are '
            'noised for one clip, so the clip may change only when a new '
            'tree starts (tree_restart=epoch).')
      checks.check_number(adaptive.target_quantile, 'target_quantile', 0,
                          strict=False, maximum=1)
      checks.check_number(adaptive.learning_rate, 'learning_rate', 0,
                          strict=False)
      if adaptive.clipped_count_stddev is None:
        self._count_stddev = default_count_stddev(
            self._noise_multiplier, self._expected_clients_per_round)
      else:
        self._count_stddev = checks.check_number(
            adaptive.clipped_count_stddev, 'clipped_count_stddev', 0,
            strict=False)

  @property
  def clipped_count_stddev(self) -> float:
    """sigma_b (0 for a fixed clip)."""
    return self._count_stddev

  def create(
      self, value_type: tff.types.StructWithPythonType | tff.TensorType
  ) -> tff.templates.AggregationProcess:
    if self._stacked_users:
      value_type = skeleton.unstacked_type(value_type, 'TreeAggregationFactory')
    value_specs = skeleton.float_value_specs(
        value_type, 'TreeAggregationFactory')
    node_stddev = self._clip * self._noise_multiplier
    # The generator's own stddev and seed are replaced by the state's
    # (`make_state`), so the tree is built once for every computation.
    generator = tree_aggregation.GaussianNoiseGenerator(
        noise_std=node_stddev, specs=value_specs)
    tree = (tree_aggregation.EfficientTreeAggregator(generator)
            if self._efficient else tree_aggregation.TreeAggregator(generator))
    restart_period = self._restart_period
    denominator = self._expected_clients_per_round
    adaptive = self._adaptive
    noise_multiplier = self._noise_multiplier

    def zeros():
      return tf.nest.map_structure(
          lambda spec: tf.zeros(spec.shape, spec.dtype), value_specs)

    def new_tree(generator_state):
      """A tree's first leaf, as TreeAggregator.init_state builds it, with
      the generator's seed and stddev from `generator_state`."""
      return tree.reset_state(tree_aggregation.TreeState(
          level_buffer=None, level_buffer_idx=None,
          value_generator_state=generator_state))

    @tff.tensorflow.computation
    def initial_state():
      generator_state = generator.make_state(
          noise_seeds.initial_seed(self._noise_seed),
          tf.constant(node_stddev, tf.float32))
      state = collections.OrderedDict(
          clip=tf.constant(self._clip, tf.float32),
          noise_multiplier=tf.constant(self._noise_multiplier, tf.float64),
          tree=new_tree(generator_state),
          previous_noise=zeros(),
          rounds_in_tree=tf.constant(0, tf.int32),
      )
      if adaptive is not None:
        state['clip_estimate'] = tf.constant(self._clip, tf.float32)
        state['clipped_count_stddev'] = tf.constant(
            self._count_stddev, tf.float64)
        # A stream apart from the tree's (which adds integers to its seed).
        state['count_seed'] = tf.random.experimental.stateless_split(
            generator_state.seeds, 2)[1]
      return state

    state_type = initial_state.type_signature.result

    get_clip, clip_update = skeleton.clip_from_state(
        state_type, 'clip', clipping.flat_clip_with_counts, 2, value_type,
        self._stacked_users)
    counts_type = clip_update.type_signature.result[1]

    @tff.tensorflow.computation(value_type, counts_type, state_type)
    def add_tree_noise(value_sum, counts, state):
      cumulative_noise, next_tree = tree.get_cumsum_and_update(state['tree'])
      residual = tf.nest.map_structure(
          lambda x, noise, previous: (x + noise - previous) / denominator,
          value_sum, cumulative_noise, state['previous_noise'])
      rounds_in_tree = state['rounds_in_tree'] + 1
      clip = state['clip']
      extra_state, extra_measurements = {}, {}
      if adaptive is not None:
        count_seeds = tf.random.experimental.stateless_split(
            state['count_seed'], 2)
        count_noise = tf.random.stateless_normal(
            [], seed=count_seeds[0],
            stddev=tf.cast(state['clipped_count_stddev'], tf.float32))
        unclipped_fraction = gaussian.noised_unclipped_fraction(
            counts, count_noise, denominator)
        clip_estimate = adaptive.next_clip(
            state['clip_estimate'], unclipped_fraction)
        extra_state = dict(
            clip_estimate=clip_estimate,
            clipped_count_stddev=state['clipped_count_stddev'],
            count_seed=count_seeds[1])
        extra_measurements = dict(unclipped_fraction=unclipped_fraction)
      if restart_period is None:
        previous_noise = cumulative_noise
      else:
        restart = tf.equal(rounds_in_tree, restart_period)
        if adaptive is not None:
          clip = tf.where(restart, clip_estimate, clip)
        finished_tree = next_tree

        def restarted():
          # The next tree's nodes are noised for the clip it starts with.
          return new_tree(generator.make_state(
              finished_tree.value_generator_state.seeds,
              clip * np.float32(noise_multiplier)))

        next_tree = tf.cond(restart, restarted, lambda: finished_tree)
        previous_noise = tf.cond(restart, zeros, lambda: cumulative_noise)
        rounds_in_tree = tf.where(restart, 0, rounds_in_tree)
      new_state = collections.OrderedDict(
          clip=clip,
          noise_multiplier=state['noise_multiplier'],
          tree=next_tree,
          previous_noise=previous_noise,
          rounds_in_tree=rounds_in_tree,
          **extra_state,
      )
      measurements = collections.OrderedDict(
          clip=state['clip'],
          node_noise_stddev=state['clip'] * tf.cast(
              state['noise_multiplier'], tf.float32),
          clipped_count=counts['clipped'],
          nonfinite_count=counts['nonfinite'],
          rounds_in_tree=rounds_in_tree,
          **extra_measurements,
      )
      return residual, new_state, measurements

    return skeleton.clip_aggregate_finish_process(
        initial_state, get_clip, clip_update, add_tree_noise,
        skeleton.PlainSum(),
    )


def default_count_stddev(noise_multiplier: float,
                         expected_clients_per_round: float) -> float:
  """sigma_b unless set: max(0.05 n, 5 z), as gaussian_adaptive's default.
  Each participation costs the count 1 / (2 sigma_b)^2 <= z^-2 / 100 in
  zCDP terms, against at least z^-2 for the tree's leaf."""
  return max(0.05 * expected_clients_per_round, 5.0 * noise_multiplier)


def _tree_schedules(participation: accounting.Participation,
                    restart_period: Optional[int]) -> list:
  """The realised schedule of each tree: the whole run, or each restart
  period's rounds."""
  if restart_period is None:
    return [participation.schedule()]
  return participation.period_schedules(restart_period)


def run_event(noise_multiplier: float, restart_period: Optional[int],
              participation: accounting.Participation,
              clipped_count_stddev: float = 0.0) -> dp_accounting.DpEvent:
  """The privacy of the rounds `participation` ran (module docstring)."""
  schedules = _tree_schedules(participation, restart_period)
  if clipped_count_stddev > 0:
    if noise_multiplier == 0:
      return dp_accounting.NonPrivateDpEvent()
    # One Gaussian for the trees and the counts: the worst client's
    # sensitivity^2 / noise^2 summed over both, each bounded by its worst.
    tree_part = sum(correlated_noise.tree_sensitivity_squared(s)
                    for s in schedules) / noise_multiplier**2
    count_part = participation.max_participations() / (
        2.0 * clipped_count_stddev)**2
    return dp_accounting.GaussianDpEvent((tree_part + count_part) ** -0.5)
  if restart_period is None:
    return correlated_noise.tree_event(noise_multiplier, schedules[0])
  if all(s.max_participations == 1 for s in schedules):
    return correlated_noise.tree_restart_event(
        noise_multiplier, [s.rounds for s in schedules])
  return correlated_noise.gaussian_event(
      noise_multiplier,
      sum(correlated_noise.tree_sensitivity_squared(s) for s in schedules))


@dataclasses.dataclass(frozen=True)
class DpFtrlTreeParams:
  """dp_ftrl_tree: DP-FTRL, tree-aggregated noise on the prefix sums."""

  noise_multiplier: float = registry.parameter(
      1.0, registry.NOISE_MULTIPLIER_HELP)
  clip: float = registry.parameter(1.0, registry.CLIP_HELP)
  tree_restart: str = registry.parameter(
      'none', f'One of {TREE_RESTARTS}. epoch: a new tree every '
      'num_clients // clients_per_round rounds (one pass of --sampling='
      'cyclic); none: one tree for the whole run.')
  tree_efficient: bool = registry.parameter(
      True, 'Honaker\'s estimator of the prefix sums (less variance, the '
      'same privacy); false uses the plain tree sums.')
  adaptive_clip: bool = registry.parameter(False, gaussian.ADAPTIVE_CLIP_HELP)
  initial_clip: float = gaussian.adaptive_field('initial_clip')
  target_quantile: float = gaussian.adaptive_field('target_quantile')
  clip_learning_rate: float = gaussian.adaptive_field('clip_learning_rate')
  clipped_count_stddev: Optional[float] = gaussian.adaptive_field(
      'clipped_count_stddev')


def _adaptive_of(params: DpFtrlTreeParams
                 ) -> Optional[gaussian.AdaptiveClipping]:
  if not params.adaptive_clip:
    return None
  return gaussian.AdaptiveClipping(
      target_quantile=params.target_quantile,
      learning_rate=params.clip_learning_rate,
      clipped_count_stddev=params.clipped_count_stddev)


def _count_stddev(params: DpFtrlTreeParams, setting: registry.Setting) -> float:
  if not params.adaptive_clip:
    return 0.0
  if params.clipped_count_stddev is not None:
    return params.clipped_count_stddev
  return default_count_stddev(
      params.noise_multiplier, setting.expected_clients_per_round)


def _restart_period(params: DpFtrlTreeParams,
                    setting: registry.Setting) -> Optional[int]:
  checks.check_choice(params.tree_restart, 'tree_restart', TREE_RESTARTS)
  if params.tree_restart == 'none':
    return None
  if setting.population is None:
    # Argument checks before the data is read: any period; the run's own
    # factory and ledger are built with the population.
    return 1
  return max(1, int(setting.population // setting.expected_clients_per_round))


registry.register(registry.Mechanism(
    name='dp_ftrl_tree',
    summary='DP-FTRL: tree-aggregated noise on the prefix sums of clipped '
    'updates (no sampling needed; zero-out adjacency)',
    params_type=DpFtrlTreeParams,
    build_factory=lambda params, setting: TreeAggregationFactory(
        noise_multiplier=params.noise_multiplier,
        clip=params.initial_clip if params.adaptive_clip else params.clip,
        expected_clients_per_round=setting.expected_clients_per_round,
        restart_period=_restart_period(params, setting),
        efficient=params.tree_efficient,
        noise_seed=setting.noise_seed,
        stacked_users=setting.stacked_users,
        adaptive=_adaptive_of(params),
    ),
    build_ledger=lambda params, setting: accounting.RunLevel(
        lambda participation: run_event(
            params.noise_multiplier, _restart_period(params, setting),
            participation, _count_stddev(params, setting))),
    noise=registry.NoiseParameter('noise_multiplier'),
    argument_names=lambda params: {
        'clip': 'initial_clip' if params.adaptive_clip else 'clip',
        'learning_rate': 'clip_learning_rate',
        'restart_period': 'tree_restart',
    },
))
