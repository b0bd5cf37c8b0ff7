"""DC's evaluation augmentation (VICO-UoE/DatasetCondensation utils.py:365-424 `augment`, :428-445 `get_daparam`)
and its use by train-hard."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from guard_fast.data.dc_augment import MNIST_STRATEGY, dc_augment, dc_augment_pixels
from guard_fast.runtime.config import load_config
from guard_fast.runtime.errors import ConfigError
from guard_fast.student.hard import HardTrainConfig
from tests.conftest import REPO


def batch(seed: int = 0, n: int = 6, c: int = 1, s: int = 12) -> torch.Tensor:
    return torch.randn(n, c, s, s, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_crop_is_a_shift_by_0_to_7_of_the_mean_padded_image():
    """cropfun (utils.py:380-386): pad 4 with the batch's per-channel mean, window at r, c = permutation(8)[0]."""
    u = batch(c=3)
    out = dc_augment(u, "crop", np.random.default_rng(0))
    mean = u.mean(dim=(0, 2, 3)).view(3, 1, 1)
    seen = set()
    for i in range(len(u)):
        padded = mean.expand(3, 20, 20).clone()
        padded[:, 4:16, 4:16] = u[i]
        hits = [(r, k) for r in range(9) for k in range(9) if torch.equal(padded[:, r:r + 12, k:k + 12], out[i])]
        assert hits and all(r < 8 and k < 8 for r, k in hits), i
        seen.update(hits)
    assert len(seen) > 1  # the offsets are drawn


def test_scale_keeps_input_values_or_zero_fill_and_noise_is_small():
    """scalefun (utils.py:388-399): nearest resize, zero canvas -> every output value is an input value or 0;
    noisefun (:407-408): + 0.001 N(0, 1)."""
    u = batch()
    out = dc_augment(u, "scale", np.random.default_rng(1))
    for i in range(len(u)):
        values = set(u[i].flatten().tolist()) | {0.0}
        assert set(out[i].flatten().tolist()) <= values
    assert not torch.equal(out, u)
    noisy = dc_augment(u, "noise", np.random.default_rng(2))
    d = noisy - u
    assert d.abs().max() < 0.01 and 0.0005 < d.std() < 0.002


def test_rotate_fills_corners_with_the_mean_and_keeps_the_center():
    """rotatefun (utils.py:401-405): scipy rotate about the center, cval = mean of the channel means, center crop.
    A constant image stays constant where it is inside; corners of a 45-ish degree turn take the fill."""
    u = torch.full((4, 1, 13, 13), 2.0, dtype=torch.float64)
    u[0] = 0.0  # the batch mean is 1.5
    out = dc_augment(u, "rotate", np.random.default_rng(3))
    assert torch.allclose(out[1:, :, 6, 6], torch.full((3, 1), 2.0, dtype=torch.float64), atol=1e-6)
    corners = out[1:, 0, [0, 0, -1, -1], [0, -1, 0, -1]]
    turned = (corners - 2.0).abs().amax(dim=1) > 1e-3
    assert turned.any() and torch.all((corners[turned] <= 2.0 + 1e-6) & (corners[turned] >= 1.5 - 0.3))


def test_one_operation_per_image():
    u = batch(n=40)
    out = dc_augment(u, "crop_noise", np.random.default_rng(4))
    near = [(out[i] - u[i]).abs().max() < 0.01 for i in range(len(u))]
    assert 5 < sum(near) < 35  # roughly half noise (close to the input), half crop (shifted)


def test_pixel_wrapper_acts_in_normalized_space():
    """DC augments normalized tensors: the scale canvas is 0 in normalized units, i.e. the data mean in pixels."""
    x = torch.rand(5, 1, 12, 12, dtype=torch.float64)
    mean, std = torch.tensor([0.3]).view(1, 1, 1, 1), torch.tensor([0.2]).view(1, 1, 1, 1)
    out = dc_augment_pixels(x, "scale", np.random.default_rng(5), mean, std)
    want = dc_augment((x - 0.3) / 0.2, "scale", np.random.default_rng(5)) * 0.2 + 0.3
    torch.testing.assert_close(out, want)
    assert (out - 0.3).abs().min() < 1e-6  # some canvas pixel shows the fill (0.3 held as float32)


def test_mnist_presets_use_dc_augmentation_and_fashion_does_not():
    """get_daparam (utils.py:439-440) turns augmentation on for dataset == 'MNIST' only, and then evaluate_synset
    trains 1000 epochs (main.py:120-121; run as Epoch + 1 = 1001 loops, utils.py:351); FashionMNIST keeps 'none' and
    300 (-> 301)."""
    from guard_fast.pipeline import PipelineConfig

    m = load_config(PipelineConfig, REPO / "configs" / "mnist" / "pipeline-dc.toml")
    f = load_config(PipelineConfig, REPO / "configs" / "fashion-mnist" / "pipeline-dc.toml")
    assert (m.train_hard.augment, m.train_hard.dc_strategy, m.train_hard.optim.epochs) == ("dc", MNIST_STRATEGY, 1001)
    assert (f.train_hard.augment, f.train_hard.optim.epochs) == ("none", 301)


def test_unknown_operation_is_a_config_error():
    with pytest.raises(ConfigError, match="dc_strategy"):
        HardTrainConfig(dc_strategy="crop_flip").validate()
