"""Statistics over seeds: mean ± std per cell, paired differences with t-intervals, the three-way verdict of the
secondary comparisons, and the pre-registered analysis of the primary endpoint (power and MDD, Holm, non-inferiority,
TOST equivalence; four verdicts).

Seeds are the unit of replication: one seed reruns every stage (teacher, synthesis, labels, student, attacks) with
`dist.seed` changed, so the spread over seeds is the run-to-run noise of the whole method. A GUARD-vs-baseline pair
shares the seed (the same seed's data order and attack randomness), so its per-seed difference d_s = T_s - B_s is the
paired quantity; the interval is mean(d) ± t_{n-1, (1+c)/2} · sd(d) / sqrt(n) (sd with n - 1 in the denominator).
"""

from __future__ import annotations

import math
from typing import Any, Sequence

from scipy import stats as sps
from scipy.optimize import brentq

SUPPORT, CONTRADICT, UNCLEAR = "supports", "contradicts", "cannot tell"


def summarize(values: Sequence[float]) -> dict[str, float | int | None]:
    """{'mean', 'std' (n - 1 denominator; None for one value), 'n'}."""
    n = len(values)
    if n == 0:
        return {"mean": None, "std": None, "n": 0}
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else None
    return {"mean": mean, "std": std, "n": n}


def paired(treatment: Sequence[float], baseline: Sequence[float], confidence: float = 0.95) -> dict:
    """Per-seed differences treatment - baseline and their t-interval: {'diffs', 'mean', 'std', 'n', 'lo', 'hi'}
    (lo/hi None with fewer than 2 seeds). The sequences are aligned by seed."""
    if len(treatment) != len(baseline):
        raise ValueError(f"paired: {len(treatment)} vs {len(baseline)} values; align them by seed")
    diffs = [t - b for t, b in zip(treatment, baseline, strict=True)]
    s = summarize(diffs)
    lo = hi = None
    if s["n"] > 1:
        half = sps.t.ppf((1 + confidence) / 2, s["n"] - 1) * s["std"] / math.sqrt(s["n"])
        lo, hi = s["mean"] - half, s["mean"] + half
    return {"diffs": diffs, **s, "lo": lo, "hi": hi}


def verdict(lo: float | None, hi: float | None, direction: int) -> str:
    """Does an interval [lo, hi] of treatment - baseline support a claim that the difference has sign `direction`
    (+1: treatment higher, -1: lower)? Excludes 0 on the claimed side: supports; on the other side: contradicts;
    contains 0 (or undefined, one seed): cannot tell."""
    if lo is None or hi is None:
        return UNCLEAR
    if direction * lo > 0 and direction * hi > 0:
        return SUPPORT
    if direction * lo < 0 and direction * hi < 0:
        return CONTRADICT
    return UNCLEAR


def overall(verdicts: Sequence[str]) -> str:
    """One verdict for a claim tested in several comparisons: supports when at least half of them support it and
    none contradicts it, contradicts in the mirror case, otherwise cannot tell (mixed or mostly inconclusive)."""
    n = len(verdicts)
    sup, con = verdicts.count(SUPPORT), verdicts.count(CONTRADICT)
    if n and con == 0 and 2 * sup >= n:
        return SUPPORT
    if n and sup == 0 and 2 * con >= n:
        return CONTRADICT
    return UNCLEAR


# --- The pre-registered analysis: power, multiplicity, non-inferiority, equivalence --------------------------------
#
# Primary endpoint: per-seed difference d_s = GUARD_s - baseline_s (accuracy in [0, 1]) of n paired seeds, tested by
# the two-sided paired (one-sample on d) t-test at level alpha. Its power at a true difference delta with paired SD
# sigma is P(|T'| > t_{1-alpha/2, n-1}), T' noncentral t with n - 1 degrees of freedom and noncentrality
# delta * sqrt(n) / sigma. The minimum detectable difference (MDD) is the delta at which that power equals the target
# (0.8), and the n needed for a target MDD is the smallest n whose MDD is <= it.

SUPPORTED, CONTRADICTED, EQUIVALENT, UNDERPOWERED = "supported", "contradicted", "equivalent", "underpowered"


def power_paired(delta: float, sd: float, n: int, alpha: float = 0.05) -> float:
    """Power of the two-sided paired t-test at level alpha, true mean difference delta, paired SD sd, n pairs."""
    if n < 2 or sd <= 0:
        raise ValueError(f"power_paired: need n >= 2 and sd > 0 (n = {n}, sd = {sd})")
    df, ncp = n - 1, delta * math.sqrt(n) / sd
    crit = sps.t.ppf(1 - alpha / 2, df)
    upper, lower = float(sps.nct.sf(crit, df, abs(ncp))), float(sps.nct.cdf(-crit, df, abs(ncp)))
    # scipy returns nan for the far tail at df = 1 and large ncp (seen at ncp 11.3), where it is below 1e-15
    return upper + (0.0 if math.isnan(lower) else lower)


def mdd(sd: float, n: int, alpha: float = 0.05, power: float = 0.8) -> float:
    """Minimum detectable difference: the delta > 0 with power_paired(delta, sd, n, alpha) = power (same unit as
    sd). Power rises monotonically in delta, so a bracketed root search finds it."""
    if not 0 < power < 1:
        raise ValueError(f"mdd: power = {power} must be in (0, 1)")
    hi = sd
    while power_paired(hi, sd, n, alpha) < power:
        hi *= 2
    return float(brentq(lambda d: power_paired(d, sd, n, alpha) - power, 0.0, hi, xtol=1e-12 * sd))


