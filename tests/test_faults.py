"""Faults that must never hang a run (docs/reliability.md): dead workers, memory limits, full or read-only disks,
huge images. Most cases run the CLI in a fresh process on the hand-made mini dataset, with the slow or faulty
step injected by a small driver script; a timeout on the process is the hang guard.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from nipype.interfaces.base import BaseInterfaceInputSpec, TraitedSpec

from bids_siamese.interfaces.base import StepInterface
from test_reliability import ROOT, _alive, error_lines

ENV = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
LINUX = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc, Linux signals")

# ------------------------------------------------------------------------------------------------
# a dead worker fails its own node's scan; the other scans go on; the run ends
# ------------------------------------------------------------------------------------------------

PLUGIN_DRIVER = """
import json, sys, time
from pathlib import Path
from nipype.interfaces import utility as niu
from nipype.pipeline import engine as pe


def nap(seconds, sig):
    import os, time
    time.sleep(seconds)
    if sig:
        os.kill(os.getpid(), sig)
    return seconds


def node(name, seconds, sig=0):
    n = pe.Node(niu.Function(input_names=["seconds", "sig"], output_names=["out"], function=nap), name=name)
    n.inputs.seconds, n.inputs.sig = seconds, sig
    return n


if __name__ == "__main__":
    from bids_siamese.workflows.plugin import multiproc_plugin

    base, context, sig = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
    wf = pe.Workflow("top", base_dir=str(base))
    scan_a = pe.Workflow("scan_a_wf")
    scan_a.add_nodes([node("victim", 1.0, sig)])  # its worker dies while scan_b's first node runs
    scan_b = pe.Workflow("scan_b_wf")
    first, second = node("first", 3.0), node("second", 0.5)
    scan_b.connect(first, "out", second, "seconds")
    wf.add_nodes([scan_a, scan_b])
    wf.config["execution"] = {"crashdump_dir": str(base / "crash"), "crashfile_format": "txt",
                              "poll_sleep_duration": 0.1}
    args = {"n_procs": 2, "memory_gb": 2.0}
    if context != "fork":
        args["mp_context"] = context
    try:
        wf.run(plugin=multiproc_plugin(args))
        error = None
    except RuntimeError as err:  # nipype: some node failed
        error = type(err).__name__
    print(json.dumps({"error": error}))
"""


@LINUX
@pytest.mark.parametrize("context, sig, name", [("fork", signal.SIGKILL, "SIGKILL"),
                                                ("forkserver", signal.SIGKILL, "SIGKILL"),
                                                ("fork", signal.SIGSEGV, "SIGSEGV")])
def test_dead_worker_fails_its_node_and_the_others_finish(tmp_path, context, sig, name):
    """nipype's MultiProc waited for ever for the result of a node whose worker died (BrokenProcessPool)."""
    driver = tmp_path / "driver.py"
    driver.write_text(PLUGIN_DRIVER)
    proc = subprocess.run([sys.executable, str(driver), str(tmp_path), context, str(int(sig))], capture_output=True,
                          text=True, env=ENV, timeout=90)  # the hang guard: a hung run is killed and fails here
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == {"error": "RuntimeError"}
    crashes = list((tmp_path / "crash").glob("crash-*.txt"))
    assert len(crashes) == 1, "only the node whose worker died fails"
    text = crashes[0].read_text()
    assert "Node: top.scan_a_wf.victim" in text
    assert f"WorkerDiedError: the worker process running node victim was killed by {name}" in text
    assert "fix: give the job more memory" in text and "lower --nprocs" in text
    # the other scan's node, terminated with the broken pool, was run again; its successor ran too
    assert (tmp_path / "top" / "scan_b_wf" / "second" / "result_second.pklz").is_file()


