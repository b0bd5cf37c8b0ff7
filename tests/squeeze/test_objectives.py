"""Each squeeze objective against a literal, independently written version of its formula (docs/spec.md section 2)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from guard_fast.attacks.pgd import fgsm_rs, pgd, trades_attack
from guard_fast.regularizers.objectives import ObjectiveConfig, build_objective, direction

B, S = 6, 16


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(1)
    x = torch.rand(B, 3, S, S, generator=g, dtype=torch.float64)
    y = torch.randint(0, 10, (B,), generator=g)
    return x, y


@pytest.fixture
def model(tiny_model):
    m = tiny_model(double=True)
    m.train()
    with torch.no_grad():  # non-trivial running statistics so eval mode differs from train mode
        for _ in range(2):
            m(torch.rand(8, 3, S, S, dtype=torch.float64))
    return m


def grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def run_library(model, x, y, **cfg):
    model.zero_grad()
    loss, stats = build_objective(ObjectiveConfig(**cfg))(model, x, y)
    loss.backward()
    assert model.training
    return loss, stats, grads(model)


def literal_z(model, x, y, h):
    """z_i = h (g_i + 1e-7) / (||g_i|| + 1e-7), g = d(batch-mean eval CE)/du, written per sample."""
    model.eval()
    u = model.normalize(x).detach().requires_grad_(True)
    F.cross_entropy(model.body(u), y).backward()
    g = u.grad.detach()
    model.zero_grad()
    return torch.stack([h * (g[i] + 1e-7) / (torch.sqrt((g[i] ** 2).sum()) + 1e-7) for i in range(len(x))])


def finish(model, x, y, reg):
    """Gradient of reg + train-mode CE: reg is back-propagated before the train forward updates the BatchNorm
    running statistics its eval graph used; returns (reg value, parameter gradients)."""
    if reg.requires_grad:
        reg.backward()
    model.train()
    F.cross_entropy(model(x), y).backward()
    return reg.detach(), grads(model)


def literal(model, x, y, bn_stats, reg_fn):
    """ce_train + reg_fn(model) with the BatchNorm statistics of `bn_stats`; returns (reg value, parameter grads).

    updated = the authors' literal order (pretrain.py, pretrain_cifar.py): train forward, then the eval forwards of
    reg_fn (which see the statistics this forward updated), then one joint backward.
    snapshot = reg_fn on the statistics from before the step, back-propagated before the train forward."""
    model.zero_grad()
    if bn_stats == "snapshot":
        return finish(model, x, y, reg_fn(model))
    model.train()
    ce = F.cross_entropy(model(x), y)
    reg = reg_fn(model)  # literal_z's backward touches only parameters' .grad, zeroed before the joint backward
    model.zero_grad()
    (ce + reg).backward()
    return reg.detach(), grads(model)


def literal_guard(model, x, y, h, beta, bn_stats):
    def reg_fn(m):
        z = literal_z(m, x, y, h)
        m.eval()
        u = m.normalize(x)
        return beta * torch.abs(F.cross_entropy(m.body(u + z), y) - F.cross_entropy(m.body(u), y))
    return literal(model, x, y, bn_stats, reg_fn)


def literal_curvature(model, x, y, h, lam, bn_stats, convention):
    """per-sample: lam * mean_i ||grad ce_i(u_i+z_i) - grad ce_i(u_i)||, one sample at a time.
    reference: the authors' CIFAR code: grad of (mean CE(u+z) - mean CE(u)) wrt the shared input, row norms, mean."""
    def per_sample(m):
        z = literal_z(m, x, y, h)
        m.eval()
        u = m.normalize(x).detach()
        norms = []
        for i in range(len(x)):
            a = (u[i:i + 1] + z[i:i + 1]).requires_grad_(True)
            b = u[i:i + 1].clone().requires_grad_(True)
            (ga,) = torch.autograd.grad(F.cross_entropy(m.body(a), y[i:i + 1]), a, create_graph=True)
            (gb,) = torch.autograd.grad(F.cross_entropy(m.body(b), y[i:i + 1]), b, create_graph=True)
            norms.append(torch.sqrt(((ga - gb) ** 2).sum()))
        return lam * sum(norms) / len(norms)

    def authors(m):
        z = literal_z(m, x, y, h)
        m.eval()
        inputs = m.normalize(x).detach().requires_grad_(True)
        diff = F.cross_entropy(m.body(inputs + z), y) - F.cross_entropy(m.body(inputs), y)
        (grad_diff,) = torch.autograd.grad(diff, inputs, create_graph=True)
        return torch.mean(lam * grad_diff.reshape(len(x), -1).norm(dim=1))
    return literal(model, x, y, bn_stats, per_sample if convention == "per-sample" else authors)