def n_for_mdd(sd: float, target: float, alpha: float = 0.05, power: float = 0.8) -> int:
    """Smallest n >= 2 whose MDD at paired SD sd is <= target (n = 10 at sd 2, target 2; 15 at sd 2.5). The search
    starts at the z-test's n = ((z_{1-alpha/2} + z_power) sd / target)^2, which the t-test never beats."""
    z = sps.norm.ppf(1 - alpha / 2) + sps.norm.ppf(power)
    n = max(2, math.floor((z * sd / target) ** 2))
    while mdd(sd, n, alpha, power) > target:
        n += 1
    return n


def _t_parts(diffs: Sequence[float]) -> tuple[float, float, int]:
    s = summarize(diffs)
    if s["n"] < 2:
        raise ValueError(f"need >= 2 paired differences, got {s['n']}")
    return s["mean"], s["std"] / math.sqrt(s["n"]), s["n"]


def t_test(diffs: Sequence[float]) -> dict[str, float]:
    """Two-sided one-sample t-test of mean(diffs) = 0: {'mean', 'se', 'n', 't', 'p'} (p = 1 when every difference
    is 0, p = 0 when they are equal and non-zero)."""
    mean, se, n = _t_parts(diffs)
    if se == 0:
        return {"mean": mean, "se": 0.0, "n": n, "t": math.copysign(math.inf, mean) if mean else 0.0,
                "p": 1.0 if mean == 0 else 0.0}
    t = mean / se
    return {"mean": mean, "se": se, "n": n, "t": t, "p": float(2 * sps.t.sf(abs(t), n - 1))}


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values, in the input order: sort ascending, p_(i) x (m - i + 1) (i from 1),
    running maximum, capped at 1. Rejecting where adjusted p < alpha controls the family-wise error at alpha."""
    m = len(pvalues)
    order = sorted(range(m), key=lambda i: pvalues[i])
    adjusted, running = [0.0] * m, 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * pvalues[i]))
        adjusted[i] = running
    return adjusted


def one_sided_p(diffs: Sequence[float], bound: float, alternative: str) -> float:
    """p of the one-sided t-test of H0: mean <= bound (alternative 'greater') or mean >= bound ('less')."""
    mean, se, n = _t_parts(diffs)
    if se == 0:
        return 0.0 if (mean > bound if alternative == "greater" else mean < bound) else 1.0
    t = (mean - bound) / se
    return float(sps.t.sf(t, n - 1) if alternative == "greater" else sps.t.cdf(t, n - 1))


def non_inferiority(diffs: Sequence[float], margin: float, alpha: float = 0.05) -> dict[str, Any]:
    """Treatment not worse than baseline by more than `margin` (> 0): H0 mean <= -margin rejected by the one-sided
    t-test at alpha (equivalently the one-sided (1 - alpha) lower bound > -margin): supported. Inferior (the upper
    one-sided bound < -margin): contradicted. Otherwise underpowered."""
    p_ni = one_sided_p(diffs, -margin, "greater")
    p_inf = one_sided_p(diffs, -margin, "less")
    mean, se, n = _t_parts(diffs)
    q = sps.t.ppf(1 - alpha, n - 1) * se
    verdict = SUPPORTED if p_ni < alpha else CONTRADICTED if p_inf < alpha else UNDERPOWERED
    return {"margin": margin, "p": p_ni, "p_inferior": p_inf, "lower": mean - q, "upper": mean + q,
            "verdict": verdict}


def tost(diffs: Sequence[float], delta: float, alpha: float = 0.05) -> dict[str, Any]:
    """Two one-sided tests of equivalence within (-delta, +delta): equivalent when both H0 mean <= -delta and
    H0 mean >= +delta are rejected at alpha, i.e. p = max of the two one-sided p-values < alpha (equivalently the
    (1 - 2 alpha) t-interval lies inside the margins)."""
    p_lo, p_hi = one_sided_p(diffs, -delta, "greater"), one_sided_p(diffs, delta, "less")
    p = max(p_lo, p_hi)
    return {"delta": delta, "p_lower": p_lo, "p_upper": p_hi, "p": p, "equivalent": p < alpha}


def primary_verdicts(family: dict[str, Sequence[float]], direction: int, delta: float, alpha: float = 0.05,
                     power: float = 0.8) -> dict[str, dict[str, Any]]:
    """The pre-registered decision for each comparison of the primary family (name -> per-seed differences,
    treatment - baseline, same n each): two-sided t-test, Holm over the family; supported / contradicted when the
    Holm-adjusted p < alpha with the mean in / against the claimed `direction` (+1: treatment higher); else
    equivalent when TOST within +-delta (the pre-registered MDD) holds; else underpowered. Each entry also carries the
    MDD achieved (at the observed paired SD and n) and the n that the target delta would need at that SD."""
    tests = {name: t_test(d) for name, d in family.items()}
    adjusted = holm([t["p"] for t in tests.values()])
    out = {}
    for (name, t), p_holm in zip(tests.items(), adjusted, strict=True):
        d = family[name]
        eq = tost(d, delta, alpha)
        sd = summarize(d)["std"]
        if p_holm < alpha:
            verdict = SUPPORTED if direction * t["mean"] > 0 else CONTRADICTED
        else:
            verdict = EQUIVALENT if eq["equivalent"] else UNDERPOWERED
        out[name] = {**t, "sd": sd, "p_holm": p_holm, "tost": eq, "verdict": verdict,
                     "mdd": mdd(sd, t["n"], alpha, power) if sd else 0.0,
                     "n_needed": n_for_mdd(sd, delta, alpha, power) if sd else 2}
    return out
