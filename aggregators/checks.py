"""Argument checks of the factories, with errors that name what is wrong.

Two kinds of refusal, so that callers can tell them apart:
* `ArgumentError`: one argument outside its range. It carries the argument's
  name, its value and what is allowed, so the binaries can restate it for the
  flag the argument came from (see `aggregators.registry`).
* `UnsupportedError`: arguments that are each fine but cannot go together
  (client noise with an adaptive clip, secure sums of stacked users), with
  the reason.
"""

import math
from typing import Any, Optional, Sequence

import numpy as np


class ArgumentError(ValueError):
  """`name` is outside its range: its `value` is not `allowed`."""

  def __init__(self, name: str, value: Any, allowed: str):
    self.name, self.value, self.allowed = name, value, allowed
    super().__init__(f'{name} must be {allowed}, got {value!r}.')

  def renamed(self, name: str) -> 'ArgumentError':
    """The same error for the argument called `name` by the caller."""
    return ArgumentError(name, self.value, self.allowed)


class UnsupportedError(ValueError):
  """A combination of arguments that a factory refuses, with the reason."""


def check_number(
    value,
    name: str,
    minimum: float,
    strict: bool,
    maximum: Optional[float] = None,
    strict_maximum: bool = False,
) -> float:
  """`value` as a Python float, finite, above `minimum` and below `maximum`.

  Raises:
    TypeError: `value` is not a number.
    ArgumentError: it is not finite or outside the range.
  """
  if isinstance(value, bool) or not isinstance(value, (int, float, np.number)):
    raise TypeError(f'{name} must be a number, got {value!r}.')
  number = float(value)
  low = f'{"(" if strict else "["}{minimum:g}'
  if maximum is None:
    allowed = f'a finite number {">" if strict else ">="} {minimum:g}'
  else:
    allowed = f'in {low}, {maximum:g}{")" if strict_maximum else "]"}'
  too_low = number < minimum or (strict and number == minimum)
  too_high = maximum is not None and (
      number > maximum or (strict_maximum and number == maximum)
  )
  if not math.isfinite(number) or too_low or too_high:
    raise ArgumentError(name, value, allowed)
  return number


def check_integer(value, name: str, minimum: int, maximum: int) -> int:
  """`value`, an int in [minimum, maximum]; ArgumentError otherwise."""
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not (
      minimum <= value <= maximum
  ):
    raise ArgumentError(name, value, f'an integer in [{minimum}, {maximum}]')
  return int(value)


def check_choice(value, name: str, choices: Sequence[str]) -> str:
  """`value`, one of `choices`; ArgumentError otherwise."""
  if value not in choices:
    raise ArgumentError(name, value, f'one of {", ".join(choices)}')
  return value


def check_bool(value, name: str) -> bool:
  if not isinstance(value, bool):
    raise TypeError(f'{name} must be a bool, got {value!r}.')
  return value


def check_seed(noise_seed: Optional[int]) -> Optional[int]:
  if noise_seed is not None and (
      isinstance(noise_seed, bool) or not isinstance(noise_seed, int)
  ):
    raise TypeError(f'noise_seed must be an int or None, got {noise_seed!r}.')
  return noise_seed
