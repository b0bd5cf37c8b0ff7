"""The distillation-method registry. Adding a method: one module with its `Method`, one entry here, its tests."""

from __future__ import annotations

from guard_fast.methods.base import Method, MethodSpec, Stage, stage_config
from guard_fast.methods.dc import DC
from guard_fast.methods.mtt import MTT, TESLA
from guard_fast.methods.sre2l import CDA, SRE2L
from guard_fast.runtime.errors import ConfigError

METHODS: dict[str, Method] = {m.name: m for m in (SRE2L, CDA, DC, MTT, TESLA)}

# What the old pipeline's `methods` (teacher objectives) meant, for a helpful error.
_OLD_NAMES = {"guard": "sre2l:teacher=guard", "none": "sre2l:teacher=none", "pgd-at": "sre2l:teacher=pgd-at"}


def resolve(text: str) -> tuple[Method, MethodSpec, dict[str, str]]:
    """'sre2l:teacher=guard' -> (method, parsed spec, checked options); ConfigError naming the entry otherwise."""
    spec = MethodSpec.parse(text)
    if spec.name not in METHODS:
        hint = f" (a teacher objective; the method is {_OLD_NAMES[spec.name]!r})" if spec.name in _OLD_NAMES else ""
        raise ConfigError(f"methods: {text!r} is not a distillation method{hint}; registered: {', '.join(METHODS)}")
    method = METHODS[spec.name]
    return method, spec, method.check(spec)


__all__ = ["METHODS", "Method", "MethodSpec", "Stage", "resolve", "stage_config"]
