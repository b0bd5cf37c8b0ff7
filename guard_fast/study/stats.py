"""Statistics over seeds: mean ± std per cell, paired differences with t-intervals, and the three-way verdict.

Seeds are the unit of replication: one seed reruns every stage (teacher, synthesis, labels, student, attacks) with
`dist.seed` changed, so the spread over seeds is the run-to-run noise of the whole method. A GUARD-vs-baseline pair
shares the seed (the same seed's data order and attack randomness), so its per-seed difference d_s = T_s - B_s is the
paired quantity; the interval is mean(d) ± t_{n-1, (1+c)/2} · sd(d) / sqrt(n) (sd with n - 1 in the denominator).
"""

from __future__ import annotations

import math
from typing import Sequence

from scipy import stats as sps

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
