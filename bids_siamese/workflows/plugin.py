"""``--use-plugin FILE``: read and check nipype plugin settings once, in the parser, before any work.

nipype's ``SLURMGraph`` submits the whole graph (one ``sbatch`` per node, chained with ``afterok``) and returns
at once; :func:`wait_for_slurm_graph` then waits for those jobs, so that the run collects the scans' results
only when they exist. The other graph plugins (``SGEGraph``, ``PBSGraph``, ``CondorDAGMan``) would return
just as early and are refused: their polling counterparts (``SGE``, ``PBS``, ``Condor``) wait themselves.
"""
from __future__ import annotations

import errno
import functools
import logging
import multiprocessing as mp
import multiprocessing.connection  # noqa: F401  (mp.connection.wait)
import os
import re
import shutil
import signal
import subprocess
import tempfile
import threading
import time
import traceback
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any

import yaml

from ..errors import NoInputError, UsageError, WorkerDiedError
from ..interfaces.base import MEMORY_FIX, write_failure_record

LOG = logging.getLogger("bids_siamese.plugin")
EXAMPLE = "e.g. 'plugin: SLURM' and 'plugin_args: {sbatch_args: \"--mem=8G\"}'"
#: Graph plugins that submit and return without waiting, and the plugin to use instead.
UNWAITED = {"SGEGraph": "SGE", "PBSGraph": "PBS", "CondorDAGMan": "Condor"}
#: Seconds between two looks at the SLURM queue while the graph's jobs run.
SQUEUE_POLL_S = 2.0


def known_plugins() -> list[str]:
    """Names nipype accepts for ``Workflow.run(plugin=...)`` (``MultiProc``, ``SLURM``, ...)."""
    from nipype.pipeline import plugins  # deferred: nipype's plugins cost a second; the parser calls us

    return sorted(name[: -len("Plugin")] for name in dir(plugins) if name.endswith("Plugin") and name != "Plugin")


def load_plugin_file(path: Path) -> tuple[str, dict[str, Any]]:
    """``(plugin, plugin_args)`` from a YAML/JSON file; a :class:`UsageError` (exit 64) naming the problem.

    Raises:
        NoInputError: the file does not exist (exit 66).
        UsageError: malformed YAML/JSON, not a mapping, unknown plugin name or ``plugin_args`` not a mapping.
    """
    path = Path(path)
    if not path.is_file():
        raise NoInputError(f"--use-plugin file {path} not found; fix: give an existing YAML/JSON file")
    try:
        spec = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or type(err).__name__
        raise UsageError(f"--use-plugin file {path} is not valid YAML/JSON ({problem}{where}); fix: correct it, "
                         f"{EXAMPLE}") from err
    except (OSError, UnicodeDecodeError) as err:
        raise UsageError(f"--use-plugin file {path} cannot be read ({err}); fix: give a YAML/JSON text file") from err
    spec = {} if spec is None else spec
    if not isinstance(spec, dict):
        raise UsageError(f"--use-plugin file {path} must be a mapping with 'plugin' and 'plugin_args'; fix: {EXAMPLE}")
    unknown_keys = sorted(set(map(str, spec)) - {"plugin", "plugin_args"})
    if unknown_keys:
        raise UsageError(f"--use-plugin file {path} has unknown key(s) {', '.join(unknown_keys)}; fix: use only "
                         f"'plugin' and 'plugin_args', {EXAMPLE}")
    name = str(spec.get("plugin", "MultiProc"))
    plugins = known_plugins()
    if name not in plugins:
        raise UsageError(f"--use-plugin file {path}: unknown nipype plugin '{name}'; fix: use one of "
                         f"{', '.join(plugins)}")
    if name in UNWAITED:
        raise UsageError(f"--use-plugin file {path}: nipype's {name} submits the jobs and returns without waiting "
                         f"for them; fix: use 'plugin: {UNWAITED[name]}' (or SLURMGraph on SLURM)")
    args = spec.get("plugin_args") or {}
    if not isinstance(args, dict):
        raise UsageError(f"--use-plugin file {path}: 'plugin_args' must be a mapping, not {type(args).__name__}; "
                         f"fix: {EXAMPLE}")
    return name, dict(args)


# ------------------------------------------------------------------------------------------------
# MultiProc that survives the death of a worker process
# ------------------------------------------------------------------------------------------------
#
# nipype's MultiProc runs nodes in a ``ProcessPoolExecutor``. When a worker dies (SIGKILL, the kernel's OOM
# killer, a segfault in a C extension) the executor marks every running and queued future with
# ``BrokenProcessPool``. MultiProc's done-callback calls ``future.result()``, which raises inside the callback:
# the executor logs that, the task's result is never stored, and MultiProc's scheduling loop waits for it for
# ever (the run idles until killed). Every later ``submit`` raises too. SafeMultiProcPlugin instead
#   * records, in each worker, which task it runs (a small file named after the task, holding the worker's pid);
#   * in the done-callback, fails the task whose worker is dead with a one-line reason (the signal, the fix),
#     and puts the tasks whose worker was alive (terminated by the executor afterwards) back in the queue;
#   * starts a fresh pool before the next submit.

