"""Run the study: selection split and runs, then every table cell for every seed, then the cost table; cached.

Layout under `runs_dir`:
- `data/selection/{train,val}`: the selection split, a seeded stratified split of `pipeline.data.path/train`;
- `selection/<knob>/<candidate>/`: one pipeline run per hyperparameter candidate, trained and scored on that split;
- `seed<s>/<settings>/`: one pipeline folder per seed and row settings (`base` for rows without overrides), shared by
  every table's rows with those settings, so GUARD's teacher is trained once per seed for Tables 1/2 and 5;
- `cost/`: the Table 4 benchmark; `cells.json`: the selection's outcome (read by --report_only).
The report reads every finished evaluate stage of the plan from these folders, so it can be rewritten at any time.

Every pipeline call goes through `run_pipeline` and its `StageRunner`, so a rerun skips finished stages and a killed
run resumes inside the interrupted stage. Independent calls (seeds x row settings, selection candidates) run in
`workers` worker processes (guard_fast/study/workers.py). Only rank 0 writes the selection ledger and the report.

Pre-registration: the main run refuses to start without a complete `[plan]`; its first start writes
`runs_dir/plan.json` (the plan and its hash), and every report prints the registered and the current hash, so an
edit of the plan after the main run began is visible. `--pilot` runs the first plan.pilot_seeds seeds without a plan
(into results_dir/pilot); the main run reuses those cached stages. After every finished call the gates
(guard_fast/study/gates.py) are measured; one below its threshold stops the study with one line.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import shutil
from pathlib import Path
from typing import Any, Callable

import numpy as np

from guard_fast.data.digits import prepare_digits, stratified_split
from guard_fast.methods import resolve
from guard_fast.pipeline import PipelineConfig, cut_chains, plan_pipeline
from guard_fast.robustness.report import evaluation_rows
from guard_fast.runtime import distributed as D
from guard_fast.runtime.config import apply_overrides, from_dict, to_dict
from guard_fast.runtime.distributed import DistInfo
from guard_fast.runtime.errors import ConfigError
from guard_fast.runtime.io import atomic_json
from guard_fast.runtime.stagecache import STAGE_FILE, StageRunner
from guard_fast.study import carry
from guard_fast.study import gates as G
from guard_fast.study.config import KNOBS, StudyConfig, candidates
from guard_fast.study.plan import Plan, plan_study, settings_slug
from guard_fast.study.report import write_study_report
from guard_fast.study.workers import GateContext, Job, run_jobs

LEDGER = "cells.json"
TEACHER = "teacher"  # the output the teacher stage of a method writes (selection.score = teacher)
REGISTERED = "plan.json"


def plan_hash(cfg: StudyConfig) -> str:
    """sha256 (16 hex) of the plan section, canonical JSON: what the pre-registration commits to."""
    return hashlib.sha256(json.dumps(to_dict(cfg.plan), sort_keys=True).encode()).hexdigest()[:16]


def plan_record(cfg: StudyConfig, register: bool) -> dict[str, Any]:
    """{'sha256': current hash, 'registered': hash written when the main run first started (None before),
    'changed': whether they differ}; with `register`, writes runs_dir/plan.json if absent (never overwrites)."""
    path = Path(cfg.runs_dir) / REGISTERED
    now = plan_hash(cfg)
    if register and not path.is_file():
        atomic_json(path, {"sha256": now, "plan": to_dict(cfg.plan), "seeds": cfg.seeds})
    try:
        registered = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        registered = None
    reg = registered["sha256"] if registered else None
    return {"sha256": now, "registered": reg, "registered_plan": registered["plan"] if registered else None,
            "changed": reg is not None and reg != now}


def pipeline_config(cfg: StudyConfig, overrides: tuple[str, ...] | list[str], out: Path, seed: int,
                    methods: list[str], ipc: list[int]) -> PipelineConfig:
    """The base pipeline config with a row's overrides, writing to `out`, every stage seeded with `seed`."""
    pc = copy.deepcopy(cfg.pipeline)
    apply_overrides(pc, list(overrides))
    pc.methods, pc.ipc, pc.dist.seed = list(methods), list(ipc), seed
    pc.output.dir = str(out)
    pc.validate()
    return pc


