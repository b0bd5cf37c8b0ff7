"""MIM as the GUARD authors' evaluation code computes it: the default attack equals an implementation of
yumozi/GUARD train/evaluate.py:252-272 and yumozi/dataset_condensation utils.py:527-547 (the same function) written
here from reading it, at each table's step (SRe2L side 1/255, evaluate.py:39; main_CURE's Table 5 0.25/255,
utils.py:404); torchattacks' per-image MIFGSM stays available by name and is a different attack."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import torchattacks

from guard_fast.attacks.suite import AttackConfig, BatchL1MIM, build_attack
from guard_fast.models import build_model
from guard_fast.robustness import evaluate as E


def authors_mim(model, x, y, eps, alpha, iters, decay):
    """Momentum of gradients each divided by the L1 norm of the whole batch's gradient tensor; step alpha times its
    sign; clip to the eps box around the input, then to [0, 1]; no random start; the model in eval mode."""
    model.eval()
    start, cur, mom = x.clone(), x.clone(), torch.zeros_like(x)
    for _ in range(iters):
        cur.requires_grad_(True)
        (g,) = torch.autograd.grad(F.cross_entropy(model(cur), y), cur)
        mom = decay * mom + g / g.abs().sum()
        cur = cur.detach() + alpha * mom.sign()
        cur = torch.clamp(torch.clamp(cur, start - eps, start + eps), 0, 1)
    return cur.detach()


@pytest.fixture
def case():
    torch.manual_seed(0)
    model = build_model("convnet", 4, (0.4, 0.4, 0.4), (0.3, 0.3, 0.3), width=4, image_size=8).double().eval()
    x = torch.rand((12, 3, 8, 8), generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    x[:4] *= 0.2  # images of different contrast: their gradients differ in size, which the batch norm couples
    with torch.no_grad():
        pred = model(x).argmax(1)
    y = torch.where(torch.arange(12) < 9, pred, (pred + 1) % 4)  # 9 clean-correct, 3 wrong
    return model, x, y


@pytest.mark.parametrize("frac", [1.0, 0.25])  # yumozi/GUARD's step; main_CURE's step at eps 1/255
def test_default_mim_is_the_authors(case, frac):
    model, x, y = case
    eps = 4 / 255
    cfg = AttackConfig(mim_steps=10, mim_alpha_frac=frac)
    attack = build_attack("mim", model, cfg, eps, 4)
    assert isinstance(attack, BatchL1MIM) and cfg.couples_batch("mim")
    got = attack(x, y)
    want = authors_mim(model, x, y, eps, eps * frac, 10, 1.0)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-15)
    assert (got - x).abs().max() > eps / 2  # it moved
    # torchattacks' MIFGSM normalizes per image: the same first step, then another attack
    image = build_attack("mim", model, AttackConfig(mim_steps=10, mim_alpha_frac=frac, mim_grad_norm="image"), eps, 4)
    assert isinstance(image, torchattacks.MIFGSM) and not isinstance(image, BatchL1MIM)
    assert not torch.equal(image(x, y), got)
    one = AttackConfig(mim_steps=1, mim_alpha_frac=frac)
    torch.testing.assert_close(build_attack("mim", model, one, eps, 4)(x, y),
                               build_attack("mim", model, AttackConfig(mim_steps=1, mim_alpha_frac=frac,
                                                                       mim_grad_norm="image"), eps, 4)(x, y))


def test_batch_mim_is_evaluated_on_whole_batches(case, monkeypatch):
    """The batch-L1 MIM of an image depends on its batch, so evaluate attacks the whole batch (as the authors' loops)
    and counts the clean-correct images that survive."""
    model, x, y = case
    eps = 8 / 255
    cfg = AttackConfig(names=["mim"], eps=[eps], mim_steps=10)
    seen = []
    real_build = E.build_attack

    def spy(*args, **kw):
        attack = real_build(*args, **kw)
        return lambda xs, ys: seen.append(len(ys)) or attack(xs, ys)

    monkeypatch.setattr(E, "build_attack", spy)
    res = E.evaluate_model(model, [(x, y)], cfg, 4)
    assert seen == [12]
    adv = authors_mim(model, x, y, eps, eps, 10, 1.0)
    with torch.no_grad():
        want = int(((model(adv).argmax(1) == y) & (model(x).argmax(1) == y)).sum())
    assert res["results"][1]["correct"] == want
    sub = authors_mim(model, x[:9], y[:9], eps, eps, 10, 1.0)
    assert not torch.equal(sub, adv[:9])  # attacking only the correct ones would be another attack
    seen.clear()
    E.evaluate_model(model, [(x, y)], AttackConfig(names=["mim"], eps=[eps], mim_steps=10, mim_grad_norm="image"), 4)
    assert seen == [9]


def test_bad_mim_norm_is_refused():
    with pytest.raises(Exception, match="attack.mim_grad_norm = 'l2'"):
        AttackConfig(mim_grad_norm="l2").validate()
