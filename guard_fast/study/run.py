"""Run the study: selection split and runs, then every table cell for every seed, then the cost table; cached.

Layout under `runs_dir`:
- `data/selection/{train,val}`: the selection split, a seeded stratified split of `pipeline.data.path/train`;
- `selection/<knob>/<candidate>/`: one pipeline run per hyperparameter candidate, trained and scored on that split;
- `seed<s>/<settings>/`: one pipeline folder per seed and row settings (`base` for rows without overrides), shared by
  every table's rows with those settings, so GUARD's teacher is trained once per seed for Tables 1/2 and 5;
- `cost/`: the Table 4 benchmark; `cells.json`: the selection's outcome (read by --report_only).
The report reads every finished evaluate stage of the plan from these folders, so it can be rewritten at any time.

Every pipeline call goes through `run_pipeline` and its `StageRunner`, so a rerun skips finished stages and a killed
run resumes inside the interrupted stage. Only rank 0 writes the selection ledger and the report.
"""

from __future__ import annotations

import copy
import hashlib
import json
import shutil
from pathlib import Path
from typing import Any, Callable

import numpy as np

from guard_fast.data.digits import prepare_digits, stratified_split
from guard_fast.methods import resolve
from guard_fast.pipeline import PipelineConfig, key_dict, run_pipeline
from guard_fast.robustness.report import evaluation_rows
from guard_fast.runtime import distributed as D
from guard_fast.runtime.config import apply_overrides, from_dict
from guard_fast.runtime.distributed import DistInfo
from guard_fast.runtime.errors import ConfigError
from guard_fast.runtime.io import atomic_json
from guard_fast.runtime.stagecache import STAGE_FILE, StageRunner
from guard_fast.study.config import KNOBS, StudyConfig, candidates
from guard_fast.study.plan import Plan, plan_study, settings_slug
from guard_fast.study.report import write_study_report

LEDGER = "cells.json"


def pipeline_config(cfg: StudyConfig, overrides: tuple[str, ...] | list[str], out: Path, seed: int,
                    methods: list[str], ipc: list[int]) -> PipelineConfig:
    """The base pipeline config with a row's overrides, writing to `out`, every stage seeded with `seed`."""
    pc = copy.deepcopy(cfg.pipeline)
    apply_overrides(pc, list(overrides))
    pc.methods, pc.ipc, pc.dist.seed = list(methods), list(ipc), seed
    pc.output.dir = str(out)
    pc.validate()
    return pc


def fingerprint(pc: PipelineConfig) -> str:
    """What a pipeline call's numbers depend on besides methods/ipc/folder (a folder's results count only if it
    matches the current config)."""
    d = key_dict(pc)
    for k in ("methods", "ipc", "force"):
        d.pop(k, None)
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]


def prepare_selection_data(cfg: StudyConfig, info: DistInfo) -> Path:
    """runs_dir/data/selection/{train,val}: a seeded stratified split of the real TRAINING images (the reported val
    split is never read by selection). Idempotent: kept when its manifest matches."""
    src = Path(cfg.pipeline.data.path)
    out = Path(cfg.runs_dir) / "data" / "selection"
    if info.is_main:
        if cfg.pipeline.data.dataset == "digits" and not (src / "train").is_dir():
            prepare_digits(src)
        files = sorted(p.relative_to(src / "train") for p in (src / "train").rglob("*") if p.is_file())
        want = {"source": str(src / "train"), "val_fraction": cfg.selection.val_fraction,
                "seed": cfg.selection.split_seed, "files": len(files)}
        manifest = out / "manifest.json"
        if not (manifest.is_file() and json.loads(manifest.read_text()).get("want") == want):
            shutil.rmtree(out, ignore_errors=True)
            labels = np.array([str(f.parent) for f in files])
            train, val = stratified_split(labels, cfg.selection.val_fraction, cfg.selection.split_seed)
            for split, ids in (("train", train), ("val", val)):
                for i in ids:
                    dst = out / split / files[i]
                    dst.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(src / "train" / files[i], dst)
            atomic_json(manifest, {"want": want, "train": len(train), "val": len(val)})  # last: folder complete
    D.barrier()
    return out


def read_ledger(cfg: StudyConfig) -> dict[str, Any]:
    try:
        return json.loads((Path(cfg.runs_dir) / LEDGER).read_text())
    except (OSError, json.JSONDecodeError):
        return {"selection": {}}


def run_selection(cfg: StudyConfig, info: DistInfo, data: Path, ledger: dict[str, Any]) -> dict[str, Any]:
    """Train and score every candidate of every knob on the selection split; the best score wins (ties: the higher
    clean accuracy, then the first in grid order). Returns {knob: {'best': overrides, 'method', 'candidates':
    [{'overrides', 'score', ...}]}}."""
    sel = cfg.selection
    for knob, method in KNOBS.items():
        grid = candidates(sel, knob)
        if not grid:
            continue
        scored = []
        for cand in grid:
            out = Path(cfg.runs_dir) / "selection" / knob / settings_slug(cand)
            pc = pipeline_config(cfg, cand, out, sel.seed, [method], [sel.ipc])
            pc.data.path = str(data)
            pc.evaluate.num_images = 0
            pc.evaluate.attack.names, pc.evaluate.attack.eps = [sel.attack], [sel.eps]
            summary = run_pipeline(pc, info)
            if info.is_main:
                row = next(r for r in summary["rows"] if r["eps"] == sel.eps)
                scored.append({"overrides": list(cand), "score": row[sel.attack], "clean": row["clean"],
                               "folder": str(out.relative_to(cfg.runs_dir))})
        if info.is_main:
            best = max(scored, key=lambda s: (s["score"], s["clean"]))  # max() keeps the first of equal pairs
            ledger["selection"][knob] = {"method": method, "attack": sel.attack, "eps": sel.eps, "ipc": sel.ipc,
                                         "best": best["overrides"], "candidates": scored}
            atomic_json(Path(cfg.runs_dir) / LEDGER, ledger)
    return D.broadcast_object(ledger["selection"])


