"""Reproduce published Fashion-MNIST cells (DC's protocol) as resumable, cached units; docs/reproduction.md.

A cell is (method, IPC); its units are (draw, model): draw d picks the set (random real: IPC seeded real images per
class of train/; dc / dsa: a DC / DSA distillation seeded d, the preset's `dc` / `dsa` section), model m trains a
fresh student on it with DC's evaluate_synset protocol (guard_fast/student/hard.py; the preset's `train_hard`
section, `train_dsa` for DSA sets: DSA on every batch, 1000 epochs) and scores it on the whole test set (val/).
DC reports mean +- sd over num_exp x num_eval = 5 sets x 20 models (VICO-UoE/DatasetCondensation main.py:20-21,
126-131; np.std, ddof 0): the full budget here. Every finished unit is one JSON file, so a rerun skips it; units run
in at most `procs` processes of one thread each.
"""

from __future__ import annotations

import json
import os
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np
import torch

from guard_fast import reproduce_carry as carry
from guard_fast.data.synthetic import write_synthetic
from guard_fast.distill.dc import run_dc
from guard_fast.methods.base import stage_config
from guard_fast.pipeline import PipelineConfig
from guard_fast.runtime.config import load_config
from guard_fast.runtime.distributed import DistInfo
from guard_fast.runtime.errors import GuardFastError
from guard_fast.runtime.io import atomic_json, atomic_text
from guard_fast.student.hard import run_train_hard

# Fashion-MNIST, ConvNet, % test accuracy: DC repo README Tables 1-2 and the DC / DSA papers (issue 25).
PUBLISHED = {("random-real", 1): 51.4, ("random-real", 10): 73.8, ("random-real", 50): 82.5,
             ("dc", 1): 70.5, ("dc", 10): 82.3, ("dc", 50): 83.6,
             ("dsa", 1): 70.6, ("dsa", 10): 84.6, ("dsa", 50): 88.7}
PUBLISHED_SD = {("random-real", 1): 3.8, ("random-real", 10): 0.7}
METHODS = ("random-real", "dc", "dsa")
DISTILL = {"dc": "dc", "dsa": "dsa"}  # method -> the preset section of its distillation (random real has none)
STUDENT = {"random-real": "train_hard", "dc": "train_hard", "dsa": "train_dsa"}  # method -> its student section
FULL = {"draws": 5, "models": 20}


@dataclass(frozen=True)
class Cell:
    method: str
    ipc: int

    @property
    def name(self) -> str:
        return f"{self.method}-ipc{self.ipc}"


def parse_cells(text: str) -> list[Cell]:
    """'random-real:1,random-real:10,dc:1' -> cells."""
    cells = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        method, _, ipc = part.partition(":")
        if method not in METHODS or not ipc.isdigit() or int(ipc) < 1:
            raise GuardFastError(f"cell {part!r}: write METHOD:IPC with METHOD in {', '.join(METHODS)}")
        cells.append(Cell(method, int(ipc)))
    return cells


# ------------------------------------------------------------------------------------------------------- sets
def random_real_set(data: Path, ipc: int, draw: int, folder: Path) -> Path:
    """IPC real train images per class, chosen with seed `draw`, written as a synthetic set (grayscale PNGs; the
    students train on these exact 8-bit images)."""
    if (folder / "manifest.json").is_file():
        return folder
    train = torch.load(data / "tensors.pt", weights_only=True)["train"]
    gen = torch.Generator().manual_seed(draw)
    picks, items = [], []
    for c in range(10):
        ids = torch.nonzero(train["labels"] == c).flatten()
        chosen = ids[torch.randperm(len(ids), generator=gen)[:ipc]]
        picks.append(train["pixels"][chosen])
        items += [{"label": c, "ipc_index": k, "train_id": int(train["ids"][i])} for k, i in enumerate(chosen)]
    write_synthetic(folder, torch.cat(picks), items, [str(c) for c in range(10)],
                    {"ipc": ipc, "image_size": 28, "method": "random-real", "draw": draw})
    return folder


