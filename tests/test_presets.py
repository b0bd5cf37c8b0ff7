"""Every preset under configs/ parses with the config class of the command it is for, and every config file named
in the docs, the README, the launchers' and the library's docstrings, Makefile or scripts exists.

Presets are `configs/<dataset>/<what>.toml` (bench presets: `configs/bench/<what>.toml`); `<what>` starts with the
command: squeeze, recover, relabel, train, evaluate, dc, dm, experts, mtt, curvature, pipeline (and the demo), study."""

from __future__ import annotations

import importlib
import re

import pytest

from tests.conftest import REPO

CONFIG_CLASSES = {
    "squeeze": "guard_fast.squeeze.stage:SqueezeConfig",
    "recover": "guard_fast.distill.recover:RecoverConfig",
    "relabel": "guard_fast.distill.relabel:RelabelConfig",
    "train": "guard_fast.student.kd:TrainConfig",
    "train-hard": "guard_fast.student.hard:HardTrainConfig",
    "evaluate": "guard_fast.robustness.evaluate:EvaluateConfig",
    "dc": "guard_fast.distill.dc:DCConfig",
    "dm": "guard_fast.distill.dm:DMConfig",
    "experts": "guard_fast.distill.experts:ExpertsConfig",
    "mtt": "guard_fast.distill.mtt:MTTConfig",
    "curvature": "guard_fast.robustness.curvature:CurvatureConfig",
    "pipeline": "guard_fast.pipeline:PipelineConfig",
    "demo": "guard_fast.pipeline:PipelineConfig",
    "study": "guard_fast.study.config:StudyConfig",
}
PRESETS = sorted(p.relative_to(REPO / "configs").as_posix() for p in (REPO / "configs").rglob("*.toml"))


def config_class(rel: str) -> type:
    folder, name = rel.split("/", 1) if "/" in rel else ("", rel)
    if folder == "bench":
        target = "bench.step:BenchConfig"
    else:
        stem = name.removesuffix(".toml")
        command = max((c for c in CONFIG_CLASSES if stem == c or stem.startswith(c + "-")), key=len, default=None)
        assert command, f"configs/{rel}: the file name must start with a command ({', '.join(CONFIG_CLASSES)})"
        target = CONFIG_CLASSES[command]
    module, cls = target.split(":")
    return getattr(importlib.import_module(module), cls)


def test_presets_live_in_dataset_folders():
    loose = [p for p in PRESETS if "/" not in p]
    assert not loose, f"presets outside configs/<dataset>/: {loose}"


@pytest.mark.parametrize("rel", PRESETS)
def test_every_preset_parses(rel):
    from guard_fast.runtime.config import load_config

    load_config(config_class(rel), REPO / "configs" / rel)


def referencing_files() -> list:
    files = [REPO / "README.md", REPO / "Makefile", *(REPO / "docs").rglob("*.md"), *(REPO / "scripts").glob("*"),
             *(REPO / "configs").rglob("*.toml")]
    for root in ("guard_fast", "launchers", "bench"):
        files += (REPO / root).rglob("*.py")
    return [f for f in files if f.is_file()]


def test_every_config_named_anywhere_exists():
    pattern = re.compile(r"configs/[A-Za-z0-9_./{},<>-]+?\.toml")
    missing = []
    for f in referencing_files():
        for ref in pattern.findall(f.read_text(errors="replace")):
            if "<" in ref:  # a pattern such as configs/<dataset>/<what>.toml
                continue
            for name in expand_braces(ref):
                if not (REPO / name).is_file():
                    missing.append(f"{f.relative_to(REPO)}: {name}")
    assert not missing, "configs named but absent:\n" + "\n".join(missing)


def expand_braces(text: str) -> list[str]:
    """'configs/{a,b}/x-{1,2}.toml' -> the four names."""
    m = re.search(r"\{([^{}]*)\}", text)
    if not m:
        return [text]
    return [n for alt in m.group(1).split(",") for n in expand_braces(text[:m.start()] + alt + text[m.end():])]