def prepare_selection_data(cfg: StudyConfig, info: DistInfo) -> Path:
    """runs_dir/data/selection/{train,val}: a seeded stratified split of the real TRAINING images (the reported val
    split is never read by selection). Idempotent: kept when its manifest matches. With selection.split = holdout,
    runs_dir/data/selection-holdout/{train,val}: links to data.path/train and data.path/holdout."""
    src = Path(cfg.pipeline.data.path)
    if cfg.selection.split == "holdout":
        return link_holdout(src, Path(cfg.runs_dir) / "data" / "selection-holdout", cfg.selection.val_images,
                            cfg.selection.split_seed, info)
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


def link_holdout(src: Path, out: Path, val_images: int, seed: int, info: DistInfo) -> Path:
    """out/train -> src/train (an absolute link); out/val -> src/holdout, or with val_images > 0 a copy of a seeded
    stratified choice of that many holdout images (the data preparation made the carve)."""
    hold = src / "holdout"
    files = sorted(p.relative_to(hold) for p in hold.rglob("*") if p.is_file()) if hold.is_dir() else []
    if not files:
        raise ConfigError(f"selection.split = holdout: {hold} is missing or empty (prepare the data with a holdout "
                          "carve, or use selection.split = carve)")
    if info.is_main:
        out.mkdir(parents=True, exist_ok=True)
        link = out / "train"
        if not link.is_symlink():
            link.symlink_to((src / "train").resolve(), target_is_directory=True)
        want = {"source": str(hold.resolve()), "val_images": val_images, "seed": seed, "files": len(files)}
        manifest = out / "manifest.json"
        if not (manifest.is_file() and json.loads(manifest.read_text()).get("want") == want):
            val = out / "val"
            if val.is_symlink():
                val.unlink()
            shutil.rmtree(val, ignore_errors=True)
            if not val_images or val_images >= len(files):
                val.symlink_to(hold.resolve(), target_is_directory=True)
                chosen = files
            else:
                labels = np.array([str(f.parent) for f in files])
                _, ids = stratified_split(labels, val_images / len(files), seed)
                chosen = [files[i] for i in ids]
                for f in chosen:
                    (val / f).parent.mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(hold / f, val / f)
            atomic_json(manifest, {"want": want, "val": len(chosen)})  # last: folder complete
    D.barrier()
    return out


def read_ledger(cfg: StudyConfig) -> dict[str, Any]:
    try:
        return json.loads((Path(cfg.runs_dir) / LEDGER).read_text())
    except (OSError, json.JSONDecodeError):
        return {"selection": {}}


def selection_call(cfg: StudyConfig, data: Path, overrides: tuple[str, ...], out: Path, seed: int,
                   method: str) -> PipelineConfig:
    """One selection run's pipeline config: on the selection split, the teacher only when scored on it."""
    sel = cfg.selection
    pc = pipeline_config(cfg, [*sel.overrides, *overrides], out, seed, [method], [sel.ipc])
    pc.data.path = str(data)
    pc.evaluate.num_images = 0
    pc.evaluate.attack.names, pc.evaluate.attack.eps = [sel.attack], [sel.eps]
    if sel.score == "teacher":
        pc.until = TEACHER
    return pc


def selection_folder(cfg: StudyConfig, knob: str, cand: tuple[str, ...], seed: int) -> Path:
    """selection/<knob>/<candidate>/ (one seed given by selection.seed) or .../seed<s>/ (selection.seeds)."""
    base = Path(cfg.runs_dir) / "selection" / knob / settings_slug(cand)
    return base / f"seed{seed}" if cfg.selection.seeds else base


def run_score(sel: Any, pc: PipelineConfig) -> tuple[float, float]:
    """(score, clean) of a finished selection run: the student's row at sel.eps, or the teacher's validation."""
    root = Path(pc.output.dir)
    if sel.score == "teacher":
        _label, _ipc, stages = cut_chains(plan_pipeline(pc, root), TEACHER)[0]
        val = json.loads((stages[-1].folder / "result.json").read_text()).get("val") or {}
        key = f"pgd@{sel.eps:.6g}"
        if key not in val:
            raise ConfigError(f"selection.score = teacher: {stages[-1].folder}/result.json has no {key} (set the "
                              f"teacher's robust evaluation at eps {sel.eps:.6g} in selection.overrides)")
        return val[key], val["clean"]
    rows = json.loads((root / "results.json").read_text())["rows"]
    row = next(r for r in rows if r["eps"] == sel.eps)
    return row[sel.attack], row["clean"]


