"""What a distillation method is, for the pipeline: the stages it runs, how they are wired, and its report label.

A pipeline entry names a registered method and its options, `name` or `name:key=value:key=value`
(`sre2l:teacher=guard`, `cda:teacher=guard:curriculum=linear`). `Method.plan` returns the method's stages for one IPC, in run order, the
last one writing the student checkpoint (output "student"); the pipeline runs them cached and resumable and adds the
evaluate stage. Stages whose folder is the same (a teacher shared by SRe2L and CDA) run once.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from guard_fast.runtime.config import OutputConfig
from guard_fast.runtime.distributed import DistInfo
from guard_fast.runtime.errors import ConfigError

if TYPE_CHECKING:
    from guard_fast.pipeline import PipelineConfig


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
    plan: Callable[[PipelineConfig, dict[str, str], int, Path], list[Stage]]
    """(pipeline config, options, ipc, chain folder root/<slug>/ipc<k>) -> the stages, in run order"""

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


def stage_config(cfg: PipelineConfig, section: str, folder: Path) -> Any:
    """A copy of pipeline section `section` with the shared data/dist sections and output settings, writing to
    `folder`."""
    stage = copy.deepcopy(getattr(cfg, section))
    stage.data, stage.dist = copy.deepcopy(cfg.data), copy.deepcopy(cfg.dist)
    stage.output = OutputConfig(dir=str(folder), log_every=cfg.output.log_every, ckpt_every=cfg.output.ckpt_every,
                                progress=cfg.output.progress)
    return stage
