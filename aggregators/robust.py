"""Byzantine-robust aggregation, composed with differential privacy soundly.

A `Robustness` names a robust rule (with its pre-aggregation) and, for
simulations, an attack. `GatheredRecords` is the inner aggregation
(`skeleton.RecordAggregation`) that applies them: the clients send every
user's record (clipped, and noised under local DP), the server gathers them
(in cohort order, the Byzantine clients' first; `dp_fedavg.byzantine`),
replaces the Byzantine records with attack updates put through the same
client step, pre-aggregates and applies the rule. With the vectorized engine
the rules see users, not TFF clients: each user's record is gathered.

Which combinations are private, and why (`refusal` enforces it):

* No DP (`--aggregator=none`): any rule; `RobustMeanFactory`.
* Local DP (`gaussian_fixed`, `noise_placement='client'`): any rule. Every
  client clips its update to S and adds N(0, (z S)^2) before sending it, so
  each message is already private (`aggregators.gaussian`, the local-DP
  ledger); the rule, the pre-aggregation and the attack simulation are
  post-processing of those messages.
* Central DP (`gaussian_fixed`, server noise): only centered clipping, in its
  DP form (`GaussianFactory(centered=True)`). Each client sends
  clip_tau(x_i - v) around the public centre v (the previous round's released
  aggregate), so adding or removing one client moves the sum by at most tau =
  `--clip`, and N(0, (z tau)^2) on the sum is the same per-round
  `GaussianDpEvent(z)` as `gaussian_fixed` under the run's sampling.
  Refused: the median, the trimmed mean, Krum, Multi-Krum and the geometric
  median with central noise. When one client changes, their output moves by
  up to about the clip (from one middle value to the next, or to another
  selected record), not clip / n, so noise calibrated for the mean would
  understate epsilon by a factor of order n. Pre-aggregation is refused with
  central noise too: it mixes clients before the clip, so one client could
  move a clipped bucket by 2 tau.
* Any other mechanism: refused (the rules would follow a secure sum, which
  never shows the server a record, or a mechanism calibrated for a sum).

Attacks change no accounting: a Byzantine client's update goes through the
clients' step like any other (clipped, noised under local DP). Under local DP
the attacker sees only noised messages, so its updates are post-processing
and the guarantee covers the simulated release. Under central DP it does for
attacks that read only their own client's data (sign_flip, scaling,
gaussian, label_flip); the omniscient ones (alie, ipm, mimic) compute their
updates from the honest clients' un-noised records, so one honest client
also moves the k attack updates: the simulated release is outside the
guarantee, which then holds against an attacker that cannot read honest
updates (`attacks.READS_HONEST_RECORDS`; the runner warns).
"""

import collections
import dataclasses
from typing import Optional

import numpy as np
import tensorflow as tf
import tensorflow_federated as tff

from aggregators import attacks as attacks_lib
from aggregators import centered_clipping
from aggregators import checks
from aggregators import coordinatewise
from aggregators import geometric_median
from aggregators import krum
from aggregators import noise_seeds
from aggregators import preaggregation as preaggregation_lib
from aggregators import skeleton

RULES = (
    'none', 'median', 'trimmed_mean', 'krum', 'multi_krum', 'geometric_median',
    'centered_clipping',
)
PREAGGREGATIONS = ('none', 'bucketing', 'nnm')
# Rules whose output moves by about the clip when one client changes.
NOT_SUMS = ('median', 'trimmed_mean', 'krum', 'multi_krum', 'geometric_median')


