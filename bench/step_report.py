"""Turn the raw samples of bench/step.py into results: summaries, ratios to plain, goal checks, Markdown rows, PNG.

Ratios between two methods are paired: repetition r of method A is divided by repetition r of method B (they ran
back to back), and the median of those ratios is reported with its p20-p80 spread. Pairing cancels the drift that
interleaving spreads evenly over the methods.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from bench.common import summarize
from guard_fast.runtime.io import atomic_write

PLAIN = "none"
BEST = "best"  # the variant group of goals that compare each side at its fastest variant (eager or compiled)
# (goal id, description, numerator row kind, denominator row kind, target, comparison): rows are picked per variant
# group (each measured variant, and "best" = each side at its fastest variant) and per bn_stats value of the guard
# rows; "best-guard" is the fastest guard strategy of that group, "guard[reference]" the reference strategy.
GOALS = [
    ("pgd10-over-guard", "PGD-10 AT / best GUARD, time per iteration", "pgd-at[K=10]", "best-guard", 2.5, ">="),
    ("guard-over-plain", "best GUARD / plain, time per iteration", "best-guard", PLAIN, 3.2, "<="),
    ("reference-over-best", "GUARD reference / best strategy, time per iteration", "guard[reference]", "best-guard",
     1.2, ">="),
    ("guard-mem-over-plain", "best GUARD / plain, peak memory", "best-guard", PLAIN, 1.3, "<="),
    ("guard-mem-below-pgd10", "best GUARD / PGD-10 AT, peak memory", "best-guard", "pgd-at[K=10]", 1.0, "<"),
]


def paired_ratio(a: Sequence[float], b: Sequence[float]) -> dict[str, float]:
    """Median and p20-p80 of a[r] / b[r] over the repetitions both have."""
    n = min(len(a), len(b))
    return summarize([a[r] / b[r] for r in range(n)])


def build_results(raw: dict[str, Any], batch_size: int, per_rank: list[dict[str, Any]] | None = None,
                  timer: str = "perf_counter", memory_measure: str = "") -> dict[str, Any]:
    """JSON-ready results from `run_benchmark`'s output (this rank) and every rank's samples (multi-rank mode)."""
    samples, memory, errors = raw["samples"], raw["memory"], raw["errors"]
    rows = []
    for m in raw["rows"]:
        plain = PLAIN + ("+compile" if m.variant == "compiled" else "")
        ok = m.label not in errors and samples[m.label] and plain not in errors
        row: dict[str, Any] = {"label": m.label, "objective": m.objective, "variant": m.variant,
                               "strategy": m.strategy, "bn_stats": m.bn_stats, "error": errors.get(m.label),
                               "samples_s": samples[m.label]}
        if ok:
            row["time_s"] = summarize(samples[m.label])
            row["images_per_s"] = summarize([batch_size / t for t in samples[m.label]])
            row["time_ratio"] = paired_ratio(samples[m.label], samples[plain])
        mem = memory.get(m.label)
        row["memory_mib"] = mem
        if mem and memory.get(plain):
            row["memory_ratio"] = mem["peak_mib"] / memory[plain]["peak_mib"]
        if per_rank:
            ranks = [{"rank": r["rank"], "images_per_s": batch_size / summarize(r["samples"][m.label])["median"]}
                     for r in per_rank if r["samples"].get(m.label)]
            row["per_rank"] = ranks
            row["aggregate_images_per_s"] = sum(r["images_per_s"] for r in ranks)
        rows.append(row)
    return {"timer": timer, "memory_measure": memory_measure, "batch_size_per_rank": batch_size,
            "world": len(per_rank) if per_rank else 1, "rows": rows, "skipped": raw["skipped"],
            "goals": check_goals(rows)}


def _pick(rows: list[dict[str, Any]], kind: str, variant: str, bn_stats: str) -> dict[str, Any] | None:
    """The fastest measured row of `kind` in `variant` ("best": any variant) whose guard rows use `bn_stats`.

    kind: "best-guard" (any guard strategy), "guard[<strategy>]", or a label without variant suffix ("none",
    "pgd-at[K=10]")."""
    live = [r for r in rows if (variant == BEST or r["variant"] == variant) and "time_s" in r]
    if kind == "best-guard" or kind.startswith("guard["):
        strategy = kind[len("guard["):-1] if kind != "best-guard" else None
        live = [r for r in live if r["objective"] == "guard" and r.get("bn_stats") == bn_stats
                and strategy in (None, r.get("strategy"))]
    else:
        live = [r for r in live if r["label"].removesuffix("+compile") == kind]
    return min(live, key=lambda r: r["time_s"]["median"]) if live else None


def check_goals(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each goal of issues 4, 7 and 12 that the measured rows allow, per variant group and guard bn_stats value."""
    out = []
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    groups = variants + ([BEST] if len(variants) > 1 else [])
    modes = list(dict.fromkeys(r["bn_stats"] for r in rows if r["objective"] == "guard")) or [None]
    for variant in groups:
        for bn in modes:
            for gid, desc, num_kind, den_kind, target, op in GOALS:
                num, den = _pick(rows, num_kind, variant, bn), _pick(rows, den_kind, variant, bn)
                if num is None or den is None or num is den:  # e.g. reference is the best: no comparison to make
                    continue
                if "mem" in gid:
                    if not (num.get("memory_mib") and den.get("memory_mib")):
                        continue
                    value = num["memory_mib"]["peak_mib"] / den["memory_mib"]["peak_mib"]
                else:
                    value = paired_ratio(num["samples_s"], den["samples_s"])["median"]
                met = {">=": value >= target, "<=": value <= target, "<": value < target}[op]
                out.append({"goal": gid, "variant": variant, "bn_stats": bn, "description": desc,
                            "numerator": num["label"], "denominator": den["label"], "value": value,
                            "target": f"{op} {target}", "met": met})
    return out


