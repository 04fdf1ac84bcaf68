"""The mechanisms, by name: parameters, factory, privacy ledger and refusals.

Each mechanism module registers one `Mechanism` per name it offers, next to
its factory (`register(...)` at the bottom of the module). An entry says:
* its parameters: one frozen dataclass whose fields (name, type, default,
  `help` in the field's metadata) are the binaries' flags;
* how to build its `tff.aggregators` factory for a `Setting` (cohort size,
  model size, noise seed, engine). The factory's own argument checks are the
  only validation: `check` builds it and restates an `ArgumentError` for the
  parameter it came from, and the binaries print that as their one-line
  error;
* its privacy ledger (`dp_fedavg.accounting`): how its privacy composes over
  the rounds, built from the same parameters, so that a factory is never
  accounted with another mechanism's statement;
* which parameter calibration and sweeps vary (`NoiseParameter`);
* whether it sums with secure aggregation, which runs only where TFF's secure
  intrinsics are simulated (one local worker). Engine refusals come from the
  factory itself (`engine_refusal`).

Adding a mechanism is a new module with a factory, a parameters dataclass and
a `register` call, plus its name in `_BUILT_IN_MODULES`; see the README's
"Adding a mechanism".
"""

import dataclasses
import importlib
import typing
from typing import Any, Callable, Mapping, Optional

import dp_accounting
import tensorflow_federated as tff

from aggregators import checks
from aggregators import robust
from dp_fedavg import accounting

# Loaded on the first look-up, so that importing one mechanism does not import
# them all.
_BUILT_IN_MODULES = (
    'aggregators.gaussian', 'aggregators.laplace', 'aggregators.distributed_dp',
    'aggregators.dp_ftrl', 'aggregators.banded_mf',
)
_MECHANISMS: dict[str, 'Mechanism'] = {}


# Helps of parameters several mechanisms share (one flag each).
NOISE_MULTIPLIER_HELP = (
    'z: the noise stddev in units of the clip: on the sum (gaussian_*: the '
    'total z, split with the unclipped count when the clip adapts), on each '
    'tree node (dp_ftrl_tree) or on each round\'s draw before the '
    'strategy\'s inverse (banded_mf).'
)
CLIP_HELP = (
    'L2 norm bound S of one client\'s whole update (a fixed clip); with '
    '--privacy_unit=example, of one example\'s gradient.'
)


def parameter(default: Any, help: str) -> Any:  # pylint: disable=redefined-builtin
  """A parameters dataclass field: its default and its flag's help."""
  return dataclasses.field(default=default, metadata={'help': help})


@dataclasses.dataclass(frozen=True)
class Setting:
  """What a mechanism is built for, beyond its parameters.

  Attributes:
    expected_clients_per_round: n, the cohort the mean divides by.
    model_dimension: the number of values in a model update; needed by
      mechanisms whose privacy depends on it (distributed DP).
    noise_seed: seed of the server's noise stream; None draws one.
    stacked_users: each TFF client carries a stack of users (the vectorized
      engine).
    robustness: the robust rule and simulated attack
      (`aggregators.robust.Robustness`); None for the plain aggregation.
    rounds: the run's planned rounds; needed by mechanisms whose noise is
      planned for the whole run (matrix factorization).
    population: the number of clients; needed by mechanisms that act once
      per pass over the population (a tree restarted every epoch).
    sampling: the run's `dp_fedavg.sampling.SamplingScheme`, for ledgers
      whose analysis depends on it (amplified banded MF); None if unknown.
    sampling_groups: the groups of cyclic Poisson sampling.
  """

  expected_clients_per_round: float
  model_dimension: Optional[int] = None
  noise_seed: Optional[int] = None
  stacked_users: bool = False
  robustness: Optional[robust.Robustness] = None
  rounds: Optional[int] = None
  population: Optional[int] = None
  sampling: Any = None
  sampling_groups: int = 0

  @property
  def robust(self) -> bool:
    """Whether a robust rule or an attack is asked for."""
    return self.robustness is not None and self.robustness.active


@dataclasses.dataclass(frozen=True)
class NoiseParameter:
  """The parameter that sets a mechanism's noise, for calibration and sweeps.

  `to_noise` maps its value to the accountant's noise parameter (larger is
  more private), `from_noise` back.
  """

  name: str
  to_noise: Callable[[float], float] = float
  from_noise: Callable[[float], float] = float