def run_cells(cfg: StudyConfig, info: DistInfo, plan: Plan, after_call: Callable[[], None]) -> None:
    """Every call of the plan for every seed (call-major, so finished cells have all their seeds); after each call,
    `after_call` rewrites the report from what is on disk."""
    for call in plan.calls:
        for seed in cfg.seeds:
            out = Path(cfg.runs_dir) / f"seed{seed}" / call.slug
            run_pipeline(pipeline_config(cfg, call.settings, out, seed, call.methods, call.ipc), info)
        if info.is_main:
            after_call()
        D.barrier()


def cell_results(cfg: StudyConfig, plan: Plan) -> dict[str, dict[int, list[dict]]]:
    """cell id -> seed -> that seed's table rows (one per eps), read from the finished evaluate stages on disk
    (`<root>/<method slug>/ipc<k>/evaluate`, complete once its stage.json exists). A pipeline folder counts only if
    the config it last ran with (`config.json`) has the current fingerprint, so stale results of another config do
    not. Reading the stages rather than a shared file keeps this right when several study processes run different
    seeds at once."""
    out: dict[str, dict[int, list[dict]]] = {}
    for call in plan.calls:
        for seed in cfg.seeds:
            root = Path(cfg.runs_dir) / f"seed{seed}" / call.slug
            pc = pipeline_config(cfg, call.settings, root, seed, call.methods, call.ipc)
            try:
                have = from_dict(PipelineConfig, json.loads((root / "config.json").read_text()))
            except (OSError, json.JSONDecodeError, ConfigError):
                continue
            if fingerprint(have) != fingerprint(pc):
                continue
            for method in call.methods:
                _, spec, _ = resolve(method)
                for ipc in call.ipc:
                    folder = root / spec.slug / f"ipc{ipc}" / "evaluate"
                    if not (folder / STAGE_FILE).is_file():
                        continue
                    ev = json.loads((folder / "evaluation.json").read_text())
                    for r in evaluation_rows(ev["checkpoints"], ev["eps"]):
                        out.setdefault(f"{call.slug}/{r['label']}", {}).setdefault(seed, []).append(r)
    return out


def run_cost(cfg: StudyConfig, info: DistInfo, cost_fn: Callable[[Any, Path], dict[str, Any]] | None
             ) -> dict[str, Any] | None:
    """Table 4 as a cached stage: cost_fn(cost config, folder) runs bench/step.py and returns its results."""
    if not cfg.cost.config or cost_fn is None:
        return None
    folder = Path(cfg.runs_dir) / "cost"
    key = {"preset": Path(cfg.cost.config).read_text(), "overrides": cfg.cost.overrides}
    runner = StageRunner(1, set(), info.is_main, log=print if info.is_main else (lambda *_: None))

    def fn(folder: Path, resume: bool) -> dict[str, str]:
        results = cost_fn(cfg.cost, folder)
        if info.is_main:
            atomic_json(folder / "cost.json", results)
        return {"cost": "cost.json"}

    rec = runner.run("cost", folder, key, [], fn)
    return json.loads(rec.path("cost").read_text())


def run_study(cfg: StudyConfig, info: DistInfo, cost_fn: Callable[[Any, Path], dict[str, Any]] | None = None
              ) -> dict[str, Any]:
    """Selection, every cell for every seed, Table 4, then report.md/results.json/charts (and the README block).
    With report_only, nothing runs: the report covers the finished stages and lists what is missing."""
    ledger = read_ledger(cfg)
    if not cfg.report_only:
        data = prepare_selection_data(cfg, info)
        selected = run_selection(cfg, info, data, ledger)
    else:
        selected = ledger["selection"]
    selected = {k: v for k, v in selected.items() if v["best"] in [list(c) for c in candidates(cfg.selection, k)]}
    plan = plan_study(cfg, selected)
    cost_path = Path(cfg.runs_dir) / "cost" / "cost.json"

    def report(cost: dict[str, Any] | None = None) -> dict[str, Any]:
        if cost is None and cost_path.is_file() and (Path(cfg.runs_dir) / "cost" / "stage.json").is_file():
            cost = json.loads(cost_path.read_text())
        return write_study_report(cfg, plan, cell_results(cfg, plan), selected, cost)

    if cfg.report_only:
        return report() if info.is_main else {}
    run_cells(cfg, info, plan, report)
    cost = run_cost(cfg, info, cost_fn)
    summary = report(cost) if info.is_main else {}
    D.barrier()
    return summary
