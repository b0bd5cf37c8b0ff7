"""The layout's rules, checked on the import graph and the sources: layers import downwards only, stages do not import
each other, nothing imports in a cycle (type-checking imports included), the library does not know its launchers, and
the pipeline and the study never name a method or one of its config sections."""

from __future__ import annotations

import ast
from pathlib import Path

from tests.conftest import REPO

LIB = REPO / "guard_fast"
# stage modules: one per pipeline stage; each may use anything below the stages, never another stage
STAGES = {
    "guard_fast.squeeze.stage": "guard_fast.squeeze",
    "guard_fast.distill.recover": "guard_fast.distill.recover",
    "guard_fast.distill.relabel": "guard_fast.distill.relabel",
    "guard_fast.distill.subset": "guard_fast.distill.subset",
    "guard_fast.distill.experts": "guard_fast.distill.experts",
    "guard_fast.distill.mtt": "guard_fast.distill.mtt",
    "guard_fast.distill.dc": "guard_fast.distill.dc",
    "guard_fast.distill.dm": "guard_fast.distill.dm",
    "guard_fast.student.kd": "guard_fast.student.kd",
    "guard_fast.student.hard": "guard_fast.student.hard",
    "guard_fast.robustness.evaluate": "guard_fast.robustness.evaluate",
    "guard_fast.robustness.curvature": "guard_fast.robustness.curvature",
}
# the library's floors, lowest first: an area imports only its own floor and the ones below
LAYERS = [{"runtime"}, {"models", "data", "attacks"}, {"regularizers"}, {"squeeze", "distill", "student", "robustness"},
          {"methods"}, {"pipeline"}, {"study", "reproduce", "reproduce_carry"}]


def module_name(path: Path) -> str:
    rel = path.relative_to(REPO).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def imports(path: Path) -> set[str]:
    """Absolute module names imported anywhere in the file: function-level imports and `if TYPE_CHECKING:` blocks
    included (a type-only cycle is still a cycle of the design)."""
    tree = ast.parse(path.read_text())
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
            out.update(f"{node.module}.{a.name}" for a in node.names)
    return out


def graph() -> dict[str, set[str]]:
    return {module_name(p): imports(p) for p in LIB.rglob("*.py")}


def area(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def test_no_stage_imports_another_stage():
    g = graph()
    for stage, own in STAGES.items():
        others = [pkg for s, pkg in STAGES.items() if s != stage and pkg != own]
        bad = sorted(m for m in g[stage] for pkg in others if m == pkg or m.startswith(pkg + "."))
        assert not bad, f"{stage} imports another stage: {bad}"


def test_areas_import_only_their_floor_and_below():
    level = {a: i for i, floor in enumerate(LAYERS) for a in floor}
    areas = {area(m) for m in graph() if m != "guard_fast"}
    assert areas <= set(level), f"areas without a floor in LAYERS: {sorted(areas - set(level))}"
    for mod, deps in graph().items():
        if mod == "guard_fast":
            continue
        bad = sorted(d for d in deps if d.startswith("guard_fast.") and level[area(d)] > level[area(mod)])
        assert not bad, f"{mod} (floor {level[area(mod)]}) imports upwards: {bad}"


def test_library_does_not_import_launchers_or_bench():
    for mod, deps in graph().items():
        bad = sorted(d for d in deps if d.split(".")[0] in ("launchers", "bench", "tests"))
        assert not bad, f"{mod} imports {bad}"


def test_no_import_cycles():
    """Over the library, the launchers and the benches together."""
    g = {}
    for root in ("guard_fast", "launchers", "bench", "kernels"):
        g.update({module_name(p): imports(p) for p in (REPO / root).rglob("*.py")})
    mods = set(g)
    edges = {m: {d for d in deps if d in mods and d != m and not m.startswith(d + ".")} for m, deps in g.items()}
    state: dict[str, int] = {}

    def visit(m: str, stack: list[str]) -> None:
        state[m] = 1
        for d in edges[m]:
            if state.get(d) == 1:
                raise AssertionError("import cycle: " + " -> ".join([*stack[stack.index(d):], d]))
            if d not in state:
                visit(d, [*stack, d])
        state[m] = 2

    for m in sorted(mods):
        if m not in state:
            visit(m, [m])


def code_strings_and_attributes(path: Path) -> tuple[set[str], set[str]]:
    """String constants that are not docstrings, and attribute names, of a source file."""
    tree = ast.parse(path.read_text())
    docstrings = {id(n.value) for n in ast.walk(tree) if isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant)}
    strings = {n.value for n in ast.walk(tree)
               if isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in docstrings}
    return strings, {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)}


def test_pipeline_and_study_never_name_a_method_or_its_sections():
    from guard_fast.methods import METHODS, sections

    names = set(METHODS)
    own = {"data", "dist", "output", "evaluate", "curvature"}  # the pipeline's shared sections
    method_sections = set(sections()) - own
    for path in [LIB / "pipeline.py", *sorted((LIB / "study").glob("*.py"))]:
        strings, attributes = code_strings_and_attributes(path)
        named = sorted(s for s in strings if s in names or any(s.startswith(n + ":") for n in names))
        assert not named, f"{path.relative_to(REPO)} names methods {named}: read them from guard_fast.methods"
        reads = sorted(attributes & method_sections)
        assert not reads, f"{path.relative_to(REPO)} reads method sections {reads} by name"