def run_selection(cfg: StudyConfig, info: DistInfo, data: Path, ledger: dict[str, Any]) -> dict[str, Any]:
    """Train and score every candidate of every knob on the selection split, for every selection seed (candidates run
    as parallel jobs); the best mean score wins (ties: the higher clean accuracy, then the first in grid order). With
    score = teacher, only candidates whose mean clean accuracy is within clean_within of the reference teacher's are
    eligible. Returns {knob: {'best': overrides, 'method', 'candidates': [{'overrides', 'score', ...}]}}."""
    sel = cfg.selection
    seeds = sel.run_seeds()
    jobs = []
    for knob, method in KNOBS.items():
        for cand in candidates(sel, knob):
            for seed in seeds:
                out = selection_folder(cfg, knob, cand, seed)
                jobs.append(Job(str(out.relative_to(cfg.runs_dir)), selection_call(cfg, data, cand, out, seed, method),
                                extra={"knob": knob, "cand": cand}))
    reference = [Job(f"selection/reference/seed{seed}", selection_call(
        cfg, data, (), Path(cfg.runs_dir) / "selection" / "reference" / f"seed{seed}", seed, sel.reference),
        extra={"knob": "", "cand": ()}) for seed in seeds] if sel.score == "teacher" and jobs else []
    run_jobs(carry.jobs_to_run(cfg, info, reference + jobs), info, cfg.workers,
             lambda job: carry.carry_job(cfg, info, job))
    if info.is_main:
        ref_clean = None
        if reference:
            ref_clean = float(np.mean([run_score(sel, j.config)[1] for j in reference]))
        for knob, method in KNOBS.items():
            scored = []
            for cand in candidates(sel, knob):
                runs = [j for j in jobs if j.extra["knob"] == knob and j.extra["cand"] == cand]
                scores = [run_score(sel, j.config) for j in runs]
                entry = {"overrides": list(cand), "score": float(np.mean([s for s, _ in scores])),
                         "clean": float(np.mean([c for _, c in scores])), "seeds": seeds,
                         "folder": str(Path(runs[0].config.output.dir).relative_to(cfg.runs_dir))}
                if ref_clean is not None:
                    entry["eligible"] = entry["clean"] >= ref_clean - sel.clean_within
                scored.append(entry)
            if not scored:
                continue
            pool = [s for s in scored if s.get("eligible", True)]
            if not pool:
                raise ConfigError(f"selection of {knob}: no candidate's teacher is within {sel.clean_within} of the "
                                  f"reference's clean accuracy {ref_clean:.4f} (widen the grid)")
            best = max(pool, key=lambda s: (s["score"], s["clean"]))  # max() keeps the first of equal pairs
            ledger["selection"][knob] = {"method": method, "attack": sel.attack, "eps": sel.eps, "ipc": sel.ipc,
                                         "score": sel.score, "reference_clean": ref_clean,
                                         "best": best["overrides"], "candidates": scored}
        atomic_json(Path(cfg.runs_dir) / LEDGER, ledger)
        if (folder := carry.carry_dir(cfg)) is not None:
            carry.save_study_files(Path(cfg.runs_dir), folder)
    return D.broadcast_object(ledger["selection"])


def plan_roots(cfg: StudyConfig, plan: Plan) -> list[tuple[int, Path]]:
    """(seed, pipeline folder) of every call of the plan."""
    return [(seed, Path(cfg.runs_dir) / f"seed{seed}" / call.slug) for call in plan.calls for seed in cfg.seeds]


def measure_gates(cfg: StudyConfig, plan: Plan, cells: dict[str, dict[int, list[dict]]]) -> list[dict[str, Any]]:
    """Every declared gate over the finished stages of the plan (teachers, recovered sets, the KD recipe row)."""
    out = G.measure_roots(cfg.gates, plan_roots(cfg, plan), Path(cfg.runs_dir))
    kd: dict[int, float] = {}
    for (_table, label, _ipc), cid in plan.cells.items():
        if label == cfg.gates.kd_row:
            for seed, rows in cells.get(cid, {}).items():
                kd.setdefault(seed, rows[0]["clean"])
    return out + G.measure_kd(cfg.gates, kd)


def cell_jobs(cfg: StudyConfig, plan: Plan) -> list[Job]:
    """Every call of the plan for every seed, call-major, the base call first: it holds the plain teacher, so the
    teacher gates stop the study before any row is made."""
    roots = plan_roots(cfg, plan)
    jobs = []
    for call in sorted(plan.calls, key=lambda c: c.slug != "base"):
        for seed in cfg.seeds:
            out = Path(cfg.runs_dir) / f"seed{seed}" / call.slug
            gate = GateContext(cfg.gates, [r for r in roots if r[0] == seed], Path(cfg.runs_dir))
            jobs.append(Job(f"seed{seed}/{call.slug}",
                            pipeline_config(cfg, call.settings, out, seed, call.methods, call.ipc), gate))
    return jobs


