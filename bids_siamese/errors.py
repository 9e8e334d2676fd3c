"""Errors a user can cause, each with a BIDS-Apps exit code (BEP027 draft).

The CLI turns a :class:`UserError` into its exit code and a one-line message, without a
traceback. Anything else is a bug and keeps its traceback.
"""
from __future__ import annotations

EXIT_OK = 0
EXIT_VALIDATION = 16
EXIT_ANALYSIS_LEVEL = 17
EXIT_EMPTY_SELECTION = 18
EXIT_USAGE = 64
EXIT_DATA = 65
EXIT_NO_INPUT = 66
EXIT_CANT_CREATE = 73
EXIT_LOCKED = 75
EXIT_INTERRUPTED = 130
EXIT_TERMINATED = 143

EXIT_CODES = {
    EXIT_OK: "success",
    EXIT_VALIDATION: "the input dataset failed BIDS validation",
    EXIT_ANALYSIS_LEVEL: "unknown analysis level",
    EXIT_EMPTY_SELECTION: "the participant/session/filter selection matched no data",
    EXIT_USAGE: "command-line usage error",
    EXIT_DATA: "bad input data (one or more scans could not be processed)",
    EXIT_NO_INPUT: "input missing (dataset, participant or file not found)",
    EXIT_CANT_CREATE: "cannot create or write the output/work directory (also when it becomes unwritable mid-run)",
    EXIT_LOCKED: "another run is processing the same subject into the same output folder; try again later",
    EXIT_INTERRUPTED: "interrupted (Ctrl-C, SIGINT); worker processes stopped; rerun to resume",
    EXIT_TERMINATED: "terminated (SIGTERM, e.g. scancel or a time limit); worker processes stopped; rerun to resume",
}


class UserError(Exception):
    """An error the user can fix; ``str(err)`` is one line naming the file and the fix."""

    exit_code = EXIT_USAGE

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))


class UsageError(UserError):
    exit_code = EXIT_USAGE


class ValidationError(UserError):
    exit_code = EXIT_VALIDATION


class AnalysisLevelError(UserError):
    exit_code = EXIT_ANALYSIS_LEVEL


class EmptySelectionError(UserError):
    exit_code = EXIT_EMPTY_SELECTION


class BadDataError(UserError):
    """A scan cannot be processed (corrupt, not 3D, NaN, ...). Other scans continue."""

    exit_code = EXIT_DATA


class NoInputError(UserError):
    exit_code = EXIT_NO_INPUT


class CannotCreateError(UserError):
    exit_code = EXIT_CANT_CREATE


class LockedError(UserError):
    """Another live run holds the lock of a selected subject."""

    exit_code = EXIT_LOCKED
