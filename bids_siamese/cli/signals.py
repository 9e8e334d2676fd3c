"""Signals: SIGTERM/SIGINT stop the run and its worker processes; workers never outlive the main process.

The CLI's side: installing the handlers and the fork hook, and stopping the children at the end. What the
workflow needs (:class:`~bids_siamese.workflows.signals.Interrupted`, the worker set-up, the re-raise after a
swallowed signal) lives in ``workflows/signals.py``, one layer down.

* :func:`handle_signals` turns SIGTERM and SIGINT in the main process into :class:`Interrupted` (a
  ``BaseException``, so no ``except Exception`` in nipype or torch swallows it); the CLI then calls
  :func:`stop_children` and exits with ``128 + signal`` (143, 130) after one line.
* Every process forked from the main process (nipype MultiProc workers, DataLoader workers) asks the kernel
  for SIGKILL when its parent dies (Linux ``prctl(PR_SET_PDEATHSIG)``; elsewhere a thread polls the parent
  id), so a SIGKILL of the main process leaves no orphan holding memory. Forked workers ignore SIGINT:
  Ctrl-C reaches the whole process group, and only the main process reports it.
"""
from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import signal
import threading
import time
from typing import Iterator

from ..workflows.signals import clear_interrupt, interrupt, worker_setup
# cli/main.py still imports Interrupted from here; it should import it from workflows.signals (then drop this line)

_parent_pid: int | None = None
_fork_hook_registered = False


def _before_fork() -> None:
    global _parent_pid
    _parent_pid = os.getpid()


def _after_fork_in_child() -> None:
    if _parent_pid is not None and _parent_pid == _main_pid:
        worker_setup(_parent_pid)


_main_pid: int | None = None


@contextlib.contextmanager
def handle_signals() -> Iterator[None]:
    """Within the block, SIGTERM/SIGINT raise :class:`Interrupted` and forked children die with us.

    Only the main thread can install handlers; elsewhere the block runs unchanged.
    """
    global _main_pid, _fork_hook_registered
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _main_pid = os.getpid()
    clear_interrupt()
    if not _fork_hook_registered and hasattr(os, "register_at_fork"):
        os.register_at_fork(before=_before_fork, after_in_child=_after_fork_in_child)
        _fork_hook_registered = True
    previous = {sig: signal.signal(sig, interrupt) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        _main_pid = None


def stop_children(timeout: float = 5.0) -> int:
    """Terminate (then kill) every child process started through :mod:`multiprocessing`; return how many."""
    # the pool's own thread reports each killed worker's future as an error with a traceback: expected here
    logging.getLogger("concurrent.futures").setLevel(logging.CRITICAL)
    children = multiprocessing.active_children()
    for child in children:
        with contextlib.suppress(Exception):
            child.terminate()
    deadline = time.monotonic() + timeout
    for child in children:
        child.join(max(0.0, deadline - time.monotonic()))
        if child.is_alive():
            with contextlib.suppress(Exception):
                child.kill()
            child.join(1.0)
    return len(children)