def run_cells(cfg: StudyConfig, info: DistInfo, plan: Plan, after_job: Callable[..., str | None]) -> None:
    """Every call of the plan for every seed as jobs (call-major, so finished cells have all their seeds first; the
    base call first); after each job, `after_job` (rank 0; `gates.interim_reporter`) checks the gates on disk,
    rewrites the report when due, and returns the failed gate's line (None when every gate holds); a failure stops
    every rank (after_job(force=True) then writes the report)."""
    jobs = carry.jobs_to_run(cfg, info, cell_jobs(cfg, plan))
    saver = carry.partial_saver(cfg, info, jobs)

    def done(job: Job) -> None:
        carry.carry_job(cfg, info, job, saver)
        line = D.broadcast_object(after_job() if info.is_main else None)
        if line:
            raise G.GateError(line)

    try:
        # unfinished jobs' folders are carried every carry_every_s seconds and on the way out (carry_partial.py)
        with saver or contextlib.nullcontext():
            run_jobs(jobs, info, cfg.workers, done)
    except G.GateError:
        if info.is_main:
            after_job(force=True)  # a gate failed inside a job: the report still shows it
        raise


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
            if carry.fingerprint(have) != carry.fingerprint(pc):
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


def pilot_config(cfg: StudyConfig) -> StudyConfig:
    """The pilot: the first plan.pilot_seeds seeds, its report in results_dir/pilot (its stages are the main run's)."""
    pilot = copy.deepcopy(cfg)
    folder = carry.carry_dir(cfg)  # the main run's: it reuses the pilot
    pilot.carry_dir = "off" if folder is None else str(folder)
    pilot.seeds = cfg.seeds[: cfg.plan.pilot_seeds]
    pilot.results_dir = str(Path(cfg.results_dir) / "pilot")
    pilot.readme = ""
    return pilot


def run_study(cfg: StudyConfig, info: DistInfo, cost_fn: Callable[[Any, Path], dict[str, Any]] | None = None
              ) -> dict[str, Any]:
    """Selection, every cell for every seed (gates checked as stages finish), Table 4, then report.md /
    results.json / charts (and the README block). The main run needs the pre-registered plan; --pilot does not.
    With report_only, nothing runs: the report covers the finished stages and lists what is missing."""
    if cfg.pilot:
        cfg = pilot_config(cfg)
    elif not cfg.report_only:
        cfg.require_plan()
    if info.is_main and (folder := carry.carry_dir(cfg)) is not None:
        carry.restore_study_files(Path(cfg.runs_dir), folder)  # a new checkout: the ledger and registered plan
    D.barrier()
    registration = plan_record(cfg, register=info.is_main and not (cfg.pilot or cfg.report_only))
    if registration["changed"] and info.is_main:
        print(f"warning: plan changed since the main run started (registered {registration['registered']}, now "
              f"{registration['sha256']}); the report says so")
    ledger = read_ledger(cfg)
    if not cfg.report_only and any(candidates(cfg.selection, k) for k in KNOBS):
        selected = run_selection(cfg, info, prepare_selection_data(cfg, info), ledger)
    else:  # nothing to select (no grid: no selection split is copied) or report only
        selected = ledger["selection"]
    selected = {k: v for k, v in selected.items() if v["best"] in [list(c) for c in candidates(cfg.selection, k)]}
    plan = plan_study(cfg, selected)
    cost_path = Path(cfg.runs_dir) / "cost" / "cost.json"

    def report(cost: dict[str, Any] | None = None) -> dict[str, Any]:
        if cost is None and cost_path.is_file() and (Path(cfg.runs_dir) / "cost" / "stage.json").is_file():
            cost = json.loads(cost_path.read_text())
        cells = cell_results(cfg, plan)
        return write_study_report(cfg, plan, cells, selected, cost, measure_gates(cfg, plan, cells), registration)

    if cfg.report_only:
        carry.jobs_to_run(cfg, info, cell_jobs(cfg, plan))  # a new checkout: the carried jobs' files, for the report
        return report() if info.is_main else {}
    run_cells(cfg, info, plan, G.interim_reporter(cfg, lambda: measure_gates(cfg, plan, cell_results(cfg, plan)),
                                                report))
    cost = run_cost(cfg, info, cost_fn)
    summary = report(cost) if info.is_main else {}
    D.barrier()
    return summary
