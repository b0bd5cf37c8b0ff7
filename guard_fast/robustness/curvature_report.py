"""Curvature results as files: per-metric summaries, model-vs-model comparisons, curvature.md and the Fig. 2-style
distribution plot (pure functions over curvature.json content, so the pipeline can combine several stages' results).
"""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Any, Sequence

import torch

from guard_fast.runtime.io import atomic_json, atomic_text, atomic_write

# per-image metrics summarized in curvature.md: key -> (title, unit)
METRICS = {
    "lambda_max": ("largest input-Hessian eigenvalue", "loss / pixel^2"),
    "fd_curvature": ("finite-difference curvature along GUARD's z", "loss / pixel^2"),
    "grad_rayleigh": ("curvature along the gradient, ghat^T H ghat", "loss / pixel^2"),
    "grad_norm": ("input-gradient norm ||g||", "loss / pixel"),
    "cos_grad_top": ("|cos(gradient, top eigenvector)|", "1"),
}


def quantiles(values: Sequence[float]) -> dict[str, float]:
    """n, median, quartiles (linear interpolation between order statistics), mean, min, max."""
    t = torch.tensor(values, dtype=torch.float64)
    q = torch.quantile(t, torch.tensor([0.25, 0.5, 0.75], dtype=torch.float64)).tolist()
    return {"n": len(values), "median": q[1], "q1": q[0], "q3": q[2], "mean": t.mean().item(),
            "min": t.min().item(), "max": t.max().item()}


