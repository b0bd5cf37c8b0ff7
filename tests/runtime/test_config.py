"""Config precedence and rejection: TOML presets, CLI overrides, one-line errors."""

from __future__ import annotations

import dataclasses
import subprocess
from dataclasses import dataclass, field

import pytest

from guard_fast.models import ModelConfig
from guard_fast.runtime import config as C
from guard_fast.runtime.errors import ConfigError
from launchers.cli import run
from tests.conftest import PYTHON, REPO, subprocess_env


@dataclass
class StageConfig:
    data: C.DataConfig = field(default_factory=C.DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    dist: C.DistConfig = field(default_factory=C.DistConfig)
    output: C.OutputConfig = field(default_factory=C.OutputConfig)
    eps: list[float] = field(default_factory=lambda: [1 / 255])
    """attack radii in [0,1] pixel units"""
    resume: bool = False
    """continue from the latest checkpoint"""

    def validate(self) -> None:
        if self.resume and self.output.ckpt_every == 0 and self.output.dir == "":
            raise ConfigError("resume needs output.dir")


def test_precedence_cli_over_toml_over_default(tmp_path):
    toml = tmp_path / "x.toml"
    toml.write_text('[data]\nbatch_size = 32\nworkers = 3\n[model]\narch = "resnet18"\n')
    cfg = C.load_config(StageConfig, toml, ["--data.batch_size=16", "--resume", "--eps=[0.5, 1/255]"])
    assert cfg.data.batch_size == 16  # CLI beats TOML
    assert cfg.data.workers == 3  # TOML beats default
    assert cfg.model.arch == "resnet18"
    assert cfg.data.crop_scale_min == 0.08  # default kept
    assert cfg.resume is True
    assert cfg.eps == [0.5, 1 / 255]


def test_fraction_and_list_values():
    cfg = C.load_config(StageConfig, None, ["--eps=1/255,2/255", "--data.mean=0.1,0.2,0.3", "--data.std=[1,1,1]"])
    assert cfg.eps == [1 / 255, 2 / 255]
    assert cfg.data.mean == [0.1, 0.2, 0.3] and cfg.data.std == [1.0, 1.0, 1.0]


@pytest.mark.parametrize("override, message", [
    ("--data.batchsize=3", "unknown config key 'data.batchsize'; valid keys in data: dataset, path"),
    ("--nope=1", "unknown config key 'nope'"),
    ("--data.batch_size=abc", "data.batch_size: expected an integer"),
    ("--data.batch_size=true", "data.batch_size: expected an integer"),
    ("--resume=maybe", "resume: expected true or false"),
    ("--data=3", "'data' is a section"),
    ("--data.backend=dali", "data.backend = 'dali': valid values are 'torch', 'ffcv'"),
    ("--model.arch=vgg", "model.arch = 'vgg': valid values are"),
    ("--dist.zero_stage=3", "dist.zero_stage = 3"),
    ("--data.mean=0.5,0.5", "data.mean and data.std take one value per channel"),
])
def test_rejection_names_the_key(override, message):
    with pytest.raises(ConfigError, match=None) as e:
        C.load_config(StageConfig, None, [override])
    assert message in str(e.value)


def test_toml_errors(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        C.load_config(StageConfig, tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[data\nx=1")
    with pytest.raises(ConfigError, match="invalid TOML"):
        C.load_config(StageConfig, bad)
    unknown = tmp_path / "unknown.toml"
    unknown.write_text("[dataa]\nx = 1\n")
    with pytest.raises(ConfigError, match="unknown config key 'dataa'"):
        C.load_config(StageConfig, unknown)


def test_resolved_toml_round_trips(tmp_path):
    cfg = C.load_config(StageConfig, None, ["--data.batch_size=7", "--eps=1/255,8/255", "--data.path=a \"b\""])
    path = tmp_path / "resolved.toml"
    path.write_text(C.to_toml(cfg))
    assert C.load_config(StageConfig, path) == cfg


def test_every_field_documented():
    for section in (C.DataConfig, ModelConfig, C.DistConfig, C.OutputConfig, StageConfig):
        docs = C.field_docs(section)
        missing = [f.name for f in dataclasses.fields(section) if not dataclasses.is_dataclass(f.type)
                   and f.name not in docs and f.type not in ("DataConfig", "ModelConfig", "DistConfig",
                                                               "OutputConfig")]
        missing = [m for m in missing if m not in ("data", "model", "dist", "output")]
        assert not missing, f"{section.__name__}: fields without a docstring: {missing}"


def test_config_error_is_one_line_exit_2(capsys):
    def main(argv):
        C.parse_args(StageConfig, argv, "x")

    assert run(main, ["--data.workers=-1"], prog="guard-fast x") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["guard-fast x: error: data.workers = -1: must be >= 0"]


def test_help_lists_keys_and_exits_zero(capsys):
    with pytest.raises(SystemExit) as e:
        C.parse_args(StageConfig, ["--help"], "x")
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "--data.batch_size=64" in out and "images per rank per step" in out


def test_help_shows_the_defaults_a_stage_gives_its_sections():
    from guard_fast.student.hard import HardTrainConfig

    cfg = HardTrainConfig()  # its optim and model sections come from factories, not the section classes' defaults
    lines = C.describe(HardTrainConfig)
    for key, value in (("optim.epochs", cfg.optim.epochs), ("optim.weight_decay_on", cfg.optim.weight_decay_on),
                       ("model.width", cfg.model.width), ("output.dir", cfg.output.dir)):
        assert any(line.split()[0] == f"--{key}={value!r}" for line in lines), key


@pytest.mark.subprocess
def test_cli_unknown_command_and_missing_path():
    env = subprocess_env()
    r = subprocess.run([PYTHON, "-m", "launchers.cli", "frobnicate"], capture_output=True, text=True, env=env,
                       cwd=REPO)
    assert r.returncode == 2 and "unknown command 'frobnicate'" in r.stderr
    r = subprocess.run([PYTHON, "-m", "launchers.cli", "data", "to-ffcv", "--src", "/nonexistent/x", "--out",
                        "y.beton"], capture_output=True, text=True, env=env, cwd=REPO)
    assert r.returncode != 0
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert "/nonexistent/x" in r.stderr


def _ast_docs(cls: type) -> dict[str, str]:
    """Reference reading of attribute docstrings with the ast module (what field_docs did before the tokenizer)."""
    import ast
    import inspect
    import textwrap

    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        docs.update(klass.__dict__.get("__field_docs__", {}))
        try:
            body = ast.parse(textwrap.dedent(inspect.getsource(klass))).body[0].body
        except (OSError, TypeError):
            continue
        for node, nxt in zip(body, body[1:], strict=False):
            if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(nxt, ast.Expr)
                    and isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str)):
                docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def test_field_docs_equal_an_ast_reading_for_every_config_class():
    """The tokenizer-based reader (no ast: CPython 3.11.7's AST constructor can fail after torch.compile) gives the
    same docs as an ast reading, for every section of the pipeline and study configs."""
    from guard_fast.study.config import StudyConfig

    seen, todo = set(), [StudyConfig, StageConfig]
    while todo:
        cls = todo.pop()
        if cls in seen:
            continue
        seen.add(cls)
        assert C.field_docs(cls) == _ast_docs(cls), cls.__name__
        todo += [getattr(cls(), f.name).__class__ for f in dataclasses.fields(cls)
                 if dataclasses.is_dataclass(getattr(cls(), f.name))]
    assert len(seen) > 15
