"""Robustness report: the paper's table layout, drop rates, BEARD's robustness ratio and a bar chart.

Pure functions over plain dicts, so a pipeline can compare several methods from several evaluation.json files:

    rows = [row for e in evaluations for row in e["rows"]]     # or evaluation_rows(...) from evaluate results
    results_table(rows); metrics_table(rows); bar_chart(rows, "compare.png")

A row is one checkpoint at one eps: {"label": str, "eps": float, "clean": acc, "pgd100": acc, ...}, accuracies as
fractions in [0, 1] (tables print percent). CW is L2 and not eps-parametrized: its one result appears in every eps's
row.

Definitions (accuracy under attack counts an image only if it is classified correctly both clean and attacked):
- robust-accuracy drop rate of attack i: (clean - acc_i) / clean.
- BEARD robustness ratio (Zhou et al. 2024, "BEARD: Benchmarking the Adversarial Robustness for Dataset
  Distillation", arXiv 2411.09265; as computed by `calculate_rr(metrics_type="beard")` in the authors' code,
  github.com/zhouzhengqd/BEARD, Code/metrics/white_box/auto_metrics.py): with ASR_i = clean - acc_i over the row's
  attacks, RR = 100 * (1 - mean_i ASR_i / max_i ASR_i). It compares the average attack with the strongest one: 0
  when every attack hurts as much as the strongest, larger when most attacks fail where one succeeds; it does not
  see the level of robust accuracy. Undefined (null here; BEARD's code returns 0) when no attack lowers accuracy.
- I-RR, the "improved robustness ratio" of the same authors' ROME paper (`metrics_type="rome"`, same file):
  I-RR = 100 * (1 - mean_i ASR_i * max_i ASR_i / clean^2): 100 when no attack lowers accuracy, 0 when the attacks
  break every clean-correct image. Reported beside RR because it does track the level.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any, Sequence

from guard_fast.attacks.suite import ATTACKS
from guard_fast.runtime.io import atomic_write

# Report columns in the paper's order (docs/spec.md section 6): key in a row -> header.
COLUMNS: dict[str, str] = {"clean": "Clean", **{name: spec.column for name, spec in ATTACKS.items()}}


def fmt_eps(eps: float | None) -> str:
    """1/255-style label for an L-inf radius in [0,1] units ('L2' for eps-free attacks)."""
    if eps is None:
        return "L2"
    k = eps * 255
    return f"{round(k)}/255" if abs(k - round(k)) < 1e-6 else f"{eps:.4g}"


def default_labels(paths: list[str]) -> list[str]:
    """Shortest distinct path tails without the suffix: runs/guard/teacher.pt, runs/sre2l/teacher.pt -> guard/teacher,
    sre2l/teacher."""
    parts = [Path(p).with_suffix("").parts for p in paths]
    for k in range(1, max(len(p) for p in parts) + 1):
        tails = ["/".join(p[-k:]) for p in parts]
        if len(set(tails)) == len(tails):
            return tails
    return [str(p) for p in paths]


def drop_rate(clean: float, robust: float) -> float | None:
    """(clean - robust) / clean, the fraction of clean accuracy an attack removes; None when clean is 0."""
    return (clean - robust) / clean if clean > 0 else None


def robustness_ratio(clean: float, robust: Sequence[float]) -> float | None:
    """BEARD's RR in percent: 100 * (1 - mean(clean - acc_i) / max(clean - acc_i)); None if no attack lowers accuracy.

    >>> round(robustness_ratio(0.8, [0.2, 0.6, 0.4]), 2)  # ASR 0.6, 0.2, 0.4: 100 * (1 - 0.4 / 0.6)
    33.33
    """
    asr = [clean - a for a in robust]
    if not asr or max(asr) <= 0:
        return None
    return 100.0 * (1.0 - (sum(asr) / len(asr)) / max(asr))


def improved_robustness_ratio(clean: float, robust: Sequence[float]) -> float | None:
    """ROME's I-RR in percent: 100 * (1 - mean(clean - acc_i) * max(clean - acc_i) / clean^2); None when clean is 0."""
    asr = [clean - a for a in robust]
    if not asr or clean <= 0:
        return None
    return 100.0 * (1.0 - (sum(asr) / len(asr)) * max(asr) / clean**2)


def evaluation_rows(checkpoints: Sequence[dict[str, Any]], eps_list: Sequence[float]) -> list[dict[str, Any]]:
    """Table rows from evaluate results ({"label", "results": [{"attack", "eps", "accuracy"}, ...]}): one row per
    checkpoint and eps; eps-free attacks (CW) fill their column in every eps's row."""
    rows = []
    for eps in eps_list or [None]:
        for ck in checkpoints:
            row: dict[str, Any] = {"label": ck["label"], "eps": eps}
            for rec in ck["results"]:
                if rec["eps"] is None or rec["eps"] == eps:
                    row[rec["attack"]] = rec["accuracy"]
            rows.append(row)
    return rows


def row_metrics(row: dict[str, Any]) -> dict[str, Any]:
    """Drop rate per attack, BEARD's RR and ROME's I-RR over the row's attacks."""
    attacks = [k for k in COLUMNS if k != "clean" and k in row]
    clean, robust = row["clean"], [row[k] for k in attacks]
    return {"label": row["label"], "eps": row["eps"],
            "drop_rate": {k: drop_rate(clean, row[k]) for k in attacks},
            "robustness_ratio": robustness_ratio(clean, robust),
            "improved_robustness_ratio": improved_robustness_ratio(clean, robust)}


def _columns(rows: Sequence[dict[str, Any]]) -> list[str]:
    return [k for k in COLUMNS if any(k in r for r in rows)]


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.2f}"


