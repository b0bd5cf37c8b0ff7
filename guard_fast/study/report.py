"""The study's report: per-cell mean ± std over seeds, paired GUARD-vs-baseline intervals, per-claim verdicts,
the selection runs, Table 4, grouped bar charts with error bars, results.json and the README block.

Everything here is computed from the per-seed rows the pipeline wrote (results.json keeps them), so a reader can
recompute every number; nothing is typed in.
"""

from __future__ import annotations

import io
import json
import os
import re
from pathlib import Path
from typing import Any

from guard_fast.attacks.suite import settings as attack_settings
from guard_fast.pipeline import section_lines
from guard_fast.robustness.report import COLUMNS, drop_rate, fmt_eps
from guard_fast.runtime.config import to_dict
from guard_fast.runtime.io import atomic_json, atomic_text, atomic_write
from guard_fast.study import analysis as A
from guard_fast.study import gates as G
from guard_fast.study import stats as S
from guard_fast.study.config import StudyConfig, parse_pair, parse_row
from guard_fast.study.figures import FIGURES, FigureContext
from guard_fast.study.plan import Plan
from guard_fast.study.report_sections import (
    gate_lines,
    md_table,
    pilot_lines,
    plan_lines,
    power_lines,
    primary_readme_lines,
    selection_lines,
    verdict_lines,
)

CLAIMS = {
    "robust": ("Robust accuracy higher", "GUARD's accuracy under attack is higher than the baseline's", +1),
    "drop": ("Drop rate lower", "GUARD loses a smaller fraction of its clean accuracy under attack", -1),
    "clean": ("Clean accuracy not lower", "GUARD does not give up clean accuracy", +1),
    "cost": ("GUARD cheaper than adversarial training", "GUARD's time per training iteration is lower", -1),
}
WORD = {S.SUPPORT: "support", S.CONTRADICT: "contradict", S.UNCLEAR: "cannot tell about"}
MARK = {S.SUPPORT: "✓", S.CONTRADICT: "✗", S.UNCLEAR: "?"}


def cell_stats(per_seed: dict[int, list[dict]]) -> dict[str, Any]:
    """{eps label: {column: {'values', 'seeds', 'mean', 'std', 'n'}, 'drop': {attack: {...}}}} over the seeds."""
    out: dict[str, Any] = {}
    seeds = sorted(per_seed)
    for seed in seeds:
        for row in per_seed[seed]:
            e = out.setdefault(fmt_eps(row["eps"]), {"drop": {}})
            for col in COLUMNS:
                if col in row:
                    e.setdefault(col, {"values": [], "seeds": []})
                    e[col]["values"].append(row[col])
                    e[col]["seeds"].append(seed)
                    if col != "clean":
                        d = drop_rate(row["clean"], row[col])
                        if d is not None:
                            e["drop"].setdefault(col, {"values": [], "seeds": []})
                            e["drop"][col]["values"].append(d)
                            e["drop"][col]["seeds"].append(seed)
    for e in out.values():
        for v in [*(v for k, v in e.items() if k != "drop"), *e["drop"].values()]:
            v.update(S.summarize(v["values"]))
    return out


def _aligned(a: dict, b: dict) -> tuple[list[float], list[float], list[int]]:
    seeds = sorted(set(a["seeds"]) & set(b["seeds"]))
    return ([a["values"][a["seeds"].index(s)] for s in seeds], [b["values"][b["seeds"].index(s)] for s in seeds],
            seeds)


def compare(treat: dict[str, Any], base: dict[str, Any], confidence: float) -> list[dict[str, Any]]:
    """Paired comparisons of two cells' stats: accuracy (clean once, every attack per eps) and drop rate."""
    out, clean_done = [], False
    for eps, te in treat.items():
        be = base.get(eps)
        if be is None:
            continue
        for col in COLUMNS:
            if col not in te or col not in be or (col == "clean" and clean_done):
                continue
            claim = "clean" if col == "clean" else "robust"
            clean_done |= col == "clean"
            t, b, seeds = _aligned(te[col], be[col])
            out.append({"claim": claim, "eps": None if col == "clean" else eps, "column": col, "seeds": seeds,
                        **S.paired(t, b, confidence)})
        for col in te["drop"]:
            if col in be["drop"]:
                t, b, seeds = _aligned(te["drop"][col], be["drop"][col])
                out.append({"claim": "drop", "eps": eps, "column": col, "seeds": seeds,
                            **S.paired(t, b, confidence)})
    for c in out:
        c["verdict"] = S.verdict(c["lo"], c["hi"], CLAIMS[c["claim"]][2])
    return out


