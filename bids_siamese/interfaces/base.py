"""A common base for the app's nipype interfaces: bounded threads and a CPU/memory record per node.

nipype's MultiProc reuses its worker processes from node to node (checked in nipype 1.11: it runs nodes in a
``ProcessPoolExecutor`` without a task limit; ``maxtasksperchild`` is an option of LegacyMultiProc only), so a
thread setting left by one node would leak into the next:
:class:`StepInterface` sets torch's thread count to the node's own ``num_threads`` (1 when it has none) before
each run. After each run it records, in the node's runtime (saved in its ``result_<node>.pklz``):

* ``cpu_seconds``: CPU time of the worker process (all threads) spent in the interface;
* ``peak_rss_gb``: the worker's peak resident memory during the interface (Linux: the peak is reset before the
  run through ``/proc/self/clear_refs``; elsewhere the process's lifetime peak).

``benchmarks/participant.py --workflow`` reads them to report per-node CPU time and memory next to the run's
end-to-end figures.

Each interface implements :meth:`StepInterface._run_step`. When a step fails, it leaves a failure record (:data:`FAILURE_FILE`, JSON: node, error class, one-line message,
exit code; :func:`failure_record`) in the node's folder before nipype reports the crash: the run's summary reads
these records (``workflows/failures.py``) instead of parsing crash files.
"""
from __future__ import annotations

import json
import logging
import resource
import sys
import time
from pathlib import Path
from typing import Any

from nipype.interfaces.base import SimpleInterface, isdefined

from ..errors import EXIT_DATA, UserError

LOG = logging.getLogger("bids_siamese.interfaces")

#: The failure record a failed step leaves in its node's folder (the work dir), read after the run.
FAILURE_FILE = "failure.json"
#: The fix named in every out-of-memory message (a worker killed by the OOM killer says the same).
MEMORY_FIX = ("fix: give the job more memory and raise --mem-gb to match, or lower --nprocs, then rerun "
              "(finished scans are reused)")


def out_of_memory(err: BaseException) -> bool:
    """Whether ``err`` is an allocation failure: ``MemoryError`` (numpy's included) or torch's CPU allocator's
    ``RuntimeError`` ("DefaultCPUAllocator: can't allocate memory")."""
    return isinstance(err, MemoryError) or (isinstance(err, RuntimeError) and
                                             "DefaultCPUAllocator: can't allocate memory" in str(err))


def failure_record(node: str, err: BaseException) -> dict[str, Any]:
    """The failure record of a step named ``node`` that raised ``err``.

    ``error``: the exception's class; ``message``: one line (a :class:`~bids_siamese.errors.UserError`'s own
    line, an out-of-memory line naming the node and the fix, else the exception's first line); ``exit_code``:
    the ``UserError``'s code, else 65; an ``OSError`` adds ``errno`` and ``filename`` (a full or read-only disk).

    Examples:
        >>> failure_record("conform", ValueError("bad affine\\nmore"))["message"]
        'bad affine'
        >>> failure_record("check_header", MemoryError("Unable to allocate 1 GiB"))["message"][:60]
        'out of memory in node check_header (Unable to allocate 1 GiB'
    """
    lines = str(err).strip().splitlines()
    message = lines[0].strip() if lines else type(err).__name__
    if out_of_memory(err):
        detail = message if message != type(err).__name__ else ""
        message = f"out of memory in node {node}{f' ({detail})' if detail else ''}; {MEMORY_FIX}"
    record: dict[str, Any] = {"node": node, "error": type(err).__name__, "message": message,
                              "exit_code": err.exit_code if isinstance(err, UserError) else EXIT_DATA}
    if isinstance(err, OSError):
        record.update(errno=err.errno, filename=None if err.filename is None else str(err.filename))
    return record


def write_failure_record(folder: Path | str, record: dict[str, Any]) -> Path | None:
    """Write ``record`` as :data:`FAILURE_FILE` in ``folder``; None (logged at WARNING) when that fails, e.g. on
    the full disk that made the step fail (the run then falls back to the crash files)."""
    path = Path(folder) / FAILURE_FILE
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(record))
    except OSError as err:
        LOG.warning("cannot write the failure record %s (%s): node %s failed with %s: %s", path, err,
                    record.get("node"), record.get("error"), record.get("message"))
        return None
    return path


def limit_torch_threads(n_threads: int, load: bool = False) -> None:
    """``torch.set_num_threads(n_threads)`` when torch is loaded in this process (importing it costs ~1 s), or
    with ``load`` in any case (a step that runs torch)."""
    if load:
        import torch  # noqa: F401  # deferred: costs ~1 s; only a step that runs torch loads it here
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.set_num_threads(max(1, int(n_threads)))


def reset_peak_rss() -> bool:
    """Reset this process's peak resident memory (Linux ``clear_refs`` 5); False where unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def peak_rss_gb() -> float:
    """Peak resident memory of this process in GB (``VmHWM``, else ``ru_maxrss``)."""
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024**2
    except OSError:
        pass
    scale = 1024**3 if sys.platform == "darwin" else 1024**2  # bytes on macOS, kB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / scale


class StepInterface(SimpleInterface):
    """``SimpleInterface`` that bounds torch's threads to the node's ``num_threads`` and records its resources."""

    #: The step runs torch: torch is imported and its threads set before each run, not only when already loaded.
    uses_torch = False

    def _run_interface(self, runtime):
        """Run the step (:meth:`_run_step`); a failure leaves :data:`FAILURE_FILE` in the node's folder, then
        propagates (nipype saves the node's result and reports the crash as usual)."""
        stale = Path(runtime.cwd) / FAILURE_FILE
        if stale.exists():  # an earlier run's, in a node folder nipype kept
            stale.unlink()
        try:
            return self._run_step(runtime)
        except Exception as err:
            write_failure_record(runtime.cwd, failure_record(Path(runtime.cwd).name, err))
            raise

    def _run_step(self, runtime):
        """The step itself (each interface's own); returns ``runtime``."""
        raise NotImplementedError

    def _n_threads(self) -> int:
        n = getattr(self.inputs, "num_threads", 1)
        return int(n) if isdefined(n) and n else 1

    def _pre_run_hook(self, runtime):
        limit_torch_threads(self._n_threads(), load=self.uses_torch)
        reset_peak_rss()
        self._cpu_start = time.process_time()
        return runtime

    def _post_run_hook(self, runtime):
        runtime.cpu_seconds = time.process_time() - self._cpu_start
        runtime.peak_rss_gb = peak_rss_gb()
        return runtime
