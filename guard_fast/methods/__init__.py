"""The distillation-method registry. Adding a method: one module with its `Method` (stages, config sections,
options, label), one entry in METHODS, a preset and its tests; the pipeline and the study read everything else from
here."""

from __future__ import annotations

from guard_fast.methods.base import Method, MethodSpec, PipelineCfg, Section, Stage, stage_config
from guard_fast.methods.dc import DC
from guard_fast.methods.dm import DM
from guard_fast.methods.dsa import DSA
from guard_fast.methods.mtt import MTT, TESLA
from guard_fast.methods.sre2l import CDA, SRE2L
from guard_fast.runtime.errors import ConfigError

METHODS: dict[str, Method] = {m.name: m for m in (SRE2L, CDA, DC, DSA, DM, MTT, TESLA)}

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


def sections(methods: dict[str, Method] = METHODS) -> dict[str, Section]:
    """Every config section the methods declare, in registry order; a name shared by two methods must be one
    Section (the same settings), else this is a registry error."""
    out: dict[str, Section] = {}
    for m in methods.values():
        for s in m.sections:
            if out.setdefault(s.name, s) is not s:
                raise TypeError(f"methods {m.name!r} and another declare different sections named {s.name!r}")
    return out


def used_sections(texts: list[str]) -> list[Section]:
    """The sections the listed method entries read, in registry order (for the report's settings lines)."""
    used = {s.name for t in texts for s in resolve(t)[0].sections}
    return [s for name, s in sections().items() if name in used]


def knobs() -> dict[str, str]:
    """Study knob -> the method entry whose selection runs tune it ('guard' -> 'sre2l:teacher=guard')."""
    return {k: f"{m.name}:{opts}" for m in METHODS.values() for k, opts in m.knobs.items()}


def describe_methods() -> str:
    return "; ".join(f"{m.name} ({', '.join(m.options) or 'no options'})" for m in METHODS.values())


__all__ = ["METHODS", "Method", "MethodSpec", "PipelineCfg", "Section", "Stage", "describe_methods", "knobs",
           "resolve", "sections", "stage_config", "used_sections"]