def cost_comparisons(cfg: StudyConfig, cost: dict[str, Any] | None) -> list[dict[str, Any]]:
    """GUARD vs each adversarial-training row of the benchmark: per-repetition paired time difference (the
    repetitions are interleaved, so repetition r of both rows ran under the same machine load)."""
    if not cost:
        return []
    rows = {r["label"]: r for r in cost["rows"]}
    g = rows.get(cfg.cost.guard)
    out = []
    for name in cfg.cost.baselines:
        b = rows.get(name)
        if g is None or b is None or not g.get("samples_s") or not b.get("samples_s"):
            continue
        n = min(len(g["samples_s"]), len(b["samples_s"]))
        p = S.paired(g["samples_s"][:n], b["samples_s"][:n], cfg.confidence)
        mem = (g.get("memory_mib") or {}).get("peak_mib"), (b.get("memory_mib") or {}).get("peak_mib")
        out.append({"claim": "cost", "pair": f"{cfg.cost.guard} vs {name}", "column": "time/iter s", **p,
                    "verdict": S.verdict(p["lo"], p["hi"], -1), "guard_time_s": S.summarize(g["samples_s"]),
                    "baseline_time_s": S.summarize(b["samples_s"]), "guard_peak_mib": mem[0],
                    "baseline_peak_mib": mem[1]})
    return out


def _ms(s: dict[str, Any] | None, scale: float = 100.0) -> str:
    if not s or s.get("mean") is None:
        return "missing"
    std = "" if s["std"] is None else f" ± {scale * s['std']:.2f}"
    return f"{scale * s['mean']:.2f}{std}"


def _ci(c: dict[str, Any], scale: float = 100.0) -> str:
    if c["mean"] is None:
        return "-"
    ci = "" if c["lo"] is None else f" [{scale * c['lo']:+.2f}, {scale * c['hi']:+.2f}]"
    return f"{scale * c['mean']:+.2f}{ci} {MARK[c['verdict']]}"


def _eps_order(cells: list[dict[str, Any]]) -> list[str]:
    return list(dict.fromkeys(e for c in cells for e in c))


def bar_chart(table_cells: list[tuple[str, dict[str, Any]]], path: Path, title: str) -> Path:
    """Grouped bars (one per row) of mean accuracy per column with ±std error bars, one panel per eps."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    eps_list = _eps_order([c for _, c in table_cells])
    cols = [k for k in COLUMNS if any(k in c.get(e, {}) for _, c in table_cells for e in c)]
    fig = Figure(figsize=(max(6.0, 0.9 * len(cols) * max(1, len(table_cells)) / 2), 3.0 * len(eps_list)),
                 layout="constrained")
    FigureCanvasAgg(fig)
    width = 0.8 / max(1, len(table_cells))
    for p, eps in enumerate(eps_list):
        ax = fig.add_subplot(len(eps_list), 1, p + 1)
        for i, (label, c) in enumerate(table_cells):
            e = c.get(eps, {})
            means = [100 * e[k]["mean"] if k in e else 0.0 for k in cols]
            errs = [100 * (e[k]["std"] or 0.0) if k in e else 0.0 for k in cols]
            xs = [j + (i - (len(table_cells) - 1) / 2) * width for j in range(len(cols))]
            ax.bar(xs, means, width, yerr=errs, capsize=2, label=f"{label} (n={e.get('clean', {}).get('n', 0)})")
        ax.set_xticks(range(len(cols)), [COLUMNS[k] for k in cols])
        ax.set_ylabel("accuracy (%), mean ± std")
        ax.set_ylim(0, 100)
        ax.set_title(f"{title}, L-inf eps = {eps} (CW: L2)")
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize="small")
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return atomic_write(path, lambda f: f.write(buf.getvalue()))


def planned_columns(cfg: StudyConfig) -> list[str]:
    """Report columns of the configured attacks, in the paper's order (clean first)."""
    return [k for k in COLUMNS if k == "clean" or k in cfg.pipeline.evaluate.attack.names]