SLOW_SCAN_DRIVER = """
import os, sys, time
from pathlib import Path
from bids_siamese.interfaces import preproc

marker = Path(sys.argv[1])
original = preproc.CheckHeader._run_step


def check(self, runtime):
    if "sub-02" in str(self.inputs.in_file):  # the victim: the test kills this worker
        (marker / str(os.getpid())).write_text("running")
        time.sleep(300)
    if "sub-01_ses-2" in str(self.inputs.in_file) and os.environ.get("EAT_MEMORY"):
        import resource
        import numpy as np

        vsz = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[20])
        resource.setrlimit(resource.RLIMIT_AS, (vsz + 256 * 2**20, resource.RLIM_INFINITY))
        np.ones(2**30, dtype=np.uint8)  # 1 GB under a 256 MB allowance: MemoryError
    raise RuntimeError("stop here: the rest of the pipeline is not needed")


# module level: a forkserver imports this file as __mp_main__, so its workers are patched too
preproc.CheckHeader._run_step = check

if __name__ == "__main__":
    from bids_siamese.cli.main import entry
    entry(sys.argv[2:])
"""


def _start(tmp_path: Path, mini_bids: Path, *options: str, env=None) -> tuple[subprocess.Popen, Path]:
    marker = tmp_path / "running"
    marker.mkdir()
    driver = tmp_path / "driver.py"
    driver.write_text(SLOW_SCAN_DRIVER)
    proc = subprocess.Popen([sys.executable, str(driver), str(marker), str(mini_bids), str(tmp_path / "out"),
                             "participant", "--skip-bids-validation", "--nprocs", "2", "-w", str(tmp_path / "work"),
                             *options], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env or ENV)
    return proc, marker


@LINUX
@pytest.mark.parametrize("forkserver", [False, True])
def test_sigkill_of_a_worker_mid_node_ends_the_run_with_65(mini_bids, tmp_path, forkserver):
    options = []
    if forkserver:  # the GPU path's workers: started by a forkserver, not forked from the main process
        plugin = tmp_path / "plugin.yml"
        plugin.write_text("plugin: MultiProc\nplugin_args:\n  n_procs: 2\n  mp_context: forkserver\n")
        options = ["--use-plugin", str(plugin)]
    proc, marker = _start(tmp_path, mini_bids, *options)
    deadline = time.monotonic() + 120
    while not list(marker.iterdir()):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the victim's node did not start"
        time.sleep(0.2)
    victim = int(next(marker.iterdir()).name)
    os.kill(victim, signal.SIGKILL)
    _, err = proc.communicate(timeout=30)  # within 30 s of the death, or the test fails here
    assert proc.returncode == 65, err
    failed = [line for line in err.splitlines() if line.startswith("bids-siamese: FAILED")]
    assert len(failed) == 3  # the victim with its reason; the two others with their own error
    victim_line = next(line for line in failed if "sub-02_ses-1_T1w:" in line)
    assert "node check_header was killed by SIGKILL" in victim_line and "fix:" in victim_line
    assert sum("stop here" in line for line in failed) == 2
    assert "Traceback" not in err and len(error_lines(err)) == 1
    assert not _alive(victim)


@LINUX
def test_memory_limit_is_one_line_naming_mem_gb_and_nprocs(mini_bids, tmp_path):
    """RLIMIT_AS (``ulimit -v``; a memory cgroup gives SIGKILL, as above) smaller than a node needs."""
    proc, _ = _start(tmp_path, mini_bids, "--participant-label", "01", env=dict(ENV, EAT_MEMORY="1"))
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 65, err
    line = next(line for line in err.splitlines() if line.startswith("bids-siamese: FAILED sub-01_ses-2_T1w:"))
    assert "out of memory in node check_header" in line
    assert "fix: give the job more memory and raise --mem-gb to match, or lower --nprocs" in line
    assert "Traceback" not in err


# ------------------------------------------------------------------------------------------------
# full and read-only disks (a real tmpfs, so root only): 73 naming the folder; a rerun after the fix completes
# ------------------------------------------------------------------------------------------------

ROOT_ONLY = pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0 or not sys.platform.startswith("linux"),
                               reason="mounts a tmpfs: needs root on Linux")

