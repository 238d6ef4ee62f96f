"""The CLI's error types and exit codes. One place (cli.main) turns them into messages.

Exit codes (documented in docs/cli.md):
  0 ok; 1 a check failed (verify/compare gates); 2 usage (bad flags or arguments);
  3 input error (missing, unreadable or unsupported source); 4 format error (a corrupt or
  incompatible kbit file); 5 I/O error (disk full, permissions); 6 Hub error (network,
  not found, auth); 130 interrupted (Ctrl-C).
"""
from __future__ import annotations

from kbitformat.errors import KbitError, KbitFormatError, KbitValueError

EXIT_OK = 0
EXIT_CHECK_FAILED = 1
EXIT_USAGE = 2
EXIT_INPUT = 3
EXIT_FORMAT = 4
EXIT_IO = 5
EXIT_HUB = 6
EXIT_INTERRUPTED = 130


class CliError(KbitError):
    """An error with a message for the user and an exit code."""

    exit_code = EXIT_INPUT

    def __init__(self, message: str, exit_code: int | None = None) -> None:
        super().__init__(message)
        if exit_code is not None:
            self.exit_code = exit_code


class UsageError(CliError):
    exit_code = EXIT_USAGE


class InputError(CliError):
    """A source that is missing, unreadable, truncated or unsupported."""

    exit_code = EXIT_INPUT


class UnsupportedArchitectureError(InputError):
    pass


class OutputError(CliError):
    """Problems writing output: disk full, permission, existing output without --force."""

    exit_code = EXIT_IO


class HubError(CliError):
    exit_code = EXIT_HUB


class CheckFailed(CliError):
    exit_code = EXIT_CHECK_FAILED


def exit_code_for(exc: BaseException) -> int:
    """The exit code for any exception we know how to report."""
    if isinstance(exc, CliError):
        return exc.exit_code
    if isinstance(exc, KbitValueError):
        return EXIT_USAGE
    if isinstance(exc, KbitFormatError):
        return EXIT_FORMAT
    if isinstance(exc, KeyboardInterrupt):
        return EXIT_INTERRUPTED
    if isinstance(exc, OSError):
        return EXIT_IO
    return 1
