"""Model variants, gradients and strict checkpoint loading."""

from __future__ import annotations

import argparse

import pytest
import torch

from guard_fast.models import MODELS, Classifier, build_model, load_checkpoint, save_checkpoint
from guard_fast.runtime.errors import GuardFastError


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
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
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
    deep = build_model("convnet-d4", 5, (0.5,) * 3, (0.5,) * 3, width=8, image_size=64)
    assert deep(torch.rand(1, 3, 64, 64)).shape == (1, 5)


@pytest.mark.parametrize("shape, dtype", [((3, 5, 8, 8), torch.float32), ((2, 7, 13, 11), torch.float32),
                                          ((1, 1, 2, 2), torch.float32), ((2, 3, 9, 6), torch.float64)])
def test_convnet_pooling_equals_average_pooling_with_its_gradients(shape, dtype):
    """ConvNet's AvgPool2x2 (a depthwise convolution for float32 on a CPU) against F.avg_pool2d: the output, the
    input gradient, and the second derivative DC's matching differentiates through (create_graph), on odd sides
    (floored like nn.AvgPool2d) and in float64 (nn.AvgPool2d itself)."""
    from guard_fast.models.convnet import AvgPool2x2

    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g, dtype=dtype, requires_grad=True)
    w = torch.randn((shape[0], shape[1], shape[2] // 2, shape[3] // 2), generator=g, dtype=dtype)

    def second(pool):  # d/dx of || d<w, pool(x)^2>/dx ||^2: needs pooling's backward to be differentiable
        (gx,) = torch.autograd.grad((w * pool(x) ** 2).sum(), x, create_graph=True)
        (ggx,) = torch.autograd.grad(gx.pow(2).sum(), x)
        return gx.detach(), ggx

    fast, ref = AvgPool2x2(), lambda t: torch.nn.functional.avg_pool2d(t, 2, 2)
    assert torch.allclose(fast(x), ref(x), rtol=1e-6, atol=1e-7)
    for a, b in zip(second(fast), second(ref), strict=True):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)
    kind = type(fast(x).grad_fn).__name__
    assert (kind == "_PoolBackward") == (dtype == torch.float32), kind  # the dispatch: CPU float32 only


def test_compile_backend_reaches_torch_compile_and_a_bad_one_is_refused():
    """model.compile_backend is the backend the body is compiled with (aot_eager: same outputs as eager, no code
    generated); an unknown backend is one error naming the key."""
    from guard_fast.models import ModelConfig, prepare_model
    from guard_fast.runtime.errors import ConfigError

    torch.manual_seed(0)
    model = build_model("resnet18-cifar", 10, (0.5,) * 3, (0.25,) * 3, width=4, image_size=16)
    x = torch.rand(2, 3, 16, 16)
    model.eval()
    want = model(x)
    seen: list[str] = []
    real = torch.compile

    def spy(fn, *a, backend="inductor", **k):
        seen.append(backend)
        return real(fn, *a, backend=backend, **k)

    torch.compile = spy
    try:
        prepare_model(model, ModelConfig(arch="resnet18-cifar", width=4, compile=True, compile_backend="aot_eager"))
    finally:
        torch.compile = real
    assert seen == ["aot_eager"]
    torch.testing.assert_close(model(x), want)
    with pytest.raises(ConfigError, match="model.compile_backend = 'tvm'"):
        ModelConfig(compile_backend="tvm").validate()
