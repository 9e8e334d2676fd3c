"""Failures as data: what the run's summary says about a scan that did not finish.

A failed step leaves a failure record in its node's folder (``failure.json``, written by
:class:`~bids_siamese.interfaces.base.StepInterface`; the MultiProc plugin writes one for a node whose worker
process died): node, error class, one-line message, exit code. After the run, :func:`scan_failure` turns the
earliest record of a scan that did not finish into a :class:`ScanFailure`; the CLI prints its line and exits
with its code. Records are cleared before each run (:func:`clear_failure_records`), so a record read afterwards
is this run's.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, NamedTuple

from ..errors import EXIT_DATA
from ..interfaces.base import FAILURE_FILE
from .plugin import DISK_ERRORS, find_disk_fault

LOG = logging.getLogger("bids_siamese.participant")

#: The line of a scan that did not finish and left no failure record (e.g. a node nipype itself could not run).
NO_RECORD = "did not finish; see the crash files"


class ScanFailure(NamedTuple):
    """A scan that did not finish: its name, the one-line reason, the exit code it calls for, and the failed
    node and error class (None when no record said)."""

    name: str
    message: str
    exit_code: int = EXIT_DATA
    node: str | None = None
    error: str | None = None

    def as_record(self) -> dict[str, Any]:
        """The failure as a JSON-ready dict: ``scan``, ``node``, ``error``, ``message``, ``exit_code``."""
        return {"scan": self.name, "node": self.node, "error": self.error, "message": self.message,
                "exit_code": self.exit_code}


def clear_failure_records(scan_dirs: list[Path]) -> int:
    """Remove earlier runs' failure records under the scans' workflow folders; return how many."""
    removed = 0
    for folder in scan_dirs:
        for path in Path(folder).rglob(FAILURE_FILE) if Path(folder).is_dir() else []:
            path.unlink()
            removed += 1
    return removed


def failure_records(scan_dir: Path) -> list[dict[str, Any]]:
    """The failure records under one scan's workflow folder, earliest first (the first failure is the cause;
    nodes after it never ran). A record that cannot be read is named at WARNING and left out."""
    found = []
    for path in Path(scan_dir).rglob(FAILURE_FILE) if Path(scan_dir).is_dir() else []:
        try:
            found.append((path.stat().st_mtime_ns, str(path), json.loads(path.read_text())))
        except (OSError, ValueError) as err:
            LOG.warning("cannot read the failure record %s (%s); its scan is reported without it", path, err)
    return [record for _, _, record in sorted(found)]


def scan_failure(name: str, records: list[dict[str, Any]]) -> ScanFailure:
    """The :class:`ScanFailure` of scan ``name`` from its failure records (:data:`NO_RECORD` without one).

    Examples:
        >>> scan_failure("sub-01_T1w", [{"node": "conform", "error": "BadDataError", "message": "m; fix: f",
        ...                              "exit_code": 65}])
        ScanFailure(name='sub-01_T1w', message='m; fix: f', exit_code=65, node='conform', error='BadDataError')
        >>> scan_failure("sub-01_T1w", []).message
        'did not finish; see the crash files'
    """
    if not records:
        return ScanFailure(name, NO_RECORD)
    first = records[0]
    return ScanFailure(name, str(first["message"]), int(first.get("exit_code", EXIT_DATA)), first.get("node"),
                       first.get("error"))


def disk_fault(records: list[dict[str, Any]]) -> tuple[int, str, str | None] | None:
    """``(errno, strerror, path or None)`` when a failure record shows a full or read-only disk.

    Examples:
        >>> disk_fault([{"error": "OSError", "errno": 28, "filename": "/w/a.nii.gz", "message": "..."}])
        (28, 'No space left on device', '/w/a.nii.gz')
        >>> disk_fault([{"error": "ValueError", "message": "nope"}]) is None
        True
    """
    reasons = dict(DISK_ERRORS)
    for record in records:
        if record.get("errno") in reasons:
            return int(record["errno"]), reasons[record["errno"]], record.get("filename")
    return None


def crash_file_disk_fault(crash_dir: Path) -> tuple[int, str, str | None] | None:
    """A full or read-only disk named in nipype's crash files: the fallback for a failure that could not leave
    its record (the full disk that made the step fail held the node's folder too)."""
    for crash in sorted(Path(crash_dir).glob("crash-*.txt")) if Path(crash_dir).is_dir() else []:
        fault = find_disk_fault(crash.read_text(errors="replace"))
        if fault is not None:
            return fault
    return None
