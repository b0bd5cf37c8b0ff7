"""The pre-registered analysis of a study from its per-cell stats: primary verdicts, clean non-inferiority, the
pilot's paired SD and the power analysis, and the headline figure (robust accuracy vs eps, two arms, 95% bands).

Inputs are report.py's cell stats ({eps label: {column: {'values', 'seeds', ...}}}); every number is recomputed
from the per-seed values, paired by seed.
"""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Any

from guard_fast.robustness.report import COLUMNS, fmt_eps
from guard_fast.runtime.io import atomic_write
from guard_fast.study import stats as S
from guard_fast.study.config import StudyConfig, parse_pair
from guard_fast.study.plan import Plan


def paired_values(a: dict[str, Any] | None, b: dict[str, Any] | None) -> tuple[list[float], list[int]]:
    """Per-seed differences a - b over the seeds both have (in seed order), and those seeds."""
    if not a or not b:
        return [], []
    seeds = sorted(set(a["seeds"]) & set(b["seeds"]))
    return [a["values"][a["seeds"].index(s)] - b["values"][b["seeds"].index(s)] for s in seeds], seeds


def primary_pairs(cfg: StudyConfig) -> list[str]:
    """The registered primary family, or (before registration) every pair of the plan's table."""
    return list(cfg.plan.pairs) or list(cfg.tables()[cfg.plan.table].pairs)


def arm_stats(cfg: StudyConfig, plan: Plan, stats: dict[str, Any], label: str) -> dict[str, Any]:
    cid = plan.cells.get((cfg.plan.table, label, cfg.plan.ipc))
    return stats.get(cid, {}) if cid else {}


def primary_analysis(cfg: StudyConfig, plan: Plan, stats: dict[str, Any]) -> dict[str, Any]:
    """Verdicts of the registered family at the primary (attack, eps): Holm-adjusted paired t-tests, TOST within
    +-plan.mdd, MDD achieved; clean accuracy by non-inferiority (margin plan.clean_margin). Empty verdicts when the
    plan is incomplete or a pair has fewer paired seeds than the registered n (the report lists it as pending)."""
    p = cfg.plan
    out: dict[str, Any] = {"registered": not p.missing(), "attack": p.attack, "eps": fmt_eps(p.eps) if p.eps else None,
                           "pairs": {}, "missing": []}
    if not out["registered"]:
        return out
    family, clean = {}, {}
    for pair in p.pairs:
        a, b = (arm_stats(cfg, plan, stats, x) for x in parse_pair(pair))
        d, seeds = paired_values(a.get(out["eps"], {}).get(p.attack), b.get(out["eps"], {}).get(p.attack))
        c, _ = paired_values(a.get(out["eps"], {}).get("clean"), b.get(out["eps"], {}).get("clean"))
        if len(d) < max(2, p.seeds) or len(c) < max(2, p.seeds):
            # the stopping rule: no verdict (and no primary difference) before all n registered seeds are in
            out["missing"].append(f"{pair}: {len(d)} of {p.seeds} registered paired seeds")
            continue
        family[pair], clean[pair] = d, c
        out["pairs"][pair] = {"seeds": seeds, "diffs": d, "ci": S.paired(d, [0.0] * len(d), 1 - p.alpha)}
    for pair, v in S.primary_verdicts(family, p.direction, p.mdd, p.alpha, p.power).items():
        out["pairs"][pair].update(v)
        out["pairs"][pair]["clean"] = S.non_inferiority(clean[pair], p.clean_margin, p.alpha)
    return out


def pilot_analysis(cfg: StudyConfig, plan: Plan, stats: dict[str, Any]) -> list[dict[str, Any]]:
    """Per primary pair and eps, over the first plan.pilot_seeds seeds: the baseline's mean robust accuracy (the
    primary eps is chosen where it lies in 20-60%), the paired SD of the difference, and the n that SD needs for an
    MDD of plan.mdd at plan.power."""
    p, rows = cfg.plan, []
    for pair in primary_pairs(cfg):
        a, b = (arm_stats(cfg, plan, stats, x) for x in parse_pair(pair))
        for eps in b:
            col_b = b.get(eps, {}).get(p.attack)
            d, seeds = paired_values(a.get(eps, {}).get(p.attack), col_b)
            d, seeds = d[: p.pilot_seeds], seeds[: p.pilot_seeds]
            base = [col_b["values"][col_b["seeds"].index(s)] for s in seeds] if col_b else []
            sd = S.summarize(d)["std"] if len(d) > 1 else None
            rows.append({"pair": pair, "eps": eps, "seeds": seeds, "baseline_mean": sum(base) / len(base) if base
                         else None, "diff_mean": sum(d) / len(d) if d else None, "sd": sd,
                         "n_needed": S.n_for_mdd(sd, p.mdd, p.alpha, p.power) if sd else None})
    return rows


