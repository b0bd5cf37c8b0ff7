"""Native single-channel data (issue 25 B): 1-channel models, the fashion-mnist / mnist presets, no silent RGB."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from guard_fast.data import build_loader
from guard_fast.data.presets import DATASETS, resolve_dataset
from guard_fast.data.real import load_real
from guard_fast.models import ModelConfig, build_model, model_from_config
from guard_fast.runtime.config import DataConfig
from guard_fast.runtime.errors import ConfigError, GuardFastError


def test_dc_convnet_for_28px_grayscale_matches_their_geometry():
    """DC's get_network('ConvNet', channel=1, im_size=(28, 28)) (VICO-UoE/DatasetCondensation utils.py:118-131):
    width 128, depth 3, instance norm (GroupNorm, one group per channel), avg pooling; the first conv pads 3 when
    channel == 1 (networks.py:99) and the classifier is sized for 32 px (networks.py:95-96): 128 x 4 x 4 features."""
    spec = DATASETS["fashion-mnist"]
    model = model_from_config(ModelConfig(arch="convnet", width=128), spec)
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    norms = [m for m in model.modules() if isinstance(m, torch.nn.GroupNorm)]
    pools = [m for m in model.modules() if isinstance(m, torch.nn.AvgPool2d)]
    assert [c.in_channels for c in convs] == [1, 128, 128] and [c.padding for c in convs] == [(3, 3), (1, 1), (1, 1)]
    assert len(pools) == 3 and all(n.num_groups == n.num_channels == 128 for n in norms)
    assert model.body.classifier.in_features == 2048
    expected = (1 * 128 * 9 + 128) + 2 * (128 * 128 * 9 + 128) + 3 * 2 * 128 + (2048 * 10 + 10)
    assert sum(p.numel() for p in model.parameters()) == expected
    assert model(torch.rand(5, 1, 28, 28)).shape == (5, 10)


@pytest.mark.parametrize("arch", ["resnet18-cifar", "resnet18-tiny", "resnet18", "convnet"])
def test_one_channel_models_output_and_gradients(arch):
    torch.manual_seed(0)
    model = build_model(arch, 10, (0.1307,), (0.3081,), width=4, image_size=28)
    stem = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
    assert stem.in_channels == 1
    x = torch.rand(3, 1, 28, 28)
    logits = model(x)
    assert logits.shape == (3, 10)
    logits.logsumexp(1).sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize("arch", ["convnet", "resnet18-cifar"])
def test_three_channel_input_refused_by_one_channel_model_and_back(arch):
    gray = build_model(arch, 10, (0.2860,), (0.3530,), width=4, image_size=28)
    with pytest.raises(GuardFastError, match="takes 1-channel images") as e:
        gray(torch.rand(2, 3, 28, 28))
    assert "\n" not in str(e.value)
    rgb = build_model(arch, 10, (0.5,) * 3, (0.5,) * 3, width=4, image_size=28)
    with pytest.raises(GuardFastError, match="takes 3-channel images"):
        rgb(torch.rand(2, 1, 28, 28))


@pytest.mark.parametrize("name, mean, std", [("fashion-mnist", 0.2860, 0.3530), ("mnist", 0.1307, 0.3081)])
def test_preset_round_trip(name, mean, std):
    spec = resolve_dataset(DataConfig(dataset=name, path="unused"))
    assert (spec.channels, spec.image_size, spec.num_classes, spec.mean, spec.std) == (1, 28, 10, (mean,), (std,))
    model = model_from_config(ModelConfig(arch="convnet", width=4), spec)
    x = torch.rand(2, 1, 28, 28)
    torch.testing.assert_close(model.normalize(x), (x - mean) / std)
    torch.testing.assert_close(model.denormalize(model.normalize(x)), x)
    with pytest.raises(ConfigError, match="1 channel"):
        resolve_dataset(DataConfig(dataset=name, path="unused", mean=[0.5] * 3, std=[0.5] * 3))


def gray_folder(root, rgb_file: bool = False):
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in range(10):
            for i in range(2):
                a = rng.integers(0, 256, (28, 28), dtype=np.uint8)
                img = Image.fromarray(np.stack([a] * 3, -1), "RGB") if rgb_file else Image.fromarray(a, "L")
                (root / split / str(c)).mkdir(parents=True, exist_ok=True)
                img.save(root / split / str(c) / f"{i}.png")


def test_loaders_yield_one_channel_and_refuse_rgb_files(tmp_path):
    gray_folder(tmp_path / "g")
    cfg = DataConfig(dataset="fashion-mnist", path=str(tmp_path / "g"), workers=0, batch_size=4, eval_batch_size=8)
    x, y = next(iter(build_loader(cfg, "val")))
    assert x.shape == (8, 1, 28, 28)
    real = load_real(cfg)
    assert real.pixels.shape == (20, 1, 28, 28)
    want = np.asarray(Image.open(tmp_path / "g" / "train" / "0" / "0.png"))
    assert np.array_equal(real.pixels[0, 0].numpy(), want)
    gray_folder(tmp_path / "c", rgb_file=True)
    with pytest.raises(GuardFastError, match="a RGB image in a 1-channel"):
        load_real(DataConfig(dataset="mnist", path=str(tmp_path / "c"), workers=0))
    with pytest.raises(GuardFastError, match="use data.backend = 'torch'"):
        build_loader(DataConfig(dataset="mnist", path=str(tmp_path / "g"), backend="ffcv"), "val")


def test_dc_then_train_hard_stay_one_channel(tmp_path):
    """DC distils 1-channel images (grayscale PNGs + float tensors) and a student trains on them with DC's MNIST
    augmentation, end to end on a tiny grayscale folder."""
    from guard_fast.distill.dc import DCConfig, run_dc
    from guard_fast.runtime.config import load_config
    from guard_fast.student.hard import HardTrainConfig, run_train_hard
    from tests.conftest import ONE

    gray_folder(tmp_path / "g")
    common = [f"--data.path={tmp_path / 'g'}", "--data.dataset=mnist", "--data.workers=0", "--output.progress=false",
              "--model.width=4"]
    run_dc(load_config(DCConfig, None, [*common, f"--output.dir={tmp_path / 'dc'}", "--ipc=1", "--iterations=2",
                                        "--batch_real=2", "--space=normalized"]), ONE)
    floats = torch.load(tmp_path / "dc" / "images.pt", weights_only=True)["images"]
    assert floats.shape == (10, 1, 28, 28)
    png = next((tmp_path / "dc" / "images").rglob("*.png"))
    assert Image.open(png).mode == "L"
    r = run_train_hard(load_config(HardTrainConfig, None, [*common, f"--output.dir={tmp_path / 'th'}",
                                                           f"--images={tmp_path / 'dc'}", "--augment=dc",
                                                           "--optim.epochs=2", "--batch_size=5"]), ONE)
    assert r["images"] == 10 and 0.0 <= r["val"]["clean"] <= 1.0