def summarize(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {m: quantiles([r[m] for r in records]) for m in METRICS}
    k = len(records[0]["eigenvalues"])
    out["eigenvalues"] = [quantiles([r["eigenvalues"][j] for r in records]) for j in range(k)]
    out["converged"] = sum(all(r["converged"]) for r in records) / len(records)
    out["mean_iterations"] = sum(sum(r["iterations"]) for r in records) / len(records)
    out["accuracy"] = sum(r["correct"] for r in records) / len(records)
    return out


def _g(v: float) -> str:
    return f"{v:.3g}"


def comparisons(models: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per group, the first model against each other one on the same images: median ratio of lambda_max and the
    fraction of images where the first model's lambda_max is lower (flatter)."""
    out = []
    for group in dict.fromkeys(m["group"] for m in models):
        ms = [m for m in models if m["group"] == group]
        for other in ms[1:]:
            a = {r["position"]: r["lambda_max"] for r in ms[0]["records"]}
            b = {r["position"]: r["lambda_max"] for r in other["records"]}
            common = sorted(set(a) & set(b))
            if not common:
                continue
            lower = sum(a[p] < b[p] for p in common) / len(common)
            mb = other["summary"]["lambda_max"]["median"]
            out.append({"group": group, "a": ms[0]["label"], "b": other["label"], "images": len(common),
                        "median_ratio": ms[0]["summary"]["lambda_max"]["median"] / mb if mb else None,
                        "fraction_a_flatter": lower})
    return out


def markdown_report(result: dict[str, Any]) -> str:
    """curvature.md: per metric a table of median [Q1, Q3] and mean per model, comparisons, settings, cost."""
    ds, s = result["dataset"], result["settings"]
    lines = ["# Input-Hessian curvature at real samples", "",
             f"{ds['name']} val split: {ds['images']} of {ds['split_images']} images"
             + (f" (seeded subset, seed {ds['subset_seed']})" if ds["images"] < ds["split_images"] else "")
             + f", {ds['image_size']} px; {result['world']} rank(s); {result['seconds']:.1f} s.", ""]
    for key, (title, unit) in METRICS.items():
        lines += [f"## {title} ({unit})", "", "| model | group | median | Q1 | Q3 | mean | min | max |",
                  "|---|---|---|---|---|---|---|---|"]
        for m in result["models"]:
            q = m["summary"][key]
            lines.append(f"| {m['label']} | {m['group'] or '-'} | {_g(q['median'])} | {_g(q['q1'])} | "
                         f"{_g(q['q3'])} | {_g(q['mean'])} | {_g(q['min'])} | {_g(q['max'])} |")
        lines.append("")
    if s["top_k"] > 1:
        lines += [f"## Top {s['top_k']} eigenvalues (median per rank)", "", "| model | "
                  + " | ".join(f"lambda_{j + 1}" for j in range(s["top_k"])) + " |",
                  "|---|" + "---|" * s["top_k"]]
        lines += [f"| {m['label']} | " + " | ".join(_g(q["median"]) for q in m["summary"]["eigenvalues"]) + " |"
                  for m in result["models"]]
        lines.append("")
    lines += ["## Per model", "", "| model | checkpoint | clean acc % | converged % | mean HVPs / image | "
              "s / image |", "|---|---|---|---|---|---|"]
    for m in result["models"]:
        sm = m["summary"]
        lines.append(f"| {m['label']} | {m['checkpoint']} | {100 * sm['accuracy']:.1f} | {100 * sm['converged']:.1f} "
                     f"| {sm['mean_iterations']:.1f} | {m['seconds_per_image']:.3f} |")
    lines.append("")
    if result["comparisons"]:
        lines += ["## Is the first model of each group flatter?", "", "| group | model A | model B | images | "
                  "median lambda_max A / B | images where A is flatter % |", "|---|---|---|---|---|---|"]
        lines += [f"| {c['group'] or '-'} | {c['a']} | {c['b']} | {c['images']} | "
                  f"{'-' if c['median_ratio'] is None else _g(c['median_ratio'])} | "
                  f"{100 * c['fraction_a_flatter']:.1f} |" for c in result["comparisons"]]
        lines.append("")
    lines += ["## Settings", "", f"- power iteration: start N(0, I) seeded by (dist.seed = {s['seed']}, image "
              f"position); stop when |lam_t - lam_(t-1)| <= {s['tol']:g} |lam_t| or after {s['max_iters']} "
              f"Hessian-vector products; top {s['top_k']} eigenvalue(s) by deflation; {s['dtype']}; models in eval "
              "mode.", f"- fd_curvature: ||g(x + z) - g(x)|| / ||z|| with GUARD's z = std * h g_u / ||g_u||, h = "
              f"{s['h']:g} normalized-input units (median ||z|| = {_g(result['fd_step_median'])} in [0,1] pixel "
              "units); x + z not clamped.",
              "- all gradients and Hessians are taken w.r.t. the [0,1] pixel image; cos_grad_top is |cos| (an "
              "eigenvector's sign is arbitrary).", "- quartiles interpolate linearly between order statistics.", ""]
    v = result["environment"]["versions"]
    lines += [f"Versions: torch {v.get('torch')}, python {v.get('python')}; git {result['environment']['git_sha']}.",
              ""]
    return "\n".join(lines)


def distribution_plot(models: Sequence[dict[str, Any]], path: str | Path, title: str = "") -> Path:
    """Fig. 2-style PNG: per group (column) and metric (row), the models' per-image distributions overlaid as step
    histograms on shared bins (log x for curvatures), with dashed medians; values <= 0 are counted in the legend."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = [("lambda_max", True), ("fd_curvature", True), ("cos_grad_top", False)]
    groups = list(dict.fromkeys(m["group"] for m in models))
    fig = Figure(figsize=(5.2 * len(groups), 2.9 * len(rows)), layout="constrained")
    FigureCanvasAgg(fig)
    for c, group in enumerate(groups):
        ms = [m for m in models if m["group"] == group]
        for r, (key, log) in enumerate(rows):
            ax = fig.add_subplot(len(rows), len(groups), r * len(groups) + c + 1)
            values = {m["label"]: [rec[key] for rec in m["records"]] for m in ms}
            pos = [v for vs in values.values() for v in vs if v > 0] if log else [v for vs in values.values()
                                                                                  for v in vs]
            if not pos:
                continue
            lo, hi = min(pos), max(pos)
            if log:
                lo, hi = math.log10(lo), math.log10(hi) + 1e-9
                bins = [10 ** (lo + (hi - lo) * i / 30) for i in range(31)]
                ax.set_xscale("log")
            else:
                bins = [lo + (hi - lo + 1e-12) * i / 30 for i in range(31)]
            for i, (label, vs) in enumerate(values.items()):
                shown = [v for v in vs if v > 0] if log else vs
                med = quantiles(vs)["median"]
                extra = f", {len(vs) - len(shown)} <= 0 not shown" if len(shown) < len(vs) else ""
                color = f"C{i}"
                ax.hist(shown, bins=bins, histtype="step", linewidth=1.6, color=color,
                        label=f"{label} (median {med:.3g}{extra})")
                ax.axvline(med, color=color, linestyle="--", linewidth=1)
            ax.set_xlabel(f"{key} ({METRICS[key][1]})")
            ax.set_ylabel("images")
            ax.set_title(f"{group + ': ' if group else ''}{METRICS[key][0]}", fontsize="medium")
            ax.legend(fontsize="x-small")
            ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    return atomic_write(path, lambda f: f.write(buf.getvalue()))



def combine(parts: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """One result from several curvature.json contents measured on the same images (the pipeline's stages): every
    model, the comparisons recomputed over all of them, the summed time; settings and dataset from the first."""
    models = [m for p in parts for m in p["models"]]
    seconds = sum(p["seconds"] for p in parts)
    return {**parts[0], "models": models, "comparisons": comparisons(models), "seconds": seconds}


def write_outputs(result: dict[str, Any], folder: Path) -> None:
    atomic_json(folder / "curvature.json", result)
    atomic_text(folder / "curvature.md", markdown_report(result))
    distribution_plot(result["models"], folder / "curvature.png", title=f"{result['dataset']['name']}: input-Hessian "
                      f"curvature at {result['dataset']['images']} real val images")