def planned_eps(cfg: StudyConfig) -> list[str]:
    return [fmt_eps(e) for e in cfg.pipeline.evaluate.attack.eps]


def image_size(cfg: StudyConfig) -> int:
    from guard_fast.data.presets import DATASETS

    spec = DATASETS.get(cfg.pipeline.data.dataset)
    return cfg.pipeline.data.image_size or (spec.image_size if spec else 224)


def claim_words(key: str, comps: list[dict[str, Any]], data: str) -> list[str]:
    """The claim's overall verdict in words, its counts, and one line per (table, pair)."""
    title, what, _ = CLAIMS[key]
    vs = [c["verdict"] for c in comps]
    if not comps:
        return [f"- **{title}** ({what}): not measured in this run.", ""]
    word = WORD[S.overall(vs)]
    lines = [f"- **{title}** ({what}): the {data} data **{word}** this claim. Of {len(vs)} comparisons, "
             f"{vs.count(S.SUPPORT)} support it, {vs.count(S.CONTRADICT)} contradict it, "
             f"{vs.count(S.UNCLEAR)} cannot tell."]
    if key == "clean":
        lines.append("  (An interval containing 0 is *consistent* with 'not lower' but is counted as cannot tell.)")
    groups: dict[str, list[str]] = {}
    for c in comps:
        groups.setdefault(c["pair"], []).append(c["verdict"])
    lines += [f"  - {p}: {g.count(S.SUPPORT)} support / {g.count(S.CONTRADICT)} contradict / "
              f"{g.count(S.UNCLEAR)} cannot tell" for p, g in groups.items()]
    return lines + [""]


