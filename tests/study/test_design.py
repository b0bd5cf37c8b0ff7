"""The study's design machinery without running a study: GUARD's resolution-scaled step, the power analysis, Holm,
non-inferiority and TOST against scipy / independent computations, and the four primary verdicts."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats as sps

from guard_fast.study import stats as S

# --- GUARD's step scaled to the resolution -------------------------------------------------------------------------

@pytest.mark.parametrize("shape, want", [((1, 28, 28), 0.2165), ((3, 224, 224), 3.0), ((3, 32, 32), 0.4286),
                                         ((3, 16, 16), 0.2143)])
def test_scaled_h_keeps_the_per_element_rms_step(shape, want):
    from guard_fast.regularizers.objectives import scaled_h

    h = scaled_h(3.0, shape)
    assert h == pytest.approx(want, abs=5e-5)  # the issue's 0.217 at 1x28x28
    # independent statement: the per-element RMS of an L2-length-h step equals the paper's h = 3 on 3x224x224
    assert h / math.sqrt(np.prod(shape)) == pytest.approx(3.0 / math.sqrt(3 * 224 * 224), rel=1e-12)


def test_resolution_scaled_objective_equals_the_explicit_step(tiny_model):
    """h_scaling = resolution with h = 3 on 3x16x16 inputs gives the same GUARD loss and gradients as h = 0.2143...
    given explicitly, and a different loss from the unscaled h = 3 (so the option is not ignored)."""
    from guard_fast.regularizers.objectives import ObjectiveConfig, build_objective, scaled_h

    torch.manual_seed(0)
    x, y = torch.rand(6, 3, 16, 16), torch.randint(0, 10, (6,))
    losses = {}
    for name, cfg, shape in (("scaled", ObjectiveConfig(beta=0.5, h_scaling="resolution"), (3, 16, 16)),
                             ("explicit", ObjectiveConfig(beta=0.5, h=scaled_h(3.0, (3, 16, 16))), None),
                             ("unscaled", ObjectiveConfig(beta=0.5), None)):
        model = tiny_model(width=4)
        loss, _ = build_objective(cfg, shape)(model, x, y)
        loss.backward()
        losses[name] = (loss.item(), [p.grad.clone() for p in model.parameters()])
    assert losses["scaled"][0] == pytest.approx(losses["explicit"][0], rel=1e-6)
    for a, b in zip(losses["scaled"][1], losses["explicit"][1], strict=True):
        torch.testing.assert_close(a, b)
    assert losses["scaled"][0] != pytest.approx(losses["unscaled"][0], rel=1e-6)


def test_h_scaling_is_validated_and_needs_a_shape():
    from guard_fast.regularizers.objectives import ObjectiveConfig, build_objective
    from guard_fast.runtime.errors import ConfigError

    with pytest.raises(ConfigError, match="h_scaling"):
        build_objective(ObjectiveConfig(h_scaling="pixels"))
    with pytest.raises(ConfigError, match="input shape"):
        build_objective(ObjectiveConfig(h_scaling="resolution"))


# --- power and minimum detectable difference -----------------------------------------------------------------------

def test_power_matches_a_monte_carlo_paired_t_test():
    """Power from the noncentral t against the rejection rate of scipy's paired t-test on simulated seeds."""
    rng = np.random.default_rng(0)
    for delta, sd, n in ((1.5, 2.0, 10), (2.0, 2.5, 15), (0.5, 1.0, 5)):
        d = rng.normal(delta, sd, size=(40_000, n))
        p = sps.ttest_1samp(d, 0.0, axis=1).pvalue
        assert S.power_paired(delta, sd, n) == pytest.approx((p < 0.05).mean(), abs=0.01)


@pytest.mark.parametrize("sd, n_want", [(2.0, 10), (2.5, 15)])
def test_n_for_a_two_point_mdd_reproduces_the_issue(sd, n_want):
    """The issue's numbers (points of accuracy): n = 10 at SD 2, 15 at SD 2.5 for an MDD <= 2 at 80% power."""
    assert S.n_for_mdd(sd, 2.0) == n_want
    assert S.mdd(sd, n_want) <= 2.0 < S.mdd(sd, n_want - 1)
    assert S.power_paired(S.mdd(sd, n_want), sd, n_want) == pytest.approx(0.8, abs=1e-9)
    for s, target in ((1.0, 1.5), (3.0, 2.0), (2.0, 0.7)):  # the search's start never skips the answer
        assert S.n_for_mdd(s, target) == next(n for n in range(2, 500) if S.mdd(s, n) <= target)


