"""Config precedence and rejection; model variants, gradients and strict checkpoint loading."""

from __future__ import annotations

import argparse
import dataclasses
import subprocess
from dataclasses import dataclass, field

import pytest
import torch

from guard_fast.models import MODELS, Classifier, ModelConfig, build_model, load_checkpoint, save_checkpoint
from guard_fast.runtime import config as C
from guard_fast.runtime.errors import ConfigError, GuardFastError
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
    ("--data.mean=0.5,0.5", "data.mean and data.std take 3 values"),
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


# ---------------------------------------------------------------------------------------------------------- models

@pytest.mark.parametrize("arch, size, out_hw", [("resnet18", 64, 2), ("resnet18-tiny", 16, 2),
                                                ("resnet18-cifar", 16, 2)])
def test_variants_shape_and_gradients(arch, size, out_hw):
    torch.manual_seed(0)
    model = build_model(arch, 7, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), width=8)
    x = torch.rand(3, 3, size, size)
    feats = {}
    model.body.layer4.register_forward_hook(lambda m, i, o: feats.update(hw=o.shape[-1]))
    logits = model(x)
    assert logits.shape == (3, 7)
    assert feats["hw"] == out_hw  # stem: /4 for the ImageNet stem, /1 for the small one; then /8
    logits.logsumexp(1).sum().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


def test_normalization_is_first_layer():
    torch.manual_seed(0)
    model = build_model("resnet18-cifar", 10, (0.1, 0.2, 0.3), (0.5, 0.4, 0.3), width=8).eval()
    x = torch.rand(2, 3, 16, 16)
    mean = torch.tensor([0.1, 0.2, 0.3]).view(1, 3, 1, 1)
    std = torch.tensor([0.5, 0.4, 0.3]).view(1, 3, 1, 1)
    torch.testing.assert_close(model(x), model.body((x - mean) / std))
    torch.testing.assert_close(model.denormalize(model.normalize(x)), x)


def test_torchvision_state_dict_loads_into_resnet18(tmp_path):
    import torchvision

    torch.manual_seed(0)
    tv = torchvision.models.resnet18(num_classes=10).eval()
    path = tmp_path / "tv.pt"
    torch.save(tv.state_dict(), path)
    model = build_model("resnet18", 10, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), checkpoint=str(path)).eval()
    x = torch.rand(2, 3, 64, 64)
    torch.testing.assert_close(model(x), tv(x))


def test_checkpoint_round_trip_and_strictness(tmp_path):
    torch.manual_seed(0)
    a = build_model("resnet18-cifar", 10, (0.2,) * 3, (0.3,) * 3, width=8)
    path = save_checkpoint(a, tmp_path / "a.pt")
    state = torch.load(path, weights_only=True)  # plain tensors only
    assert all(isinstance(v, torch.Tensor) for v in state.values())
    b = build_model("resnet18-cifar", 10, (0.2,) * 3, (0.3,) * 3, width=8, checkpoint=str(path))
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(va, vb), k
    with pytest.raises(GuardFastError, match="does not match the model.*shape mismatch.*fc"):
        build_model("resnet18-cifar", 7, (0.2,) * 3, (0.3,) * 3, width=8, checkpoint=str(path))
    with pytest.raises(GuardFastError, match="does not match the model"):
        build_model("resnet18-cifar", 10, (0.2,) * 3, (0.3,) * 3, width=16, checkpoint=str(path))
    state.pop("body.fc.bias")
    torch.save(state, tmp_path / "missing.pt")
    with pytest.raises(GuardFastError, match="missing \\['body.fc.bias'\\]"):
        load_checkpoint(b, tmp_path / "missing.pt")


def test_checkpoint_load_errors(tmp_path):
    model = build_model("resnet18-cifar", 10, (0.2,) * 3, (0.3,) * 3, width=8)
    with pytest.raises(GuardFastError, match="checkpoint not found"):
        load_checkpoint(model, tmp_path / "nope.pt")
    torch.save({"args": argparse.Namespace(lr=1)}, tmp_path / "pickled.pt")  # the reference code's format
    with pytest.raises(GuardFastError, match="cannot load as a weights-only state dict"):
        load_checkpoint(model, tmp_path / "pickled.pt")
    good = save_checkpoint(model, tmp_path / "good.pt")
    (tmp_path / "trunc.pt").write_bytes(good.read_bytes()[:1000])
    with pytest.raises(GuardFastError, match="trunc.pt: cannot load"):
        load_checkpoint(model, tmp_path / "trunc.pt")


def test_registry_is_classifier():
    for arch in MODELS:
        assert isinstance(build_model(arch, 3, (0,) * 3, (1,) * 3, width=4), Classifier)


def test_convnet_shapes_and_parameter_count():
    """DC's ConvNet at 32 px, width 128: three conv(3x3)+GroupNorm blocks and a 2048 -> C linear layer."""
    model = build_model("convnet", 10, (0.5,) * 3, (0.5,) * 3, width=128, image_size=32)
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    norms = [m for m in model.modules() if isinstance(m, torch.nn.GroupNorm)]
    assert len(convs) == 3 and all(n.num_groups == n.num_channels == 128 for n in norms)
    expected = (3 * 128 * 9 + 128) + 2 * (128 * 128 * 9 + 128) + 3 * 2 * 128 + (2048 * 10 + 10)
    assert sum(p.numel() for p in model.parameters()) == expected
    assert model(torch.rand(2, 3, 32, 32)).shape == (2, 10)
    assert build_model("convnet-d4", 5, (0.5,) * 3, (0.5,) * 3, width=8, image_size=64)(torch.rand(1, 3, 64, 64)).shape \
        == (1, 5)
