"""Worker processes die with the main process; a signal that stopped the run is never taken for a node failure.

The workflow's side of the app's signal handling (the CLI installs the handlers: ``cli/signals.py``):

* :class:`Interrupted` is what a SIGTERM/SIGINT in the main process raises (a ``BaseException``, so no
  ``except Exception`` in nipype or torch swallows it); :func:`interrupt` is the handler's body, and
  :func:`raise_if_interrupted` raises it again after a library turned it into its own error (nipype's Linear
  plugin reports it as a failed node).
* Every worker asks the kernel for SIGKILL when its parent dies (Linux ``prctl(PR_SET_PDEATHSIG)``; elsewhere a
  thread polls the parent id), so a SIGKILL of the main process leaves no orphan holding memory; workers ignore
  SIGINT (Ctrl-C reaches the whole process group, and only the main process reports it).
  :func:`worker_setup` arms that in a forked child; :func:`workers_die_with_us` does it for MultiProc's
  spawn/forkserver workers (the GPU path).
"""
from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
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


class Interrupted(BaseException):
    """The main process received SIGTERM or SIGINT."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        """``128 + signal``: 143 for SIGTERM, 130 for SIGINT."""
        return 128 + self.signum

    @property
    def signal_name(self) -> str:
        """``SIGTERM`` or ``SIGINT``."""
        return signal.Signals(self.signum).name


#: The signal that interrupted the run (None: none since :func:`clear_interrupt`), kept in case a library turned
#: the :class:`Interrupted` into its own error.
_received: int | None = None


def interrupt(signum: int, frame=None) -> None:  # noqa: ARG001 - signal handler signature
    """Signal handler: remember ``signum`` and raise :class:`Interrupted`."""
    global _received
    _received = signum
    raise Interrupted(signum)


def clear_interrupt() -> None:
    """Forget an earlier signal (a new run starts)."""
    global _received
    _received = None


def raise_if_interrupted() -> None:
    """Raise :class:`Interrupted` again when a signal arrived during the run and a library swallowed it."""
    if _received is not None:
        raise Interrupted(_received)


def set_parent_death_signal(sig: int) -> bool:
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

    Run after every ``os.fork`` of the main process (the CLI's fork hook); usable as (part of) a
    ``ProcessPoolExecutor`` initializer for spawn/forkserver workers.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    if not set_parent_death_signal(signal.SIGKILL):
        threading.Thread(target=watch_process, args=(parent_pid,), daemon=True, name="watch-parent").start()
    if os.getppid() != parent_pid:  # the parent died before the death signal was armed
        os._exit(128 + signal.SIGTERM)


def process_alive(pid: int) -> bool:
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


def watch_process(pid: int) -> None:
    """Exit as soon as process ``pid`` is gone (polled every PARENT_POLL_S seconds)."""
    while process_alive(pid):
        time.sleep(PARENT_POLL_S)
    os._exit(128 + signal.SIGTERM)


def pool_worker_initializer(cwd: str, main_pid: int) -> None:
    """Initializer of MultiProc workers started by spawn or a forkserver (no ``os.fork`` of the main process,
    so the fork hook never runs there): nipype's own set-up, then the worker dies with the main process. A
    spawned worker is the main process's child (:func:`worker_setup`). A forkserver worker is the forkserver's
    child, and the forkserver waits for its workers before it exits, so such a worker watches the main process
    itself.
    """
    os.chdir(cwd)
    os.environ["NIPYPE_NO_ET"] = "1"  # as nipype's process_initializer
    if os.getppid() == main_pid:
        worker_setup(main_pid)
        return
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    threading.Thread(target=watch_process, args=(main_pid,), daemon=True, name="watch-main").start()


@contextlib.contextmanager
def workers_die_with_us(plugin_args: dict) -> Iterator[None]:
    """While nipype's MultiProc starts its pool, use :func:`pool_worker_initializer` for spawn/forkserver
    workers (forked ones are covered by the CLI's fork hook, which calls :func:`worker_setup`)."""
    if plugin_args.get("mp_context") not in ("spawn", "forkserver"):
        yield
        return
    from nipype.pipeline.plugins import multiproc  # deferred: nipype's plugins cost a second; the CLI imports us

    original = multiproc.process_initializer
    # the pool calls initializer(cwd): bind the main process's pid (picklable: a partial of a module function)
    multiproc.process_initializer = functools.partial(pool_worker_initializer, main_pid=os.getpid())
    try:
        yield
    finally:
        multiproc.process_initializer = original
