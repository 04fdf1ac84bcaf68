"""Flags of robust aggregation and simulated Byzantine attacks.

Shared by `experiments.train` and the studies; their values become the
`RunConfig`'s robust fields (`aggregators.robust` says which combinations
with DP are sound, and refuses the others).
"""

from absl import flags

from aggregators import attacks
from aggregators import robust

ROBUST_RULE = flags.DEFINE_string(
    'robust_rule', 'none',
    f'One of {robust.RULES}: the server\'s robust rule. With '
    '--aggregator=gaussian_fixed and server noise only centered_clipping (its '
    'central-DP form, tau = --clip); any rule with --noise_placement=client '
    '(local DP) or --aggregator=none.')
TRIM_FRACTION = flags.DEFINE_float(
    'trim_fraction', 0.1,
    'trimmed_mean: fraction beta in [0, 0.5) of values dropped at each end.')
ROBUST_ASSUMED_BYZANTINE = flags.DEFINE_integer(
    'robust_assumed_byzantine', None,
    'f that krum, multi_krum and nnm assume; default round(byzantine_fraction '
    '* clients_per_round).')
KRUM_SELECTED = flags.DEFINE_integer(
    'krum_selected', None,
    'multi_krum: records averaged (m); default n - f for each round\'s n.')
GM_ITERATIONS = flags.DEFINE_integer(
    'gm_iterations', 3, 'geometric_median: smoothed Weiszfeld steps.')
GM_SMOOTHING = flags.DEFINE_float(
    'gm_smoothing', 1e-6, 'geometric_median: smoothing nu > 0.')
CC_RADIUS = flags.DEFINE_float(
    'cc_radius', None,
    'centered_clipping on the server (--aggregator=none or client noise): the '
    'radius tau. Unset under central DP, where tau is --clip.')
ROBUST_PREAGGREGATION = flags.DEFINE_string(
    'robust_preaggregation', 'none',
    f'One of {robust.PREAGGREGATIONS}, applied before the rule (not with '
    'central noise).')
BUCKET_SIZE = flags.DEFINE_integer(
    'bucket_size', 2, 'bucketing: records averaged per bucket (s).')
ATTACK = flags.DEFINE_string(
    'attack', 'none',
    f'Simulated attack, one of {attacks.ATTACKS}: what the Byzantine clients '
    'send (see aggregators/attacks.py). Needs --byzantine_fraction.')
BYZANTINE_FRACTION = flags.DEFINE_float(
    'byzantine_fraction', 0.0,
    'Fraction in [0, 1) of the population that is Byzantine: a fixed set '
    'chosen by --seed; those sampled in a round attack.')
ATTACK_SCALE = flags.DEFINE_float(
    'attack_scale', 10.0, 'scaling: the factor lambda of the update.')
ATTACK_STDDEV = flags.DEFINE_float(
    'attack_stddev', 1.0, 'gaussian: stddev of each coordinate sent.')
IPM_EPSILON = flags.DEFINE_float(
    'ipm_epsilon', 0.1, 'ipm: epsilon of -epsilon * (honest mean).')

FLAGS = (
    ROBUST_RULE, TRIM_FRACTION, ROBUST_ASSUMED_BYZANTINE, KRUM_SELECTED,
    GM_ITERATIONS, GM_SMOOTHING, CC_RADIUS, ROBUST_PREAGGREGATION, BUCKET_SIZE,
    ATTACK, BYZANTINE_FRACTION, ATTACK_SCALE, ATTACK_STDDEV, IPM_EPSILON,
)
