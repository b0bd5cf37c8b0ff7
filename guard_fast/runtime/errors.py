"""User-facing errors: the CLI prints them as one line and exits non-zero, without a traceback."""


class GuardFastError(Exception):
    """Bad input a user can fix (a path, a key, a file); the message says what and where."""

    exit_code = 1


class ConfigError(GuardFastError, ValueError):
    """Invalid configuration: unknown key, wrong type, contradictory values. Exit code 2."""

    exit_code = 2


class CheckpointError(GuardFastError):
    """A checkpoint or run-folder file that cannot be used: truncated, garbled, or holding more than plain data."""
