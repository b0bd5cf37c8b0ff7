"""The layout's rules, checked on the import graph: stages do not import each other, the library does not know its
launchers, and the data package has no import cycle."""

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
    "guard_fast.distill.experts": "guard_fast.distill.experts",
    "guard_fast.distill.mtt": "guard_fast.distill.mtt",
    "guard_fast.distill.dc": "guard_fast.distill.dc",
    "guard_fast.student.kd": "guard_fast.student.kd",
    "guard_fast.student.hard": "guard_fast.student.hard",
    "guard_fast.robustness.evaluate": "guard_fast.robustness.evaluate",
    "guard_fast.robustness.curvature": "guard_fast.robustness.curvature",
}


def module_name(path: Path) -> str:
    rel = path.relative_to(REPO).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def imports(path: Path) -> set[str]:
    """Absolute module names imported anywhere in the file (function-level imports too; `if TYPE_CHECKING:` blocks,
    which never run, excluded)."""
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING":
            node.body = []
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


def test_no_stage_imports_another_stage():
    g = graph()
    for stage, own in STAGES.items():
        others = [pkg for s, pkg in STAGES.items() if s != stage and pkg != own]
        bad = sorted(m for m in g[stage] for pkg in others if m == pkg or m.startswith(pkg + "."))
        assert not bad, f"{stage} imports another stage: {bad}"


def test_library_does_not_import_launchers_or_bench():
    for mod, deps in graph().items():
        bad = sorted(d for d in deps if d.split(".")[0] in ("launchers", "bench", "tests"))
        assert not bad, f"{mod} imports {bad}"


def test_no_import_cycles_in_the_library():
    g = graph()
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
