"""Signals: SIGTERM/SIGINT stop the run and its worker processes; workers never outlive the main process.

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
import ctypes
import ctypes.util
import logging
import multiprocessing
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Iterator

PR_SET_PDEATHSIG = 1
#: How often a worker without ``prctl`` checks that its parent is alive (seconds).
PARENT_POLL_S = 1.0

_parent_pid: int | None = None
_fork_hook_registered = False


class Interrupted(BaseException):
    """The main process received SIGTERM or SIGINT."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum

    @property
    def signal_name(self) -> str:
        return signal.Signals(self.signum).name


#: The signal that interrupted the run, kept in case a library turned the :class:`Interrupted` into its own error
#: (nipype's Linear plugin reports it as a failed node).
_received: int | None = None


def _raise_interrupted(signum, frame):  # noqa: ARG001 - signal handler signature
    global _received
    _received = signum
    raise Interrupted(signum)


def raise_if_interrupted() -> None:
    """Raise :class:`Interrupted` again when a signal arrived inside :func:`handle_signals` and was swallowed."""
    if _received is not None:
        raise Interrupted(_received)


def _set_parent_death_signal(sig: int) -> bool:
    """Ask Linux to send ``sig`` to this process when its parent exits; False where unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        return libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def worker_setup(parent_pid: int) -> None:
    """Make the calling (child) process die with ``parent_pid``; ignore SIGINT, default SIGTERM.

    Run automatically after every ``os.fork`` of the main process (see :func:`handle_signals`); usable as
    (part of) a ``ProcessPoolExecutor`` initializer for spawn/forkserver workers.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    if not _set_parent_death_signal(signal.SIGKILL):
        threading.Thread(target=_watch_process, args=(parent_pid,), daemon=True, name="watch-parent").start()
    if os.getppid() != parent_pid:  # the parent died before the death signal was armed
        os._exit(128 + signal.SIGTERM)


def _process_alive(pid: int) -> bool:
    """Whether ``pid`` runs; a zombie (killed, not yet reaped by its parent) counts as gone."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        return state not in ("Z", "X")
    except FileNotFoundError:
        return False
    except OSError:  # no /proc: ask the kernel
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            pass
        return True


def _watch_process(pid: int) -> None:
    """Exit as soon as process ``pid`` is gone (polled every PARENT_POLL_S seconds)."""
    while _process_alive(pid):
        time.sleep(PARENT_POLL_S)
    os._exit(128 + signal.SIGTERM)


def pool_worker_initializer(cwd: str, main_pid: int) -> None:
    """Initializer of MultiProc workers started by spawn or a forkserver (no ``os.fork`` of the main process,
    so :func:`_after_fork_in_child` never runs there): nipype's own set-up, then the worker dies with the main
    process. A spawned worker is the main process's child (:func:`worker_setup`). A forkserver worker is the
    forkserver's child, and the forkserver waits for its workers before it exits, so such a worker watches
    the main process itself.
    """
    os.chdir(cwd)
    os.environ["NIPYPE_NO_ET"] = "1"  # as nipype's process_initializer
    if os.getppid() == main_pid:
        worker_setup(main_pid)
        return
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    threading.Thread(target=_watch_process, args=(main_pid,), daemon=True, name="watch-main").start()


@contextlib.contextmanager
def workers_die_with_us(plugin_args: dict) -> Iterator[None]:
    """While nipype's MultiProc starts its pool, use :func:`pool_worker_initializer` for spawn/forkserver
    workers (forked ones are covered by the fork hook of :func:`handle_signals`)."""
    if plugin_args.get("mp_context") not in ("spawn", "forkserver"):
        yield
        return
    import functools

    from nipype.pipeline.plugins import multiproc

    original = multiproc.process_initializer
    main_pid = os.getpid()
    # the pool calls initializer(cwd): bind the main process's pid (picklable: a partial of a module function)
    multiproc.process_initializer = functools.partial(pool_worker_initializer, main_pid=main_pid)
    try:
        yield
    finally:
        multiproc.process_initializer = original


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
    global _main_pid, _fork_hook_registered, _received
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _main_pid = os.getpid()
    _received = None
    if not _fork_hook_registered and hasattr(os, "register_at_fork"):
        os.register_at_fork(before=_before_fork, after_in_child=_after_fork_in_child)
        _fork_hook_registered = True
    previous = {sig: signal.signal(sig, _raise_interrupted) for sig in (signal.SIGTERM, signal.SIGINT)}
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