HEADER = ["method", "time/iter ms (p20-p80)", "x plain (p20-p80)", "images/s per rank", "peak MiB",
          "x plain mem"]


def markdown_rows(results: dict[str, Any]) -> list[list[Any]]:
    out = []
    for r in results["rows"]:
        if "time_s" not in r:
            out.append([r["label"], f"failed: {r['error']}", "", "", "", ""])
            continue
        t, q = r["time_s"], r["time_ratio"]
        mem = r.get("memory_mib") or {}
        ips = f"{r['images_per_s']['median']:.1f}"
        if "aggregate_images_per_s" in r:
            ips += f" (all {results['world']} ranks: {r['aggregate_images_per_s']:.1f})"
        out.append([r["label"], f"{1e3 * t['median']:.1f} ({1e3 * t['p20']:.1f}-{1e3 * t['p80']:.1f})",
                    f"{q['median']:.2f} ({q['p20']:.2f}-{q['p80']:.2f})", ips,
                    f"{mem['peak_mib']:.1f}" if mem else "", f"{r['memory_ratio']:.2f}" if "memory_ratio" in r else ""])
    return out


def goals_markdown(results: dict[str, Any]) -> str:
    lines = ["| goal | variant | guard bn_stats | value | target | met |", "|---|---|---|---|---|---|"]
    lines += [f"| {g['description']} ({g['numerator']} / {g['denominator']}) | {g['variant']} | {g['bn_stats']} "
              f"| {g['value']:.2f} | {g['target']} | {'yes' if g['met'] else 'NO'} |" for g in results["goals"]]
    return "\n".join(lines)


