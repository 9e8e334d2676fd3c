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
"""
from __future__ import annotations

import resource
import sys
import time

from nipype.interfaces.base import SimpleInterface, isdefined


def limit_torch_threads(n_threads: int, load: bool = False) -> None:
    """``torch.set_num_threads(n_threads)`` when torch is loaded in this process (importing it costs ~1 s), or
    with ``load`` in any case (a step that runs torch)."""
    if load:
        import torch  # noqa: F401 - imported into sys.modules for the line below
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
