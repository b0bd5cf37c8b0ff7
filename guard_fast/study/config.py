"""The study's configuration: base pipeline settings, seeds, the paper's tables as row lists, hyperparameter selection.

A table row is one distillation method plus optional per-row settings, written as one string:

    "sre2l:teacher=guard | @guard"                                    GUARD with the selected beta/h
    "sre2l:teacher=grad-norm:label=GN 1e-3 | --squeeze.objective.grad_norm_beta=1e-3"

`method spec` (guard_fast/methods: `name:key=value:label=NAME`), then `|`-separated parts: `--section.key=value`
overrides of the pipeline config (CLI syntax, keys relative to the `pipeline` section) and `@knob`, which applies the
values the selection stage chose for that knob. Rows with the same overrides share one pipeline folder (and so their
teachers); the label is the method's display name.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

from guard_fast.methods import knobs, resolve
from guard_fast.pipeline import PipelineConfig
from guard_fast.runtime.bounds import Radius
from guard_fast.runtime.config import overrides_to_dict, parse_args
from guard_fast.runtime.errors import ConfigError
from guard_fast.study.figures import FIGURES

# knob -> the method entry its selection runs train, from the methods' registry (Method.knobs)
KNOBS: dict[str, str] = knobs()


@dataclass
class TableConfig:
    title: str = ""
    """heading of the table in the report"""
    rows: list[str] = field(default_factory=list)
    """'method spec | --section.key=value | @knob' per row (see the module docstring); empty = table not run"""
    ipc: list[int] = field(default_factory=list)
    """images per class, one cell per (row, ipc)"""
    pairs: list[str] = field(default_factory=list)
    """'TREATMENT vs BASELINE' by row label: the GUARD-vs-baseline comparisons with paired confidence intervals"""

    def validate(self) -> None:
        labels = [parse_row(r).label for r in self.rows]
        if len(set(labels)) != len(labels):
            raise ConfigError(f"table rows {labels}: labels must be distinct (set label=NAME in the method spec)")
        if self.rows and (not self.ipc or min(self.ipc) < 1):
            raise ConfigError(f"table {self.title!r}: ipc = {self.ipc}: give one or more values >= 1")
        for p in self.pairs:
            a, b = parse_pair(p)
            if a not in labels or b not in labels:
                raise ConfigError(f"pair {p!r}: both labels must be rows of table {self.title!r} ({labels})")


@dataclass
class SelectionConfig:
    """Hyperparameters chosen on a split carved from the TRAINING images, never on the reported val split."""

    split: str = "carve"
    """carve: a seeded stratified val_fraction of data.path/train is the selection val split, the rest its train
    split; holdout: data.path/train and data.path/holdout as they are (the prepared validation carve)"""
    val_fraction: float = 0.2
    """fraction of each class of data.path/train held out as the selection val split (split = carve)"""
    split_seed: int = 0
    """seed of the stratified selection split (split = carve) or of the holdout subset (split = holdout)"""
    val_images: int = 0
    """split = holdout: score on a seeded stratified choice of this many holdout images (0 = all of them)"""
    ipc: int = 10
    """images per class of the selection runs' distilled sets"""
    seed: int = 0
    """dist.seed of the selection runs (when `seeds` is empty)"""
    seeds: list[int] = field(default_factory=list)
    """dist.seed of every selection run, scores averaged over them (empty = [seed])"""
    score: str = "student"
    """student: the method's student under `attack` at `eps` (the whole method runs); teacher: the method's teacher
    only, its robust accuracy at `eps` as the teacher stage's validation measured it (set the teacher's robust
    evaluation in `overrides`), among candidates whose mean clean accuracy is within `clean_within` of the
    `reference` teacher's"""
    reference: str = ""
    """score = teacher: the method entry whose teacher is the clean reference (the plain teacher)"""
    clean_within: float = 0.02
    """score = teacher: a candidate is eligible when its mean clean accuracy >= the reference's minus this"""
    overrides: list[str] = field(default_factory=list)
    """--section.key=value overrides of every selection run (e.g. the teacher's robust evaluation)"""
    attack: str = "pgd100"
    """score = accuracy under this attack (counted only on clean-correct images) on the selection split"""
    eps: Radius = 4 / 255
    """L-inf radius of the score's attack, [0,1] pixel units"""
    guard: list[str] = field(default_factory=list)
    """GUARD grid, one 'section.key=v1,v2,...' line per key (the grid is their product), e.g. squeeze.objective.beta"""
    pgd_at: list[str] = field(default_factory=list)
    """adversarial-training grid (e.g. squeeze.objective.eps=1/255,2/255,4/255)"""
    grad_norm: list[str] = field(default_factory=list)
    """gradient-norm grid (squeeze.objective.grad_norm_beta=...)"""

    def validate(self) -> None:
        if not 0.0 < self.val_fraction < 1.0:
            raise ConfigError(f"selection.val_fraction = {self.val_fraction}: must be in (0, 1)")
        if self.split not in ("carve", "holdout"):
            raise ConfigError(f"selection.split = {self.split!r}: carve or holdout")
        if self.score not in ("student", "teacher"):
            raise ConfigError(f"selection.score = {self.score!r}: student or teacher")
        if self.score == "teacher":
            if not self.reference:
                raise ConfigError("selection.score = teacher needs selection.reference (the plain teacher's method "
                                  "entry)")
            resolve(self.reference)
        if len(set(self.run_seeds())) != len(self.run_seeds()):
            raise ConfigError(f"selection.seeds = {self.seeds}: distinct seeds")
        overrides_to_dict(PipelineConfig, self.overrides)
        for knob in KNOBS:
            candidates(self, knob)  # raises on malformed lines

    def run_seeds(self) -> list[int]:
        return list(self.seeds) or [self.seed]


