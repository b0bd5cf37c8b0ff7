"""The registry is the only place a method is wired in: a new method with its own config section plugs into the
pipeline's config, planning and report without any edit of the pipeline."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pytest

from guard_fast.methods import METHODS, Method, Section, Stage, sections, stage_config
from guard_fast.pipeline import PipelineBase, PipelineConfig, config_class, plan_pipeline, section_lines
from guard_fast.runtime.config import DataConfig, DistConfig, OutputConfig, describe, load_config
from guard_fast.runtime.errors import ConfigError
from guard_fast.student.hard import run_train_hard


@dataclass
class ToyConfig:
    data: DataConfig = field(default_factory=DataConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    steps: int = 5
    """toy distillation steps"""
    ipc: int = 1
    """images per class (set per chain)"""


def _plan(cfg, opts, ipc, chain: Path) -> list[Stage]:
    toy = stage_config(cfg, "toy", chain / "toy")
    toy.ipc = ipc
    student = stage_config(cfg, "train_hard", chain / "train-hard")
    return [Stage("toy", chain / "toy", toy, lambda c, i: {}, {"manifest": "manifest.json"}),
            Stage("train-hard", chain / "train-hard", student, run_train_hard, {"student": "student.pt"},
                  [chain / "toy"])]


TOY_SECTION = Section("toy", ToyConfig, "the toy method's settings", lambda t, cfg: f"- toy: {t.steps} steps")


@pytest.fixture
def toy(monkeypatch):
    from guard_fast.methods.students import TRAIN_HARD

    method = Method("toy", "a toy method", {"flavour": ("a", "b")}, ("toy", "train-hard"),
                    lambda o: f"Toy-{o.get('flavour', 'a')}", _plan, (TOY_SECTION, TRAIN_HARD))
    monkeypatch.setitem(METHODS, "toy", method)
    return method


def test_a_registered_method_brings_its_section_plan_label_and_report_line(toy, tmp_path):
    cls = config_class(METHODS)
    cfg = load_config(cls, None, ["--methods=toy:flavour=b,sre2l:teacher=guard", "--toy.steps=7", "--ipc=2"])
    assert cfg.toy.steps == 7 and "toy" in sections()
    assert any("--toy.steps=5" in line and "toy distillation steps" in line for line in describe(cls))
    chains = plan_pipeline(cfg, tmp_path)
    label, ipc, stages = chains[0]
    assert (label, ipc) == ("Toy-b", 2)
    assert [s.kind for s in stages] == ["toy", "train-hard", "evaluate"]
    assert stages[0].config.ipc == 2 and stages[0].config.steps == 7
    assert stages[-1].config.checkpoints == [str(tmp_path / "toy-flavour-b/ipc2/train-hard/student.pt")]
    lines = section_lines(cfg, cfg.methods)
    assert lines[0].startswith("- squeeze:") and "- toy: 7 steps" in lines  # registry order, each section once
    assert sum(line.startswith("- train-hard") for line in lines) == 1
    with pytest.raises(ConfigError, match="valid values"):
        load_config(cls, None, ["--methods=toy:flavour=c"])


def test_two_methods_cannot_declare_different_sections_under_one_name(toy, monkeypatch):
    clash = Section("toy", DataConfig, "another toy section")
    monkeypatch.setitem(METHODS, "clash", Method("clash", "", {}, (), lambda o: "", _plan, (clash,)))
    with pytest.raises(TypeError, match="'toy'"):
        sections()


def test_pipeline_config_is_the_registry_sections():
    base = set(PipelineBase.__dataclass_fields__)
    assert set(PipelineConfig.__dataclass_fields__) - base == set(sections())
