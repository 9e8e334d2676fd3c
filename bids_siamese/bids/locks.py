"""One lock per subject and output folder, so two runs never write the same subject's files at once.

Lock files live in ``OUTPUT_DIR/logs/locks/sub-<label>.lock`` (``fcntl``/``flock`` through :mod:`filelock`:
the kernel releases them when a run dies, even by SIGKILL, so there are no stale locks). Next to each lock a
``.json`` names the holder (run id, host, pid, start time) for the message the second run prints.
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

LOG = logging.getLogger("bids_siamese.locks")


def lock_dir(output_dir: Path) -> Path:
    return Path(output_dir) / "logs" / "locks"


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
        for subject in sorted(set(subjects)):  # a fixed order: two runs never wait on each other in a cycle
            path = folder / f"sub-{subject}.lock"
            lock = FileLock(str(path), timeout=timeout)
            try:
                lock.acquire()
            except Timeout as err:
                raise LockedError(
                    f"sub-{subject} in {output_dir} is being processed by {_holder(path.with_suffix('.json'))}; "
                    f"fix: wait for it to finish (or cancel it), then rerun; lock file {path}"
                ) from err
            except OSError as err:  # e.g. a file system without flock support
                LOG.warning("cannot lock %s (%s): concurrent runs on sub-%s are not protected", path, err, subject)
                continue
            held.append(lock)
            info = {"run_id": run_id, "pid": os.getpid(), "host": socket.gethostname(),
                    "since": datetime.now(timezone.utc).isoformat(timespec="seconds")}
            with contextlib.suppress(OSError):
                path.with_suffix(".json").write_text(json.dumps(info) + "\n")
        yield
    finally:
        for lock in reversed(held):
            lock.release()