def write_study_report(cfg: StudyConfig, plan: Plan, cells: dict[str, dict[int, list[dict]]],
                       selected: dict[str, Any], cost: dict[str, Any] | None, gates: list[dict[str, Any]] = (),
                       registration: dict[str, Any] | None = None) -> dict[str, Any]:
    """report.md (verdicts and the headline figure first; then settings, plan, gates, pilot, power analysis, the
    secondary tables), results.json, one chart per (table, IPC), and the README block; returns the results dict."""
    out = Path(cfg.results_dir)
    out.mkdir(parents=True, exist_ok=True)
    stats = {cid: cell_stats(per_seed) for cid, per_seed in cells.items()}
    missing = list(plan.pending)
    tables, comparisons, charts = {}, [], []
    body: list[str] = []
    for tname, t in cfg.tables().items():
        if not t.rows:
            continue
        labels = [parse_row(r).label for r in t.rows]
        body += [f"## {t.title or tname}", ""]
        tables[tname] = {"title": t.title, "ipc": t.ipc, "rows": {}}
        for ipc in t.ipc:
            table_cells = []
            for label in labels:
                cid = plan.cells.get((tname, label, ipc))
                st = stats.get(cid, {}) if cid else {}
                n = len(cells.get(cid, {})) if cid else 0
                if n < len(cfg.seeds):
                    missing.append(f"{tname}: {label} IPC {ipc} ({n} of {len(cfg.seeds)} seeds)")
                tables[tname]["rows"][f"{label} IPC {ipc}"] = {"cell": cid, "stats": st}
                table_cells.append((label, st))
            eps_list, cols = planned_eps(cfg), planned_columns(cfg)
            for eps in eps_list:
                body += [f"### IPC {ipc}, eps = {eps}", "", "Accuracy (%), mean ± std over seeds:", "",
                         md_table(["Row", "seeds", *[COLUMNS[k] for k in cols]],
                             [[lb, str(c.get(eps, {}).get("clean", {}).get("n", 0)),
                               *[_ms(c.get(eps, {}).get(k)) for k in cols]] for lb, c in table_cells]), "",
                         "Drop rate (% of clean accuracy lost), mean ± std:", "",
                         md_table(["Row", *[COLUMNS[k] for k in cols if k != "clean"]],
                             [[lb, *[_ms(c.get(eps, {}).get("drop", {}).get(k)) for k in cols if k != "clean"]]
                              for lb, c in table_cells]), ""]
            if any(c for _, c in table_cells):
                name = f"{tname}-ipc{ipc}.png"
                bar_chart(table_cells, out / name, f"{t.title or tname}, IPC {ipc}")
                charts.append(name)
                body += [f"![{tname} IPC {ipc}]({name})", ""]
            for pair in t.pairs:
                a, b = parse_pair(pair)
                ca, cb = dict(table_cells)[a], dict(table_cells)[b]
                comps = compare(ca, cb, cfg.confidence) if ca and cb else []
                for c in comps:
                    c.update(table=tname, pair=f"{pair} ({tname})", ipc=ipc)
                comparisons += comps
                body += [f"**{pair}, IPC {ipc}**: paired difference {a} − {b} per seed, mean "
                         f"[{100 * cfg.confidence:g}% t-interval], points (✓ supports / ✗ contradicts / "
                         f"? cannot tell the paper's claim):", ""]
                if not comps:
                    body += ["(missing: a cell of this pair has no finished seed)", ""]
                    continue
                clean = next((c for c in comps if c["claim"] == "clean"), None)
                if clean:
                    body += [f"- clean accuracy: {_ci(clean)}", ""]
                rob_cols = [k for k in cols if k != "clean"]
                rows = []
                for eps in eps_list:
                    acc = {c["column"]: c for c in comps if c["claim"] == "robust" and c["eps"] == eps}
                    drp = {c["column"]: c for c in comps if c["claim"] == "drop" and c["eps"] == eps}
                    rows.append([f"accuracy @ {eps}", *[_ci(acc[k]) if k in acc else "-" for k in rob_cols]])
                    rows.append([f"drop rate @ {eps}", *[_ci(drp[k]) if k in drp else "-" for k in rob_cols]])
                body += [md_table(["", *[COLUMNS[k] for k in rob_cols]], rows), ""]
    costs = cost_comparisons(cfg, cost)
    comparisons += costs
    primary = A.primary_analysis(cfg, plan, stats)
    pilot = A.pilot_analysis(cfg, plan, stats)
    power = A.power_rows(cfg, primary)
    gate_summary = G.summary(list(gates), cfg.gates)
    headline = A.headline_figure(cfg, plan, stats, out / "headline.png")
    results = {"config": to_dict(cfg), "seeds": cfg.seeds, "selection": selected, "cells": cells,
               "results_dir": cfg.results_dir, "plan": {**(registration or {}), "pilot": cfg.pilot},
               "primary": primary, "pilot": pilot,
               "power": power, "gates": list(gates), "gate_summary": gate_summary,
               "cell_stats": stats, "tables": tables, "comparisons": comparisons, "cost": cost, "missing": missing,
               "charts": charts, "verdicts": {k: S.overall([c["verdict"] for c in comparisons if c["claim"] == k])
                                              for k in CLAIMS}}
    figures = []
    for name in cfg.figures:
        figures += FIGURES[name](FigureContext(cfg, out, cells, plan.cells))
    lines = [f"# Study: {Path(cfg.results_dir).name}", ""]
    if cfg.quick:
        lines += ["**Quick smoke configuration (`--quick`), not the study**: tiny networks and budgets that check the "
                  "harness end to end; its numbers say nothing about GUARD.", ""]
    lines += verdict_lines(cfg, primary)
    if headline:
        lines += [f"![headline: {cfg.plan.attack} accuracy vs eps, 95% CI bands, and the paired difference]"
                  f"({headline.name})", ""]
    lines += header_lines(cfg, missing) + plan_lines(cfg, registration) + gate_lines(gate_summary, gates)
    lines += pilot_lines(cfg, pilot) + power_lines(cfg, power)
    lines += ["## Secondary comparisons: the paper's claims", "",
                                          "Verdict per comparison: the paired t-interval over seeds excludes 0 in the "
                                          "claimed direction (supports), in the opposite direction (contradicts), or "
                                          "contains 0 (cannot tell). Per claim: supports when at least half of its "
                                          "comparisons support it and none contradicts it (contradicts: the mirror "
                                          "case); otherwise cannot tell. No correction for the many comparisons: "
                                          "expect about 5% false verdicts at 95%.", ""]
    for key in CLAIMS:
        lines += claim_words(key, [c for c in comparisons if c["claim"] == key], cfg.pipeline.data.dataset)
    lines += body + cost_lines(cfg, costs, cost) + selection_lines(cfg, selected)
    lines += [f"![{cap}]({p})\n" for cap, p in figures]
    atomic_json(out / "results.json", results)
    atomic_text(out / "report.md", "\n".join(lines) + "\n")
    write_readme_block(cfg, results)
    return results