@dataclass
class CostConfig:
    config: str = ""
    """bench preset (bench/step.py's BenchConfig TOML) for Table 4; empty = no cost table"""
    overrides: list[str] = field(default_factory=list)
    """--section.key=value overrides of that preset"""
    guard: str = "guard[reuse,updated]"
    """bench row of GUARD (bench/step.py's label: objective[strategy,bn_stats])"""
    baselines: list[str] = field(default_factory=lambda: ["pgd-at[K=10]"])
    """bench rows of the adversarial-training baselines GUARD is compared with"""


@dataclass
class PlanConfig:
    """The pre-registered analysis, written into the config before the main run: the runner refuses the main run
    while it is incomplete, and results.json / report.md carry its hash (a later edit shows as a changed hash)."""

    table: str = "table12"
    """table holding the primary arms (table12, table3 or table5)"""
    pairs: list[str] = field(default_factory=list)
    """the primary family: 'TREATMENT vs BASELINE' row labels of that table (Holm over these)"""
    ipc: int = 10
    """images per class of the primary cells"""
    attack: str = "pgd100"
    """primary endpoint: the students' accuracy under this attack (a name of pipeline.evaluate.attack.names)"""
    eps: float = 0.0
    """L-inf radius of the primary endpoint, [0,1] pixel units; one of pipeline.evaluate.attack.eps (0 = not
    registered yet)"""
    seeds: int = 0
    """n: paired seeds of the main run (len(seeds) must equal it; 0 = not registered yet)"""
    stopping_rule: str = ""
    """in words, fixed in advance: when the study stops (e.g. 'all n seeds, no interim looks')"""
    clean_margin: float = 0.02
    """non-inferiority margin of clean accuracy, accuracy fraction (0.02 = 2 points)"""
    mdd: float = 0.02
    """target minimum detectable difference at `power`, accuracy fraction; also the TOST equivalence margin"""
    alpha: float = 0.05
    """family-wise level (Holm) of the primary tests; level of the one-sided tests"""
    power: float = 0.8
    """power at which the MDD is computed"""
    pilot_seeds: int = 3
    """seeds of the pilot (--pilot), which estimates the paired SD and needs no plan"""
    direction: int = 1
    """claimed sign of TREATMENT - BASELINE on the primary endpoint (+1: treatment more robust)"""

    def missing(self) -> list[str]:
        """The fields the main run needs that are still unset."""
        return [k for k, empty in (("pairs", not self.pairs), ("eps", self.eps <= 0), ("seeds", self.seeds < 2),
                                   ("stopping_rule", not self.stopping_rule.strip())) if empty]