FAULT_DRIVER = """
import os, subprocess, sys
from pathlib import Path
from bids_siamese.interfaces import derivatives, preproc

mount, fault, node = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
hooked = {"check_header": preproc.CheckHeader, "model_grid": preproc.ModelGrid,
          "write_derivatives": derivatives.WriteDerivatives}[node]
original = hooked._run_step


def with_fault(self, runtime):  # the disk fails just as this node starts (in a worker: a mid-run fault)
    if fault == "full":
        fd = os.open(mount / "filler", os.O_WRONLY | os.O_CREAT)
        stat = os.statvfs(mount)
        os.posix_fallocate(fd, 0, stat.f_bavail * stat.f_frsize)
        os.close(fd)
    elif node == "write_derivatives":  # a remount would fail: the run holds its lock file open for writing
        import errno

        def read_only(src, dst, *args, **kwargs):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(dst))

        os.replace = read_only  # in this worker: every output file's final rename
    else:
        subprocess.run(["mount", "-o", "remount,ro", str(mount)], check=True)
    return original(self, runtime)


hooked._run_step = with_fault

if __name__ == "__main__":
    from bids_siamese.cli.main import entry
    entry(sys.argv[4:])
"""


class TinyTmpfs:
    """A 30 MB tmpfs at ``path`` (``with TinyTmpfs(p) as fs``); always unmounted on exit."""

    def __init__(self, path: Path):
        self.path = path

    def __enter__(self) -> Path:
        self.path.mkdir(parents=True, exist_ok=True)
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=30m", "tmpfs", str(self.path)], check=True)
        return self.path

    def heal(self) -> None:
        """Free the space and make it writable again (the user's fix)."""
        subprocess.run(["mount", "-o", "remount,rw", str(self.path)], check=True)
        (self.path / "filler").unlink(missing_ok=True)

    def __exit__(self, *exc) -> None:
        subprocess.run(["umount", "-l", str(self.path)], check=False)


def _participant_args(mini_bids: Path, out: Path, work: Path) -> list[str]:
    return [str(mini_bids), str(out), "participant", "--participant-label", "02", "--skip-bids-validation",
            "--nprocs", "2", "--resolution", "8", "-w", str(work)]


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory) -> Path:
    """An uninterrupted run of the mini dataset's sub-02 (one scan, 8 mm grid)."""
    from conftest import make_mini_bids

    base = tmp_path_factory.mktemp("reference")
    bids = make_mini_bids(base / "bids")
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "bids_siamese", *_participant_args(bids, base / "out", base / "work")],
                          capture_output=True, text=True, env=ENV, timeout=600)
    assert proc.returncode == 0, proc.stderr
    (base / "seconds").write_text(f"{time.monotonic() - start:.1f}")  # where the soak test's kills may fall
    return base


def assert_same_outputs(out: Path, reference: Path, subject: str = "02") -> None:
    """The subject's outputs byte-identical to the reference run's (completion records: the same file list)."""
    files = sorted(p for p in (reference / "out" / f"sub-{subject}").rglob("*") if p.is_file())
    assert len(files) >= 10
    for path in files:
        mine = out / path.relative_to(reference / "out")
        if path.name.endswith("_desc-status_qc.json"):  # run id and time differ
            assert json.loads(mine.read_text())["files"] == json.loads(path.read_text())["files"]
        else:
            assert mine.read_bytes() == path.read_bytes(), mine
    assert list(out.rglob(".*.part*")) == []


