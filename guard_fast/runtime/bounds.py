"""Bounded numbers: a float field's valid range declared once as a type (Radius, Positive, NonNegative, Fraction01),
checked by `check_bounds` for every config class that has such a field (runtime.config.validate calls it)."""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass
from typing import Annotated, Any

from guard_fast.runtime.errors import ConfigError


@dataclass(frozen=True)
class Bound:
    """A float field's valid range; NaN and infinities are never valid."""

    low: float
    high: float = math.inf
    low_open: bool = True
    text: str = ""

    def check(self, key: str, value: float) -> None:
        above = value > self.low if self.low_open else value >= self.low
        if not (math.isfinite(value) and above and value <= self.high):
            raise ConfigError(f"{key} = {value}: must be {self.text}")


Radius = Annotated[float, Bound(0.0, 1.0, True, "an L-inf radius (or step) in (0, 1] pixel units, e.g. 8/255")]
"""an L-inf radius or attack step size in [0,1] pixel units: 0 < r <= 1"""
Positive = Annotated[float, Bound(0.0, math.inf, True, "a finite number > 0")]
"""a learning rate, coefficient or step that the formula divides by or needs > 0"""
NonNegative = Annotated[float, Bound(0.0, math.inf, False, "a finite number >= 0")]
"""a momentum, decay or coefficient where 0 switches the term off"""
Fraction01 = Annotated[float, Bound(0.0, 1.0, True, "in (0, 1]")]
"""a fraction in (0, 1]"""


def split_bound(tp: Any) -> tuple[Any, Bound | None]:
    """(the plain type, its Bound or None) of an annotation such as Radius or list[Radius]."""
    if typing.get_origin(tp) is Annotated:
        base, *meta = typing.get_args(tp)
        return base, next((m for m in meta if isinstance(m, Bound)), None)
    return tp, None


def check_bounds(cfg: Any, prefix: str = "") -> None:
    """Every bounded field of `cfg` (and of its sections) within its Bound; lists element-wise."""
    hints = typing.get_type_hints(type(cfg), include_extras=True)
    for f in dataclasses.fields(cfg):
        value, tp, key = getattr(cfg, f.name), hints[f.name], f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            check_bounds(value, f"{key}.")
            continue
        if typing.get_origin(tp) is list:
            (tp,) = typing.get_args(tp)
            values = value
        else:
            values = [value]
        _, bound = split_bound(tp)
        if bound is not None:
            for v in values:
                bound.check(key, v)
