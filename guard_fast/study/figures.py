"""Figures beyond the tables, drawn from a finished study; `curvature` is the paper's Fig. 2.

`FIGURES[name](context) -> list of (caption, PNG path relative to results_dir)`, where `context` is a FigureContext
(the config, the results folder, the finished cells and which table cell each is). `figures = ["curvature"]` in the
study config draws it into report.md; unknown names are refused at config time.

Fig. 2 here: the input-Hessian lambda_max distributions of the Table 1/2 students at the table's smallest IPC and of
their squeeze teachers, read from the pipeline's curvature stages (`pipeline.curvature.enabled`). The curvature
subset is seeded by `curvature.subset_seed`, not by the cell's seed, so every seed measures the same val images: the
figure pools the images of all seeds, and the table gives each model's per-seed median (mean ± std over seeds) and,
for GUARD against each other student, the paired per-seed difference of medians with its t-interval (the paper's
claim: GUARD's student is flatter, i.e. the difference is negative).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from guard_fast.robustness.curvature_report import distribution_plot, quantiles
from guard_fast.runtime.io import atomic_json, atomic_text
from guard_fast.study import stats as S


@dataclass
class FigureContext:
    config: Any
    """the StudyConfig"""
    results_dir: Path
    """where the figure's PNG goes (return its path relative to this folder)"""
    cells: dict[str, dict[int, list[dict]]]
    """cell id '<settings>/<label> IPC k' -> seed -> rows; the pipeline folder of (seed, settings) is
    runs_dir/seed<s>/<settings>, holding the method's stages (teachers/<objective>, <method>/ipc<k>/train, ...)"""
    table_cells: dict[tuple[str, str, int], str] = field(default_factory=dict)
    """(table, row label, ipc) -> cell id, the study plan's mapping"""


def _curvature_models(folder: Path) -> list[dict[str, Any]]:
    """The models of every finished curvature stage under a pipeline folder (students and teachers)."""
    out = []
    teachers = sorted(folder.glob("curvature/teacher-*/curvature.json"))
    for path in teachers + sorted(folder.glob("*/ipc*/curvature/curvature.json")):
        if (path.parent / "stage.json").is_file():
            out += json.loads(path.read_text())["models"]
    return out


def curvature_figure(ctx: FigureContext) -> list[tuple[str, Path]]:
    cfg = ctx.config
    t12 = cfg.table12
    if not t12.rows or not t12.ipc:
        return []
    ipc = min(t12.ipc)
    wanted = {cid: label for (table, label, k), cid in ctx.table_cells.items() if table == "table12" and k == ipc}
    slugs = {cid.split("/", 1)[0] for cid in wanted if cid in ctx.cells}
    students = {f"{label} IPC {ipc}" for cid, label in wanted.items() if cid in ctx.cells}
    per_seed: dict[tuple[str, str], dict[int, list[dict]]] = {}  # (group, label) -> seed -> records
    for seed in cfg.seeds:
        for slug in sorted(slugs):
            for m in _curvature_models(Path(cfg.runs_dir) / f"seed{seed}" / slug):
                if m["group"] == "students" and m["label"] not in students:
                    continue
                per_seed.setdefault((m["group"], m["label"]), {})[seed] = m["records"]
    if not per_seed:
        return []
    models = [{"label": f"{label} ({len(seeds)} seeds)", "group": group,
               "records": [r for recs in seeds.values() for r in recs]}
              for (group, label), seeds in sorted(per_seed.items(), key=lambda kv: (kv[0][0] != "students", kv[0]))]
    out = ctx.results_dir
    png = distribution_plot(models, out / "curvature.png", title=f"Fig. 2 on the digits: input-Hessian curvature, "
                            f"Table 1/2 students at IPC {ipc} and their teachers, all seeds pooled")
    summary = curvature_summary(per_seed, cfg.confidence)
    atomic_json(out / "curvature.json", summary)
    atomic_text(out / "curvature.md", curvature_markdown(summary))
    return [("Fig. 2: lambda_max per val image (table: curvature.md)", png.relative_to(out))]


def curvature_summary(per_seed: dict[tuple[str, str], dict[int, list[dict]]], confidence: float) -> dict[str, Any]:
    """Per model: pooled quartiles of lambda_max and its per-seed medians; per student vs GUARD: paired difference."""
    models = []
    for (group, label), seeds in per_seed.items():
        medians = {s: quantiles([r["lambda_max"] for r in recs])["median"] for s, recs in seeds.items()}
        pooled = quantiles([r["lambda_max"] for recs in seeds.values() for r in recs])
        models.append({"group": group, "label": label, "pooled": pooled, "seed_medians": medians,
                       "over_seeds": S.summarize(list(medians.values()))})
    guard = next((m for m in models if m["group"] == "students" and m["label"].startswith("GUARD ")), None)
    pairs = []
    for m in models:
        if guard is None or m is guard or m["group"] != "students":
            continue
        common = sorted(set(guard["seed_medians"]) & set(m["seed_medians"]))
        p = S.paired([guard["seed_medians"][s] for s in common], [m["seed_medians"][s] for s in common], confidence)
        pairs.append({"a": guard["label"], "b": m["label"], "seeds": common, **p,
                      "verdict": S.verdict(p["lo"], p["hi"], -1)})
    return {"metric": "lambda_max", "models": models, "pairs": pairs, "confidence": confidence}


def curvature_markdown(summary: dict[str, Any]) -> str:
    lines = ["# Fig. 2 on the digits: input-Hessian lambda_max at real val images", "",
             "Per model: the median [Q1, Q3] over every measured image of every seed (pooled), and the mean ± std "
             "over seeds of the per-seed median.", "", "| group | model | images | pooled median [Q1, Q3] | "
             "per-seed median, mean ± std (seeds) |", "|---|---|---|---|---|"]
    for m in summary["models"]:
        p, o = m["pooled"], m["over_seeds"]
        sd = f" ± {o['std']:.3g}" if o["std"] is not None else ""
        lines.append(f"| {m['group']} | {m['label']} | {p['n']} | {p['median']:.3g} [{p['q1']:.3g}, {p['q3']:.3g}] |"
                     f" {o['mean']:.3g}{sd} ({o['n']}) |")
    if summary["pairs"]:
        lines += ["", f"GUARD's student against each other student: per-seed difference of medians (GUARD - other; "
                  f"the paper's claim is negative, GUARD flatter), mean and {summary['confidence']:.0%} t-interval.",
                  "", "| pair | seeds | difference | interval | verdict |", "|---|---|---|---|---|"]
        for p in summary["pairs"]:
            ci = f"[{p['lo']:.3g}, {p['hi']:.3g}]" if p["lo"] is not None else "-"
            lines.append(f"| {p['a']} vs {p['b']} | {len(p['seeds'])} | {p['mean']:.3g} | {ci} | {p['verdict']} |")
    return "\n".join(lines) + "\n"


FIGURES: dict[str, Callable[[FigureContext], list[tuple[str, Path]]]] = {"curvature": curvature_figure}