@dataclasses.dataclass(frozen=True)
class Robustness:
  """A robust rule, its pre-aggregation and the simulated attack.

  Attributes:
    rule: one of `RULES`; none is the plain (noised) mean.
    trim_fraction: beta of trimmed_mean, in [0, 1/2).
    assumed_byzantine: f that Krum, Multi-Krum and NNM assume, >= 0.
    krum_selected: m of multi_krum, >= 1; None is n - f for a cohort of n.
    gm_iterations: Weiszfeld steps of geometric_median, >= 1.
    gm_smoothing: nu of geometric_median, > 0.
    cc_radius: tau of centered_clipping applied on the server (no DP, local
      DP); under central DP tau is the clients' clip and this must be None.
    preaggregation: one of `PREAGGREGATIONS`.
    bucket_size: s of bucketing, >= 1.
    attack: one of `attacks.ATTACKS`.
    attack_scale, attack_stddev, ipm_epsilon: see `aggregators.attacks`.
  """

  rule: str = 'none'
  trim_fraction: float = 0.1
  assumed_byzantine: int = 0
  krum_selected: Optional[int] = None
  gm_iterations: int = 3
  gm_smoothing: float = 1e-6
  cc_radius: Optional[float] = None
  preaggregation: str = 'none'
  bucket_size: int = 2
  attack: str = 'none'
  attack_scale: float = 10.0
  attack_stddev: float = 1.0
  ipm_epsilon: float = 0.1

  def __post_init__(self):
    checks.check_choice(self.rule, 'robust_rule', RULES)
    coordinatewise.check_trim_fraction(self.trim_fraction)
    checks.check_integer(
        self.assumed_byzantine, 'robust_assumed_byzantine', 0, 2**31 - 1)
    if self.krum_selected is not None:
      checks.check_integer(self.krum_selected, 'krum_selected', 1, 2**31 - 1)
    checks.check_integer(self.gm_iterations, 'gm_iterations', 1, 10_000)
    checks.check_number(self.gm_smoothing, 'gm_smoothing', 0, strict=True)
    if self.cc_radius is not None:
      checks.check_number(self.cc_radius, 'cc_radius', 0, strict=True)
    checks.check_choice(
        self.preaggregation, 'robust_preaggregation', PREAGGREGATIONS)
    checks.check_integer(self.bucket_size, 'bucket_size', 1, 2**31 - 1)
    attacks_lib.check_attack(self.attack)
    checks.check_number(self.attack_scale, 'attack_scale', -np.inf, False)
    checks.check_number(self.attack_stddev, 'attack_stddev', 0, strict=False)
    checks.check_number(self.ipm_epsilon, 'ipm_epsilon', -np.inf, False)

  @property
  def active(self) -> bool:
    """Whether it changes the plain aggregation at all."""
    return self.rule != 'none' or self.attack != 'none' or (
        self.preaggregation != 'none')

  @property
  def gathers(self) -> bool:
    """Whether the server must see every record (label_flip alone poisons
    data and needs no more than a sum)."""
    return (self.rule != 'none' or self.preaggregation != 'none'
            or self.replaces_updates)

  @property
  def replaces_updates(self) -> bool:
    """Whether Byzantine records are replaced on the server (not label_flip)."""
    return self.attack in attacks_lib.UPDATE_ATTACKS

  def apply(self, records: tf.Tensor, center: tf.Tensor, seed: tf.Tensor):
    """[d]: the pre-aggregation, then the rule, of [n, d] records, n >= 1.

    The rule none sums (the factory divides by the expected cohort).
    """
    if self.preaggregation == 'bucketing':
      records = preaggregation_lib.bucketing(records, self.bucket_size, seed)
    elif self.preaggregation == 'nnm':
      records = preaggregation_lib.nearest_neighbour_mixing(
          records, self.assumed_byzantine)
    if self.rule == 'none':
      return tf.reduce_sum(records, axis=0)
    if self.rule == 'median':
      return coordinatewise.median(records)
    if self.rule == 'trimmed_mean':
      return coordinatewise.trimmed_mean(records, self.trim_fraction)
    if self.rule == 'krum':
      return krum.krum(records, self.assumed_byzantine)
    if self.rule == 'multi_krum':
      selected = self.krum_selected
      if selected is None:
        selected = tf.maximum(tf.shape(records)[0] - self.assumed_byzantine, 1)
      return krum.multi_krum(records, self.assumed_byzantine, selected)
    if self.rule == 'geometric_median':
      return geometric_median.geometric_median(
          records, self.gm_iterations, self.gm_smoothing)
    return centered_clipping.centered_clipping(records, center, self.cc_radius)


