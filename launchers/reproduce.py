"""guard-fast reproduce: published Fashion-MNIST cells under DC's protocol (guard_fast/reproduce.py).

    guard-fast reproduce --cells random-real:1,random-real:10 --draws 2 --models 4 --procs 2
    guard-fast reproduce --cells dsa:1 --draws 1 --models 2
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from guard_fast.runtime.errors import GuardFastError
from launchers.cli import run


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2, like config errors
        raise GuardFastError(f"{self.prog}: {message}")


def main(argv: list[str]) -> int:
    p = _Parser(prog="guard-fast reproduce", description="reproduce published cells (docs/reproduction.md)")
    p.add_argument("--cells", default="random-real:1,random-real:10,random-real:50,dc:1",
                   help="METHOD:IPC list, METHOD in random-real, dc, dsa")
    p.add_argument("--preset", default="configs/fashion-mnist/pipeline-dc.toml",
                   help="pipeline preset whose data, dc and train_hard sections define the protocol")
    p.add_argument("--draws", type=int, default=5, help="sets per cell (DC's num_exp: 5)")
    p.add_argument("--models", type=int, default=20, help="students per set (DC's num_eval: 20)")
    p.add_argument("--procs", type=int, default=2, help="worker processes, one thread each (1 or 2)")
    p.add_argument("--root", default="runs/reproduce-fashion-mnist", help="cache folder (units, sets, students)")
    p.add_argument("--report", default="results/reproduce-fashion-mnist",
                   help="report path without suffix (.json and .md are written)")
    if not argv:  # the defaults are hours of CPU: name the cells to run
        p.print_usage(sys.stderr)
        print(f"{p.prog}: error: no arguments; name the cells, e.g. --cells random-real:1 (docs/reproduction.md)",
              file=sys.stderr)
        raise SystemExit(2)
    args, overrides = p.parse_known_args(argv)
    bad = [o for o in overrides if not o.startswith("--")]
    if bad or args.draws < 1 or args.models < 1:
        raise GuardFastError(f"unexpected {bad}: extra arguments are --section.key=value preset overrides; "
                             "--draws and --models must be >= 1")
    from guard_fast.reproduce import parse_cells, run_cells

    command = "guard-fast reproduce " + shlex.join(argv)
    out = run_cells(args.preset, overrides, Path(args.root), parse_cells(args.cells), args.draws, args.models,
                    args.procs, Path(args.report), command)
    for r in out["cells"]:
        if r["mean"] is not None:
            print(f"{r['cell']}: {r['mean']:.2f} +- {r['sd']:.2f} % over {r['units_done']} units "
                  f"(published {r['published']}), {r['cpu_s'] / 3600:.2f} CPU h")
    return 0


if __name__ == "__main__":
    sys.exit(run(main, prog="guard-fast reproduce"))
