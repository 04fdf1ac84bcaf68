"""A run's whole configuration, frozen: built once by a binary, passed down.

Nothing below the binaries reads absl flags: `experiments.*` builds one
`RunConfig` from its flags in `main` and hands it to the runner; studies
derive their runs' configurations with `RunConfig.replace`.
"""

import dataclasses
import math
from typing import Any, Mapping, Optional

from aggregators import checks
from aggregators import registry
from aggregators import robust
from dp_fedavg import accounting
from dp_fedavg import dp_sgd
from dp_fedavg import sampling as sampling_lib

# What one (epsilon, delta) protects: a client's whole data (user-level DP on
# the aggregate), or one example of one client (DP-SGD inside every client).
PRIVACY_UNITS = ('user', 'example')
# The mechanism whose parameters example-level DP-SGD takes: its noise
# multiplier, clip and clipping, applied to every example's gradient.
EXAMPLE_MECHANISM = 'gaussian_fixed'
# Where rounds run (`choose_engine`): auto picks the fastest that supports
# the run.
ENGINES = ('auto', 'inprocess', 'vectorized', 'standard')


@dataclasses.dataclass(frozen=True)
class RunConfig:
  """Everything that decides what a run computes (and where it runs).

  `mechanism_values` holds every mechanism parameter (those of the other
  mechanisms too), so that a study can switch `aggregator` and keep the
  values; `params` picks the chosen mechanism's.
  """

  task: str = 'digits'
  data_dir: Optional[str] = None
  data_source: str = 'local'
  num_clients: Optional[int] = None
  partition: str = 'iid'
  dirichlet_alpha: float = 0.5
  silos: Optional[int] = None
  # --task=custom: the user's data and model (dp_fedavg/tasks/custom.py).
  data_path: Optional[str] = None
  model: Optional[str] = None
  test_data_path: Optional[str] = None
  feature_key: str = 'x'
  label_key: str = 'y'
  loss: str = 'auto'
  aggregator: str = 'gaussian_fixed'
  privacy_unit: str = 'user'
  mechanism_values: tuple[tuple[str, Any], ...] = ()
  clients_per_round: int = 20
  sampling: str = 'poisson'
  sampling_groups: int = 0
  rounds: int = 30
  delta: float = 1e-5
  accountant: str = 'auto'
  target_epsilon: Optional[float] = None
  calibrate: str = 'none'
  local_epochs: int = 2
  batch_size: int = 8
  client_lr: float = 0.3
  server_lr: float = 1.0
  server_momentum: float = 0.9
  eval_every: int = 1
  max_diverged_rounds: int = 3
  dropout_rate: float = 0.0
  engine: str = 'auto'
  users_per_worker_client: Optional[int] = None
  user_data_dir: Optional[str] = None
  workers: tuple[str, ...] = ()
  seed: int = 0
  # Robust aggregation and simulated attacks (aggregators.robust).
  robust_rule: str = 'none'
  trim_fraction: float = 0.1
  robust_assumed_byzantine: Optional[int] = None
  krum_selected: Optional[int] = None
  gm_iterations: int = 3
  gm_smoothing: float = 1e-6
  cc_radius: Optional[float] = None
  robust_preaggregation: str = 'none'
  bucket_size: int = 2
  attack: str = 'none'
  byzantine_fraction: float = 0.0
  attack_scale: float = 10.0
  attack_stddev: float = 1.0
  ipm_epsilon: float = 0.1

  @property
  def mechanism(self) -> registry.Mechanism:
    return registry.get(self.aggregator)

  @property
  def params(self) -> Any:
    """The chosen mechanism's parameters (its dataclass)."""
    return self.mechanism.params(dict(self.mechanism_values))

  @property
  def sampling_scheme(self) -> sampling_lib.SamplingScheme:
    return sampling_lib.SamplingScheme(self.sampling)

  @property
  def accountant_kind(self) -> accounting.AccountantKind:
    return accounting.AccountantKind(self.accountant)

  @property
  def example_level(self) -> bool:
    return self.privacy_unit == 'example'

  @property
  def example_dp(self) -> dp_sgd.DpSgdConfig:
    """The clients' DP-SGD (`--privacy_unit=example`): the Gaussian
    mechanism's noise multiplier, clip and clipping, per example.

    Raises:
      checks.ArgumentError: a parameter outside its range.
    """
    params = self.params
    return dp_sgd.DpSgdConfig(
        noise_multiplier=params.noise_multiplier, clip=params.clip,
        clipping=params.clipping, batch_size=self.batch_size,
        local_epochs=self.local_epochs,
    )

  def robustness(self, expected_clients_per_round: float) -> robust.Robustness:
    """The robust rule and attack; f defaults to the expected number of
    Byzantine clients in a cohort, byzantine_fraction * n.

    Raises:
      checks.ArgumentError: a robust parameter outside its range.
    """
    assumed = self.robust_assumed_byzantine
    if assumed is None:
      assumed = round(self.byzantine_fraction * expected_clients_per_round)
    return robust.Robustness(
        rule=self.robust_rule, trim_fraction=self.trim_fraction,
        assumed_byzantine=assumed, krum_selected=self.krum_selected,
        gm_iterations=self.gm_iterations, gm_smoothing=self.gm_smoothing,
        cc_radius=self.cc_radius, preaggregation=self.robust_preaggregation,
        bucket_size=self.bucket_size, attack=self.attack,
        attack_scale=self.attack_scale, attack_stddev=self.attack_stddev,
        ipm_epsilon=self.ipm_epsilon,
    )

  def replace(self, **values: Any) -> 'RunConfig':
    """A copy with `values` changed: fields, or mechanism parameters by name."""
    fields = {f.name for f in dataclasses.fields(self)}
    mechanism = dict(self.mechanism_values)
    unknown = [
        name for name in values
        if name not in fields and name not in mechanism
    ]
    if unknown:
      raise ValueError(f'RunConfig has no field or parameter {unknown}.')
    mechanism.update((k, v) for k, v in values.items() if k not in fields)
    return dataclasses.replace(
        self,
        mechanism_values=tuple(sorted(mechanism.items())),
        **{k: v for k, v in values.items() if k in fields},
    )

  def flat(self) -> dict[str, Any]:
    """Every field and mechanism parameter by name (as config.json has them)."""
    values = {
        f.name: getattr(self, f.name) for f in dataclasses.fields(self)
        if f.name != 'mechanism_values'
    }
    values['workers'] = list(self.workers)
    values.update(self.mechanism_values)
    return values


