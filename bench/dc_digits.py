"""results/dc-digits.{json,md}: DC vs GUARD(DC) on the bundled digits, from a finished pipeline run folder.

    guard-fast pipeline --config configs/digits/pipeline-dc.toml [overrides]   # then:
    PYTHONPATH=. python -m bench.dc_digits --run runs/dc-digits --command "<the pipeline command>" --wall-s N

Reads the run's results.json (accuracy rows per method, IPC and eps) and its resolved config, and writes one table
(clean and attacked accuracy at every eps) with the settings and the command beside the numbers.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from bench.common import markdown_table, write_results

RESULTS = Path(__file__).resolve().parent.parent / "results"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", required=True, help="the pipeline's output.dir")
    p.add_argument("--command", required=True, help="the command that produced it (stated in the result)")
    p.add_argument("--wall-s", type=float, default=0.0, help="wall time of that command (budget used)")
    args = p.parse_args(argv)
    run = Path(args.run)
    summary = json.loads((run / "results.json").read_text())
    config = json.loads((run / "config.json").read_text())
    attacks = [a for a in ("pgd100", "square", "autoattack", "cw", "mim") if a in summary["rows"][0]]
    eps = summary["eps"]
    header = ["method", "IPC", "clean %"] + [f"{a} {e * 255:g}/255 %" for a in attacks for e in eps]
    table: dict[tuple[str, str], list] = {}
    for r in summary["rows"]:
        name, ipc = r["label"].rsplit(" IPC ", 1)
        row = table.setdefault((name, ipc), [name, int(ipc), round(100 * r["clean"], 2)] + [None] * (len(header) - 3))
        for i, a in enumerate(attacks):
            row[3 + i * len(eps) + eps.index(r["eps"])] = round(100 * r[a], 2)
    rows = sorted(table.values(), key=lambda row: (row[1], row[0]))
    report = (run / "report.md").read_text()
    settings = report.split("## Settings", 1)[1].split("##", 1)[0].strip()
    notes = "\n".join([f"Command: `{args.command}` (wall time {args.wall_s / 60:.1f} min on a 2-core CPU shared "
                       "with other jobs; load average 8-19 during the run, so times are not representative).",
                       "", "Settings (from the run's report.md):", "", settings, "",
                       "Accuracy on a seeded subset of the real val split; attacked accuracy counts images that are "
                       "also correct when clean. One seed, one student per set: differences of a few points are "
                       "within noise at this size."])
    stages = markdown_table(["stage", "cached", "seconds"], [[s["stage"], s["cached"], s["seconds"]]
                                                              for s in summary["stages"]])
    write_results("dc-digits", {"run": str(run), "command": args.command, "wall_s": args.wall_s},
                  {"rows": summary["rows"], "table": rows, "header": header, "stages": summary["stages"],
                   "pipeline_config": config}, header, rows, out_dir=RESULTS, notes=notes + "\n\n" + stages)


if __name__ == "__main__":
    main()
