"""Sections of the study's report.md: verdicts, the plan as registered, stage gates, pilot, power analysis and the
hyperparameter selection (every number comes from guard_fast.study.analysis and the selection runs; nothing is
typed in)."""

from __future__ import annotations

from typing import Any

from guard_fast.robustness.report import COLUMNS, fmt_eps
from guard_fast.study import gates as G
from guard_fast.study import stats as S
from guard_fast.study.config import StudyConfig


def md_table(header: list[str], body: list[list[str]]) -> str:
    return "\n".join(["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
                      *["| " + " | ".join(r) + " |" for r in body]])


VERDICT_WORDS = {S.SUPPORTED: "**supported**", S.CONTRADICTED: "**contradicted**",
                 S.EQUIVALENT: "**equivalent** (no difference beyond +-MDD)", S.UNDERPOWERED: "**underpowered**"}


def _pts(x: float | None, sign: bool = True) -> str:
    return "-" if x is None else f"{100 * x:+.2f}" if sign else f"{100 * x:.2f}"


def verdict_lines(cfg: StudyConfig, primary: dict[str, Any]) -> list[str]:
    """The first section: the pre-registered verdicts, or why there are none yet."""
    p = cfg.plan
    lines = ["## Verdicts", ""]
    if cfg.pilot:
        return lines + [f"Pilot ({len(cfg.seeds)} seeds): no verdicts; the pilot picks the primary eps and estimates "
                        "the paired SD for the power analysis below.", ""]
    if not primary["registered"]:
        return lines + [f"No verdicts: the plan is not registered (missing: {', '.join(p.missing())}).", ""]
    lines += [f"Primary endpoint: students' {COLUMNS.get(p.attack, p.attack)} accuracy at L-inf eps {primary['eps']}, "
              f"{p.table} at IPC {p.ipc}, paired over seeds; two-sided paired t-tests, Holm over {len(p.pairs)} "
              f"comparison(s) at alpha {p.alpha}; equivalence by TOST within +-{100 * p.mdd:g} points (the MDD "
              f"target); clean accuracy by non-inferiority (margin {100 * p.clean_margin:g} points).", ""]
    rows = []
    for pair, v in primary["pairs"].items():
        ci = v["ci"]
        rows.append([pair, str(v["n"]), f"{_pts(v['mean'])} [{_pts(ci['lo'])}, {_pts(ci['hi'])}]", f"{v['p']:.3g}",
                     f"{v['p_holm']:.3g}", f"{100 * v['mdd']:.2f}", VERDICT_WORDS[v["verdict"]],
                     f"{_pts(v['clean']['lower'])} vs -{100 * p.clean_margin:g}: {v['clean']['verdict']}"])
    if rows:
        lines += [md_table(["comparison", "seeds", f"difference, points [{100 * (1 - p.alpha):g}% CI]", "p", "p (Holm)",
                       "MDD achieved", "verdict", "clean: lower bound vs margin"], rows), ""]
    lines += [f"- not analysed yet: {m}" for m in primary["missing"]]
    return lines + ([""] if primary["missing"] else [])


def primary_readme_lines(cfg: StudyConfig, primary: dict[str, Any]) -> list[str]:
    """The pre-registered verdicts in one line per pair, or why there are none yet (first in the README block)."""
    p = cfg.plan
    if cfg.pilot or not primary["registered"]:
        return []
    what = f"students' {COLUMNS.get(p.attack, p.attack)} accuracy at eps {primary['eps']}, IPC {p.ipc}"
    lines = [f"- **Primary (pre-registered): {pair}**, {what}, {v['n']} paired seeds: {100 * v['mean']:+.2f} points "
             f"[{100 * v['ci']['lo']:+.2f}, {100 * v['ci']['hi']:+.2f}] ({100 * (1 - p.alpha):g}% CI), Holm p "
             f"{v['p_holm']:.3g}, MDD {100 * v['mdd']:.2f}: **{v['verdict']}**; clean accuracy non-inferior "
             f"(margin {100 * p.clean_margin:g} points): {v['clean']['verdict']}"
             for pair, v in primary["pairs"].items()]
    lines += [f"- Primary (pre-registered): {m}; no verdict until all are in" for m in primary["missing"]]
    return lines + [""]


def plan_lines(cfg: StudyConfig, registration: dict[str, Any] | None) -> list[str]:
    p, reg = cfg.plan, registration or {}
    lines = ["## Pre-registered plan", "",
             f"- primary: {COLUMNS.get(p.attack, p.attack)} at eps {fmt_eps(p.eps) if p.eps else '(unset)'}, pairs "
             f"{', '.join(p.pairs) or '(unset)'} of {p.table} at IPC {p.ipc}; claimed sign {p.direction:+d}",
             f"- n = {p.seeds or '(unset)'} paired seeds; stopping rule: {p.stopping_rule or '(unset)'}",
             f"- alpha {p.alpha}, power {p.power}, MDD target {100 * p.mdd:g} points (also the TOST margin), clean "
             f"non-inferiority margin {100 * p.clean_margin:g} points; pilot: first {p.pilot_seeds} seeds",
             f"- plan hash (sha256 of the [plan] section): `{reg.get('sha256', '-')}`; registered when the main run "
             f"first started: `{reg.get('registered') or 'not yet'}`"]
    if reg.get("changed"):
        lines.append(f"- **the plan changed after the main run started**: registered {reg['registered_plan']}")
    return lines + [""]