@dataclasses.dataclass(frozen=True)
class EngineChoice:
  """Where a run's rounds execute, and why.

  `engine` is 'inprocess' (the process's TF graphs in this process,
  `dp_fedavg.inprocess`), 'vectorized' or 'standard' (TFF's worker);
  `stacked_users` says whether the process is the vectorized one (users
  grouped per TFF client, the aggregator built for stacked users) or the
  standard one (a TFF client per user).
  """

  engine: str
  stacked_users: bool
  reason: str

  @property
  def in_process(self) -> bool:
    return self.engine == 'inprocess'


def _stacking_refusal(config: RunConfig) -> Optional[str]:
  """Why the mechanism cannot aggregate stacked users; None if it can."""
  if config.example_level:
    return None
  setting = registry.Setting(
      expected_clients_per_round=max(1, config.clients_per_round),
      noise_seed=config.seed,
      robustness=config.robustness(max(1, config.clients_per_round)),
      rounds=max(1, config.rounds),
      population=config.num_clients,
  )
  return config.mechanism.engine_refusal(config.params, setting)


def choose_engine(config: RunConfig) -> EngineChoice:
  """The engine `config.engine` names; for 'auto', the fastest that runs it.

  auto: in process with users grouped per TFF client, unless the mechanism
  refuses stacked users (secure sums: then the standard engine, whose worker
  runs one client per user faster than this process's graphs do) or
  `--workers` sends the rounds to TFF workers (then the vectorized engine).
  """
  if config.engine in ('standard', 'vectorized'):
    return EngineChoice(config.engine, config.engine == 'vectorized',
                        f'--engine={config.engine}')
  refusal = _stacking_refusal(config)
  if config.engine == 'inprocess':
    if refusal:
      return EngineChoice(
          'inprocess', False,
          f'--engine=inprocess, one TFF client per user: {refusal}')
    return EngineChoice('inprocess', True, '--engine=inprocess')
  if refusal:
    return EngineChoice(
        'standard', False,
        f'--engine=auto: the standard engine, since {refusal[0].lower()}'
        f'{refusal[1:]}')
  if config.workers:
    return EngineChoice(
        'vectorized', True,
        '--engine=auto: the vectorized engine, since --workers runs the rounds '
        'on TFF workers')
  return EngineChoice('inprocess', True, '--engine=auto: the fastest')


