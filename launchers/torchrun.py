"""`guard-fast torchrun [torchrun arguments] launchers/<stage>.py [stage arguments]`: torchrun, ending in one line.

Plain `torchrun` ends a failed job with its own ChildFailedError traceback (about 90 lines) printed after the ranks'
one-line errors. This runs the same elastic launcher (torch.distributed.run, same arguments) and, when a rank fails,
prints as the last line which rank failed first and its error (read from the rank's error file, which
launchers/cli.py writes under torchrun), then exits with that rank's exit code.
"""

from __future__ import annotations

import sys

from launchers.cli import run


def main(argv: list[str]) -> int:
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args
    from torch.distributed.run import run as torchrun

    if not argv:
        print("usage: guard-fast torchrun [torchrun arguments] launchers/<stage>.py [stage arguments]",
              file=sys.stderr)
        return 2
    try:
        torchrun(parse_args(argv))
    except ChildFailedError as e:
        rank, failure = e.get_first_failure()
        message = failure.message.get("message") if isinstance(failure.message, dict) else failure.message
        if not failure.error_file_data or not message:  # no error file: a crash, a signal, a bug's traceback above
            message = (f"exit code {failure.exitcode}" if failure.exitcode > 0
                       else f"signal {failure.signal_name()}")
        others = sorted(r for r in e.failures if r != rank)
        after = f"; rank(s) {', '.join(map(str, others))} stopped with it" if others else ""
        print(f"guard-fast torchrun: rank {rank} failed: {message}{after}",
              file=sys.stderr)
        return failure.exitcode if failure.exitcode > 0 else 1
    return 0


if __name__ == "__main__":
    sys.exit(run(main, prog="guard-fast torchrun"))
