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

Parameters: noise multiplier z (node stddev z S), clip S, n, restart period,
Honaker's estimator or the plain tree, noise seed.
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

    Raises:
      TypeError: if an argument is not of its type.
      checks.ArgumentError: if an argument is outside its range.
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

    def zeros():
      return tf.nest.map_structure(
          lambda spec: tf.zeros(spec.shape, spec.dtype), value_specs)

    @tff.tensorflow.computation
    def initial_state():
      generator_state = generator.make_state(
          noise_seeds.initial_seed(self._noise_seed),
          tf.constant(node_stddev, tf.float32))
      return collections.OrderedDict(
          clip=tf.constant(self._clip, tf.float32),
          noise_multiplier=tf.constant(self._noise_multiplier, tf.float64),
          # The first leaf's state, as TreeAggregator.init_state builds it.
          tree=tree.reset_state(tree_aggregation.TreeState(
              level_buffer=None, level_buffer_idx=None,
              value_generator_state=generator_state)),
          previous_noise=zeros(),
          rounds_in_tree=tf.constant(0, tf.int32),
      )

    state_type = initial_state.type_signature.result

    @tff.tensorflow.computation(state_type)
    def get_clip(state):
      return state['clip']

    clip_update = skeleton.client_update_computation(
        clipping.flat_clip_with_counts, 2, value_type,
        tff.TensorType(np.float32), self._stacked_users,
    )
    counts_type = clip_update.type_signature.result[1]

    @tff.tensorflow.computation(value_type, counts_type, state_type)
    def add_tree_noise(value_sum, counts, state):
      cumulative_noise, next_tree = tree.get_cumsum_and_update(state['tree'])
      residual = tf.nest.map_structure(
          lambda x, noise, previous: (x + noise - previous) / denominator,
          value_sum, cumulative_noise, state['previous_noise'])
      rounds_in_tree = state['rounds_in_tree'] + 1
      if restart_period is None:
        previous_noise = cumulative_noise
      else:
        restart = tf.equal(rounds_in_tree, restart_period)
        next_tree = tf.cond(
            restart, lambda: tree.reset_state(next_tree), lambda: next_tree)
        previous_noise = tf.cond(restart, zeros, lambda: cumulative_noise)
        rounds_in_tree = tf.where(restart, 0, rounds_in_tree)
      new_state = collections.OrderedDict(
          clip=state['clip'],
          noise_multiplier=state['noise_multiplier'],
          tree=next_tree,
          previous_noise=previous_noise,
          rounds_in_tree=rounds_in_tree,
      )
      measurements = collections.OrderedDict(
          clip=state['clip'],
          node_noise_stddev=state['clip'] * tf.cast(
              state['noise_multiplier'], tf.float32),
          clipped_count=counts['clipped'],
          nonfinite_count=counts['nonfinite'],
          rounds_in_tree=rounds_in_tree,
      )
      return residual, new_state, measurements

    return skeleton.clip_aggregate_finish_process(
        initial_state, get_clip, clip_update, add_tree_noise,
        skeleton.PlainSum(),
    )


def run_event(noise_multiplier: float, restart_period: Optional[int],
              cohorts) -> dp_accounting.DpEvent:
  """The privacy of the rounds `cohorts` ran (module docstring)."""
  if restart_period is None:
    return correlated_noise.tree_event(
        noise_multiplier, correlated_noise.realised_schedule(cohorts))
  trees = [cohorts[start:start + restart_period]
           for start in range(0, len(cohorts), restart_period)]
  schedules = [correlated_noise.realised_schedule(t) for t in trees]
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


def _restart_period(params: DpFtrlTreeParams,
                    setting: registry.Setting) -> Optional[int]:
  checks.check_choice(params.tree_restart, 'tree_restart', TREE_RESTARTS)
  if params.tree_restart == 'none' or setting.population is None:
    # Without the population (argument checks before the data is read)
    # the factory is built without restarts; the run's own is built with.
    return None
  return max(1, int(setting.population // setting.expected_clients_per_round))


registry.register(registry.Mechanism(
    name='dp_ftrl_tree',
    summary='DP-FTRL: tree-aggregated noise on the prefix sums of clipped '
    'updates (no sampling needed; zero-out adjacency)',
    params_type=DpFtrlTreeParams,
    build_factory=lambda params, setting: TreeAggregationFactory(
        noise_multiplier=params.noise_multiplier,
        clip=params.clip,
        expected_clients_per_round=setting.expected_clients_per_round,
        restart_period=_restart_period(params, setting),
        efficient=params.tree_efficient,
        noise_seed=setting.noise_seed,
        stacked_users=setting.stacked_users,
    ),
    build_ledger=lambda params, setting: accounting.RunLevel(
        lambda participation: run_event(
            params.noise_multiplier, _restart_period(params, setting),
            participation.cohorts)),
    noise=registry.NoiseParameter('noise_multiplier'),
))