def literal_grad_norm(model, x, y, beta, bn_stats):
    def reg_fn(m):
        m.eval()
        u = m.normalize(x).detach()
        sq = []
        for i in range(len(x)):
            a = u[i:i + 1].clone().requires_grad_(True)
            (g,) = torch.autograd.grad(F.cross_entropy(m.body(a), y[i:i + 1]), a, create_graph=True)
            sq.append((g ** 2).sum())
        return beta * sum(sq) / len(sq)
    return literal(model, x, y, bn_stats, reg_fn)


def literal_pgd(model, x, y, eps, alpha, steps):
    model.eval()
    adv = x.clone()
    for _ in range(steps):
        adv.requires_grad_(True)
        loss = F.cross_entropy(model(adv), y)
        g = torch.autograd.grad(loss, adv)[0]
        adv = adv.detach() + alpha * torch.sign(g)
        adv = torch.clamp(torch.clamp(adv, min=x - eps, max=x + eps), 0, 1)
    return adv


def assert_same(got, want, rtol=1e-9, atol=1e-12):
    (reg_a, g_a), (reg_b, g_b) = got, want
    torch.testing.assert_close(reg_a, reg_b, rtol=rtol, atol=atol)
    for n in g_b:
        torch.testing.assert_close(g_a[n], g_b[n], rtol=rtol, atol=atol, msg=n)


def assert_differ(a, b):
    """The two semantics are different functions on this model: R or some gradient differs by far more than rounding."""
    (reg_a, g_a), (reg_b, g_b) = a, b
    rel = max([abs(reg_a - reg_b).item() / abs(reg_b).item()]
              + [((g_a[n] - g_b[n]).norm() / g_b[n].norm()).item() for n in g_b])
    assert rel > 1e-4


BN = ["updated", "snapshot"]


@pytest.mark.parametrize("bn_stats", BN)
@pytest.mark.parametrize("strategy", ["reference", "batched", "reuse"])
def test_guard_matches_literal(model, batch, strategy, bn_stats):
    x, y = batch
    ref, other = copy.deepcopy(model), copy.deepcopy(model)
    loss, stats, g = run_library(model, x, y, name="guard", strategy=strategy, bn_stats=bn_stats, h=3.0, beta=0.5)
    want = literal_guard(ref, x, y, 3.0, 0.5, bn_stats)
    assert_same((stats["reg"], g), want)
    assert stats["reg"] > 0
    assert_differ(want, literal_guard(other, x, y, 3.0, 0.5, BN[1 - BN.index(bn_stats)]))


@pytest.mark.parametrize("convention", ["reference", "per-sample"])
@pytest.mark.parametrize("bn_stats", BN)
def test_guard_curvature_matches_literal(model, batch, bn_stats, convention):
    x, y = batch
    ref, other = copy.deepcopy(model), copy.deepcopy(model)
    _, stats, g = run_library(model, x, y, name="guard-curvature", bn_stats=bn_stats, lam_convention=convention,
                              h=3.0, lam=0.7)
    want = literal_curvature(ref, x, y, 3.0, 0.7, bn_stats, convention)
    assert_same((stats["reg"], g), want)
    assert_differ(want, literal_curvature(other, x, y, 3.0, 0.7, BN[1 - BN.index(bn_stats)], convention))