def with_defaults(**values: Any) -> RunConfig:
  """A RunConfig whose mechanism parameters start at their defaults."""
  defaults = tuple(sorted(
      (p.name, p.default) for p in registry.parameters()
  ))
  return RunConfig(mechanism_values=defaults).replace(**values)


def range_error(config: RunConfig) -> Optional[str]:
  """The first run-level field outside its range, in flag terms; None if none.

  Mechanism parameters are checked by their factories (`mechanism_error`).
  """
  checks = (
      ('clients_per_round', config.clients_per_round >= 1, 'an integer >= 1'),
      ('num_clients', config.num_clients is None or config.num_clients >= 1,
       'an integer >= 1'),
      ('sampling', config.sampling in _values(sampling_lib.SamplingScheme),
       f'one of {", ".join(_values(sampling_lib.SamplingScheme))}'),
      ('sampling_groups', config.sampling_groups >= 0, 'an integer >= 0'),
      ('rounds', config.rounds >= 1, 'an integer >= 1'),
      ('delta', 0 < config.delta < 1, 'in (0, 1)'),
      ('accountant', config.accountant in _values(accounting.AccountantKind),
       f'one of {", ".join(_values(accounting.AccountantKind))}'),
      ('target_epsilon', config.target_epsilon is None
       or 0 < config.target_epsilon < math.inf, 'a finite number > 0'),
      ('calibrate', config.calibrate in CALIBRATIONS,
       f'one of {", ".join(CALIBRATIONS)}'),
      ('privacy_unit', config.privacy_unit in PRIVACY_UNITS,
       f'one of {", ".join(PRIVACY_UNITS)}'),
  )
  for name, is_allowed, allowed in checks:
    if not is_allowed:
      return out_of_range(name, config.flat()[name], allowed)
  return byzantine_error(config)


def byzantine_error(config: RunConfig) -> Optional[str]:
  """A simulated attack that is not fully asked for, as one line."""
  if not 0 <= config.byzantine_fraction < 1:
    return out_of_range('byzantine_fraction', config.byzantine_fraction, 'in [0, 1)')
  if config.attack != 'none' and config.byzantine_fraction == 0:
    return f'--attack={config.attack} needs --byzantine_fraction > 0.'
  if config.byzantine_fraction > 0 and config.attack == 'none':
    return (
        f'--byzantine_fraction={config.byzantine_fraction} needs --attack: '
        'Byzantine clients that send honest updates are honest clients.'
    )
  return None


CALIBRATIONS = ('none', 'noise')


def _values(enum_type) -> tuple[str, ...]:
  return tuple(member.value for member in enum_type)


def out_of_range(name: str, value: Any, allowed: str) -> str:
  return f'--{name}={value} is out of range: must be {allowed}.'


def population_error(config: RunConfig, num_clients: int) -> Optional[str]:
  """A cohort that does not fit a population of `num_clients`, as one line."""
  if config.sampling != 'full' and not 1 <= config.clients_per_round <= num_clients:
    return (
        f'--clients_per_round={config.clients_per_round} is out of range: must '
        f'be in [1, num_clients={num_clients}] (sampling rate q = '
        'clients_per_round / num_clients must lie in (0, 1]).'
    )
  if config.sampling == sampling_lib.SamplingScheme.CYCLIC_POISSON.value:
    largest = num_clients // config.clients_per_round
    if not 1 <= config.sampling_groups <= largest:
      return (
          f'--sampling_groups={config.sampling_groups} is out of range: '
          f'--sampling=cyclic_poisson needs [1, num_clients // '
          f'clients_per_round = {largest}] groups (each of at least '
          'clients_per_round clients).'
      )
  elif config.sampling_groups:
    return (
        f'--sampling_groups={config.sampling_groups} applies to '
        f'--sampling=cyclic_poisson, not {config.sampling}.'
    )
  return None