#: Set in each worker by :func:`_worker_initializer`: the folder of the task files.
_TRACK_DIR: str | None = None


def _worker_initializer(cwd: str, track_dir: str, inner=None) -> None:
    """Pool initializer: nipype's (or :func:`~bids_siamese.workflows.signals.pool_worker_initializer`), then the
    task-file folder."""
    global _TRACK_DIR
    from nipype.pipeline.plugins import multiproc  # deferred: nipype's plugins cost a second

    (inner or multiproc.process_initializer)(cwd)
    _TRACK_DIR = track_dir


def run_node_tracked(node, updatehash: bool, taskid: int):
    """nipype's ``run_node`` in a worker, with a file ``<track dir>/<taskid>`` holding this worker's pid."""
    from nipype.pipeline.plugins.multiproc import run_node  # deferred: nipype's plugins cost a second

    marker = os.path.join(_TRACK_DIR, str(taskid)) if _TRACK_DIR else None
    if marker:
        try:
            with open(marker, "w") as handle:
                handle.write(str(os.getpid()))
        except OSError:  # no room for 8 bytes: the task is then blamed only if its worker is found dead
            marker = None
    try:
        return run_node(node, updatehash, taskid)
    finally:
        if marker:
            try:
                os.unlink(marker)
            except OSError:
                pass


def death_reason(node_name: str, exitcode: int | None) -> str:
    """One line for a node whose worker process died with ``exitcode`` (negative: killed by that signal).

    Examples:
        >>> death_reason("wf.scan_wf.brain_extraction", -9).split(" (")[0]
        'the worker process running node brain_extraction was killed by SIGKILL'
    """
    fix = MEMORY_FIX
    if exitcode is not None and exitcode < 0:
        try:
            name = signal.Signals(-exitcode).name
        except ValueError:
            name = f"signal {-exitcode}"
        why = {"SIGKILL": " (the kernel's out-of-memory killer sends SIGKILL when memory runs out)",
               "SIGSEGV": " (a crash in compiled code, often out of memory)",
               "SIGBUS": " (a crash in compiled code: memory or a file that vanished while mapped)"}.get(name, "")
        return f"the worker process running node {node_name.split('.')[-1]} was killed by {name}{why}; {fix}"
    return f"the worker process running node {node_name.split('.')[-1]} ended unexpectedly (exit code {exitcode}); {fix}"