def test_curvature_conventions_differ_by_batch_size(model, batch):
    """reference (batch-mean gradients) = per-sample / B, and the default is the authors' lambda = 100."""
    x, y = batch
    assert (ObjectiveConfig().lam, ObjectiveConfig().lam_convention) == (100.0, "reference")
    _, s_ref, _ = run_library(copy.deepcopy(model), x, y, name="guard-curvature", lam=100.0)
    _, s_ps, _ = run_library(copy.deepcopy(model), x, y, name="guard-curvature", lam=100.0,
                             lam_convention="per-sample")
    torch.testing.assert_close(s_ref["reg"] * B, s_ps["reg"], rtol=1e-9, atol=0)


@pytest.mark.parametrize("bn_stats", BN)
def test_grad_norm_matches_literal_and_changes_gradients(model, batch, bn_stats):
    x, y = batch
    ref, plain, other = copy.deepcopy(model), copy.deepcopy(model), copy.deepcopy(model)
    _, stats, g = run_library(model, x, y, name="grad-norm", bn_stats=bn_stats, grad_norm_beta=2.0)
    want = literal_grad_norm(ref, x, y, 2.0, bn_stats)
    assert_same((stats["reg"], g), want)
    assert_differ(want, literal_grad_norm(other, x, y, 2.0, BN[1 - BN.index(bn_stats)]))
    _, _, g_plain = run_library(plain, x, y, name="none")
    diff = max((g[n] - g_plain[n]).abs().max().item() for n in g)
    assert diff > 1e-6  # unlike the reference, the term reaches the parameters


@pytest.mark.parametrize("bn_stats", BN)
@pytest.mark.parametrize("name,strategy", [("guard", "reference"), ("guard", "batched"), ("guard", "reuse"),
                                           ("guard-curvature", "reuse"), ("grad-norm", "reuse"), ("none", "reuse"),
                                           ("trades", "reuse")])