@dataclass
class GatesConfig:
    """Each stage's gate: a stage below its gate stops the study with one line (gate, measured, threshold). A
    threshold of 0 (or kd_row empty) turns that gate off."""

    teacher_min: float = 0.0
    """plain (objective none) teacher's accuracy on the test split >= this, fraction (issue 30: 0.88)"""
    guard_teacher_max_drop: float = 0.0
    """GUARD teacher's test accuracy >= the same seed's plain teacher's minus this, fraction (0.02 = 2 points)"""
    recovered_min: float = 0.0
    """each teacher classifies >= this fraction of its own recovered images (issue 30: 0.90)"""
    kd_row: str = ""
    """label of the row whose student is the KD recipe check (a relabelled real subset); empty = gate off"""
    kd_min: float = 0.0
    """that row's clean accuracy >= this, fraction (the best recipe's accuracy minus a few points)"""

    def validate(self) -> None:
        for k in ("teacher_min", "guard_teacher_max_drop", "recovered_min", "kd_min"):
            if not 0.0 <= getattr(self, k) <= 1.0:
                raise ConfigError(f"gates.{k} = {getattr(self, k)}: a fraction in [0, 1]")


@dataclass
class StudyConfig:
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    """base settings of every run (data, squeeze, recover, train, evaluate); methods, ipc, dist.seed, output.dir are
    set per cell by the study"""
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    """dist.seed of every stage of a cell, one run per seed (>= 3 for the confidence intervals to mean much)"""
    runs_dir: str = "runs/study-digits"
    """cache: one pipeline folder per (seed, row settings), the selection runs, the selection data split"""
    results_dir: str = "results/study-digits"
    """report.md, results.json, PNG charts"""
    readme: str = "README.md"
    """file whose '<!-- NAME:begin -->' ... '<!-- NAME:end -->' block (NAME = results_dir's folder name) is rewritten
    with the main table; empty = none"""
    report_eps: Radius = 4 / 255
    """L-inf radius of the README's main table, [0,1] pixel units"""
    confidence: float = 0.95
    """level of the paired t-intervals"""
    report_only: bool = False
    """do not run anything: rewrite the report from the cells finished so far (e.g. while a study runs)"""
    quick: bool = False
    """apply quick_overrides (the smoke preset) on top of the file"""
    quick_overrides: list[str] = field(default_factory=list)
    """--key=value overrides (study-level keys) that make the quick smoke preset"""
    table12: TableConfig = field(default_factory=TableConfig)
    """Tables 1/2: GUARD vs SRe2L, SRe2L+Adv (MTT, TESLA when registered)"""
    table3: TableConfig = field(default_factory=TableConfig)
    """Table 3: gradient-norm ablation at several lambda_g next to GUARD"""
    table5: TableConfig = field(default_factory=TableConfig)
    """Table 5: method vs GUARD(method) (SRe2L, CDA; DC when registered)"""
    selection: SelectionConfig = field(default_factory=SelectionConfig)
    cost: CostConfig = field(default_factory=CostConfig)
    """Table 4: time/iter and peak memory of GUARD vs adversarial training (bench/step.py, side by side)"""
    figures: list[str] = field(default_factory=list)
    """extra figures from guard_fast.study.figures.FIGURES (Fig. 2, curvature, registers there when its stage lands)"""
    plan: PlanConfig = field(default_factory=PlanConfig)
    """the pre-registration (primary endpoint, eps, n, stopping rule, margins, MDD target)"""
    gates: GatesConfig = field(default_factory=GatesConfig)
    """per-stage gates, measured and printed in the report"""
    pilot: bool = False
    """run the pilot: the first plan.pilot_seeds seeds, no plan needed; its report estimates the paired SD"""
    carry_dir: str = ""
    """where each finished job's small files (stage records, results; no weights or images) are kept so that a new
    checkout resumes without rerunning it (guard_fast/study/carry.py): default results_dir/carry (committed with the
    results), "off" to keep nothing"""
    carry_partial_mb: float = 64.0
    """largest unfinished job (MB of what its resume needs: stage outputs, the newest checkpoint) whose folder is
    carried every carry_every_s seconds so that a new checkout resumes it mid-job (guard_fast/study/carry_partial.py);
    0 = carry finished jobs only"""
    carry_every_s: float = 120.0
    """seconds between copies of the running jobs' folders to the partial carry"""
    report_every_s: float = 60.0
    """seconds between the interim reports (report.md, charts, README block) rewritten as jobs finish; the gates are
    checked after every job regardless, a failed gate and the end of the run always write it; 0 = after every job"""
    workers: int = 2
    """pipeline calls (one per seed and row settings) run at once in worker processes of one thread each; 1 = in
    this process, one after another (forced under torchrun, where every stage distributes itself)"""

    def validate(self) -> None:
        if len(self.seeds) < 1 or len(set(self.seeds)) != len(self.seeds):
            raise ConfigError(f"seeds = {self.seeds}: give one or more distinct seeds (>= 3 for the study)")
        if not any(t.rows for t in self.tables().values()):
            raise ConfigError("no table has rows: set table12.rows, table3.rows or table5.rows")
        for t in self.tables().values():
            for r in t.rows:
                for k in parse_row(r).knobs:
                    if not candidates(self.selection, k):
                        raise ConfigError(f"row {r!r} uses @{k} but selection.{k} is empty")
        unknown = sorted(set(self.figures) - set(FIGURES))
        if unknown:
            raise ConfigError(f"figures = {unknown}: registered figures are {sorted(FIGURES) or 'none yet'}")
        if self.carry_partial_mb < 0 or self.carry_every_s <= 0:
            raise ConfigError(f"carry_partial_mb = {self.carry_partial_mb}, carry_every_s = {self.carry_every_s}: "
                              "give a size >= 0 (0 = off) and a period > 0")
        if self.report_every_s < 0:
            raise ConfigError(f"report_every_s = {self.report_every_s}: give seconds >= 0 (0 = after every job)")
        if self.workers < 1:
            raise ConfigError(f"workers = {self.workers}: give 1 (sequential) or more")
        self.gates.validate()
        labels = [parse_row(r).label for t in self.tables().values() for r in t.rows]
        if self.gates.kd_row and self.gates.kd_row not in labels:
            raise ConfigError(f"gates.kd_row = {self.gates.kd_row!r}: not the label of a table row ({labels})")
        self.validate_plan()

    def validate_plan(self) -> None:
        """Whatever part of the plan is set must name real arms, attack, eps and IPC."""
        p = self.plan
        tables = self.tables()
        if p.table not in tables:
            raise ConfigError(f"plan.table = {p.table!r}: one of {', '.join(tables)}")
        t = tables[p.table]
        for pair in p.pairs:
            if pair not in t.pairs:
                raise ConfigError(f"plan.pairs: {pair!r} is not a pair of {p.table} ({t.pairs})")
        if p.pairs and p.ipc not in t.ipc:
            raise ConfigError(f"plan.ipc = {p.ipc}: {p.table} runs ipc {t.ipc}")
        if p.attack not in self.pipeline.evaluate.attack.names:
            raise ConfigError(f"plan.attack = {p.attack!r}: not among pipeline.evaluate.attack.names "
                              f"{self.pipeline.evaluate.attack.names}")
        if p.eps > 0 and not any(abs(p.eps - e) < 1e-9 for e in self.pipeline.evaluate.attack.eps):
            raise ConfigError(f"plan.eps = {p.eps}: not among pipeline.evaluate.attack.eps")
        if p.direction not in (-1, 1):
            raise ConfigError(f"plan.direction = {p.direction}: +1 or -1")
        if not (0 < p.alpha < 0.5 and 0 < p.power < 1 and p.mdd > 0 and p.clean_margin >= 0 and p.pilot_seeds >= 2):
            raise ConfigError("plan: need 0 < alpha < 0.5, 0 < power < 1, mdd > 0, clean_margin >= 0, "
                              "pilot_seeds >= 2")

    def require_plan(self) -> None:
        """The main run's precondition: a complete plan whose n is the number of seeds."""
        missing = self.plan.missing()
        if missing:
            raise ConfigError(f"the main run needs the pre-registered plan: set plan.{', plan.'.join(missing)} "
                              "(or run the pilot with --pilot)")
        if self.plan.seeds != len(self.seeds):
            raise ConfigError(f"plan.seeds = {self.plan.seeds} but seeds lists {len(self.seeds)}: the main run uses "
                              "exactly the pre-registered n")

    def tables(self) -> dict[str, TableConfig]:
        return {"table12": self.table12, "table3": self.table3, "table5": self.table5}


