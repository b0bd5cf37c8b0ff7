"""`guard-fast <command> [args]`: one console script over the launchers (each is also runnable as a script)."""

from __future__ import annotations

import importlib
import json
import os
import sys
import time
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
    "dm": "launchers.dm",
    "train": "launchers.train",
    "train-hard": "launchers.train_hard",
    "evaluate": "launchers.evaluate",
    "curvature": "launchers.curvature",
    "pipeline": "launchers.pipeline",
    "bench": "launchers.bench",
    "study": "launchers.study",
    "reproduce": "launchers.reproduce",
    "torchrun": "launchers.torchrun",
}


def run(main: Callable[[list[str]], int | None], argv: list[str] | None = None, prog: str = "guard-fast",
        entry: bool | None = None) -> int:
    """`_run`, then, when this is the process's entry point (`entry`; by default: argv read from sys.argv) in one rank
    of a multi-process job, the end of the process (see runtime/distributed.teardown): output flushed, exit code
    kept, no interpreter teardown of the process group."""
    code = _run(main, argv, prog)
    from guard_fast.runtime.distributed import multi_process

    if multi_process() and (argv is None if entry is None else entry):
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


def _run(main: Callable[[list[str]], int | None], argv: list[str] | None = None, prog: str = "guard-fast") -> int:
    """The one error boundary: call a launcher's main; a user error (bad config, missing or corrupt file), a
    file-system error (disk full, no permission, a file where a folder should be), a data loader worker's error and a
    lost peer rank become one line on stderr and a non-zero exit code (under torchrun, also the rank's error file)."""
    try:
        return int(main(sys.argv[1:] if argv is None else argv) or 0)
    except KeyboardInterrupt:
        say(f"{prog}: interrupted")
        return 130
    except Exception as e:
        line, code = one_line(e)
        if line is None:
            raise
        say(f"{prog}: error: {line}")
        record_error(f"{prog}: {line}", code)
        return code


def say(line: str) -> None:
    """`line` and its newline on stderr in one write: print() writes them apart, and the ranks of a job share one
    stderr, so another rank's line could land between them (two ranks' errors on one line)."""
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


def one_line(e: BaseException) -> tuple[str | None, int]:
    """(one line, exit code) for an error the user can act on; (None, 1) for a bug (its traceback is shown)."""
    text = str(e)
    if "DataLoader worker process" in text:
        # torch re-raises a worker's exception with the worker's traceback in its message; its last line is
        # "module.Type: message"
        last = next((x for x in reversed(text.splitlines()) if x.strip()), text)
        kind, _, message = last.partition(": ")
        if isinstance(e, GuardFastError) or kind.endswith("GuardFastError"):
            return message or last, getattr(e, "exit_code", 1)
        return f"a data loader worker failed: {kind.rsplit('.', 1)[-1]}: {message}".rstrip(": "), 1
    if isinstance(e, GuardFastError):
        return (text.splitlines() or [type(e).__name__])[0], e.exit_code
    if isinstance(e, OSError):
        where = ": ".join(str(f) for f in (e.filename, e.filename2) if f is not None)
        return f"{e.strerror or text.splitlines()[0]}{': ' + where if where else ''}", 1
    if isinstance(e, RuntimeError):  # a collective failed: another rank died, a node was lost, dist.timeout_s passed
        from guard_fast.runtime.distributed import lost_ranks

        return lost_ranks(e), 1
    return None, 1


def record_error(line: str, code: int) -> None:
    """Under torchrun, the rank's error file (TORCHELASTIC_ERROR_FILE): torchrun's failure summary and
    `launchers/torchrun.py` then show this line rather than '<N/A>'."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path:
        return
    try:
        with open(path, "w") as f:
            json.dump({"message": {"message": line, "extraInfo": {"py_callstack": "", "timestamp":
                                                                   str(int(time.time()))}}}, f)
    except OSError:
        pass


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
    return run(module.main, rest, prog=f"guard-fast {cmd}", entry=True)


if __name__ == "__main__":
    raise SystemExit(main())