def example_level_error(config: RunConfig) -> Optional[str]:
  """Why `--privacy_unit=example` cannot run as configured; None if it can."""
  if config.aggregator != EXAMPLE_MECHANISM:
    return (
        f'--privacy_unit=example runs DP-SGD inside every client with the '
        f'parameters of --aggregator={EXAMPLE_MECHANISM} (--noise_multiplier, '
        f'--clip, --clipping) and averages the clients\' updates without '
        f'server noise; --aggregator={config.aggregator} is user-level only.'
    )
  if config.sampling == sampling_lib.SamplingScheme.CYCLIC_POISSON.value:
    return (
        '--privacy_unit=example accounts each client\'s own participation; '
        '--sampling=cyclic_poisson is for amplified banded MF (user level).'
    )
  params = config.params
  if params.noise_placement != 'server':
    return (
        '--privacy_unit=example adds its noise to every step of the clients\' '
        'DP-SGD; --noise_placement applies to user-level DP only.'
    )
  if config.robust_rule != 'none' or config.attack != 'none':
    return (
        '--privacy_unit=example averages the clients\' updates; robust rules '
        'and simulated attacks are built for user-level DP only.'
    )
  try:
    config.example_dp  # pylint: disable=pointless-statement
  except checks.ArgumentError as e:
    return out_of_range(e.name, e.value, e.allowed)
  return None


def mechanism_error(
    config: RunConfig, default_values: Mapping[str, Any]
) -> Optional[str]:
  """The first problem with the mechanism's parameters, as one line.

  `default_values` are the parameters' defaults: a parameter of another
  mechanism set away from its default is refused, since it would be ignored.
  """
  try:
    mechanism = config.mechanism
  except checks.ArgumentError as e:
    return out_of_range('aggregator', e.value, e.allowed)
  values = dict(config.mechanism_values)
  own = set(mechanism.parameter_names)
  for info in registry.parameters():
    if info.name not in own and values.get(info.name) != default_values.get(
        info.name, info.default
    ):
      return (
          f'--{info.name}={values.get(info.name)} is a parameter of '
          f'--aggregator={"|".join(info.mechanisms)}, not of '
          f'--aggregator={config.aggregator}, which would ignore it.'
      )
  if mechanism.noise is None and config.target_epsilon is not None:
    return (
        '--target_epsilon needs a private --aggregator; '
        f'--aggregator={config.aggregator} spends an infinite epsilon.'
    )
  if config.calibrate == 'noise' and config.target_epsilon is None:
    return '--calibrate=noise needs --target_epsilon.'
  if config.example_level:
    return example_level_error(config)
  try:
    robustness = config.robustness(max(1, config.clients_per_round))
  except checks.ArgumentError as e:
    return out_of_range(e.name, e.value, e.allowed)
  setting = registry.Setting(
      expected_clients_per_round=max(1, config.clients_per_round),
      noise_seed=config.seed,
      robustness=robustness,
      rounds=max(1, config.rounds),
      population=config.num_clients,
  )
  try:
    mechanism.check(config.params, setting)
  except checks.ArgumentError as e:
    return out_of_range(e.name, e.value, e.allowed)
  except (ValueError, TypeError) as e:
    return f'--aggregator={config.aggregator}: {e}'
  if config.engine == 'vectorized':
    refusal = _stacking_refusal(config)
    if refusal:
      return (
          f'--aggregator={config.aggregator} does not run on '
          f'--engine=vectorized: {refusal} Use --engine=standard.'
      )
  if config.engine == 'inprocess' and config.workers:
    return (
        '--engine=inprocess runs the rounds in this process; --workers needs '
        '--engine=standard, vectorized or auto.'
    )
  if config.workers and mechanism.secure_sums:
    return (
        f'--aggregator={config.aggregator} needs the secure-sum simulation, '
        'which runs on one local worker; drop --workers.'
    )
  return None