@ROOT_ONLY
@pytest.mark.slow
@pytest.mark.parametrize("where, fault, node, rerun, nprocs", [
    ("work", "full", "check_header", False, "2"),        # ENOSPC at the first node
    ("work", "full", "model_grid", True, "2"),           # ENOSPC mid-run; free the space, rerun
    ("work", "full", "model_grid", False, "1"),          # the same with the Linear plugin (no workers)
    ("work", "readonly", "model_grid", False, "2"),      # EROFS mid-run (a read-only remount)
    ("output", "full", "write_derivatives", True, "2"),  # ENOSPC while the outputs are written; free, rerun
    ("output", "readonly", "write_derivatives", False, "2"),  # EROFS at the outputs' renames (patched)
])
def test_full_or_read_only_disk_is_73_naming_the_folder(reference_run, tmp_path, where, fault, node, rerun, nprocs):
    from conftest import make_mini_bids

    bids = make_mini_bids(tmp_path / "bids")
    driver = tmp_path / "driver.py"
    driver.write_text(FAULT_DRIVER)
    fs = TinyTmpfs(tmp_path / "fs")
    with fs as mount:
        out, work = (mount / "out", tmp_path / "work") if where == "output" else (tmp_path / "out", mount / "work")
        args = _participant_args(bids, out, work)
        args[args.index("--nprocs") + 1] = nprocs
        proc = subprocess.run([sys.executable, str(driver), str(mount), fault, node, *args], capture_output=True,
                              text=True, env=ENV, timeout=300)  # the hang guard
        assert proc.returncode == 73, proc.stderr
        lines = [line for line in proc.stderr.splitlines() if line.startswith("bids-siamese:")]
        assert "Traceback" not in proc.stderr
        reason = "No space left on device" if fault == "full" else "Read-only file system"
        folder = f"OUTPUT_DIR {out}" if where == "output" else f"the work dir {work}"
        assert any(folder in line and reason in line and "fix:" in line for line in lines), lines
        assert len(error_lines(proc.stderr)) == 1
        assert list(out.rglob(".*.part*")) == []  # no partial output file
        if not rerun:
            return
        fs.heal()
        proc = subprocess.run([sys.executable, "-m", "bids_siamese", *args], capture_output=True, text=True, env=ENV,
                              timeout=600)
        assert proc.returncode == 0, proc.stderr
        assert_same_outputs(out, reference_run)


# ------------------------------------------------------------------------------------------------
# sizes: an image larger than --mem-gb allows (by its header) fails before its data are read
# ------------------------------------------------------------------------------------------------

def _bomb(path: Path, shape=(2000, 2000, 2000), stream_mb: int = 64) -> Path:
    """A .nii.gz whose header declares ``shape`` int16 (16 GB) over a gzip stream of zeros (64 MB, ~64 kB)."""
    import gzip

    import nibabel as nib
    import numpy as np

    img = nib.Nifti1Image(np.zeros((2, 2, 2), np.int16), np.diag([1.0, 1.0, 1.0, 1.0]))
    img.header.set_data_shape(shape)
    img.header.set_xyzt_units("mm", "sec")
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(path, "wb", compresslevel=1) as handle:
        handle.write(img.header.binaryblock + b"\0" * 4)  # 348-byte header, 4-byte extension flag
        chunk = b"\0" * (1 << 20)
        for _ in range(stream_mb):
            handle.write(chunk)
    return path


def test_image_larger_than_mem_gb_fails_by_its_header(mini_bids, tmp_path):
    scan = _bomb(mini_bids / "sub-03" / "ses-1" / "anat" / "sub-03_ses-1_T1w.nii.gz")
    assert scan.stat().st_size < 1_000_000
    proc = subprocess.run([sys.executable, "-m", "bids_siamese", str(mini_bids), str(tmp_path / "out"), "participant",
                           "--participant-label", "03", "--skip-bids-validation", "--mem-gb", "4", "--nprocs", "1",
                           "-w", str(tmp_path / "work")], capture_output=True, text=True, env=ENV, timeout=300)
    assert proc.returncode == 65, proc.stderr
    line = next(line for line in proc.stderr.splitlines() if line.startswith("bids-siamese: FAILED sub-03_ses-1_T1w:"))
    assert "2000x2000x2000 int16" in line and "more than --mem-gb 4 allows" in line and "fix:" in line
    assert "Traceback" not in proc.stderr


def test_decompression_bomb_is_not_read(tmp_path):
    """The header is checked before any data are read: a stream far larger than the memory is never inflated."""
    import resource

    from bids_siamese.errors import BadDataError
    from bids_siamese.preproc.conform import load_t1w

    scan = _bomb(tmp_path / "bomb.nii.gz", stream_mb=256)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(BadDataError, match="more than --mem-gb 1 allows"):
        load_t1w(scan, max_gb=1.0)
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert grown_mb < 100  # nothing near the 256 MB stream (let alone the declared 16 GB) was inflated