def stage_time(cfg: StudyConfig) -> tuple[float, int]:
    """Seconds and count of the stages this report covers: every stage under runs_dir except those of seeds it does
    not list (a pilot's report counts its own seeds and the selection, not the main run's other seeds)."""
    root, seeds = Path(cfg.runs_dir), {f"seed{s}" for s in cfg.seeds}
    tops = {p: p.relative_to(root).parts[0] for p in root.rglob("stage.json")}
    times = [json.loads(p.read_text()).get("seconds", 0.0) for p, top in tops.items()
             if not top.startswith("seed") or top in seeds]
    return sum(times), len(times)


def header_lines(cfg: StudyConfig, missing: list[str]) -> list[str]:
    pc, size = cfg.pipeline, image_size(cfg)
    ev = pc.evaluate
    eps = ", ".join(fmt_eps(e) for e in ev.attack.eps)
    spent, stages = stage_time(cfg)
    lines = [
        f"Regenerated by `guard-fast study --config <preset>{' --quick' if cfg.quick else ''}`; every number below is "
        "computed from the per-seed results in [results.json](results.json).", "",
        "## Settings", "",
        f"- data: {pc.data.dataset} at {size} px, students evaluated on "
        + ("the **whole** val split" if ev.num_images == 0 else f"a seeded {ev.num_images}-image subset")
        + f"; seeds {cfg.seeds} (each seed reseeds every stage: teacher, synthesis, labels, student, attacks)",
        *section_lines(pc, [parse_row(r).method for t in cfg.tables().values() for r in t.rows]),
        "- rows with @knob use the values chosen in 'Hyperparameter selection' below in place of the base values "
        "above",
        f"- attacks: {', '.join(COLUMNS[n] for n in ev.attack.names)} at L-inf eps {eps} (CW: L2); "
        + "; ".join(f"{COLUMNS[n]} " + ", ".join(f"{k} {v}" for k, v in s.items() if k != "norm")
                    for n, s in attack_settings(ev.attack, 10).items()),
        f"- scale of eps: an L-inf perturbation of eps at 224 px carries as much L2 energy as eps x {224 / size:.3g} "
        f"at {size} px (sqrt of the pixel-count ratio), so the paper's eps = 1/255 at 224 px is about "
        f"{224 / size:.3g}/255 here: the paper's regime is the upper end of our eps range.",
        f"- compute spent: {spent / 3600:.2f} h of stage time ({stages} stages of these seeds under the cache "
        "folder, selection included; the sum of each stage's wall time when it ran, including any run that shared "
        "the machine).",
        "",
    ]
    if missing:
        lines += ["## Missing cells", "", *[f"- {m}" for m in missing], ""]
    return lines


def cost_lines(cfg: StudyConfig, costs: list[dict[str, Any]], cost: dict[str, Any] | None) -> list[str]:
    if cost is None:
        return ["## Table 4: cost", "", "Not run (set cost.config to a bench preset).", ""]
    body = []
    for c in costs:
        g, b = c["guard_time_s"], c["baseline_time_s"]
        mem = ("-" if not (c["guard_peak_mib"] and c["baseline_peak_mib"])
               else f"{c['guard_peak_mib']:.1f} / {c['baseline_peak_mib']:.1f}")
        body.append([c["pair"], f"{1e3 * g['mean']:.1f} ± {1e3 * (g['std'] or 0):.1f}",
                     f"{1e3 * b['mean']:.1f} ± {1e3 * (b['std'] or 0):.1f}", _ci(c, 1e3), mem])
    labels = [r["label"] for r in cost["rows"]]
    absent = [x for x in (cfg.cost.guard, *cfg.cost.baselines) if x not in labels]
    note = ([f"**cost.guard / cost.baselines name rows the benchmark did not write: {', '.join(absent)}** (its rows: "
             f"{', '.join(labels)}).", ""] if absent else [])
    return ["## Table 4: time per iteration and peak memory, side by side", "", *note,
            "Measured by bench/step.py in one process, repetitions interleaved; the interval is over repetitions "
            "(paired by repetition), not seeds. Memory is one measurement per row.", "",
            md_table(["GUARD vs baseline", "GUARD ms/iter", "baseline ms/iter", "difference ms [CI]",
                 "peak MiB (GUARD / baseline)"], body), ""]


