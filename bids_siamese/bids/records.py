"""Per-scan records: the completion record each scan writes last (``*_desc-status_qc.json``) and the reader of
the orientation QC record (``*_desc-orientation_qc.json``); the names come from :mod:`bids_siamese.bids.derivatives`."""
from __future__ import annotations

import json
import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence

from .. import __version__
from .derivatives import cannot_write, write_json


def read_qc_record(path: Path | str) -> dict[str, Any] | None:
    """A per-scan QC record (``*_desc-orientation_qc.json``) as a dict; None when the file does not exist.

    Raises:
        OSError: the file exists but cannot be read.
        ValueError: it is not JSON, or not a JSON object.
    """
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        return None
    record = json.loads(text)
    if not isinstance(record, dict):
        raise ValueError(f"a JSON object was expected, not {type(record).__name__}")
    return record


# --------------------------------------------------------------------------------------------------
# Completion records: one per scan, written after every other output of the scan
# --------------------------------------------------------------------------------------------------

#: ``status`` values of a completion record and of ``group_orientation.tsv``.
STATUS_OK, STATUS_FAILED, STATUS_MISSING = "ok", "failed", "missing"


def write_completion_record(output_dir: Path, rel: Path, *, status: str, scan: str, run_id: str,
                            files: Sequence[str] = (), reason: str | None = None) -> Path:
    """Write ``<source>_desc-status_qc.json``: the scan's outcome and the size of every file it wrote.

    Written last, after the scan's derivatives, figures and the subject report: a scan without this record
    (or with a listed file missing or of another size) is incomplete.
    """

    output_dir = Path(output_dir)
    listed = []
    for name in files:
        listed.append({"path": str(name), "size": (output_dir / name).stat().st_size})
    record = {
        "status": status,
        "reason": reason,
        "scan": scan,
        "run_id": run_id,
        "version": __version__,
        "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "files": listed,
    }
    return write_json(output_dir / rel, record)


def remove_completion_record(output_dir: Path, rel: Path) -> None:
    """Forget a scan's completion before its outputs are rewritten (a killed rewrite leaves none)."""
    try:
        (Path(output_dir) / rel).unlink()
    except FileNotFoundError:
        pass
    except OSError as err:
        raise cannot_write(Path(output_dir) / rel, err) from err


def check_completion_record(output_dir: Path, rel: Path) -> tuple[str, str | None]:
    """``(status, reason)`` of one scan from its completion record: ok, failed or missing."""
    path = Path(output_dir) / rel
    try:
        record = json.loads(path.read_text())
    except FileNotFoundError:
        return STATUS_MISSING, "no completed participant-level results (never run, or the run was interrupted)"
    except (OSError, ValueError) as err:
        return STATUS_MISSING, f"unreadable completion record {path.name} ({err})"
    if record.get("status") != STATUS_OK:
        return STATUS_FAILED, str(record.get("reason") or "failed at the participant level")
    root = os.fspath(output_dir)
    for item in record.get("files", []):
        try:  # os.stat of a joined string: a Path per listed file cost more than the stat at 10,000 scans
            size = os.stat(os.path.join(root, item["path"])).st_size
        except OSError:
            return STATUS_MISSING, f"{item['path']} was deleted after the participant run"
        if size != item["size"]:
            return STATUS_MISSING, f"{item['path']} changed after the participant run ({size} != {item['size']} bytes)"
    return STATUS_OK, None