def _safe_multiproc_class():
    """The plugin class (built on first use: importing nipype's plugins costs about a second)."""
    global _SAFE_CLASS
    if _SAFE_CLASS is not None:
        return _SAFE_CLASS
    from nipype.pipeline.plugins import multiproc  # deferred: nipype's plugins cost a second

    class SafeMultiProcPlugin(multiproc.MultiProcPlugin):
        """MultiProc in which a dead worker fails its own node (with the reason) and never hangs the run."""

        def __init__(self, plugin_args=None):
            super().__init__(plugin_args=plugin_args)
            self.pool.shutdown(wait=False)  # no worker started yet: replaced by one with tracked workers
            self._track_dir = tempfile.mkdtemp(prefix="bids-siamese-tasks-", dir=_shm_or_tmp())
            self._lock = threading.Lock()
            self._requeue: set[int] = set()
            self._task_node: dict[int, str] = {}
            self._task_dir: dict[int, str] = {}
            self._requeued: dict[str, int] = {}
            self.disk_fault: tuple[int, str, str | None] | None = None
            self._processes: dict[int, Any] = {}
            self.pool = self._new_pool()

        def _new_pool(self):
            context = mp.get_context(self.plugin_args.get("mp_context"))
            initializer = functools.partial(_worker_initializer, track_dir=self._track_dir,
                                            inner=multiproc.process_initializer)
            return ProcessPoolExecutor(max_workers=self.processors, initializer=initializer,
                                       initargs=(self._cwd,), mp_context=context)

        def _renew_pool(self) -> None:
            # the old pool's processes stay in self._processes: its callbacks may still be running
            self.pool.shutdown(wait=False, cancel_futures=True)
            self.pool = self._new_pool()

        def _submit_job(self, node, updatehash=False):
            if getattr(node.interface, "terminal_output", "") == "stream":
                node.interface.terminal_output = "allatonce"
            for attempt in (0, 1):
                self._taskid += 1
                taskid = self._taskid
                self._task_node[taskid] = node.fullname
                self._task_dir[taskid] = node.output_dir()
                try:
                    future = self.pool.submit(run_node_tracked, node, updatehash, taskid)
                except BrokenProcessPool:  # broke since the last check: a fresh pool, once
                    if attempt:
                        raise
                    self._renew_pool()
                    continue
                break
            # the worker processes of this pool, kept so that their exit codes can be read after a breakage
            self._processes.update(getattr(self.pool, "_processes", None) or {})
            future.add_done_callback(functools.partial(self._done, taskid))
            self._task_obj[taskid] = future
            return taskid

        def _done(self, taskid, future) -> None:
            """Done-callback (executor thread): store the result; never raise."""
            try:
                result = future.result()
            except BrokenProcessPool:
                pid = _read_pid(self._track_dir, taskid)
                process = self._processes.get(pid) if pid is not None else None
                exitcode = None
                # the pool saw the worker's sentinel close; the kernel may not have made it a zombie yet
                if process is not None and mp.connection.wait([process.sentinel], timeout=0):
                    process.join(5.0)
                    exitcode = process.exitcode if process.exitcode is not None else 0
                name = self._task_node.get(taskid, "?")
                again = self._requeued.get(name, 0) < MAX_REQUEUE
                if exitcode is None and again:  # queued, or its worker was alive: run it again
                    self._requeued[name] = self._requeued.get(name, 0) + 1
                    with self._lock:
                        self._requeue.add(taskid)
                    return
                reason = death_reason(name, exitcode)
                # the failure record the worker could not leave: the run's summary reads it (workflows/failures.py)
                write_failure_record(self._task_dir[taskid], {
                    "node": name.split(".")[-1], "error": WorkerDiedError.__name__, "message": reason,
                    "exit_code": WorkerDiedError.exit_code})
                result = {"result": None, "taskid": taskid,
                          "traceback": [f"bids_siamese.errors.WorkerDiedError: {reason}\n"]}
            except BaseException as err:  # noqa: BLE001 - e.g. a node whose result file could not be written
                # the worker's own traceback (with the error that caused this one) is the exception's __cause__
                result = {"result": None, "taskid": taskid, "traceback": traceback.format_exception(err)}
            if result and result.get("traceback") and self.disk_fault is None:
                self.disk_fault = find_disk_fault("".join(result["traceback"]))
            self._taskresult[taskid] = result

        def run(self, graph, config, updatehash=False):
            try:
                return super().run(graph, config, updatehash=updatehash)
            except BaseException:
                self._stop_workers()
                raise

        def _stop_workers(self) -> None:
            """Cancel what is queued and end the workers now (an aborted run must not wait for them)."""
            processes = list((getattr(self.pool, "_processes", None) or {}).values())
            manager = getattr(self.pool, "_executor_manager_thread", None)  # shutdown() forgets it
            self.pool.shutdown(wait=False, cancel_futures=True)
            for process in processes:
                try:
                    process.kill()
                except (OSError, ValueError, AttributeError):
                    pass
            if manager is not None:
                join_manager_thread(manager)
            shutil.rmtree(self._track_dir, ignore_errors=True)

        def _send_procs_to_workers(self, updatehash=False, graph=None):
            if self.disk_fault is not None:  # a full or read-only disk: every further node would fail too
                raise DiskFault(*self.disk_fault)
            with self._lock:
                requeue, self._requeue = self._requeue, set()
            if requeue:
                for taskid, jobid in [t for t in self.pending_tasks if t[0] in requeue]:
                    self.pending_tasks.remove((taskid, jobid))
                    self._task_obj.pop(taskid, None)
                    self.proc_done[jobid] = False
                    self.proc_pending[jobid] = False
                    _read_pid(self._track_dir, taskid, remove=True)
                self._stats = None
            if getattr(self.pool, "_broken", False):
                self._renew_pool()
            return super()._send_procs_to_workers(updatehash=updatehash, graph=graph)

        def _postrun_check(self):
            try:
                super()._postrun_check()
            finally:
                shutil.rmtree(self._track_dir, ignore_errors=True)

    _SAFE_CLASS = SafeMultiProcPlugin
    return _SAFE_CLASS


_SAFE_CLASS = None


def join_manager_thread(thread: threading.Thread, timeout: float = 10.0) -> bool:
    """Wait (at most ``timeout`` s) for a shut-down executor's management thread to end; True when it did.

    With its workers killed the thread ends at once, closing its wake-up pipe. Left running, it races with
    CPython 3.11's exit hook (``concurrent.futures.process._python_exit``), which writes to that pipe unlocked:
    an aborted run (a full disk, exit 73) then printed an ``OSError: [Errno 9] Bad file descriptor`` traceback
    after its one-line error, now and then.
    """
    thread.join(timeout)
    return not thread.is_alive()

