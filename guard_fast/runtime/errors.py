"""User-facing errors: the CLI prints them as one line and exits non-zero, without a traceback."""

from __future__ import annotations

import pickle
from contextlib import contextmanager
from typing import Any, Iterator


class GuardFastError(Exception):
    """Bad input a user can fix (a path, a key, a file); the message says what and where."""

    exit_code = 1


class ConfigError(GuardFastError, ValueError):
    """Invalid configuration: unknown key, wrong type, contradictory values. Exit code 2."""

    exit_code = 2


class CheckpointError(GuardFastError):
    """A checkpoint or run-folder file that cannot be used: truncated, garbled, or holding more than plain data."""


@contextmanager
def reading(path: Any, what: str) -> Iterator[None]:
    """One line naming `path` for a file of ours (a manifest, labels.json, buffer.json, state.pt) whose content is not
    what its reader expects: invalid JSON, a missing key, a wrong type or shape, an unloadable tensor file."""
    try:
        yield
    except GuardFastError:
        raise
    except KeyError as e:
        raise GuardFastError(f"{path}: not a valid {what} (missing key {e})") from None
    except (ValueError, TypeError, IndexError, AttributeError, EOFError, RuntimeError, pickle.UnpicklingError) as e:
        first = (str(e).splitlines() or [""])[0][:160]
        raise GuardFastError(f"{path}: not a valid {what} ({type(e).__name__}: {first})") from None