def stage_cfg(pipeline: Any, section: str, folder: Path, seed: int) -> Any:
    """The preset's section as a stage config writing to `folder`, one process, no loader workers, seed `seed`."""
    cfg = stage_config(pipeline, section, folder)
    cfg.data.workers, cfg.dist.seed, cfg.dist.cpu_threads = 0, seed, 1
    cfg.output.progress, cfg.output.ckpt_every = False, 50
    return cfg


# ------------------------------------------------------------------------------------------------------ units
def unit_path(root: Path, cell: Cell, draw: int, model: int) -> Path:
    return root / cell.name / f"draw{draw}" / f"model{model}.json"


def one_cpu() -> Any:
    return DistInfo(rank=0, world=1, local_rank=0, device=torch.device("cpu"))


def run_unit(preset: str, overrides: list[str], root: str, cell: Cell, draw: int, model: int) -> dict:
    """Train and test one student (for dc / dsa, distilling its set first unless cached); writes the unit's JSON.
    CPU seconds are this process's (one thread, no loader workers); the distillation's are counted once, in the
    unit that finished it, over every sitting it took (result.json's cpu_s)."""
    torch.set_num_threads(1)
    start_cpu, start_wall = time.process_time(), time.time()
    pipeline = load_config(PipelineConfig, preset, overrides)
    base = Path(root) / cell.name / f"draw{draw}"
    distill_cpu = 0.0
    if cell.method == "random-real":
        images = random_real_set(Path(pipeline.data.path), cell.ipc, draw, base / "set")
    else:
        images = base / cell.method
        if not (images / "result.json").is_file():
            d = stage_cfg(pipeline, DISTILL[cell.method], images, draw)
            d.ipc, d.dsa, d.guard = cell.ipc, cell.method == "dsa", False
            made = run_dc(d, one_cpu())
            if "stopped_at_iteration" in made:
                raise GuardFastError(f"{images}: the distillation stopped at iteration {made['stopped_at_iteration']}"
                                     " (dc.stop_after); a unit needs the finished set")
            distill_cpu = made["cpu_s"]
    tr = stage_cfg(pipeline, STUDENT[cell.method], base / f"model{model}", draw * 1000 + model)
    tr.images, tr.resume = str(images), True
    result = run_train_hard(tr, one_cpu())
    made_by = json.loads((images / "manifest.json").read_text())["method"]  # random-real, DC or DSA
    record = {"cell": cell.name, "draw": draw, "model": model, "seed": tr.dist.seed, "set_method": made_by,
              "acc": 100 * result["val"]["clean"],
              "cpu_s": time.process_time() - start_cpu, "distill_cpu_s": distill_cpu,
              "wall_s": time.time() - start_wall, "epochs": tr.optim.epochs, "augment": tr.augment,
              "preset": preset, "overrides": list(overrides)}
    atomic_json(unit_path(Path(root), cell, draw, model), record)
    return record


def restore_units(root: Path, report: Path, preset: str, overrides: list[str], cells: list[Cell]) -> int:
    """Write back into `root` the unit records the committed report holds (report.json "units") and `root` lacks,
    so a new checkout resumes where an earlier one stopped. A requested cell whose recorded units were made under
    another preset or other overrides is refused: one report holds one protocol per cell."""
    previous = read_report(report)
    wanted = {c.name for c in cells}
    restored = 0
    for rec in previous.get("units", []):
        if rec["cell"] not in wanted:
            continue
        if rec.get("preset") != preset or rec.get("overrides") != list(overrides):
            raise GuardFastError(f"{report.with_suffix('.json')}: cell {rec['cell']} was run with preset "
                                 f"{rec.get('preset')} and overrides {rec.get('overrides')}; this run asks for "
                                 f"{preset} {list(overrides)}: pass another --report (and --root)")
        path = unit_path(root, Cell(rec["method"], rec["ipc"]), rec["draw"], rec["model"])
        if not path.is_file():
            atomic_json(path, {k: v for k, v in rec.items() if k not in ("method", "ipc")})
            restored += 1
    if restored:
        print(f"restored {restored} finished units from {report.with_suffix('.json')}", flush=True)
    return restored


def read_report(report: Path) -> dict:
    path = report.with_suffix(".json")
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise GuardFastError(f"{path}: unreadable report ({type(e).__name__}: {e}); move it aside") from None


