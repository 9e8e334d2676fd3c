"""The work directory: how big it is, and ``--clean-workdir`` (remove this run's part of it)."""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Iterable

#: The participant workflow's folder inside the work dir (``init_participant_wf``'s name).
WORKFLOW_FOLDER = "bids_siamese_wf"


def folder_size(path: Path) -> int:
    """Bytes used by the files under ``path`` (0 when absent); links are not followed."""
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except OSError:
                pass
    return total


def human_size(n_bytes: int) -> str:
    """``1536 -> '1.5 kB'`` (powers of 1000, as ``du --si``)."""
    size = float(n_bytes)
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if size < 1000 or unit == "TB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{size:.1f} TB"  # pragma: no cover


def clean_work_dir(work_dir: Path, scan_folders: Iterable[str]) -> bool:
    """Remove the given per-scan folders; remove the whole work dir when nothing else is left in it.

    Folders of scans this run did not process (another run may be using them) are kept. Returns whether the
    work dir itself was removed.
    """
    work_dir = Path(work_dir)
    base = work_dir / WORKFLOW_FOLDER
    for name in scan_folders:
        shutil.rmtree(base / name, ignore_errors=True)
    others = [p for p in base.iterdir() if p.is_dir()] if base.is_dir() else []
    if others:
        return False
    extra = [p for p in work_dir.iterdir() if p.name != WORKFLOW_FOLDER] if work_dir.is_dir() else []
    if extra:  # not only ours (e.g. a -w folder shared with other files): keep it
        shutil.rmtree(base, ignore_errors=True)
        return False
    shutil.rmtree(work_dir, ignore_errors=True)
    return not work_dir.exists()
