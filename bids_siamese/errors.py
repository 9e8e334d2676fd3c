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
    """An error the user can fix; ``str(err)`` is one line naming the file and the fix.

    A subclass names its exit code in its class line: ``class UsageError(UserError, exit_code=EXIT_USAGE)``.
    """

    exit_code = EXIT_USAGE

    def __init_subclass__(cls, exit_code: int | None = None, **kwargs):
        super().__init_subclass__(**kwargs)
        if exit_code is not None:
            cls.exit_code = exit_code

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))


class UsageError(UserError, exit_code=EXIT_USAGE):
    """A wrong option, option value or combination of options."""


class ValidationError(UserError, exit_code=EXIT_VALIDATION):
    """The input dataset fails BIDS validation."""


class AnalysisLevelError(UserError, exit_code=EXIT_ANALYSIS_LEVEL):
    """An analysis level other than ``participant`` or ``group``."""


class EmptySelectionError(UserError, exit_code=EXIT_EMPTY_SELECTION):
    """The participant, session or filter selection matches no data."""


class BadDataError(UserError, exit_code=EXIT_DATA):
    """A scan cannot be processed (corrupt, not 3D, NaN, ...). Other scans continue."""


class NoInputError(UserError, exit_code=EXIT_NO_INPUT):
    """A dataset, participant or file that is needed is missing."""


class CannotCreateError(UserError, exit_code=EXIT_CANT_CREATE):
    """The output or work folder cannot be created or written."""


class LockedError(UserError, exit_code=EXIT_LOCKED):
    """Another live run holds the lock of a selected subject."""


class WorkerDiedError(UserError, exit_code=EXIT_DATA):
    """A worker process died while it ran a node (SIGKILL by the OOM killer, a segfault): that scan fails."""


class OutOfMemoryError(UserError, exit_code=EXIT_DATA):
    """A node ran out of memory (``MemoryError``, e.g. under ``ulimit -v`` or a memory cgroup)."""
