"""Byzantine attacks, for simulation only.

A round's records arrive at the server as a [n, d] matrix whose first k rows
belong to the Byzantine clients of the cohort (the training loop puts them
first; `dp_fedavg.byzantine`). `attack_updates` returns the k updates they
send instead of their honest ones. The caller then passes them through the
clients' step (clipping, client noise), as every other update: attack
updates are clipped like honest ones, so no privacy statement changes.

The attacker is omniscient, the standard threat model of the robustness
literature: it sees the round's honest records as they reach the server
(clipped, centred under centered clipping, noised under local DP) and its
own clients' honest records.

* sign_flip: -x_j, its own record reversed.
* scaling: lambda x_j (`attack_scale`).
* gaussian: N(0, sigma^2 I) (`attack_stddev`), independent per client.
* alie ("A Little Is Enough", Baruch, Baruch & Goldberg 2019): every
  Byzantine client sends mu - z sigma, mu and sigma the coordinate-wise mean
  and standard deviation of the honest records, z = Phi^-1((n - s) / n) with
  s = floor(n / 2 + 1) - f (n the cohort, f = k its Byzantine clients): the
  largest shift that still hides among the honest values.
* ipm (inner-product manipulation, Xie, Koyejo & Gupta 2020): -epsilon mu
  (`ipm_epsilon`).
* mimic (Karimireddy, He & Jaggi 2022): every Byzantine client copies one
  honest record (the first honest one of the round, a random honest client
  since cohorts are random), over-weighting that client's data.
* label_flip: a data attack. The Byzantine clients train honestly on their
  data with every label y replaced by C - 1 - y; their records are not
  replaced here.
"""

import tensorflow as tf

from aggregators import checks

ATTACKS = (
    'none', 'sign_flip', 'scaling', 'gaussian', 'alie', 'ipm', 'mimic',
    'label_flip',
)
# Attacks that replace records on the server (label_flip poisons data).
UPDATE_ATTACKS = ('sign_flip', 'scaling', 'gaussian', 'alie', 'ipm', 'mimic')
# Attacks computed from the honest clients' records (omniscient).
READS_HONEST_RECORDS = ('alie', 'ipm', 'mimic')


def check_attack(attack: str) -> str:
  return checks.check_choice(attack, 'attack', ATTACKS)


def alie_z(cohort: tf.Tensor, byzantine: tf.Tensor) -> tf.Tensor:
  """z of ALIE for a cohort of n records of which f are Byzantine (float32)."""
  n = tf.cast(cohort, tf.float64)
  supporters = tf.floor(n / 2.0 + 1.0) - tf.cast(byzantine, tf.float64)
  # For f >= n / 2 + 1 the quantile leaves (0, 1); clamp it into range.
  quantile = tf.clip_by_value((n - supporters) / n, 1e-6, 1.0 - 1e-6)
  return tf.cast(tf.math.ndtri(quantile), tf.float32)


def attack_updates(
    attack: str,
    records: tf.Tensor,
    byzantine: tf.Tensor,
    seed: tf.Tensor,
    attack_scale: float = 1.0,
    attack_stddev: float = 1.0,
    ipm_epsilon: float = 0.1,
) -> tf.Tensor:
  """[k, d]: the updates the k = `byzantine` first rows send instead.

  Args:
    attack: one of `UPDATE_ATTACKS`.
    records: [n, d], the round's records, the Byzantine clients' first.
    byzantine: int32 scalar k, 0 <= k <= n.
    seed: stateless int64[2] seed (gaussian).
    attack_scale, attack_stddev, ipm_epsilon: see the module docstring.
  """
  if attack not in UPDATE_ATTACKS:
    raise ValueError(f'attack must be one of {UPDATE_ATTACKS}, got {attack!r}.')
  own = records[:byzantine]
  if attack == 'sign_flip':
    return -own
  if attack == 'scaling':
    return attack_scale * own
  if attack == 'gaussian':
    return tf.random.stateless_normal(
        tf.shape(own), seed=seed, stddev=attack_stddev
    )
  honest = records[byzantine:]
  honest_count = tf.shape(honest)[0]
  # With no honest record in the round there is nothing to imitate: the
  # omniscient attacks send zeros.
  mean = tf.math.divide_no_nan(
      tf.reduce_sum(honest, axis=0), tf.cast(honest_count, tf.float32)
  )
  if attack == 'alie':
    stddev = tf.sqrt(tf.maximum(tf.math.divide_no_nan(
        tf.reduce_sum(tf.square(honest), axis=0),
        tf.cast(honest_count, tf.float32),
    ) - tf.square(mean), 0.0))
    sent = mean - alie_z(tf.shape(records)[0], byzantine) * stddev
  elif attack == 'ipm':
    sent = -ipm_epsilon * mean
  else:  # mimic
    sent = tf.cond(
        honest_count > 0, lambda: honest[0], lambda: tf.zeros_like(mean)
    )
  return tf.tile(sent[tf.newaxis], tf.stack([byzantine, 1]))