def test_loss_value_is_ce_plus_true_reg(model, batch, name, strategy, bn_stats):
    """Whatever carries the gradient, the returned loss's value is ce + R (the loop's non-finite check reads it),
    and stats carry the true R and the train CE."""
    x, y = batch
    plain = copy.deepcopy(model).train()
    want_ce = F.cross_entropy(plain(x), y).detach()  # train-mode CE: batch statistics, independent of the buffers
    loss, stats, _ = run_library(model, x, y, name=name, strategy=strategy, bn_stats=bn_stats, beta=0.5, steps=2)
    assert set(stats) >= {"ce", "reg"}
    torch.testing.assert_close(stats["ce"], want_ce, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(loss.detach(), stats["ce"] + stats["reg"], rtol=1e-12, atol=1e-12)


def test_pgd_at_matches_literal(model, batch):
    x, y = batch
    ref = copy.deepcopy(model)
    _, stats, g = run_library(model, x, y, name="pgd-at", eps=8 / 255, alpha=2 / 255, steps=3)
    adv = literal_pgd(ref, x, y, 8 / 255, 2 / 255, 3)
    ref.zero_grad()
    ref.train()
    ce = F.cross_entropy(ref(adv), y)
    ce.backward()
    assert_same((stats["ce"], g), (ce.detach(), grads(ref)))


def test_fgsm_rs_and_trades_match_literal(model, batch):
    x, y = batch
    eps = 4 / 255
    ref = copy.deepcopy(model)
    torch.manual_seed(7)
    _, stats, g = run_library(model, x, y, name="fgsm-rs", eps=eps)
    torch.manual_seed(7)
    start = torch.clamp(x + (2 * torch.rand(x.shape, dtype=x.dtype) - 1) * eps, 0, 1)
    ref.eval()
    start.requires_grad_(True)
    gx = torch.autograd.grad(F.cross_entropy(ref(start), y), start)[0]
    adv = torch.clamp(torch.clamp(start.detach() + 1.25 * eps * gx.sign(), x - eps, x + eps), 0, 1)
    ref.zero_grad()
    _, g_ref = finish(ref, adv, y, torch.zeros((), dtype=x.dtype))
    for n in g:
        torch.testing.assert_close(g[n], g_ref[n], rtol=1e-9, atol=1e-12)

    m2, ref2 = copy.deepcopy(model), copy.deepcopy(model)
    torch.manual_seed(3)
    _, stats, g = run_library(m2, x, y, name="trades", eps=eps, alpha=1 / 255, steps=2, trades_beta=6.0)
    torch.manual_seed(3)
    ref2.eval()
    p = F.softmax(ref2(x), 1).detach()
    adv = torch.clamp(torch.clamp(x + 0.001 * torch.randn(x.shape, dtype=x.dtype), x - eps, x + eps), 0, 1)
    for _ in range(2):
        adv.requires_grad_(True)
        kl = (p * (torch.log(p) - F.log_softmax(ref2(adv), 1))).sum()
        gx = torch.autograd.grad(kl, adv)[0]
        adv = torch.clamp(torch.clamp(adv.detach() + (1 / 255) * gx.sign(), x - eps, x + eps), 0, 1)
    ref2.train()
    logits = ref2(x)
    q = F.softmax(logits, 1)
    reg = 6.0 * (q * (torch.log(q) - F.log_softmax(ref2(adv), 1))).sum() / len(x)
    ref2.zero_grad()
    (F.cross_entropy(logits, y) + reg).backward()
    torch.testing.assert_close(stats["reg"], reg.detach(), rtol=1e-9, atol=1e-12)
    for n, prm in ref2.named_parameters():
        torch.testing.assert_close(g[n], prm.grad, rtol=1e-9, atol=1e-12, msg=n)


@pytest.mark.parametrize("eps", [1 / 255, 8 / 255])
def test_attacks_stay_in_eps_ball_and_range(model, batch, eps):
    x, y = batch
    x = x.clone()
    x[0] = 0.0  # pixels at the range edges must stay in [0,1]
    x[1] = 1.0
    gen = torch.Generator().manual_seed(0)
    for adv in (pgd(model, x, y, eps, eps / 4, 5, random_start=True, generator=gen),
                pgd(model, x, y, eps, eps, 3), fgsm_rs(model, x, y, eps, generator=gen),
                trades_attack(model, x, eps, eps / 2, 3, generator=gen)):
        assert (adv - x).abs().max() <= eps + 1e-12
        assert adv.min() >= 0 and adv.max() <= 1
        assert (adv != x).any()
    assert model.training  # attacks restore the mode


@pytest.mark.parametrize("bn_stats", BN)
@pytest.mark.parametrize("name", ["none", "guard", "guard-curvature", "grad-norm", "pgd-at", "fgsm-rs", "trades"])
def test_bn_stats_updated_once_and_all_grads_finite(model, batch, name, bn_stats):
    x, y = batch
    plain = copy.deepcopy(model)
    plain.train()
    plain(x) if name != "trades" else (plain(x), plain(x))  # trades runs two train forwards (x and x_adv)
    _, stats, g = run_library(model, x, y, name=name, steps=2, bn_stats=bn_stats)
    for (n, a), b in zip(model.named_buffers(), plain.buffers(), strict=True):
        if "running_mean" in n and name not in ("pgd-at", "fgsm-rs", "trades"):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-12, msg=n)  # eval forwards left them alone
        if "num_batches_tracked" in n:
            assert torch.equal(a, b), n
    assert all(torch.isfinite(v).all() and v.abs().sum() > 0 for v in g.values())
    assert all(torch.isfinite(v) for v in stats.values())


