"""`guard-fast <command> [args]`: one console script over the launchers (each is also runnable as a script)."""

from __future__ import annotations

import importlib
import sys
from typing import Callable

from guard_fast.runtime.errors import GuardFastError

# command -> launcher module with `main(argv) -> int`; plain dict, no plugin magic.
COMMANDS = {
    "data": "launchers.data",
    "squeeze": "launchers.squeeze",
    "recover": "launchers.recover",
    "experts": "launchers.experts",
    "mtt": "launchers.mtt",
    "relabel": "launchers.relabel",
    "dc": "launchers.dc",
    "train": "launchers.train",
    "train-hard": "launchers.train_hard",
    "evaluate": "launchers.evaluate",
    "curvature": "launchers.curvature",
    "pipeline": "launchers.pipeline",
    "bench": "launchers.bench",
    "study": "launchers.study",
    "reproduce": "launchers.reproduce",
}


def run(main: Callable[[list[str]], int | None], argv: list[str] | None = None, prog: str = "guard-fast") -> int:
    """Call a launcher's main; a user error (bad config, missing or corrupt file) or a file-system error (disk full,
    no permission, a file where a folder should be) becomes one line on stderr and a non-zero exit code."""
    try:
        return int(main(sys.argv[1:] if argv is None else argv) or 0)
    except GuardFastError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return e.exit_code
    except OSError as e:
        where = ": ".join(str(f) for f in (e.filename, e.filename2) if f is not None)
        print(f"{prog}: error: {e.strerror or e}{': ' + where if where else ''}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except RuntimeError as e:  # a collective failed: another rank died, a node was lost, dist.timeout_s passed
        from guard_fast.runtime.distributed import lost_ranks

        if (line := lost_ranks(e)) is None:
            raise
        print(f"{prog}: error: {line}", file=sys.stderr)
        return 1


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: guard-fast <command> [--config FILE.toml] [--section.key=value ...]\n\ncommands: "
              + ", ".join(COMMANDS) + "\n\n'guard-fast <command> --help' lists the command's keys.")
        return 0 if argv else 2
    cmd, rest = argv[0], argv[1:]
    if cmd not in COMMANDS:
        print(f"guard-fast: error: unknown command {cmd!r}; valid: {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    try:
        module = importlib.import_module(COMMANDS[cmd])
    except ModuleNotFoundError as e:
        if e.name == COMMANDS[cmd]:
            print(f"guard-fast: error: command {cmd!r} is not available in this build", file=sys.stderr)
            return 2
        raise
    return run(module.main, rest, prog=f"guard-fast {cmd}")


if __name__ == "__main__":
    raise SystemExit(main())
