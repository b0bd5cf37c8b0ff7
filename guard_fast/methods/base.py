"""What a distillation method is, for the pipeline: its config sections, the stages it runs and how they are wired,
and its report label.

A pipeline entry names a registered method and its options, `name` or `name:key=value:key=value`
(`sre2l:teacher=guard`, `cda:teacher=guard:curriculum=linear`). A method declares the pipeline config sections it
reads (`Section`: `[dc]`, `[train_hard]`, ...; a section shared by several methods is one `Section` object listed by
each); the pipeline's config class is built from the registered methods' sections, so the pipeline never names a
method or a section of one. `Method.plan` returns the method's stages for one IPC, in run order, the last one writing
the student checkpoint (output "student"); the pipeline runs them cached and resumable and adds the evaluate stage.
Stages whose folder is the same (a teacher shared by SRe2L and CDA) run once.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from guard_fast.runtime.config import OutputConfig
from guard_fast.runtime.distributed import DistInfo
from guard_fast.runtime.errors import ConfigError

# `cfg` in this package is the pipeline's config: shared sections `data`, `dist`, `output`, `evaluate`, `curvature`
# plus one attribute per registered `Section` (guard_fast/pipeline.py builds its class from the registry).
PipelineCfg = Any


@dataclass(frozen=True)
class Section:
    """A pipeline config section a method reads: `[name]` in a pipeline TOML, an instance of `config` (a stage's
    config dataclass, whose data/dist/output the pipeline fills in per stage)."""

    name: str
    """the key in the pipeline config (`[dc]`, `--dc.iterations=...`)"""
    config: type
    """the dataclass of the section (its defaults are the section's defaults)"""
    doc: str
    """one line for `--help`: what the section sets and what the method fills in per stage"""
    summary: Callable[[Any, PipelineCfg], str] | None = None
    """(section, pipeline config) -> one line of the report's settings (None: no line)"""


@dataclass
class Stage:
    kind: str
    """stage type, what --force names: squeeze, recover, relabel, train, evaluate, ..."""
    folder: Path
    """the stage's output folder (its config's output.dir)"""
    config: Any
    """the stage's resolved config dataclass"""
    run: Callable[[Any, DistInfo], dict[str, Any]]
    """run_<stage>(config, info) -> result; a result with a 'stopped*' key means it stopped early"""
    outputs: dict[str, str]
    """output name -> file relative to folder; all must exist for a cached stage to count"""
    inputs: list[Path] = field(default_factory=list)
    """folders of the stages this one reads (their completion ids are part of its cache key)"""


@dataclass(frozen=True)
class MethodSpec:
    """One `methods` entry, parsed: registered name + options (strings, validated by the method)."""

    name: str
    options: tuple[tuple[str, str], ...] = ()

    @classmethod
    def parse(cls, text: str) -> MethodSpec:
        name, *parts = text.strip().split(":")
        opts = []
        for part in parts:
            key, sep, value = part.partition("=")
            if not sep or not key.strip() or not value.strip():
                raise ConfigError(f"methods: {text!r}: options look like name:key=value:key=value")
            opts.append((key.strip(), value.strip()))
        return cls(name.strip(), tuple(opts))

    @property
    def slug(self) -> str:
        """Folder name: sre2l:teacher=guard -> sre2l-teacher-guard."""
        text = "-".join([self.name, *(f"{k}-{v}" for k, v in self.options)])
        return re.sub(r"[^A-Za-z0-9_.-]+", "_", text)


@dataclass(frozen=True)
class Method:
    name: str
    description: str
    options: dict[str, tuple[str, ...] | None]
    """option -> allowed values (None: any string); an option not given takes the method's default in `plan`"""
    kinds: tuple[str, ...]
    """stage kinds the method runs (for --force validation)"""
    label: Callable[[dict[str, str]], str]
    plan: Callable[[PipelineCfg, dict[str, str], int, Path], list[Stage]]
    """(pipeline config, options, ipc, chain folder root/<slug>/ipc<k>) -> the stages, in run order"""
    sections: tuple[Section, ...] = ()
    """the pipeline config sections the method's stages read"""
    knobs: dict[str, str] = field(default_factory=dict)
    """study knob -> the options of this method whose selection runs tune it (e.g. guard -> 'teacher=guard')"""

    def check(self, spec: MethodSpec) -> dict[str, str]:
        opts = dict(spec.options)
        for key, value in opts.items():
            if key not in self.options and key != "label":
                raise ConfigError(f"methods: {self.name} has no option {key!r}; valid: "
                                  f"{', '.join([*self.options, 'label'])}")
            allowed = self.options.get(key)
            if allowed is not None and value not in allowed:
                raise ConfigError(f"methods: {self.name}:{key}={value}: valid values are {', '.join(allowed)}")
        return opts

    def display(self, opts: dict[str, str]) -> str:
        return opts.get("label") or self.label(opts)


def stage_config(cfg: PipelineCfg, section: str, folder: Path) -> Any:
    """A copy of pipeline section `section` with the shared data/dist sections and output settings, writing to
    `folder`."""
    stage = copy.deepcopy(getattr(cfg, section))
    stage.data, stage.dist = copy.deepcopy(cfg.data), copy.deepcopy(cfg.dist)
    stage.output = OutputConfig(dir=str(folder), log_every=cfg.output.log_every, ckpt_every=cfg.output.ckpt_every,
                                progress=cfg.output.progress)
    return stage