def test_mdd_scales_with_sd_and_exceeds_the_normal_approximation():
    z = sps.norm.ppf(0.975) + sps.norm.ppf(0.8)
    for n in (3, 10, 30):
        # the t-test needs more than the z-test's (z_a + z_b) sd / sqrt(n), and converges to it as n grows
        assert S.mdd(1.0, n) > z / math.sqrt(n)
        assert S.mdd(2.5, n) == pytest.approx(2.5 * S.mdd(1.0, n), rel=1e-9)  # MDD is linear in sd
    assert S.mdd(1.0, 400) == pytest.approx(z / 20, rel=0.01)
    assert S.mdd(1.0, 2) > S.mdd(1.0, 3)  # df = 1 (nan tail in scipy) still gives a finite, larger MDD


# --- Holm, non-inferiority, TOST -----------------------------------------------------------------------------------

def holm_reject(p: list[float], alpha: float) -> list[bool]:
    """Holm's procedure as a rejection rule (independent of the adjusted-p form): reject p_(1), p_(2), ... while
    p_(i) <= alpha / (m - i + 1), stop at the first that is not."""
    order, m = np.argsort(p), len(p)
    out = [False] * m
    for i, k in enumerate(order):
        if p[k] > alpha / (m - i):
            break
        out[k] = True
    return out


def test_holm_adjusted_p_agrees_with_the_step_down_rule():
    rng = np.random.default_rng(1)
    assert S.holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    for _ in range(200):
        p = list(rng.uniform(0, 0.1, size=rng.integers(1, 6)))
        adj = S.holm(p)
        for alpha in (0.01, 0.05):
            assert [a <= alpha for a in adj] == holm_reject(p, alpha)
        assert all(a >= b for a, b in zip(adj, p, strict=True))


def test_non_inferiority_and_tost_match_scipy_one_sided_tests():
    rng = np.random.default_rng(2)
    for _ in range(20):
        d = rng.normal(rng.uniform(-0.03, 0.03), 0.01, size=8)
        ni = S.non_inferiority(list(d), 0.02)
        assert ni["p"] == pytest.approx(sps.ttest_1samp(d, -0.02, alternative="greater").pvalue, rel=1e-9)
        assert ni["p_inferior"] == pytest.approx(sps.ttest_1samp(d, -0.02, alternative="less").pvalue, rel=1e-9)
        want = "supported" if ni["p"] < 0.05 else "contradicted" if ni["p_inferior"] < 0.05 else "underpowered"
        assert ni["verdict"] == want
        assert (ni["lower"] > -0.02) == (ni["p"] < 0.05)  # the one-sided bound and the test agree
        eq = S.tost(list(d), 0.02)
        p = max(sps.ttest_1samp(d, -0.02, alternative="greater").pvalue,
                sps.ttest_1samp(d, 0.02, alternative="less").pvalue)
        assert eq["p"] == pytest.approx(p, rel=1e-9)
        lo, hi = sps.ttest_1samp(d, 0.0).confidence_interval(0.90)  # TOST at 5% = the 90% interval inside margins
        assert eq["equivalent"] == (-0.02 < lo and hi < 0.02)


def test_primary_verdicts_cover_the_four_outcomes():
    fam = {"up": [0.05, 0.06, 0.04, 0.05, 0.055], "down": [-0.05, -0.06, -0.04, -0.05, -0.055],
           "same": [0.001, -0.001, 0.0, 0.002, -0.002], "noisy": [0.3, -0.25, 0.1, -0.2, 0.05]}
    v = S.primary_verdicts(fam, direction=+1, delta=0.02)
    assert {k: x["verdict"] for k, x in v.items()} == {"up": "supported", "down": "contradicted",
                                                       "same": "equivalent", "noisy": "underpowered"}
    ps = [sps.ttest_1samp(d, 0.0).pvalue for d in fam.values()]
    assert [x["p"] for x in v.values()] == pytest.approx(ps, rel=1e-9)
    assert [x["p_holm"] for x in v.values()] == pytest.approx(S.holm(ps))
    noisy = v["noisy"]
    assert noisy["mdd"] == pytest.approx(S.mdd(np.std(fam["noisy"], ddof=1), 5))
    assert noisy["n_needed"] > 5 and noisy["mdd"] > 0.02
    # Holm matters: a p of 0.03 alone is supported, in a family of two with a null it is not
    d = [0.03, 0.0, 0.05, 0.02, 0.04, 0.005]
    assert S.primary_verdicts({"a": d}, +1, 0.001)["a"]["verdict"] == "supported"
    assert 0.025 < sps.ttest_1samp(d, 0).pvalue < 0.05
    assert S.primary_verdicts({"a": d, "b": [0.1, -0.1, 0.2, -0.2, 0.1, -0.1]}, +1, 0.001)["a"]["verdict"] == \
        "underpowered"