# ------------------------------------------------------------------------------------------------
# failures as data: a failed step leaves a record; the summary reads records, never crash text
# ------------------------------------------------------------------------------------------------

class FailingStep(StepInterface):
    """A step that raises :attr:`error` (module level: nipype pickles the interface's class by reference)."""

    input_spec = BaseInterfaceInputSpec
    output_spec = TraitedSpec
    error: BaseException = RuntimeError("unset")

    def _run_step(self, runtime):
        raise self.error


@pytest.mark.parametrize("error, expected", [
    ("BadDataError", {"error": "BadDataError", "message": "x.nii.gz is not 3D; fix: give a 3D T1w", "exit_code": 65}),
    ("CannotCreateError", {"error": "CannotCreateError", "message": "cannot write y; fix: free space",
                           "exit_code": 73}),
    ("MemoryError", {"error": "MemoryError", "exit_code": 65,
                     "message": "out of memory in node conform (Unable to allocate 8.00 GiB); fix: give the job more "
                                "memory and raise --mem-gb to match, or lower --nprocs, then rerun (finished scans "
                                "are reused)"}),
    ("ValueError", {"error": "ValueError", "message": "a bug's first line", "exit_code": 65}),
])
def test_a_failed_step_leaves_its_record_in_the_node_folder(tmp_path, error, expected):
    from nipype.pipeline import engine as pe

    from bids_siamese import errors
    from bids_siamese.interfaces.base import FAILURE_FILE

    exc = {"BadDataError": errors.BadDataError("x.nii.gz is not 3D; fix: give a 3D T1w"),
           "CannotCreateError": errors.CannotCreateError("cannot write y; fix: free space"),
           "MemoryError": MemoryError("Unable to allocate 8.00 GiB"),
           "ValueError": ValueError("a bug's first line\nand its second")}[error]
    FailingStep.error = exc
    node = pe.Node(FailingStep(), name="conform", base_dir=str(tmp_path))
    (tmp_path / "conform").mkdir()
    (tmp_path / "conform" / FAILURE_FILE).write_text("{}")  # an earlier run's record is replaced
    with pytest.raises(Exception):
        node.run()
    record = json.loads((tmp_path / "conform" / FAILURE_FILE).read_text())
    assert record == {"node": "conform", **expected}
    assert (tmp_path / "conform" / "result_conform.pklz").is_file()  # nipype's own handling is unchanged


def test_the_summary_reads_the_earliest_record_and_a_disk_fault_record_is_73(tmp_path):
    from types import SimpleNamespace

    from bids_siamese.bids.layout import T1wScan
    from bids_siamese.errors import CannotCreateError
    from bids_siamese.workflows import participant
    from bids_siamese.workflows.failures import failure_records, scan_failure

    scan = T1wScan(tmp_path / "bids" / "sub-01" / "anat" / "sub-01_T1w.nii.gz", {"subject": "01"})
    settings = SimpleNamespace(work_dir=tmp_path / "work", output_dir=tmp_path / "out")
    folder = participant.scan_dir(settings, scan)
    first, later = folder / "preproc_wf" / "conform", folder / "orientation_qc_wf" / "figures"
    for path, message in ((first, "first; fix: a"), (later, "later; fix: b")):
        path.mkdir(parents=True)
        (path / "failure.json").write_text(json.dumps({"node": path.name, "error": "BadDataError",
                                                        "message": message, "exit_code": 65}))
        time.sleep(0.02)
    failure = scan_failure(scan.name, failure_records(folder))
    assert failure == ("sub-01_T1w", "first; fix: a", 65, "conform", "BadDataError")
    assert failure.as_record()["node"] == "conform"
    (later / "failure.json").write_text(json.dumps({
        "node": "figures", "error": "OSError", "message": "[Errno 28] No space left on device",
        "exit_code": 65, "errno": 28, "filename": str(tmp_path / "out" / "sub-01" / "x.svg")}))
    with pytest.raises(CannotCreateError, match=f"cannot write OUTPUT_DIR {tmp_path / 'out'} .*No space left"):
        participant.finish(settings, [scan], tmp_path / "crash")


