"""One lock per subject and output folder, so two runs never write the same subject's files at once.

Lock files live in ``OUTPUT_DIR/logs/locks/sub-<label>.lock`` (``fcntl``/``flock`` through :mod:`filelock`:
the kernel releases them when a run dies, even by SIGKILL, so there are no stale locks). Next to each lock a
``.json`` names the holder (run id, host, pid, start time) for the message the second run prints. Each held
lock keeps a file descriptor open: a run over more than :data:`MAX_LOCKS` subjects locks the first ones and
warns once.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator, Sequence

from filelock import FileLock, Timeout

from ..errors import CannotCreateError, LockedError
from .derivatives import LOCKS_FOLDER, LOGS_FOLDER

LOG = logging.getLogger("bids_siamese.locks")
#: At most this many subject locks per run (one open file each; the usual limit is 1024 per process).
MAX_LOCKS = 256


def lock_dir(output_dir: Path) -> Path:
    return Path(output_dir) / LOGS_FOLDER / LOCKS_FOLDER


def _holder(info: Path) -> str:
    try:
        data = json.loads(info.read_text())
        return f"run {data['run_id']} (pid {data['pid']} on {data['host']}, since {data['since']})"
    except (OSError, ValueError, KeyError):
        return "another run"


@contextlib.contextmanager
def subject_locks(output_dir: Path, subjects: Sequence[str], run_id: str, timeout: float = 0.0) -> Iterator[None]:
    """Hold the locks of ``subjects`` in ``output_dir`` for the block.

    Raises:
        LockedError: another live run holds one of them (after ``timeout`` seconds); exit 75, nothing written.
        CannotCreateError: the lock folder cannot be created.
    """
    folder = lock_dir(output_dir)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise CannotCreateError(f"cannot create {folder}: {err.strerror}; fix: choose a writable OUTPUT_DIR") from err
    held: list[FileLock] = []
    try:
        ordered = sorted(set(subjects))  # a fixed order: two runs never wait on each other in a cycle
        if len(ordered) > MAX_LOCKS:
            LOG.warning("%d subjects selected: only the first %d are locked against concurrent runs (each lock keeps a "
                        "file open); fix: run large selections in parts, e.g. a job array", len(ordered), MAX_LOCKS)
        for subject in ordered[:MAX_LOCKS]:
            path = folder / f"sub-{subject}.lock"
            lock = FileLock(str(path), timeout=timeout)
            try:
                lock.acquire()
            except Timeout as err:
                raise LockedError(
                    f"sub-{subject} in {output_dir} is being processed by {_holder(path.with_suffix('.json'))}; "
                    f"fix: wait for it to finish (or cancel it), then rerun; lock file {path}"
                ) from err
            except OSError as err:  # a file system without flock support, or too many open files
                LOG.warning("cannot lock %s (%s): concurrent runs on this and the remaining %d subject(s) are not "
                            "protected", path, err, len(set(subjects)) - len(held) - 1)
                break
            held.append(lock)
            info = {"run_id": run_id, "pid": os.getpid(), "host": socket.gethostname(),
                    "since": datetime.now(timezone.utc).isoformat(timespec="seconds")}
            with contextlib.suppress(OSError):
                path.with_suffix(".json").write_text(json.dumps(info) + "\n")
        yield
    finally:
        for lock in reversed(held):
            lock.release()
