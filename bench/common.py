"""Shared output format of every benchmark: JSON (config, hardware, versions, git SHA, raw samples) + Markdown."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any, Sequence

from guard_fast.runtime.io import atomic_json, atomic_text
from guard_fast.runtime.rundir import environment

RESULTS = Path(__file__).resolve().parent / "results"


def summarize(samples: Sequence[float]) -> dict[str, float]:
    """Median with the p20-p80 spread of a list of measurements."""
    xs = sorted(samples)
    if not xs:
        raise ValueError("no samples")

    def q(p: float) -> float:  # linear interpolation between closest ranks
        pos = p * (len(xs) - 1)
        lo = int(pos)
        hi = min(lo + 1, len(xs) - 1)
        return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)

    return {"median": statistics.median(xs), "p20": q(0.2), "p80": q(0.8), "n": len(xs)}


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    def cell(v: Any) -> str:
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def write_results(name: str, config: dict[str, Any], results: dict[str, Any], header: Sequence[str],
                  rows: Sequence[Sequence[Any]], out_dir: str | Path = RESULTS, notes: str = "",
                  device=None) -> tuple[Path, Path]:
    """Write <out_dir>/<name>.json and <name>.md; returns both paths."""
    out_dir = Path(out_dir)
    env = environment(device)
    payload = {"benchmark": name, "config": config, "environment": env, "results": results}
    json_path = atomic_json(out_dir / f"{name}.json", payload)
    hw = env["hardware"]
    md = [f"# {name}", "", markdown_table(header, rows), ""]
    if notes:
        md += [notes, ""]
    md += [f"- device: {hw.get('gpu') or hw.get('cpu')} ({hw['device']}), torch threads {hw['torch_threads']}",
           "- versions: " + ", ".join(f"{k} {v}" for k, v in env["versions"].items()),
           f"- git: {env['git_sha']}, run {env['started']}",
           "- config: `" + ", ".join(f"{k}={v}" for k, v in config.items()) + "`", ""]
    md_path = atomic_text(out_dir / f"{name}.md", "\n".join(md))
    return json_path, md_path