def refusal(
    robustness: Robustness, private: bool, client_noise: bool
) -> Optional[str]:
  """Why `robustness` cannot follow a mechanism; None if it can.

  Args:
    robustness: the rule and attack.
    private: the mechanism adds noise (False: `--aggregator=none`).
    client_noise: the noise is added by each client (local DP).
  """
  central = private and not client_noise
  if robustness.rule == 'none' and robustness.preaggregation != 'none':
    return (
        f'--robust_preaggregation={robustness.preaggregation} feeds a robust '
        'rule; before the mean (--robust_rule=none) it would only reweight '
        'the clients.'
    )
  if central and robustness.rule in NOT_SUMS:
    return (
        f'--robust_rule={robustness.rule} after central noise is unsound: when '
        'one client changes, its output moves by up to about the clip, not '
        'clip / n, so noise calibrated for the mean would understate epsilon. '
        'Use --noise_placement=client (local DP), --robust_rule='
        'centered_clipping (central DP), or --aggregator=none.'
    )
  if central and robustness.preaggregation != 'none':
    return (
        f'--robust_preaggregation={robustness.preaggregation} with central noise '
        'is unsound: it mixes clients before the clip, so one client could '
        'move a clipped bucket by twice the clip. Use --noise_placement=client '
        'or --aggregator=none.'
    )
  if robustness.rule == 'centered_clipping':
    if central and robustness.cc_radius is not None:
      return (
          '--cc_radius is the radius of the server-side rule; under central '
          'DP centered clipping clips on the clients, and its radius is '
          '--clip: leave --cc_radius unset.'
      )
    if not central and robustness.cc_radius is None:
      return (
          '--robust_rule=centered_clipping on the server (no DP or local DP) '
          'needs --cc_radius, its clipping radius tau.'
      )
  elif robustness.cc_radius is not None:
    return (
        f'--cc_radius is a parameter of --robust_rule=centered_clipping, not '
        f'of --robust_rule={robustness.rule}, which would ignore it.'
    )
  return None


def gaussian_composition(
    robustness: Robustness, client_noise: bool, secure: bool, adaptive: bool,
) -> tuple[Optional[skeleton.RecordAggregation], bool]:
  """(record aggregation, centered) of a Gaussian factory with `robustness`.

  `centered` is centered clipping in its central-DP form: the clients clip
  around the broadcast centre (the rule is then a sum). The aggregation is
  None where the factory's own (plain or secure) sum serves.

  Raises:
    checks.UnsupportedError: with the reason, for combinations that are
      unsound or not simulated.
  """
  error = refusal(robustness, private=True, client_noise=client_noise)
  if error:
    raise checks.UnsupportedError(error)
  if adaptive:
    raise checks.UnsupportedError(
        'robust rules and attacks take a fixed clip: the adaptive clip\'s '
        'unclipped count is a sum that Byzantine clients would steer.'
    )
  centered = robustness.rule == 'centered_clipping' and not client_noise
  if centered:
    robustness = dataclasses.replace(robustness, rule='none')
  if not robustness.gathers:
    return None, centered
  if secure:
    raise checks.UnsupportedError(
        'with a secure sum the server never sees a record: robust rules other '
        'than centered clipping, and the simulated attacks, need them '
        'gathered.'
    )
  return GatheredRecords(robustness), centered


class GatheredRecords(skeleton.RecordAggregation):
  """Gathers every user's record; attack, pre-aggregation and rule on the server.

  The factory's state must hold `noise_seed` (int64[2], advanced every
  round) and, for centered_clipping, `center` ([D], the previous release);
  this aggregation adds `byzantine_count` (int32), how many of the round's
  first records are Byzantine, which the training loop sets before each
  round (`dp_fedavg.byzantine`).
  """

  gathers = True

  def __init__(self, robustness: Robustness):
    self._robustness = robustness
    self.sums = robustness.rule == 'none'
    self.reads_center = robustness.rule == 'centered_clipping'

  def state_fields(self) -> dict:
    return collections.OrderedDict(byzantine_count=tf.constant(0, tf.int32))

  def aggregate(self, records, counts, params, state, clients):
    del params
    if clients.step is None and self._robustness.replaces_updates:
      raise TypeError('GatheredRecords simulates attacks through the client '
                      'step; the factory must give it.')
    matrix_type = records.type_signature.member

    @tff.tensorflow.computation
    def no_records():
      return tf.zeros([0, matrix_type.shape[1]], matrix_type.dtype)

    @tff.tensorflow.computation(matrix_type, matrix_type)
    def concatenate(gathered, more):
      return tf.concat([gathered, more], axis=0)

    @tff.tensorflow.computation(matrix_type)
    def identity(gathered):
      return tf.identity(gathered)

    # In cohort order: TFF's runtime accumulates the clients in their order
    # (checked in robust_test), which is how the Byzantine rows are known.
    gathered = tff.federated_aggregate(
        records, no_records(), concatenate, concatenate, identity
    )
    server_params = tff.federated_map(clients.params, state)
    robustness = self._robustness
    step = clients.step

    @tff.tensorflow.computation(
        gathered.type_signature.member, server_params.type_signature.member,
        state.type_signature.member,
    )
    def robust_aggregate(matrix, client_params, server_state):
      n = tf.shape(matrix)[0]
      byzantine = tf.minimum(server_state['byzantine_count'], n)
      # Seeds of this round's attack and bucketing, apart from the noise's.
      attack_seed, bucket_seed = tf.unstack(
          tf.random.experimental.stateless_split(
              tf.random.experimental.stateless_fold_in(
                  server_state['noise_seed'], 0x0B12),
              num=2,
          )
      )
      if robustness.replaces_updates:
        sent = attacks_lib.attack_updates(
            robustness.attack, matrix, byzantine, attack_seed,
            robustness.attack_scale, robustness.attack_stddev,
            robustness.ipm_epsilon,
        )
        matrix = tf.concat(
            [step.records(sent, client_params), matrix[byzantine:]], axis=0
        )
      zeros = tf.zeros([matrix_type.shape[1]], matrix_type.dtype)
      center = server_state['center'] if self.reads_center else zeros
      # An empty round (Poisson sampling) moves nothing: centered clipping
      # keeps its centre, the others release zeros.
      empty = center if robustness.rule == 'centered_clipping' else zeros
      return tf.cond(
          n > 0,
          lambda: robustness.apply(matrix, center, bucket_seed),
          lambda: empty,
      )

    return (
        tff.federated_map(robust_aggregate, (gathered, server_params, state)),
        tff.federated_sum(counts),
    )