@dataclasses.dataclass(frozen=True)
class Mechanism:
  """One registered mechanism; see the module docstring.

  Attributes:
    name: the `--aggregator` value.
    summary: one line for help texts.
    params_type: frozen dataclass of its parameters (fields made with
      `parameter`).
    build_factory: (params, Setting) -> the factory; None is the plain mean.
    build_ledger: (params, Setting) -> its `accounting` ledger.
    noise: the parameter calibration varies; None for no privacy.
    secure_sums: whether it sums with secure aggregation.
    argument_names: factory argument -> parameter, where the names differ
      (a function of the parameters, for mechanisms that pass different
      parameters to one argument).
    robust: whether `build_factory` composes `Setting.robustness` (robust
      rules, attacks); `factory` refuses it for the others.
    utility_notes: (params, Setting, planned `accounting.Participation`) ->
      lines on the noise's expected error that the privacy report and the
      training log print (matrix factorization against DP-SGD).
  """

  name: str
  summary: str
  params_type: type
  build_factory: Callable[[Any, Setting], Optional[
      tff.aggregators.UnweightedAggregationFactory]]
  build_ledger: Callable[[Any, Setting], accounting.MechanismLedger]
  noise: Optional[NoiseParameter] = None
  secure_sums: bool = False
  argument_names: Callable[[Any], Mapping[str, str]] = lambda params: {}
  robust: bool = False
  utility_notes: Callable[[Any, Setting, accounting.Participation],
                          list[str]] = lambda params, setting, planned: []

  @property
  def parameter_names(self) -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(self.params_type))

  def params(self, values: Mapping[str, Any]) -> Any:
    """Its parameters from `values`, which may hold other mechanisms' too."""
    return self.params_type(**{
        name: values[name] for name in self.parameter_names if name in values
    })

  def noise_of(self, params) -> float:
    """The accountant's noise parameter of `params` (0 without privacy)."""
    if self.noise is None:
      return 0.0
    return self.noise.to_noise(getattr(params, self.noise.name))

  def with_noise(self, params, noise: float):
    """`params` with the noise parameter set from the accountant's `noise`."""
    return dataclasses.replace(
        params, **{self.noise.name: self.noise.from_noise(noise)}
    )

  def factory(
      self, params, setting: Setting
  ) -> Optional[tff.aggregators.UnweightedAggregationFactory]:
    """Its factory for `setting`; None is the plain mean.

    Raises:
      checks.UnsupportedError: robust rules or attacks for a mechanism that
        does not compose them.
    """
    if setting.robust and not self.robust:
      robust_names = ', '.join(m.name for m in map(get, names()) if m.robust)
      raise checks.UnsupportedError(
          f'robust rules and attacks run with {robust_names}: {self.name}\'s '
          'noise is calibrated for a sum, or its sum is secure or adaptive.'
      )
    return self.build_factory(params, setting)

  def check(self, params, setting: Setting) -> None:
    """Builds the factory once; raises its refusal in parameter terms.

    Raises:
      checks.ArgumentError: naming the parameter (not the factory argument).
      ValueError, TypeError: other refusals of the factory.
    """
    try:
      self.factory(params, setting)
    except checks.ArgumentError as e:
      raise e.renamed(self.argument_names(params).get(e.name, e.name)) from e

  def engine_refusal(self, params, setting: Setting) -> Optional[str]:
    """Why the factory refuses stacked users (the vectorized engine); None if
    it takes them."""
    try:
      self.factory(params, dataclasses.replace(setting, stacked_users=True))
    except checks.UnsupportedError as e:
      return str(e)
    return None


def register(mechanism: Mechanism) -> Mechanism:
  """Adds `mechanism`; its shared parameters must agree with other entries'.

  Raises:
    ValueError: the name is taken, or a parameter of the same name elsewhere
      has another type or default (they are one flag).
  """
  if mechanism.name in _MECHANISMS:
    raise ValueError(f'mechanism {mechanism.name!r} is already registered.')
  for field in dataclasses.fields(mechanism.params_type):
    for other in _MECHANISMS.values():
      for other_field in dataclasses.fields(other.params_type):
        if other_field.name == field.name and (
            other_field.default != field.default
            or _field_type(other)[field.name] != _field_type(mechanism)[field.name]
        ):
          raise ValueError(
              f'{mechanism.name}.{field.name} differs from {other.name}\'s '
              'parameter of that name (type or default); they are one flag.'
          )
  _MECHANISMS[mechanism.name] = mechanism
  return mechanism


def _field_type(mechanism: Mechanism) -> dict[str, Any]:
  return typing.get_type_hints(mechanism.params_type)


def _load_built_ins() -> None:
  for module in _BUILT_IN_MODULES:
    importlib.import_module(module)


def names() -> tuple[str, ...]:
  """Every registered mechanism's name: none first, then alphabetical (the
  order of registration depends on the order of imports)."""
  _load_built_ins()
  return tuple(sorted(_MECHANISMS, key=lambda name: (name != 'none', name)))


def get(name: str) -> Mechanism:
  """The mechanism called `name`; ArgumentError naming the choices."""
  if name not in names():
    raise checks.ArgumentError('aggregator', name, f'one of {", ".join(names())}')
  return _MECHANISMS[name]


@dataclasses.dataclass(frozen=True)
class ParameterInfo:
  """One parameter across mechanisms: a flag."""

  name: str
  type: Any
  default: Any
  help: str
  mechanisms: tuple[str, ...]


def parameters() -> list[ParameterInfo]:
  """Every mechanism parameter once, with the mechanisms that take it."""
  found: dict[str, ParameterInfo] = {}
  for mechanism in map(get, names()):
    types = _field_type(mechanism)
    for field in dataclasses.fields(mechanism.params_type):
      if field.name in found:
        info = found[field.name]
        found[field.name] = dataclasses.replace(
            info, mechanisms=info.mechanisms + (mechanism.name,)
        )
      else:
        found[field.name] = ParameterInfo(
            field.name, types[field.name], field.default,
            field.metadata.get('help', ''), (mechanism.name,),
        )
  return list(found.values())


@dataclasses.dataclass(frozen=True)
class NoParameters:
  """Plain FedAvg takes none."""


def _no_privacy_factory(params, setting: Setting):
  """The plain mean, or a robust rule of the raw updates."""
  del params
  if not setting.robust or not setting.robustness.gathers:
    return None
  return robust.RobustMeanFactory(
      setting.robustness, setting.noise_seed, setting.stacked_users)


register(Mechanism(
    name='none',
    summary='plain (non-private) FedAvg: the unweighted mean, epsilon infinite',
    params_type=NoParameters,
    build_factory=_no_privacy_factory,
    robust=True,
    build_ledger=lambda params, setting: accounting.SampledRounds(
        dp_accounting.NonPrivateDpEvent(),
        lambda state: dp_accounting.NonPrivateDpEvent(),
    ),
))