def test_an_unreadable_result_of_the_writer_is_named_at_warning(tmp_path, caplog):
    from types import SimpleNamespace

    from bids_siamese.bids.layout import T1wScan
    from bids_siamese.workflows import participant

    scan = T1wScan(tmp_path / "sub-01_T1w.nii.gz", {"subject": "01"})
    settings = SimpleNamespace(work_dir=tmp_path / "work")
    assert participant.sink_outputs(settings, scan) is None  # never ran: nothing to say
    result = participant.scan_dir(settings, scan) / "derivatives_wf" / "write_derivatives" / \
        "result_write_derivatives.pklz"
    result.parent.mkdir(parents=True)
    result.write_bytes(b"not a pickle")
    with caplog.at_level("WARNING", logger="bids_siamese.participant"):
        assert participant.sink_outputs(settings, scan) is None
    assert any(str(result) in r.getMessage() and r.levelname == "WARNING" for r in caplog.records)


def test_an_unreadable_model_card_is_named_at_warning(tmp_path, caplog):
    """--model whose card cannot be read: the participant level runs without it, and says so (it was silent)."""
    from bids_siamese.workflows.scan import model_task

    assert model_task(None) is None
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "model_card.json").write_text("{not json")
    with caplog.at_level("WARNING", logger="bids_siamese.participant"):
        assert model_task(tmp_path / "model") is None
    assert any(str(tmp_path / "model" / "model_card.json") in r.getMessage() and "fix:" in r.getMessage()
               for r in caplog.records if r.levelname == "WARNING")
    (tmp_path / "model" / "model_card.json").write_text(json.dumps({"task": "twin"}))
    assert model_task(tmp_path / "model") == "twin"


# ------------------------------------------------------------------------------------------------
# offline by proof, and a scan symlinked from outside the dataset: one end-to-end run
# ------------------------------------------------------------------------------------------------

#: Put first on PYTHONPATH as ``sitecustomize``: every Python process of the run (the CLI, its workers, any
#: Python subprocess) refuses outgoing network connections and records each attempt.
NETWORK_GUARD = """
import os, socket

_LOG = os.environ["NETWORK_GUARD_LOG"]


def _refuse(self, address, *args, **kwargs):
    if self.family in (socket.AF_INET, socket.AF_INET6):
        with open(_LOG, "a") as log:
            log.write(f"{os.getpid()} connect {address!r}\\n")
        raise ConnectionRefusedError(111, "network guard: no connection allowed in this test")
    return _original_connect(self, address, *args, **kwargs)


def _refuse_lookup(host, *args, **kwargs):  # a connection starts with a name lookup (offline: it fails there)
    if host not in (None, "localhost", "127.0.0.1", "::1", b"localhost"):
        with open(_LOG, "a") as log:
            log.write(f"{os.getpid()} getaddrinfo {host!r}\\n")
        raise socket.gaierror(socket.EAI_NONAME, "network guard: no name lookup allowed in this test")
    return _original_getaddrinfo(host, *args, **kwargs)


_original_connect = socket.socket.connect
_original_getaddrinfo = socket.getaddrinfo
socket.socket.connect = _refuse
socket.socket.connect_ex = lambda self, address: _refuse(self, address) or 0
socket.getaddrinfo = _refuse_lookup
"""