def power_rows(cfg: StudyConfig, primary: dict[str, Any]) -> list[dict[str, Any]]:
    """Per primary pair: n, observed paired SD, the MDD achieved at plan.power, and the power at the target MDD."""
    p, rows = cfg.plan, []
    for pair, v in primary["pairs"].items():
        sd, n = v.get("sd"), v.get("n")
        if not sd or not n:
            continue
        rows.append({"pair": pair, "n": n, "sd": sd, "mdd": v["mdd"], "target": p.mdd,
                     "power_at_target": S.power_paired(p.mdd, sd, n, p.alpha), "n_needed": v["n_needed"]})
    return rows


def headline_figure(cfg: StudyConfig, plan: Plan, stats: dict[str, Any], path: Path) -> Path | None:
    """Two panels: the first primary pair's arms' accuracy under plan.attack vs eps (mean with a 95% t-band over
    seeds), and their paired difference with its 95% t-band; the primary eps is marked. None without data."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from scipy import stats as sps

    pairs = primary_pairs(cfg)
    if not pairs:
        return None
    labels = parse_pair(pairs[0])
    arms = [arm_stats(cfg, plan, stats, x) for x in labels]
    eps_list = [e for e in arms[1] if e in arms[0] and cfg.plan.attack in arms[0][e] and cfg.plan.attack in arms[1][e]]
    if not eps_list:
        return None
    xs = [_eps_value(e) for e in eps_list]
    fig = Figure(figsize=(10, 3.6), layout="constrained")
    FigureCanvasAgg(fig)
    ax, dx = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)

    def band(values: list[float]) -> tuple[float, float]:
        s = S.summarize(values)
        half = sps.t.ppf(0.975, s["n"] - 1) * s["std"] / math.sqrt(s["n"]) if s["n"] > 1 else 0.0
        return 100 * s["mean"], 100 * half

    for label, arm in zip(labels, arms, strict=True):
        mh = [band(arm[e][cfg.plan.attack]["values"]) for e in eps_list]
        n = len(arm[eps_list[0]][cfg.plan.attack]["values"])
        ax.plot(xs, [m for m, _ in mh], marker="o", label=f"{label} (n={n})")
        ax.fill_between(xs, [m - h for m, h in mh], [m + h for m, h in mh], alpha=0.25)
    diffs = [paired_values(arms[0][e][cfg.plan.attack], arms[1][e][cfg.plan.attack])[0] for e in eps_list]
    mh = [band(d) if d else (math.nan, 0.0) for d in diffs]
    dx.plot(xs, [m for m, _ in mh], marker="o", color="black", label=f"{labels[0]} - {labels[1]} (paired)")
    dx.fill_between(xs, [m - h for m, h in mh], [m + h for m, h in mh], color="gray", alpha=0.3)
    dx.axhline(0, color="red", lw=0.8)
    for a in (ax, dx):
        if cfg.plan.eps:
            a.axvline(cfg.plan.eps * 255, color="gray", ls="--", lw=0.8, label="primary eps")
        a.set_xlabel("L-inf eps (/255)")
        a.grid(alpha=0.3)
        a.legend(fontsize="small")
    ax.set_ylabel(f"{COLUMNS.get(cfg.plan.attack, cfg.plan.attack)} accuracy (%), mean, 95% CI")
    dx.set_ylabel("paired difference (points), mean, 95% CI")
    ax.set_title(f"Students at IPC {cfg.plan.ipc} ({cfg.plan.table})")
    dx.set_title("Paired difference per seed")
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return atomic_write(path, lambda f: f.write(buf.getvalue()))


def _eps_value(label: str) -> float:
    """'4/255' -> 4.0 (x axis in /255 units)."""
    if label.endswith("/255"):
        return float(label[:-4])
    return float(label) * 255