def report_unit(rec: dict) -> None:
    print(f"{rec['cell']} draw {rec['draw']} model {rec['model']}: {rec['acc']:.2f}% ({rec['cpu_s']:.0f} CPU s)",
          flush=True)


def _worker_init() -> None:
    torch.set_num_threads(1)


def run_cells(preset: str, overrides: list[str], root: Path, cells: list[Cell], draws: int, models: int,
              procs: int, report: Path, command: str, carry_every_s: float = 120.0) -> dict:
    """Run every missing unit of `cells` (draw-major), at most `procs` at a time; the report is rewritten after
    each finished unit, so an interrupted run leaves a report of what finished, and the distillations are carried
    (finished or not) to <report>-carry/ every `carry_every_s` seconds (guard_fast/reproduce_carry.py)."""
    if not 1 <= procs <= 2:
        raise GuardFastError(f"--procs {procs}: 1 or 2 (two one-thread processes are the fastest here)")
    restore_units(root, report, preset, overrides, cells)
    record = {"preset": preset, "overrides": list(overrides)}
    names = tuple(DISTILL)
    carry.restore(root, carry.carry_dir(report), [c.name for c in cells], record, names)
    with carry.Saver(root, carry.carry_dir(report), record, names, carry_every_s) as saver:
        return _run_units(preset, overrides, root, cells, draws, models, procs, report, command, saver)


def _run_units(preset: str, overrides: list[str], root: Path, cells: list[Cell], draws: int, models: int,
               procs: int, report: Path, command: str, saver: carry.Saver) -> dict:
    todo = [(c, d, m) for c in cells for d in range(draws) for m in range(models)
            if not unit_path(root, c, d, m).is_file()]
    data = Path(load_config(PipelineConfig, preset, overrides).data.path)
    if not (data / "tensors.pt").is_file():
        raise GuardFastError(f"{data}/tensors.pt not found (run: guard-fast data prepare-fashion-mnist --out {data})")
    for c in cells:  # sets first, in this process: two units of one draw must not write the same set
        if c.method == "random-real":
            for d in range(draws):
                random_real_set(data, c.ipc, d, root / c.name / f"draw{d}" / "set")
    write_report(root, cells, draws, models, report, command, overrides)
    # dc / dsa: model 0 of each draw distils; the other models of that draw wait for it (submitted after it finishes)
    first = [u for u in todo if u[0].method not in DISTILL or u[2] == 0 or (
        root / u[0].name / f"draw{u[1]}" / u[0].method / "result.json").is_file()]
    later = [u for u in todo if u not in first]
    if procs == 1:  # in this process, in order (a distilling model 0 comes first within its draw)
        for u in first + later:
            report_unit(run_unit(preset, overrides, str(root), *u))
            saver.now()
            write_report(root, cells, draws, models, report, command, overrides)
        return write_report(root, cells, draws, models, report, command, overrides)
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = "1"  # inherited by the spawned workers
    with ProcessPoolExecutor(max_workers=procs, mp_context=get_context("spawn"), initializer=_worker_init) as pool:
        pending = {pool.submit(run_unit, preset, overrides, str(root), *u): u for u in first}
        while pending:
            for fut in as_completed(list(pending)):
                unit = pending.pop(fut)
                report_unit(fut.result())
                saver.now()
                ready = [u for u in later if u[0] == unit[0] and u[1] == unit[1]]
                for u in ready:
                    later.remove(u)
                    pending[pool.submit(run_unit, preset, overrides, str(root), *u)] = u
                write_report(root, cells, draws, models, report, command, overrides)
                break
    return write_report(root, cells, draws, models, report, command, overrides)


# ----------------------------------------------------------------------------------------------------- report
def budget_text(cell: Cell, draws: int, models: int, overrides: list[str]) -> str:
    """full: DC's 5 draws x 20 models and no override of a section the cell reads (its distillation, its student);
    otherwise reduced, naming those overrides."""
    sections = [s for s in (DISTILL.get(cell.method), STUDENT[cell.method]) if s]
    changed = [o for o in overrides if any(o.startswith(f"--{s}.") for s in sections)]
    what = f"{draws} draws x {models} models"
    if draws >= FULL["draws"] and models >= FULL["models"] and not changed:
        return f"full ({what})"
    return f"reduced: {what}" + (f", {' '.join(changed)}" if changed else "") + \
        f" (full: {FULL['draws']} x {FULL['models']})"