def write_readme_block(cfg: StudyConfig, results: dict[str, Any]) -> None:
    """Rewrite the README block '<!-- NAME:begin -->'...'<!-- NAME:end -->' (NAME = results_dir's folder name) with
    the primary verdicts, Table 1/2 at report_eps, the claim verdicts and links (while registered seeds are missing:
    only the seeds in so far); skipped when the markers are absent."""
    if not cfg.readme or not Path(cfg.readme).is_file():
        return
    readme = Path(cfg.readme)
    name = Path(cfg.results_dir).name
    text = readme.read_text()
    pattern = re.compile(rf"(<!-- {re.escape(name)}:begin -->\n).*?(<!-- {re.escape(name)}:end -->)", re.S)
    if not pattern.search(text):
        print(f"{readme}: no '<!-- {name}:begin -->' block; README not updated")
        return
    rel = Path(os.path.relpath(Path(cfg.results_dir).resolve(), readme.resolve().parent)).as_posix()
    main = next((t for t in results["tables"].values() if t["rows"]), None)
    want = fmt_eps(cfg.report_eps)
    if results["primary"]["missing"] and results["primary"]["registered"] and not cfg.pilot:
        seeds_in = ", ".join(f"{label} {r['stats'].get(want, {}).get('clean', {}).get('n', 0)}/{len(cfg.seeds)}"
                             for label, r in (main["rows"].items() if main else []))
        lines = [*primary_readme_lines(cfg, results["primary"]), f"Seeds in so far: {seeds_in}. The rows, the paired "
                 "differences and every claim's verdict are withheld here until all registered seeds are in (the "
                 "stopping rule: no interim look at the primary difference).", "",
                 f"Report so far: [{rel}/report.md]({rel}/report.md)."]
    else:
        lines = full_readme_lines(cfg, results, main, want, rel)
    block = "\n".join(lines) + "\n"
    atomic_text(readme, pattern.sub(lambda m: m.group(1) + block + m.group(2), text))


def full_readme_lines(cfg: StudyConfig, results: dict[str, Any], main: dict[str, Any] | None, want: str,
                      rel: str) -> list[str]:
    """The README block once every registered seed is in: verdicts, the main table at report_eps, claims, link."""
    data, n_eval = cfg.pipeline.data.dataset, cfg.pipeline.evaluate.num_images
    lines = [*primary_readme_lines(cfg, results["primary"]), ("Quick smoke configuration (not the study): " if
             cfg.quick else "") + f"accuracy (%) at L-inf eps = {want}, mean ± std over seeds {cfg.seeds}, "
             + (f"a seeded {n_eval}-image subset of the val split." if n_eval else "the whole val split."), ""]
    if main:
        cols = planned_columns(cfg)
        rows = [[label, *[_ms(r["stats"].get(want, {}).get(k)) for k in cols]] for label, r in main["rows"].items()]
        lines += [f"{main['title']}:", "", md_table(["Row", *[COLUMNS[k] for k in cols]], rows), ""]
    lines += [f"- {CLAIMS[k][0]} (secondary): the {data} data **{WORD[v]}** it" + (" (not measured yet)" if not any(
        c["claim"] == k for c in results["comparisons"]) else "") for k, v in results["verdicts"].items()]
    if results["missing"]:
        lines.append(f"- missing cells: {len(results['missing'])} (listed in the report)")
    lines += ["", f"Full report (every table, eps, paired intervals, selection, Table 4, charts): [{rel}/report.md]"
              f"({rel}/report.md)."]
    return lines