#: Errors of a full or read-only disk: ``(errno, text)``; found in a node's traceback they end the run.
DISK_ERRORS = ((errno.ENOSPC, "No space left on device"), (errno.EROFS, "Read-only file system"),
               (errno.EDQUOT, "Disk quota exceeded"))


class DiskFault(OSError):
    """A node failed because a disk is full or read-only (raised in the main process to end the run)."""


def find_disk_fault(text: str) -> tuple[int, str, str | None] | None:
    """``(errno, strerror, path or None)`` when ``text`` (a traceback) shows a full or read-only disk.

    Examples:
        >>> find_disk_fault("OSError: [Errno 28] No space left on device: '/work/a/b.nii.gz'")
        (28, 'No space left on device', '/work/a/b.nii.gz')
        >>> find_disk_fault("ValueError: nope") is None
        True
    """
    for number, message in DISK_ERRORS:
        for line in reversed(text.splitlines()):
            if message in line:
                path = re.search(r"(/[^\s'\",:]+)", line)
                return number, message, path.group(1) if path else None
    return None
#: How often a node is put back in the queue after another node's worker died while it ran (then it fails).
MAX_REQUEUE = 3


def _shm_or_tmp() -> str | None:
    """``/dev/shm`` (memory, so a full disk cannot stop the task files) when writable, else the temp dir."""
    return "/dev/shm" if os.access("/dev/shm", os.W_OK) else None


def _read_pid(track_dir: str, taskid: int, remove: bool = False) -> int | None:
    """The pid in a task file (None when absent or unreadable)."""
    path = os.path.join(track_dir, str(taskid))
    try:
        with open(path) as handle:
            pid = int(handle.read().strip() or 0) or None
    except (OSError, ValueError):
        return None
    if remove:
        try:
            os.unlink(path)
        except OSError:
            pass
    return pid


def multiproc_plugin(plugin_args: dict[str, Any]):
    """A :class:`SafeMultiProcPlugin` instance for ``wf.run(plugin=...)``."""
    return _safe_multiproc_class()(plugin_args=dict(plugin_args))


def graph_jobs(submit_script: Path) -> list[str]:
    """Names of the jobs in the ``submit_jobs.sh`` that nipype's ``SLURMGraph`` wrote (``j<index>_<node>``)."""
    return re.findall(r"^(j\d+_\w+)=\$\(sbatch", submit_script.read_text(), re.M)


def _queued(names: list[str], batch_dir: Path) -> list[tuple[str, str, str]]:
    """(job id, state, reason) of this graph's jobs still in the queue: their script lies in ``batch_dir``."""
    proc = subprocess.run(["squeue", "--noheader", "--user", str(os.getuid()), "--name", ",".join(names),
                           "--format", "%i|%T|%r|%o"], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise OSError(proc.stderr.strip() or f"squeue exited {proc.returncode}")
    rows = [line.split("|", 3) for line in proc.stdout.splitlines() if line.count("|") == 3]
    return [(job, state, reason) for job, state, reason, command in rows
            if Path(command).parent == batch_dir]


def wait_for_slurm_graph(batch_dir: Path, since: float, poll: float = SQUEUE_POLL_S) -> int:
    """Wait until the jobs that ``SLURMGraph`` submitted from ``batch_dir`` (at or after ``since``) have left
    the queue; return how many were submitted.

    A job whose dependency failed (a node before it crashed) would stay pending for ever: it is cancelled, and
    the run reports its scan from the crash file. When the run itself is stopped (SIGTERM, Ctrl-C), the graph's
    remaining jobs are cancelled too.
    """
    script = Path(batch_dir) / "submit_jobs.sh"
    if not script.is_file() or script.stat().st_mtime < since:
        return 0
    names = graph_jobs(script)
    if not names:
        return 0
    LOG.info("SLURMGraph: waiting for the %d job(s) it submitted (scripts in %s)", len(names), batch_dir)
    failures = 0
    try:
        while True:
            try:
                queued = _queued(names, Path(batch_dir))
                failures = 0
            except OSError as err:  # squeue can time out while the controller is busy: look again
                failures += 1
                if failures > 30:  # the controller is gone: a traceback, the jobs stay as they are
                    raise
                LOG.warning("SLURMGraph: squeue failed (%s); trying again", err)
                time.sleep(poll)
                continue
            if not queued:
                return len(names)
            stuck = [job for job, state, reason in queued if state == "PENDING" and "NeverSatisfied" in reason]
            if stuck:
                LOG.warning("SLURMGraph: cancelling %d job(s) that wait for a failed one", len(stuck))
                subprocess.run(["scancel", *stuck], check=False)
            time.sleep(poll)
    except BaseException:  # stopped while waiting: leave no job of this run behind
        try:
            left = [job for job, _, _ in _queued(names, Path(batch_dir))]
        except OSError:
            left = []
        if left:
            subprocess.run(["scancel", *left], check=False)
        raise
