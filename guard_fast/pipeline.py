"""Every registered distillation method, cached and resumable: its stages, then evaluate, per method and IPC.

The pipeline knows no method: its config class is the shared sections plus the sections the registered methods
declare (guard_fast/methods), and each method plans its own stages. Folders: `runs/<name>/<method slug>/ipc<k>/<stage>`
per chain (stages shared by several chains, such as a teacher, live where the method puts them), then `report.md`,
`results.json`, `robustness.png` at the top. Each stage is a `StageRunner` stage keyed by its resolved config and its
inputs' completion ids (guard_fast/runtime/stagecache.py): unchanged stages are skipped, `force` reruns a stage kind,
an interrupted stage resumes from its own checkpoints. Every rank runs this function; each stage distributes itself.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from guard_fast.methods import METHODS, Method, Stage, describe_methods, resolve, sections, stage_config, used_sections
from guard_fast.robustness.curvature import PipelineCurvatureConfig, run_curvature
from guard_fast.robustness.curvature_report import combine, write_outputs
from guard_fast.robustness.evaluate import EvaluateConfig, run_evaluate
from guard_fast.robustness.report import bar_chart, evaluation_rows, metrics_table, results_table
from guard_fast.runtime import distributed as D
from guard_fast.runtime import runfolder
from guard_fast.runtime.cluster import open_run
from guard_fast.runtime.config import DataConfig, DistConfig, OutputConfig, to_dict
from guard_fast.runtime.distributed import DistInfo
from guard_fast.runtime.errors import ConfigError, GuardFastError
from guard_fast.runtime.io import atomic_json, atomic_text
from guard_fast.runtime.stagecache import StageRecord, StageRunner

UNKEYED = ("output", "stop_after", "resume", "allow_config_change", "until")  # fields that do not change a result


@dataclass
class PipelineBase:
    """The sections every pipeline has; PipelineConfig adds one section per registered method section."""

    data: DataConfig = field(default_factory=DataConfig)
    """the real dataset, shared by every stage"""
    dist: DistConfig = field(default_factory=DistConfig)
    """shared by every stage"""
    output: OutputConfig = field(default_factory=lambda: OutputConfig(dir="runs/pipeline"))
    """output.dir holds one folder per method plus report.md; log/progress settings apply to every stage"""
    methods: list[str] = field(default_factory=list)
    """distillation methods to compare, `name` or `name:key=value:...` (label=NAME renames); see guard_fast/methods"""
    ipc: list[int] = field(default_factory=lambda: [10])
    """images per class of the distilled sets (one chain of stages each)"""
    force: list[str] = field(default_factory=list)
    """stage kinds to rerun even when cached (squeeze, recover, relabel, train, evaluate, ...)"""
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    """attacks and the evaluation subset (evaluate.model follows each method's student)"""
    curvature: PipelineCurvatureConfig = field(default_factory=PipelineCurvatureConfig)
    """optional input-Hessian curvature stages after evaluate (curvature.enabled, curvature.models; off by default)"""
    until: str = ""
    """stop every chain after its first stage with this output (e.g. teacher: the teachers only, for a selection
    scored on them); no evaluation and no report then. Empty = every stage"""

    def validate(self) -> None:
        specs = [resolve(m)[1] for m in self.methods]
        if len(set(specs)) != len(specs):
            raise ConfigError(f"methods = {self.methods}: listed twice")
        if not self.ipc or min(self.ipc) < 1:
            raise ConfigError(f"ipc = {self.ipc}: give one or more values >= 1")
        kinds = {"evaluate", *(["curvature"] if self.curvature.enabled else []),
                 *(k for m in self.methods for k in resolve(m)[0].kinds)}
        unknown = sorted(set(self.force) - kinds)
        if unknown:
            raise ConfigError(f"force = {unknown}: valid stages are {', '.join(sorted(kinds))}")


def config_class(methods: dict[str, Method] = METHODS) -> type:
    """PipelineBase plus one field per section the methods declare (`[squeeze]`, `[dc]`, `[train_hard]`, ...)."""
    secs = sections(methods)
    cls = dataclasses.make_dataclass(
        "PipelineConfig", [(s.name, s.config, field(default_factory=s.config)) for s in secs.values()],
        bases=(PipelineBase,))
    cls.__module__, cls.__qualname__ = __name__, "PipelineConfig"
    cls.__doc__ = "Every registered method's settings in one config: the shared sections plus the methods' sections."
    cls.__field_docs__ = {s.name: s.doc for s in secs.values()}
    cls.__field_docs__["methods"] = (f"distillation methods to compare, `name` or `name:key=value:...` (label=NAME "
                                     f"renames); registered: {describe_methods()}")
    return cls


PipelineConfig = config_class()


def evaluate_stage(cfg: PipelineConfig, student: Stage, label: str, folder: Path) -> Stage:
    """Attack the student that `student` wrote, with the student's own network settings."""
    ev = stage_config(cfg, "evaluate", folder)
    ev.dist.precision = "fp32"  # attacks run in fp32 whatever the training precision
    ev.model = copy.deepcopy(student.config.model)
    ev.model.checkpoint, ev.model.compile = "", False
    ev.checkpoints, ev.labels = [str(student.folder / student.outputs["student"])], [label]
    return Stage("evaluate", folder, ev, run_evaluate, {"evaluation": "evaluation.json"}, [student.folder])


def curvature_stage(cfg: PipelineConfig, source: Stage, output: str, model: Any, label: str, group: str,
                    folder: Path) -> Stage:
    """Curvature of the network that `source` wrote (its output `output`), with that network's settings."""
    cc = stage_config(cfg, "curvature", folder).stage_config()
    cc.model = copy.deepcopy(model)
    cc.model.checkpoint, cc.model.compile = "", False
    cc.checkpoints, cc.labels, cc.groups = [str(source.folder / source.outputs[output])], [label], [group]
    return Stage("curvature", folder, cc, run_curvature, {"curvature": "curvature.json"}, [source.folder])


def curvature_stages(cfg: PipelineConfig, stages: list[Stage], label: str, root: Path, chain: Path) -> list[Stage]:
    """The chain's curvature stages (none unless curvature.enabled): its squeeze teacher's (if any), then its student's
    (the input of the evaluate stage that ends `stages`)."""
    if not cfg.curvature.enabled:
        return []
    out = []
    if "teachers" in cfg.curvature.models:
        out += [curvature_stage(cfg, s, "teacher", s.config.model, f"{s.folder.name} teacher", "teachers",
                                root / "curvature" / f"teacher-{s.folder.name}")
                for s in stages if "teacher" in s.outputs]
    if "students" in cfg.curvature.models:
        student = next(s for s in stages if s.folder == stages[-1].inputs[0])  # what evaluate (last) attacks
        out.append(curvature_stage(cfg, student, "student", student.config.model, label, "students",
                                   chain / "curvature"))
    return out


def plan_pipeline(cfg: PipelineConfig, root: Path) -> list[tuple[str, int, list[Stage]]]:
    """(display label, ipc, stages ending with evaluate) per method and IPC, in run order."""
    if not cfg.methods:  # empty is valid in a template (the study sets methods per cell), not in a run
        raise ConfigError("methods: give one or more distillation methods, e.g. --methods=sre2l:teacher=guard "
                          f"(registered: {describe_methods()})")
    chains = []
    for text in cfg.methods:
        method, spec, opts = resolve(text)
        label = method.display(opts)
        for ipc in cfg.ipc:
            chain = root / spec.slug / f"ipc{ipc}"
            stages = method.plan(cfg, opts, ipc, chain)
            stages.append(evaluate_stage(cfg, stages[-1], f"{label} IPC {ipc}", chain / "evaluate"))
            stages += curvature_stages(cfg, stages, f"{label} IPC {ipc}", root, chain)
            chains.append((label, ipc, stages))
    return chains


def cut_chains(chains: list[tuple[str, int, list[Stage]]], output: str) -> list[tuple[str, int, list[Stage]]]:
    """Each chain up to and including its first stage that writes `output` (pipeline `until`)."""
    out = []
    for label, ipc, stages in chains:
        k = next((i for i, s in enumerate(stages) if output in s.outputs), None)
        if k is None:
            raise ConfigError(f"until = {output!r}: no stage of {label} writes it (outputs: "
                              f"{', '.join(o for s in stages for o in s.outputs)})")
        out.append((label, ipc, stages[: k + 1]))
    return out


def key_dict(stage: Any) -> dict[str, Any]:
    d = to_dict(stage)
    for k in UNKEYED:
        d.pop(k, None)
    return d


def _stage_fn(stage: Stage, info: DistInfo):
    """fn(folder, resume) -> outputs for StageRunner; a stage that stops early (stop_after) is not complete."""

    def fn(folder: Path, resume: bool) -> dict[str, str]:
        if hasattr(stage.config, "resume"):
            stage.config.resume = resume
        result = stage.run(stage.config, info)
        if any(k.startswith("stopped") for k in result):
            raise GuardFastError(f"{stage.kind} stopped early ({result}); rerun the pipeline to resume it")
        return stage.outputs

    return fn


@runfolder.stage("pipeline")
def run_pipeline(cfg: PipelineConfig, info: DistInfo,
                 on_stage: Callable[[str, Path], None] | None = None) -> dict[str, Any]:
    """Every stage of every chain, cached; `on_stage(kind, folder)` after each (the study checks its gates there: an
    exception stops the pipeline before the next stage)."""
    root = Path(cfg.output.dir)
    open_run(root, cfg, info=info, keyed=False).start()  # stages key their own work: a changed config reruns them
    chains = plan_pipeline(cfg, root)
    if cfg.until:
        chains = cut_chains(chains, cfg.until)
    unique = {s.folder for _, _, stages in chains for s in stages}
    runner = StageRunner(len(unique), set(cfg.force), info.is_main, log=print if info.is_main else (lambda *_: None))
    done: dict[Path, StageRecord] = {}  # folder -> record: a stage shared by several methods runs once
    evaluations: list[tuple[str, int, StageRecord]] = []
    grids: dict[str, str] = {}
    for label, ipc, stages in chains:
        for stage in stages:
            if stage.folder not in done:
                upstream = [done[f] for f in stage.inputs]
                done[stage.folder] = runner.run(str(stage.folder.relative_to(root)), stage.folder,
                                                key_dict(stage.config), upstream, _stage_fn(stage, info),
                                                kind=stage.kind)
                if on_stage is not None:
                    on_stage(stage.kind, stage.folder)
            if "grid" in stage.outputs:
                grids[f"{label} IPC {ipc}"] = str(done[stage.folder].path("grid").relative_to(root))
        if cfg.until:
            continue
        evaluations.append((label, ipc, done[next(s for s in stages if s.kind == "evaluate").folder]))
    curvatures = [done[f] for f in dict.fromkeys(s.folder for _, _, st in chains for s in st if s.kind == "curvature")]
    summary = {}
    if cfg.until:
        summary = {"until": cfg.until, "outputs": {f"{label} IPC {ipc}": str(done[stages[-1].folder].path(cfg.until))
                                                   for label, ipc, stages in chains}}
    elif info.is_main:
        summary = write_report(cfg, root, evaluations, grids, runner, curvatures)
    D.barrier()
    return summary


def section_lines(cfg: Any, methods: list[str]) -> list[str]:
    """One report line per config section that the listed methods read (each section's own summary)."""
    return [s.summary(getattr(cfg, s.name), cfg) for s in used_sections(methods) if s.summary]


def settings_lines(cfg: PipelineConfig, evaluation: dict[str, Any]) -> list[str]:
    """What was run, stated in the report (demo settings are smaller than the paper's)."""
    ds = evaluation["dataset"]
    data_line = (f"- data: {ds['name']}, {ds['num_classes']} classes, {ds['image_size']} px; evaluated on "
                 f"{ds['images']} of {ds['split_images']} val images"
                 + (f" (seeded subset, seed {ds['subset_seed']})" if ds["images"] < ds["split_images"] else ""))
    attacks = "- attacks: " + "; ".join(f"{k} " + ", ".join(f"{a} {b}" for a, b in v.items())
                                        for k, v in evaluation["attacks"].items())
    return [data_line, *section_lines(cfg, cfg.methods), attacks,
            *[f"- {n}" for n in evaluation["notes"]]]


def write_report(cfg: PipelineConfig, root: Path, evaluations: list[tuple[str, int, StageRecord]],
                 grids: dict[str, str], runner: StageRunner, curvatures: list[StageRecord] = ()) -> dict[str, Any]:
    """report.md + results.json + robustness.png comparing every (method, IPC) student."""
    loaded = [json.loads(rec.path("evaluation").read_text()) for _, _, rec in evaluations]
    checkpoints = [ck for e in loaded for ck in e["checkpoints"]]
    eps = loaded[0]["eps"]
    rows = evaluation_rows(checkpoints, eps)
    bar_chart(rows, root / "robustness.png", title=loaded[0]["dataset"]["name"])
    stages = [{"stage": r.name, "cached": r.skipped, "seconds": round(r.seconds, 1)} for r in runner.records]
    summary = {"rows": rows, "eps": eps, "methods": cfg.methods, "ipc": cfg.ipc, "stages": stages, "grids": grids,
               "evaluations": [str(rec.path("evaluation").relative_to(root)) for _, _, rec in evaluations]}
    atomic_json(root / "results.json", summary)
    labels = ", ".join(dict.fromkeys(label for label, _, _ in evaluations))
    lines = [f"# GUARD pipeline report: {labels}", "",
             "Students trained on each distilled set, evaluated on the real val split (accuracy %, L-inf attacks "
             "in [0,1] pixel units; CW is L2).", "", "## Settings", "", *settings_lines(cfg, loaded[0]), ""]
    for e in eps or [None]:
        sub = [r for r in rows if r["eps"] == e]
        title = "eps = " + (f"{e * 255:g}/255" if e is not None else "-")
        lines += [f"## Results, {title}", "", results_table(sub), "", "Drop rate (% of clean accuracy lost) and "
                  "robustness ratios:", "", metrics_table(sub), ""]
    lines += ["![robustness](robustness.png)", "", "## Distilled images (one row per class)", ""]
    lines += [f"**{name}**\n\n![{name}]({path})\n" for name, path in grids.items()]
    if curvatures:  # every measured teacher and student in one Fig. 2-style figure
        write_outputs(combine([json.loads(rec.path("curvature").read_text()) for rec in curvatures]), root)
        lines += ["## Input-Hessian curvature at real val images", "", "Per-model medians and quartiles: "
                  "[curvature.md](curvature.md).", "", "![curvature](curvature.png)", ""]
    lines += ["## Stages", "", "| stage | cached | seconds (when it ran) |", "|---|---|---|",
              *[f"| {s['stage']} | {'yes' if s['cached'] else 'no'} | {s['seconds']} |" for s in stages], "",
              "Per-student details (attack settings, wall time per attack): "
              + ", ".join(f"[{p}]({p.replace('evaluation.json', 'evaluation.md')})" for p in summary["evaluations"]),
              ""]
    atomic_text(root / "report.md", "\n".join(lines))
    return summary