def write_report(root: Path, cells: list[Cell], draws: int, models: int, report: Path, command: str,
                 overrides: list[str]) -> dict:
    """report.json and report.md: per cell the finished units' mean +- sd (np.std, DC's), CPU time, published
    number and gap; report.json also lists every unit record. Cells of an earlier run of the same report that this
    run does not name are kept (their rows and units), so running one cell never drops another's results."""
    previous = read_report(report)
    named = {c.name for c in cells}
    kept_rows = [r for r in previous.get("cells", []) if r["cell"] not in named]
    kept_units = [u for u in previous.get("units", []) if u["cell"] not in named]
    rows, units = [], []
    for c in cells:
        found = [json.loads(p.read_text()) for p in sorted((root / c.name).glob("draw*/model*.json"))]
        units += [{"method": c.method, "ipc": c.ipc, **r} for r in found]  # all kept for a later, larger run
        recs = [r for r in found if r["draw"] < draws and r["model"] < models]  # the statistics: this budget only
        accs = np.array([r["acc"] for r in recs])
        pub = PUBLISHED.get((c.method, c.ipc))
        mean = float(accs.mean()) if len(accs) else None
        rows.append({"cell": c.name, "method": c.method, "ipc": c.ipc, "units_done": len(recs),
                     "units_planned": draws * models, "budget": budget_text(c, draws, models, overrides),
                     "mean": mean, "sd": float(accs.std()) if len(accs) else None,
                     "per_draw_mean": {str(d): float(np.mean([r["acc"] for r in recs if r["draw"] == d]))
                                       for d in sorted({r["draw"] for r in recs})},
                     "cpu_s": sum(r["cpu_s"] for r in recs), "epochs": recs[0]["epochs"] if recs else None,
                     "augment": recs[0]["augment"] if recs else None, "published": pub,
                     "published_sd": PUBLISHED_SD.get((c.method, c.ipc)),
                     "gap": None if mean is None or pub is None else mean - pub,
                     "command": command})
    order = {(m, i): k for k, (m, i) in enumerate(PUBLISHED)}
    rows = sorted(kept_rows + rows, key=lambda r: (order.get((r["method"], r["ipc"]), len(order)), r["cell"]))
    units = sorted(kept_units + units, key=lambda u: (u["cell"], u["draw"], u["model"]))
    out = {"dataset": "fashion-mnist", "protocol": "DC evaluate_synset (ConvNet-128, 28 px, 1 channel)",
           "torch": torch.__version__, "cells": rows, "units": units}
    report.parent.mkdir(parents=True, exist_ok=True)
    atomic_json(report.with_suffix(".json"), out)
    atomic_text(report.with_suffix(".md"), markdown(out))
    return out


def markdown(out: dict) -> str:
    lines = ["# Fashion-MNIST: reproduction of published cells", "",
             f"Protocol: {out['protocol']}; torch {out['torch']}. Accuracy on the official 10,000 test images, mean "
             "+- sd over all finished (draw, model) units. CPU time: sum over units (one thread each). "
             "docs/reproduction.md describes the cells.", "",
             "| cell | units | budget | accuracy % | published % | gap | student epochs | CPU h |",
             "|---|---|---|---|---|---|---|---|"]
    for r in out["cells"]:
        acc = "-" if r["mean"] is None else f"{r['mean']:.1f} +- {r['sd']:.1f}"
        pub = "-" if r["published"] is None else f"{r['published']}" + (
            f" +- {r['published_sd']}" if r["published_sd"] else "")
        gap = "-" if r["gap"] is None else f"{r['gap']:+.1f}"
        lines.append(f"| {r['cell']} | {r['units_done']}/{r['units_planned']} | {r['budget']} | {acc} | {pub} | "
                     f"{gap} | {r['epochs'] or '-'} | {r['cpu_s'] / 3600:.2f} |")
    lines += ["", "Commands (a rerun resumes from the units report.json lists):", ""]
    lines += [f"    {c}" for c in dict.fromkeys(r["command"] for r in out["cells"])] + [""]
    return "\n".join(lines)