def _md(header: Sequence[str], body: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in body])


def _label(row: dict[str, Any], with_eps: bool) -> str:
    return f"{row['label']} @ {fmt_eps(row['eps'])}" if with_eps else row["label"]


def results_table(rows: Sequence[dict[str, Any]]) -> str:
    """Markdown table in the paper's layout: rows = checkpoints, columns Clean, PGD100, Square, AutoAttack, CW, MIM
    (those present), accuracy in percent with 2 decimals. Rows of several eps get an '@ eps' suffix."""
    cols = _columns(rows)
    with_eps = len({r["eps"] for r in rows}) > 1
    body = [[_label(r, with_eps), *[_pct(r.get(k)) for k in cols]] for r in rows]
    return _md(["Checkpoint", *[COLUMNS[k] for k in cols]], body)


def metrics_table(rows: Sequence[dict[str, Any]]) -> str:
    """Markdown table of robust-accuracy drop rates (percent of clean accuracy lost), BEARD's RR and ROME's I-RR."""
    attacks = [k for k in _columns(rows) if k != "clean"]
    with_eps = len({r["eps"] for r in rows}) > 1
    body = []
    for r in rows:
        m = row_metrics(r)
        ratios = [m["robustness_ratio"], m["improved_robustness_ratio"]]
        body.append([_label(r, with_eps), *[_pct(m["drop_rate"].get(k)) for k in attacks],
                     *["-" if v is None else f"{v:.2f}" for v in ratios]])
    return _md(["Checkpoint", *[f"{COLUMNS[k]} drop" for k in attacks], "RR (BEARD)", "I-RR (ROME)"], body)


def bar_chart(rows: Sequence[dict[str, Any]], path: str | Path, title: str = "") -> Path:
    """Grouped bar chart (PNG): accuracy per column, one bar per checkpoint side by side, one panel per eps."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    eps_values = list(dict.fromkeys(r["eps"] for r in rows))
    labels = list(dict.fromkeys(r["label"] for r in rows))
    cols = _columns(rows)
    fig = Figure(figsize=(max(6.0, 1.3 * len(cols) * max(1, len(labels)) / 2), 3.2 * len(eps_values)),
                 layout="constrained")
    FigureCanvasAgg(fig)
    width = 0.8 / max(1, len(labels))
    for p, eps in enumerate(eps_values):
        ax = fig.add_subplot(len(eps_values), 1, p + 1)
        for i, label in enumerate(labels):
            row = next((r for r in rows if r["eps"] == eps and r["label"] == label), {})
            values = [100 * row[k] if k in row else 0.0 for k in cols]
            xs = [c + (i - (len(labels) - 1) / 2) * width for c in range(len(cols))]
            ax.bar(xs, values, width, label=label)
        ax.set_xticks(range(len(cols)), [COLUMNS[k] for k in cols])
        ax.set_ylabel("accuracy (%)")
        ax.set_ylim(0, 100)
        ax.set_title(f"{title + ', ' if title else ''}L-inf eps = {fmt_eps(eps)} (CW: L2)")
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize="small")
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    return atomic_write(path, lambda f: f.write(buf.getvalue()))


def markdown_report(evaluation: dict[str, Any]) -> str:
    """evaluation.md: one results table and one drop-rate/RR table per eps, settings, timing and definitions."""
    ds, model = evaluation["dataset"], evaluation["model"]
    lines = ["# Robustness evaluation", "",
             f"{ds['name']} val split: {ds['images']} of {ds['split_images']} images"
             + (f" (seeded subset, seed {ds['subset_seed']})" if ds["images"] < ds["split_images"] else "")
             + f", {ds['num_classes']} classes, {ds['image_size']} px; model {model['arch']} width {model['width']}; "
             f"{evaluation['world']} rank(s); {evaluation['seconds']:.1f} s.", ""]
    for eps in evaluation["eps"] or [None]:
        rows = [r for r in evaluation["rows"] if r["eps"] == eps]
        lines += [f"## L-inf eps = {fmt_eps(eps)}", "", "Accuracy (%):", "", results_table(rows), "",
                  "Robust-accuracy drop rate (% of clean accuracy), BEARD's robustness ratio and ROME's I-RR (%):",
                  "",
                  metrics_table(rows), ""]
    lines += ["## Attack settings", ""]
    for name, s in evaluation["attacks"].items():
        lines.append(f"- {COLUMNS[name]}: " + ", ".join(f"{k} {v}" for k, v in s.items()))
    lines += ["", *[f"- {n}" for n in evaluation["notes"]], "", "## Time", "",
              _md(["Checkpoint", "attack", "eps", "wall s", "rank-s per image"],
                  [[ck["label"], COLUMNS[r["attack"]], "-" if r["attack"] == "clean" else fmt_eps(r["eps"]),
                    f"{r['seconds']:.2f}", f"{r['seconds_per_image']:.4f}"]
                   for ck in evaluation["checkpoints"] for r in ck["results"]]), ""]
    lines += ["## Definitions", "", "- drop rate = (clean - robust) / clean; ASR_i = clean - robust_i over the "
              "attacks of the row.", "- RR (BEARD, arXiv 2411.09265) = 100 (1 - mean ASR / max ASR): the average "
              "attack against the strongest; undefined when no attack lowers accuracy.",
              "- I-RR (ROME, the same authors) = 100 (1 - mean ASR * max ASR / clean^2): 100 = no drop, 0 = every "
              "clean-correct image broken.", ""]
    v = evaluation["environment"]["versions"]
    lines += [f"Versions: torch {v.get('torch')}, torchattacks {v.get('torchattacks')}, python {v.get('python')}; "
              f"git {evaluation['environment']['git_sha']}.", ""]
    return "\n".join(lines)