class RobustMeanFactory(tff.aggregators.UnweightedAggregationFactory):
  """No privacy: a robust rule (or the mean) of the clients' raw updates.

  The plain mean under an attack (rule none) divides the sum by the round's
  number of records. State: `noise_seed` (attacks, bucketing), `center`
  (centered_clipping's previous aggregate) and `byzantine_count`.
  Measurements: `nonfinite_count`, updates replaced by zeros, and
  `byzantine_count`.
  """

  def __init__(
      self, robustness: Robustness, noise_seed: Optional[int] = None,
      stacked_users: bool = False,
  ):
    if not isinstance(robustness, Robustness):
      raise TypeError(f'robustness must be a Robustness, got {robustness!r}.')
    error = refusal(robustness, private=False, client_noise=False)
    if error:
      raise checks.UnsupportedError(error)
    self._robustness = robustness
    self._noise_seed = checks.check_seed(noise_seed)
    self._stacked_users = checks.check_bool(stacked_users, 'stacked_users')

  def create(self, value_type) -> tff.templates.AggregationProcess:
    if self._stacked_users:
      value_type = skeleton.unstacked_type(value_type, 'RobustMeanFactory')
    value_specs = skeleton.float_value_specs(value_type, 'RobustMeanFactory')
    dimension = skeleton.flat_dimension(value_type)
    records = GatheredRecords(self._robustness)

    @tff.tensorflow.computation
    def initial_state():
      return collections.OrderedDict(
          noise_seed=noise_seeds.initial_seed(self._noise_seed),
          center=tf.zeros([dimension], tf.float32),
          **records.state_fields(),
      )

    state_type = initial_state.type_signature.result

    @tff.tensorflow.computation(state_type)
    def client_params(state):
      del state
      return ()

    def keep_users(norms, is_finite, params):
      del params
      return tf.ones_like(norms), collections.OrderedDict(
          nonfinite=tf.cast(tf.logical_not(is_finite), tf.int32),
          participants=tf.ones_like(norms[:, 0], tf.int32),
      )

    client_step = skeleton.ClientStep(
        keep_users, 2, value_type, client_params.type_signature.result,
        self._stacked_users,
    )
    counts_type = client_step.computation(gather=True).type_signature.result[1]

    @tff.tensorflow.computation(
        tff.TensorType(np.float32, [dimension]), counts_type, state_type)
    def finish_round(aggregate, counts, state):
      if records.sums:
        aggregate = aggregate / tf.cast(
            tf.maximum(counts['participants'], 1), tf.float32)
      new_state = collections.OrderedDict(
          noise_seed=tf.random.experimental.stateless_split(
              state['noise_seed'], num=1)[0],
          center=aggregate,
          byzantine_count=state['byzantine_count'],
      )
      measurements = collections.OrderedDict(
          nonfinite_count=counts['nonfinite'],
          byzantine_count=state['byzantine_count'],
      )
      return skeleton.unflatten(aggregate, value_specs), new_state, measurements

    return skeleton.clip_aggregate_finish_process(
        initial_state, client_params, client_step, finish_round, records
    )