def plot(results: dict[str, Any], path: str | Path, title: str) -> Path:
    """Horizontal bars of time/iter (p20-p80 whiskers) and peak memory per method, labelled with the x-plain ratio."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in results["rows"] if "time_s" in r]
    labels = [r["label"] for r in rows][::-1]  # first row at the top
    rows = rows[::-1]
    ms = [1e3 * r["time_s"]["median"] for r in rows]
    err = [[1e3 * (r["time_s"]["median"] - r["time_s"]["p20"]) for r in rows],
           [1e3 * (r["time_s"]["p80"] - r["time_s"]["median"]) for r in rows]]
    mib = [(r.get("memory_mib") or {}).get("peak_mib", 0.0) for r in rows]
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(12, 0.45 * len(rows) + 1.8), sharey=True)
    colors = ["tab:gray" if r["objective"] == PLAIN else "tab:blue" if r["objective"].startswith("guard")
              else "tab:red" for r in rows]
    ax_t.barh(labels, ms, xerr=err, color=colors, capsize=3)
    ax_m.barh(labels, mib, color=colors)
    for i, r in enumerate(rows):
        ax_t.text(ms[i], i, f"  {r['time_ratio']['median']:.2f}x", va="center", fontsize=8)
        if "memory_ratio" in r:
            ax_m.text(mib[i], i, f"  {r['memory_ratio']:.2f}x", va="center", fontsize=8)
    ax_t.set_xlabel("time per iteration, ms (median, p20-p80)")
    ax_m.set_xlabel("peak memory, MiB")
    for ax in (ax_t, ax_m):
        ax.margins(x=0.2)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    try:
        return atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=110))
    finally:
        plt.close(fig)


def default_name(cfg, device_type: str, world: int) -> str:
    b = cfg.bench
    name = f"bench-{device_type}-{cfg.model.arch}-{b.image_size}px-b{b.batch_size}-{cfg.dist.precision}"
    return name + (f"-{world}ranks" if world > 1 else "")


def memory_measure(device_type: str) -> str:
    if device_type == "cuda":
        return "torch.cuda.max_memory_allocated over the last warm-up step (peak reset just before it)"
    return ("CPU: peak of live tensor bytes during the last warm-up step, from the profiler's allocator events "
            "(profile_memory=True), plus the parameters, buffers, optimizer state and batch live at its start")


def write_bench_results(cfg, raw: dict[str, Any], device, per_rank: list[dict[str, Any]] | None = None,
                        conditions: dict[str, Any] | None = None) -> list[Path]:
    """JSON + Markdown through bench.common.write_results, plus the PNG chart; returns the paths written."""
    from bench.common import write_results
    from guard_fast.runtime.config import to_dict

    world = len(per_rank) if per_rank else 1
    name = cfg.bench.name or default_name(cfg, device.type, world)
    results = build_results(raw, cfg.bench.batch_size, per_rank,
                            timer=("cuda_events" if device.type == "cuda" else
                                   "process_time" if cfg.bench.cpu_timer == "process" else "perf_counter"),
                            memory_measure=memory_measure(device.type))
    results["conditions"] = conditions or {}
    notes = [f"Interleaved: {cfg.bench.warmup} warm-up + {cfg.bench.reps} timed steps per method, each repetition "
             f"running every method once; ratios are medians of per-repetition ratios. World {world}, "
             f"batch {cfg.bench.batch_size} per rank, {cfg.dist.precision}, timer {results['timer']}.",
             f"Memory: {results['memory_measure']}."]
    if conditions:
        notes.append("Conditions: " + ", ".join(f"{k} {v}" for k, v in conditions.items()) + ".")
    notes += [f"Skipped: {s}." for s in raw["skipped"]]
    if results["goals"]:
        notes += ["", goals_markdown(results)]
    json_path, md_path = write_results(name, to_dict(cfg), results, HEADER, markdown_rows(results),
                                       out_dir=cfg.bench.out_dir, notes="\n".join(notes), device=device)
    paths = [json_path, md_path]
    if cfg.bench.plot and any("time_s" in r for r in results["rows"]):
        paths.append(plot(results, Path(cfg.bench.out_dir) / f"{name}.png",
                          f"{name} ({results['rows'][0]['label']} = 1.00x)"))
    return paths