def gate_lines(summary: list[dict[str, Any]], gates: list[dict[str, Any]]) -> list[str]:
    lines = ["## Stage gates", ""]
    if not summary:
        return lines + ["No gates declared ([gates] thresholds are 0).", ""]
    word = {True: "pass", False: "**FAIL**", None: "not measured yet"}
    lines += [md_table(["gate", "rule", "threshold", "stages measured", "worst measured", "result"],
                  [[g["gate"], g["rule"], f"{g['threshold']:.3f}", str(g["stages"]),
                    "-" if g["worst"] is None else f"{g['worst']:.3f}", word[g["ok"]]] for g in summary]), ""]
    line = G.failure_line(list(gates))
    return lines + ([f"Stopped: {line}", ""] if line else [])


def pilot_lines(cfg: StudyConfig, pilot: list[dict[str, Any]]) -> list[str]:
    p = cfg.plan
    lines = ["## Pilot", "", f"First {p.pilot_seeds} seeds, {COLUMNS.get(p.attack, p.attack)} at IPC {p.ipc}: the "
             "primary eps is one where the baseline's robust accuracy lies in 20-60%; the paired SD there gives the "
             f"n for an MDD of {100 * p.mdd:g} points at {100 * p.power:g}% power.", ""]
    if not pilot:
        return lines + ["No pilot cells finished yet.", ""]
    rows = [[r["pair"], r["eps"], str(len(r["seeds"])), _pts(r["baseline_mean"], False), _pts(r["diff_mean"]),
             "-" if r["sd"] is None else f"{100 * r['sd']:.2f}", str(r["n_needed"] or "-")] for r in pilot]
    header = ["pair", "eps", "seeds", "baseline %", "difference", "paired SD", "n for the MDD"]
    return lines + [md_table(header, rows), ""]


def power_lines(cfg: StudyConfig, power: list[dict[str, Any]]) -> list[str]:
    lines = ["## Power analysis", "", "Minimum detectable difference of the two-sided paired t-test at "
             f"{100 * cfg.plan.power:g}% power and alpha {cfg.plan.alpha} (noncentral t), at the observed paired SD "
             "and n of the main run.", ""]
    if not power:
        return lines + ["Not available (no registered primary comparison with >= 2 paired seeds).", ""]
    rows = [[r["pair"], str(r["n"]), f"{100 * r['sd']:.2f}", f"{100 * r['mdd']:.2f}", f"{100 * r['target']:g}",
             f"{100 * r['power_at_target']:.0f}%", str(r["n_needed"])] for r in power]
    return lines + [md_table(["pair", "n", "paired SD (points)", "MDD achieved", "MDD target", "power at target",
                         "n needed at this SD"], rows), ""]


def selection_lines(cfg: StudyConfig, selected: dict[str, Any]) -> list[str]:
    sel = cfg.selection
    split = (f"data/train, scored on data/holdout (the prepared carve of the training images"
             f"{f'; {sel.val_images} of its images, stratified, seed {sel.split_seed}' if sel.val_images else ''})"
             if sel.split == "holdout" else
             f"a seeded stratified split of data/train ({100 * sel.val_fraction:g}% held out per class, seed "
             f"{sel.split_seed})")
    seeds = ", ".join(map(str, sel.run_seeds()))
    if sel.score == "teacher":
        how = (f"each candidate trains its teacher only, seeds {seeds}, and is scored by the teacher's mean PGD "
               f"accuracy at {fmt_eps(sel.eps)} (the teacher stage's robust validation) among candidates whose mean "
               f"clean accuracy is within {100 * sel.clean_within:g} points of the reference teacher's "
               f"(`{sel.reference}`)")
    else:
        how = (f"each candidate trains the whole chain at IPC {sel.ipc}, seeds {seeds}, and is scored by "
               f"{COLUMNS.get(sel.attack, sel.attack)} accuracy at {fmt_eps(sel.eps)}")
    lines = ["## Hyperparameter selection (on the training images)", "",
             f"Training on {split}: {how}. The reported test split is never used.", ""]
    if not selected:
        return lines + ["No selection runs (or not finished yet).", ""]
    for knob, s in selected.items():
        ref = s.get("reference_clean")
        lines += [f"**{knob}** ({s['method']}), chosen: `{' '.join(s['best'])}`"
                  + (f"; reference teacher clean {100 * ref:.2f}%" if ref is not None else ""), "",
                  md_table(["candidate", "clean %", "score %", "eligible"],
                      [[f"`{' '.join(c['overrides'])}`", f"{100 * c['clean']:.2f}", f"{100 * c['score']:.2f}",
                        {True: "yes", False: "no"}.get(c.get("eligible"), "-")] for c in s["candidates"]]), ""]
    return lines
