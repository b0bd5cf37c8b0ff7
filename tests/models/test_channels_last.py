"""prepare_model: channels_last on the body's inputs (weights stay contiguous for DeepSpeed); compile the body."""

from __future__ import annotations

import copy

import torch

from guard_fast.models import ModelConfig, prepare_model, unwrap


def test_channels_last_reaches_the_convolutions_with_contiguous_weights(tiny_model):
    model = tiny_model(arch="resnet18", width=4).eval()
    ref = copy.deepcopy(model)
    model = prepare_model(model, ModelConfig(channels_last=True))
    seen = []
    channels_last = torch.channels_last
    model.body.conv1.register_forward_hook(lambda m, i, o: seen.append(o.is_contiguous(memory_format=channels_last)))
    x = torch.rand(2, 3, 40, 40, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(model(x), ref(x), atol=1e-5, rtol=1e-5)
    assert seen == [True]  # the first convolution ran (and wrote) in channels_last
    assert model.normalize(x).is_contiguous(memory_format=torch.channels_last)
    assert all(p.is_contiguous() for p in model.parameters())  # what DeepSpeed's broadcast/flattening needs
    assert not prepare_model(tiny_model(), ModelConfig()).channels_last


def test_deepspeed_engine_takes_a_channels_last_bf16_model(tiny_model):
    """Regression: channels_last weights broke DeepSpeed's initial broadcast (view as bytes needs stride(-1) == 1)."""
    from guard_fast.runtime.config import DistConfig
    from guard_fast.runtime.engine import OptimConfig, build_engine, build_optimizer

    model = prepare_model(tiny_model(arch="resnet18", width=4), ModelConfig(channels_last=True))
    optim = OptimConfig()
    engine = build_engine(model, build_optimizer(model, optim), None, DistConfig(precision="bf16", zero_stage=1),
                          optim, 2, torch.device("cpu"))
    x = torch.rand(2, 3, 32, 32).to(torch.bfloat16)
    loss = torch.nn.functional.cross_entropy(engine(x).float(), torch.tensor([0, 1]))
    engine.backward(loss)
    engine.step()
    assert torch.isfinite(loss)


def test_compile_wraps_the_body_that_the_objectives_call(tiny_model):
    model = prepare_model(tiny_model(), ModelConfig(compile=True))
    assert unwrap(model).body._compiled_call_impl is not None  # model.body(u) runs compiled, not only model(x)
    assert set(model.state_dict()) == set(tiny_model().state_dict())  # checkpoints keep their keys