@dataclass(frozen=True)
class Row:
    method: str
    label: str
    overrides: tuple[str, ...]
    knobs: tuple[str, ...]


def parse_row(text: str) -> Row:
    """'spec | --a.b=1 | @guard' -> Row; ConfigError naming the row otherwise."""
    method, *parts = [p.strip() for p in text.split("|")]
    m, _spec, opts = resolve(method)
    overrides, knobs = [], []
    for p in parts:
        if p.startswith("@") and p[1:] in KNOBS:
            knobs.append(p[1:])
        elif p.startswith("--") and "=" in p:
            overrides.append(p)
        else:
            raise ConfigError(f"row {text!r}: part {p!r} is neither --section.key=value nor @knob "
                              f"({', '.join('@' + k for k in KNOBS)})")
    overrides_to_dict(PipelineConfig, overrides)  # syntax check now; keys are checked when the cell is planned
    return Row(method, m.display(opts), tuple(overrides), tuple(knobs))


def parse_pair(text: str) -> tuple[str, str]:
    a, sep, b = text.partition(" vs ")
    if not sep or not a.strip() or not b.strip():
        raise ConfigError(f"pair {text!r}: write 'TREATMENT vs BASELINE' with row labels")
    return a.strip(), b.strip()


def candidates(sel: SelectionConfig, knob: str) -> list[tuple[str, ...]]:
    """The grid of `knob` as override tuples: ['a=1,2', 'b=3'] -> [('--a=1', '--b=3'), ('--a=2', '--b=3')]."""
    axes = []
    for line in getattr(sel, knob):
        key, sep, values = line.partition("=")
        vals = [v.strip() for v in values.split(",") if v.strip()]
        if not sep or not key.strip() or not vals:
            raise ConfigError(f"selection.{knob}: {line!r} should look like section.key=v1,v2")
        axes.append([f"--{key.strip()}={v}" for v in vals])
    return [tuple(c) for c in itertools.product(*axes)] if axes else []


def load_study(argv: list[str], prog: str = "guard-fast study") -> StudyConfig:
    """parse_args, and with --quick (or quick = true in the file) once more with the file's quick_overrides placed
    before the command line's overrides (CLI > quick preset > TOML > defaults)."""
    cfg = parse_args(StudyConfig, argv, prog)
    if cfg.quick:
        cfg = parse_args(StudyConfig, [*cfg.quick_overrides, *argv, "--quick=true"], prog)
    return cfg