def test_direction_zero_gradient_row_is_finite():
    g = torch.randn(4, 3, 5, 5)
    g[2] = 0
    z = direction(g, 3.0)
    assert torch.isfinite(z).all()
    norms = z.flatten(1).norm(dim=1)
    torch.testing.assert_close(norms[[0, 1, 3]], torch.full((3,), 3.0), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bn_stats", BN)
@pytest.mark.parametrize("strategy", ["batched", "reuse"])
def test_strategies_match_reference_fp32(tiny_model, strategy, bn_stats):
    torch.manual_seed(0)
    x, y = torch.rand(8, 3, S, S), torch.randint(0, 10, (8,))
    a = tiny_model()
    a(x)  # non-trivial running statistics
    b = copy.deepcopy(a)
    _, sa, ga = run_library(a, x, y, name="guard", strategy="reference", beta=0.3, bn_stats=bn_stats)
    _, sb, gb = run_library(b, x, y, name="guard", strategy=strategy, beta=0.3, bn_stats=bn_stats)
    torch.testing.assert_close(sa["reg"], sb["reg"], rtol=1e-4, atol=1e-6)
    for n in ga:
        torch.testing.assert_close(ga[n], gb[n], rtol=1e-4, atol=1e-5, msg=n)


def test_unknown_names_rejected():
    from guard_fast.runtime.errors import ConfigError

    with pytest.raises(ConfigError, match="objective.name = 'cure'"):
        build_objective(ObjectiveConfig(name="cure"))
    with pytest.raises(ConfigError, match="objective.strategy = 'fast'"):
        build_objective(ObjectiveConfig(strategy="fast"))
    with pytest.raises(ConfigError, match="objective.bn_stats = 'before'"):
        build_objective(ObjectiveConfig(bn_stats="before"))
    with pytest.raises(ConfigError, match="objective.lam_convention = 'mean'"):
        build_objective(ObjectiveConfig(lam_convention="mean"))


@pytest.mark.parametrize("bn_stats", BN)
def test_strategies_compiled_match_eager_reference(tiny_model, bn_stats):
    """torch.compile of the model with every guard strategy: same R and gradients as eager `reference`."""
    torch.manual_seed(0)
    x, y = torch.rand(8, 3, S, S), torch.randint(0, 10, (8,))
    base = tiny_model()
    base(x)  # non-trivial running statistics
    ref = copy.deepcopy(base)
    _, s_ref, g_ref = run_library(ref, x, y, name="guard", strategy="reference", beta=0.5, bn_stats=bn_stats)
    for strategy in ("reuse", "batched", "reference"):
        m = copy.deepcopy(base)
        m.compile()
        _, stats, g = run_library(m, x, y, name="guard", strategy=strategy, beta=0.5, bn_stats=bn_stats)
        torch.testing.assert_close(stats["reg"], s_ref["reg"], rtol=1e-4, atol=1e-6)
        for n in g_ref:
            torch.testing.assert_close(g[n], g_ref[n], rtol=1e-3, atol=2e-5, msg=f"{strategy} {n}")


@pytest.mark.parametrize("bn_stats", BN)
def test_strategies_train_identically_fp64(tiny_model, bn_stats):
    """Eight SGD steps with each guard strategy follow the same trajectory (fp64: rounding cannot hide a bug)."""
    from guard_fast.runtime.engine import OptimConfig, build_optimizer

    g = torch.Generator().manual_seed(0)
    data = [(torch.rand(8, 3, S, S, generator=g, dtype=torch.float64), torch.randint(0, 10, (8,), generator=g))
            for _ in range(8)]
    base = tiny_model(double=True)
    traces = {}
    for strategy in ("reference", "batched", "reuse"):
        m = copy.deepcopy(base)
        opt = build_optimizer(m, OptimConfig(lr=0.01, weight_decay=5e-4))
        objective = build_objective(ObjectiveConfig(name="guard", strategy=strategy, beta=0.5, bn_stats=bn_stats))
        trace = []
        for x, y in data:
            loss, stats = objective(m, x, y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            trace.append(torch.stack([stats["ce"], stats["reg"]]))
        traces[strategy] = (torch.stack(trace), torch.cat([p.flatten() for p in m.parameters()]))
    for strategy in ("batched", "reuse"):
        torch.testing.assert_close(traces[strategy][0], traces["reference"][0], rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(traces[strategy][1], traces["reference"][1], rtol=1e-9, atol=1e-11)