@pytest.mark.slow
def test_offline_end_to_end_with_a_symlinked_scan(reference_run, tmp_path):
    """With validation on, no Python process of the run tries to connect (the guard), and, where strace exists,
    no process at all does (the validator is a native program). sub-02's scan is a symlink to a file outside
    the dataset (as HPC datasets assembled from symlinks): processed and written like any scan."""
    import shutil

    from conftest import make_mini_bids

    bids = make_mini_bids(tmp_path / "bids")
    scan = bids / "sub-02" / "ses-1" / "anat" / "sub-02_ses-1_T1w.nii.gz"
    store = tmp_path / "store" / "a_scan_stored_elsewhere.nii.gz"
    store.parent.mkdir()
    shutil.move(scan, store)
    scan.symlink_to(store)
    guard = tmp_path / "guard"
    guard.mkdir()
    (guard / "sitecustomize.py").write_text(NETWORK_GUARD)
    log = tmp_path / "connections.log"
    env = dict(ENV, PYTHONPATH=f"{guard}{os.pathsep}{ENV['PYTHONPATH']}", NETWORK_GUARD_LOG=str(log))
    env.pop("NIPYPE_NO_ET", None)  # the app itself must turn nipype's version check off
    out = tmp_path / "out"
    command = [sys.executable, "-m", "bids_siamese", *_participant_args(bids, out, tmp_path / "work")]
    command.remove("--skip-bids-validation")
    trace = tmp_path / "connect.strace"
    if shutil.which("strace"):
        command = ["strace", "-f", "--seccomp-bpf", "-e", "trace=connect", "-o", str(trace), *command]
    proc = subprocess.run(command, capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr
    assert not log.exists(), log.read_text()
    if trace.exists():
        attempts = [line for line in trace.read_text().splitlines() if "AF_INET" in line]
        assert attempts == []
    assert_same_outputs(out, reference_run)
    assert not scan.is_file() or scan.is_symlink()  # the dataset is untouched


# ------------------------------------------------------------------------------------------------
# soak: killed at 5 random moments, resumed; the same outputs, no orphan, no stale lock
# ------------------------------------------------------------------------------------------------

def _descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (from /proc)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


@LINUX
@pytest.mark.slow
def test_soak_killed_at_five_random_moments_then_resumed(reference_run, tmp_path):
    """SIGKILL of the main process at 5 random moments (seeded), each time resumed with the same command; the
    final outputs are byte-identical to the uninterrupted reference run; no worker outlives a killed run; the
    last resume finds no stale lock (a stale one would exit 75)."""
    import random

    from conftest import make_mini_bids

    bids = make_mini_bids(tmp_path / "bids")
    out = tmp_path / "out"
    command = [sys.executable, "-m", "bids_siamese", *_participant_args(bids, out, tmp_path / "work")]
    rng = random.Random(24)
    span = float((reference_run / "seconds").read_text())
    moments = []
    for _ in range(5):
        proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV)
        moment = rng.uniform(1.0, span)
        try:
            proc.wait(timeout=moment)  # finished before the moment: nothing left to kill
        except subprocess.TimeoutExpired:
            workers = _descendants(proc.pid)
            proc.kill()
            proc.wait(timeout=30)
            moments.append(round(moment, 1))
            deadline = time.monotonic() + 15
            while any(_alive(p) for p in workers) and time.monotonic() < deadline:
                time.sleep(0.2)
            assert [p for p in workers if _alive(p)] == [], "orphaned worker process"
    assert moments, "no run was killed"
    proc = subprocess.run(command, capture_output=True, text=True, env=ENV, timeout=900)
    assert proc.returncode == 0, proc.stderr  # 75 here would be a stale lock
    assert_same_outputs(out, reference_run)


def test_an_aborted_pool_ends_its_manager_thread_before_the_exit_hook():
    """After a run is aborted (workers killed), the executor's management thread is joined, so CPython 3.11's
    exit hook finds its wake-up pipe closed instead of racing the thread that closes it (the rare
    ``Bad file descriptor`` traceback after a full disk's one-line error)."""
    from concurrent.futures import ProcessPoolExecutor, process

    from bids_siamese.workflows.plugin import join_manager_thread

    pool = ProcessPoolExecutor(max_workers=1)
    assert pool.submit(abs, -3).result(timeout=60) == 3
    wakeup, manager = pool._executor_manager_thread_wakeup, pool._executor_manager_thread
    for worker in list(pool._processes.values()):
        worker.kill()
    pool.shutdown(wait=False, cancel_futures=True)
    assert join_manager_thread(manager)
    assert wakeup._closed  # the exit hook's wakeup() is now a no-op
    assert all(w._closed for t, w in process._threads_wakeups.items() if t is manager)
