"""Copy the demo's report (results tables, chart, image grids) into the README between demo markers.

    python -m bench.demo_readme --run runs/demo      (make demo runs it after the pipeline)

Images are copied to docs/demo/ so the README can show them; the tables come from runs/demo/results.json.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from bench.squeeze_digits import update_readme
from guard_fast.robustness.report import metrics_table, results_table

REPO = Path(__file__).resolve().parent.parent


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", default="runs/demo")
    ap.add_argument("--readme", default=str(REPO / "README.md"))
    args = ap.parse_args(argv)
    run = Path(args.run)
    results = json.loads((run / "results.json").read_text())
    docs = REPO / "docs" / "demo"
    docs.mkdir(parents=True, exist_ok=True)
    shutil.copy(run / "robustness.png", docs / "robustness.png")
    lines = []
    for eps in results["eps"] or [None]:
        rows = [r for r in results["rows"] if r["eps"] == eps]
        lines += [f"Accuracy (%) at L-inf eps = {eps * 255:g}/255 (CW: L2):" if eps else "Accuracy (%):", "",
                  results_table(rows), "", metrics_table(rows), ""]
    lines += ["![robustness](docs/demo/robustness.png)", ""]
    for name, grid in results["grids"].items():  # "GUARD IPC 10" -> its recover grid.png
        slug = name.lower().replace(" ", "-").replace("(", "").replace(")", "").replace("+", "-")
        shutil.copy(run / grid, docs / f"grid-{slug}.png")
        lines += [f"{name}: ![{name}](docs/demo/grid-{slug}.png)", ""]
    if (run / "curvature.png").exists():  # the pipeline's curvature stages (configs/digits/demo.toml enables them)
        shutil.copy(run / "curvature.png", docs / "curvature.png")
        md = (run / "curvature.md").read_text().split("\n## ")
        eig = next(s for s in md if s.startswith("largest input-Hessian eigenvalue"))
        lines += ["Largest input-Hessian eigenvalue at real val images (" + md[0].splitlines()[-1].strip() + "), "
                  "loss / pixel^2; the other curvature measures are in `runs/demo/curvature.md`:", "",
                  *[ln for ln in eig.splitlines() if ln.startswith("|")], "",
                  "![curvature](docs/demo/curvature.png)", ""]
    total = sum(s["seconds"] for s in results["stages"])
    parts = ", ".join(f"{s['stage']} {s['seconds']:.0f} s" for s in results["stages"])
    lines.append(f"Stage time in this run: {total:.0f} s ({parts}).")
    update_readme(Path(args.readme), "\n".join(lines), name="demo")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
