"""Participant level: one nipype sub-workflow per selected T1w scan.

``init_participant_wf`` follows fMRIPrep's habits: every node declares ``mem_gb`` and ``n_procs`` so
MultiProc never starts more torch models than the memory allows, and each per-scan workflow has an
``inputnode``/``outputnode``.
"""
from __future__ import annotations

import gc
import json
import logging
import os
import re
import time
from pathlib import Path
from typing import Any, NamedTuple

from nipype.interfaces import utility as niu
from nipype.pipeline import engine as pe

from ..bids.fmriprep import AnatDerivatives, find_anat, reuse_summary
from ..bids.layout import T1wScan, bids_relative
from ..errors import EXIT_DATA, CannotCreateError
from ..interfaces.derivatives import WriteDerivatives, output_names
from ..interfaces.preproc import (
    AffineRegistration,
    BrainExtraction,
    CheckHeader,
    Conform,
    ModelGrid,
    OrientationCheck,
    ReportFigures,
    ReuseAnatomical,
)

LOG = logging.getLogger("bids_siamese.participant")

#: Memory per node in GB, measured with benchmarks/participant.py on 1 mm scans (see docs/benchmarks.md).
MEM_GB = {"light": 0.5, "conform": 1.0, "brain": 3.0, "register": 1.5, "grid": 1.0, "figures": 0.8}

#: With ``--device cuda``: GPU nodes (deepbet, registration, embedding) MultiProc may run at once on the device.
#: deepbet needs about 2 GB of GPU memory at its 256^3 input; two at a time keep the GPU busy while one of them
#: is in its CPU part (reading, post-processing) and fit on an 8 GB card.
GPU_NODES = 2


def uses_gpu(settings) -> bool:
    """Whether torch nodes run on a CUDA device (``--device cuda[:N]``)."""
    return str(settings.device).startswith("cuda")


def torch_node_resources(settings, cpu_threads: int) -> tuple[dict[str, Any], int]:
    """Interface inputs (``device``, ``use_gpu``, ``num_threads``) and ``n_procs`` of a torch node.

    On a GPU the node declares GPU use, so that MultiProc runs at most ``n_gpu_procs`` of them at once, and takes
    one CPU thread (its CPU part is single-threaded); on the CPU it takes ``cpu_threads``.

    Examples:
        >>> from types import SimpleNamespace
        >>> torch_node_resources(SimpleNamespace(device="cuda:1"), 4)
        ({'device': 'cuda:1', 'use_gpu': True, 'num_threads': 1}, 1)
        >>> torch_node_resources(SimpleNamespace(device="cpu"), 4)
        ({'device': 'cpu', 'use_gpu': False, 'num_threads': 4}, 4)
    """
    threads = 1 if uses_gpu(settings) else max(1, int(cpu_threads))
    return {"device": str(settings.device), "use_gpu": uses_gpu(settings), "num_threads": threads}, threads


#: torch threads of the affine registrations, whatever --omp-nthreads says: its float32 sums (correlation,
#: grid_sample gradients) are split across threads, so another thread count changes the last bits of the
#: transform and of everything resampled with it. One thread keeps outputs identical across --nprocs and
#: --omp-nthreads (docs/reliability.md); the registration is a few seconds per scan.
REGISTRATION_THREADS = 1


def _wf_name(scan: T1wScan) -> str:
    return "scan_" + re.sub(r"[^A-Za-z0-9]", "_", scan.name) + "_wf"


def anatomical_derivatives(settings, scan: T1wScan) -> AnatDerivatives | None:
    """The scan's fMRIPrep/sMRIPrep files (:class:`~bids_siamese.bids.fmriprep.AnatDerivatives`), or None
    without ``--derivatives`` or when the folder has none for it (logged: the scan is then processed alone)."""
    for dataset in settings.derivatives.values():
        anat = find_anat(dataset, scan.entities, scan.name)
        if anat is None:
            LOG.warning("%s: no %s anatomical outputs in %s; using deepbet and our registration", scan.name,
                        dataset.pipeline, dataset.path)
            continue
        reused = "brain mask and T1w-to-MNI transform" if anat.xfm else "brain mask (no T1w-to-MNI transform: " \
            "estimated by our registration)"
        LOG.info("%s: reusing %s %s's %s (%s reference %s)", scan.name, dataset.pipeline, dataset.version, reused,
                 anat.layout, dataset.uri(anat.preproc))
        return anat
    return None


def model_task(model: Path | None) -> str | None:
    """The task recorded in a checkpoint's model card (None without a model or card)."""
    if model is None:
        return None
    model = Path(model)
    card = model / "model_card.json" if model.is_dir() else model.with_name("model_card.json")
    try:
        return str(json.loads(card.read_text())["task"])
    except (OSError, ValueError, KeyError):
        return None


def init_scan_wf(scan: T1wScan, settings, name: str | None = None) -> pe.Workflow:
    """Preprocessing, orientation QC, figures and derivatives for one T1w scan."""
    omp = settings.omp_nthreads
    wf = pe.Workflow(name=name or _wf_name(scan))
    inputnode = pe.Node(niu.IdentityInterface(fields=["t1w"]), name="inputnode")
    inputnode.inputs.t1w = str(scan.path)
    outputnode = pe.Node(niu.IdentityInterface(fields=["orientation", "out_files"]), name="outputnode")

    check = pe.Node(CheckHeader(max_gb=settings.mem_gb), name="check_header", mem_gb=MEM_GB["conform"], n_procs=1)
    conform = pe.Node(Conform(), name="conform", mem_gb=MEM_GB["conform"], n_procs=1)
    # one thread each (REGISTRATION_THREADS: outputs do not depend on the thread count); the tensors are small
    # (<= 60,000 points), extra threads only stall; the shear-free one refines the affine one (issue 27)
    reg_inputs, reg_procs = torch_node_resources(settings, REGISTRATION_THREADS)
    register = pe.Node(
        AffineRegistration(resolution=max(settings.resolution, 2.0), seed=settings.seed, **reg_inputs),
        name="register", mem_gb=MEM_GB["register"], n_procs=reg_procs,
    )
    # the orientation check needs a shear-free registration (shears imitate the brain's torque asymmetry)
    register_qc = pe.Node(
        AffineRegistration(resolution=max(settings.resolution, 2.0), seed=settings.seed, dof=9, **reg_inputs),
        name="register_shear_free", mem_gb=MEM_GB["register"], n_procs=reg_procs,
    )
    grid = pe.Node(ModelGrid(resolution=settings.resolution), name="model_grid", mem_gb=MEM_GB["grid"], n_procs=1)
    # it registers the mirrored image: one thread, as the registrations, so outputs do not depend on --omp-nthreads
    orient = pe.Node(OrientationCheck(resolution=max(settings.resolution, 2.0), seed=settings.seed,
                                      device=settings.device, num_threads=REGISTRATION_THREADS),
                     name="orientation", mem_gb=MEM_GB["register"], n_procs=REGISTRATION_THREADS)
    if settings.orientation_model:
        orient.inputs.orientation_model = str(settings.orientation_model)
    figures = pe.Node(ReportFigures(), name="figures", mem_gb=MEM_GB["figures"], n_procs=1)
    merge_figs = pe.Node(niu.Merge(3), name="merge_figures", mem_gb=MEM_GB["light"], n_procs=1)
    sink = pe.Node(
        WriteDerivatives(
            output_dir=str(settings.output_dir), bids_dir=str(settings.bids_dir), source_file=str(scan.path),
            entities=dict(scan.entities), resolution=settings.resolution, resolution_label=settings.resolution_label,
        ),
        name="write_derivatives", mem_gb=MEM_GB["light"], n_procs=1, overwrite=True,
    )

    from ..interfaces.symmetry import AsymmetryAnalysis

    task = model_task(settings.model)
    # torch threads only for the Siamese symmetry model; the slots it holds match the threads it uses
    asymmetry_threads = omp if task == "symmetry" else 1
    asymmetry = pe.Node(AsymmetryAnalysis(atlas=settings.atlas, num_threads=asymmetry_threads), name="asymmetry",
                        mem_gb=MEM_GB["grid"], n_procs=asymmetry_threads)
    if task == "symmetry":
        asymmetry.inputs.model = str(settings.model)
    wf.connect([
        (grid, asymmetry, [("out_file", "in_file"), ("out_mask", "in_mask")]),
        (asymmetry, sink, [("out_map", "asymmetry_map"), ("out_regions", "asymmetry_regions"),
                           ("out_report", "asymmetry_report")]),
    ])
    if task in ("twin", "longitudinal"):
        from ..interfaces.embedding import ComputeEmbedding

        embed_inputs, embed_procs = torch_node_resources(settings, omp)
        embed = pe.Node(ComputeEmbedding(model=str(settings.model), **embed_inputs),
                        name="embedding", mem_gb=MEM_GB["brain"], n_procs=embed_procs)
        wf.connect([(grid, embed, [("out_file", "in_file")]),
                    (embed, sink, [("out_tsv", "embedding"), ("out_task", "embedding_task")])])

    anat = anatomical_derivatives(settings, scan)
    wf.connect([(inputnode, check, [("t1w", "in_file")]), (check, orient, [("out_checks", "in_checks")]),
                (check, conform, [("out_file", "in_file")])])
    # every scan keeps its own raw image (its orientation, figures and model-grid volume): a pipeline's reference
    # made from several sessions gives each session only its mask and transform, moved onto the session's image
    if anat is None:
        brain_inputs, brain_procs = torch_node_resources(settings, omp)
        native_mask = pe.Node(BrainExtraction(**brain_inputs), name="brain_extraction", mem_gb=MEM_GB["brain"],
                              n_procs=brain_procs)
        wf.connect([(conform, native_mask, [("out_file", "in_file")])])
    else:
        sink.inputs.brain_source = anat.dataset.name
        native_mask = pe.Node(ReuseAnatomical(anat=anat.as_dict(), anat_files=[str(p) for p in anat.files()],
                                              scan=str(bids_relative(scan.path, settings.bids_dir))),
                              name="reuse_anatomical", mem_gb=MEM_GB["conform"], n_procs=1)
        wf.connect([(conform, native_mask, [("out_file", "in_file")]),
                    (native_mask, sink, [("out_report", "reuse_report")])])
    transform = register if anat is None or anat.xfm is None else native_mask
    wf.connect([(transform, grid, [("out_matrix", "in_matrix")]), (transform, sink, [("out_itk", "xfm")])])
    if transform is register:
        wf.connect([(conform, register, [("out_file", "in_file")]), (native_mask, register, [("out_mask", "in_mask")])])
        # the shear-free registration refines the affine one (issue 27) instead of searching from scratch
        wf.connect([(register, register_qc, [("out_matrix", "in_initial")])])
    wf.connect([
        (conform, register_qc, [("out_file", "in_file")]),
        (native_mask, register_qc, [("out_mask", "in_mask")]),
        (conform, orient, [("out_file", "t1w")]),
        (conform, figures, [("out_file", "t1w")]),
        (native_mask, figures, [("out_mask", "native_mask")]),
        (native_mask, orient, [("out_mask", "native_mask")]),
        (native_mask, sink, [("out_mask", "native_mask")]),
        (conform, grid, [("out_file", "in_file")]),
        (native_mask, grid, [("out_mask", "in_mask")]),
    ])

    wf.connect([
        (register_qc, orient, [("out_matrix", "in_matrix")]),
        *([(grid, orient, [("out_file", "grid_file")])] if settings.orientation_model else []),
        (grid, figures, [("out_file", "grid_file")]),
        (figures, merge_figs, [("out_mask_svg", "in1"), ("out_reg_svg", "in2"), ("out_orient_svg", "in3")]),
        (merge_figs, sink, [("out", "figures")]),
        (grid, sink, [("out_file", "preproc"), ("out_mask", "grid_mask")]),
        (orient, sink, [("out_report", "orientation")]),
        (sink, outputnode, [("out_orientation", "orientation"), ("out_files", "out_files")]),
    ])
    # Nodes whose file inputs are all written by this workflow hash them by size and modification time (nipype's
    # default) instead of by content: six of them read the float32 1 mm T1w (30-65 MB), and an md5 of it in each
    # cost about 0.5 CPU s per scan. A rerun still reuses them: their inputs keep their times unless an upstream
    # node ran again. Nodes that read the user's files (BIDS, fMRIPrep, a model) keep content hashing.
    intermediate = [register_qc, grid, orient, figures, merge_figs, sink]
    intermediate += [register] if transform is register else []
    intermediate += [native_mask] if anat is None else []
    intermediate += [asymmetry] if task != "symmetry" else []
    for node in intermediate:
        node.config = {"execution": {"hash_method": "timestamp"}}
    return wf


def init_participant_wf(scans: list[T1wScan], settings, name: str = "bids_siamese_wf") -> pe.Workflow:
    """The participant-level workflow: one :func:`init_scan_wf` per scan."""
    wf = pe.Workflow(name=name)
    wf.base_dir = str(settings.work_dir)
    for scan in scans:
        wf.add_nodes([init_scan_wf(scan, settings)])
    return wf


def plugin_settings(settings) -> tuple[str, dict[str, Any]]:
    """MultiProc with --nprocs/--mem-gb, or the plugin given by --use-plugin (YAML or JSON)."""
    if settings.use_plugin is not None:
        from .plugin import load_plugin_file

        return load_plugin_file(settings.use_plugin)
    if settings.nprocs == 1:
        return "Linear", {}
    # MultiProc reuses its worker processes across nodes (nipype 1.11 MultiProc ignores maxtasksperchild), so
    # imports, deepbet's networks and the template caches are loaded once per worker, not once per node
    args: dict[str, Any] = {"n_procs": settings.nprocs, "memory_gb": settings.mem_gb, "raise_insufficient": False}
    if uses_gpu(settings):
        # GPU nodes (use_gpu) share GPU_NODES slots; workers start from a fresh forkserver process, since CUDA
        # cannot be used in a child forked from a process that has queried it
        args.update(n_gpu_procs=GPU_NODES, mp_context="forkserver")
    return "MultiProc", args


class ScanFailure(NamedTuple):
    """A scan that did not finish: its name, the one-line reason and the exit code it calls for."""

    name: str
    message: str
    exit_code: int = EXIT_DATA


def _exit_code_of(error_class: str) -> int:
    """Exit code of a :class:`~bids_siamese.errors.UserError` subclass named in a crash file (65 otherwise)."""
    from .. import errors

    cls = getattr(errors, error_class, None)
    if isinstance(cls, type) and issubclass(cls, errors.UserError):
        return cls.exit_code
    return EXIT_DATA


#: The last line of a traceback that ran out of memory (numpy, Python, torch's CPU allocator); group: the detail.
OUT_OF_MEMORY = re.compile(r"^\s*(?:[\w.]+\.)?(?:_Array|OutOf)?MemoryError\b:? ?(.*)$|"
                           r"DefaultCPUAllocator: (can't allocate memory.*)$", re.M)


def _crash_messages(crash_dir: Path) -> dict[str, tuple[str, int]]:
    """Map per-scan workflow name -> (the one-line error of its crashed node, exit code)."""
    messages: dict[str, tuple[str, int]] = {}
    for crash in sorted(crash_dir.glob("crash-*.txt")):
        text = crash.read_text(errors="replace")
        node = re.search(r"^Node: (\S+)", text, re.M)
        wf = next((part for part in (node.group(1).split(".") if node else []) if part.startswith("scan_")), None)
        if wf is None:
            continue
        user = re.findall(r"(?:bids_siamese\.errors\.)?(\w*Error): (.+)", text)
        memory = OUT_OF_MEMORY.findall(text)  # numpy/torch could not allocate: ulimit -v or a cgroup
        if memory:
            detail = "".join(memory[-1]).strip()
            messages.setdefault(wf, (
                f"out of memory in node {node.group(1).split('.')[-1] if node else '?'}"
                f"{f' ({detail})' if detail else ''}; fix: give the job more memory and raise --mem-gb to match, "
                "or lower --nprocs, then rerun (finished scans are reused)", EXIT_DATA))
        elif user:
            messages.setdefault(wf, (user[-1][1].strip(), _exit_code_of(user[-1][0])))
        else:
            messages.setdefault(wf, (f"see {crash}", EXIT_DATA))
    return messages


def warm_worker_caches(settings) -> None:
    """Build, in the main process, the per-process caches every MultiProc worker would otherwise build for itself.

    MultiProc forks its workers when the first node is submitted, so they inherit these copy-on-write: the
    template on the model grid (orientation check, figures), the atlas and the template's own asymmetry
    (asymmetry node), the template side of the registration, and the figure modules. About 3 CPU seconds once
    instead of once per worker. numpy/scipy only, and torch with one thread, so that forking stays safe.
    """
    import nibabel as nib

    from ..interfaces.symmetry import DEFAULT_FWHM
    from ..preproc.brain import torch_threads
    from ..preproc.grid import template_on_grid
    from ..preproc.register import pyramid_levels, template_side
    from ..reports import figures  # noqa: F401  (matplotlib)
    from ..resources import model_grid, template_brain_path
    from ..atlas import atlas_on_grid
    from ..symmetry.analysis import template_reference

    template_on_grid(model_grid(settings.resolution))
    atlas_on_grid(settings.atlas, settings.resolution)
    template_reference(settings.resolution, DEFAULT_FWHM, settings.atlas)
    with torch_threads(1):
        template_side(nib.load(template_brain_path()), None, pyramid_levels(max(settings.resolution, 2.0)),
                      settings.seed)


def _sink_outputs(settings, scan: T1wScan) -> list[str] | None:
    """The files the scan's ``write_derivatives`` node wrote in this run (None when it did not finish)."""
    from nipype.pipeline.engine.utils import load_resultfile

    result = Path(settings.work_dir) / "bids_siamese_wf" / _wf_name(scan) / "write_derivatives" / \
        "result_write_derivatives.pklz"
    try:
        outputs = load_resultfile(str(result)).outputs
        return list(outputs.out_files) if outputs is not None else None
    except Exception:  # noqa: BLE001 - a missing, partial or foreign result file means "not finished"
        return None


def run_participant(settings, scans: list[T1wScan]) -> list[ScanFailure]:
    """Run the workflow; return a :class:`ScanFailure` for each failed scan (others finish).

    Each scan ends with its completion record (``*_desc-status_qc.json``, ``ok`` or ``failed`` with the
    reason), written after its derivatives and its subject's report.
    """
    from nipype import config as nipype_config

    crash_dir = settings.log_dir / "crash"
    wf = init_participant_wf(scans, settings)
    wf.config["execution"] = {
        "crashdump_dir": str(crash_dir),
        "crashfile_format": "txt",
        "stop_on_first_crash": False,
        "remove_unnecessary_outputs": False,
        "hash_method": "content",
        "poll_sleep_duration": 0.2,
        "create_report": False,
    }
    wf.config["monitoring"] = {"enabled": False}
    nipype_config.set("execution", "check_version", "false")
    plugin, plugin_args = plugin_settings(settings)
    LOG.info("running %d scan workflow(s) with %s %s", len(scans), plugin, plugin_args)
    if plugin == "MultiProc" and "mp_context" not in plugin_args and scans:
        warm_worker_caches(settings)  # forked workers inherit them
    # MultiProc calls gc.collect() in its scheduling loop (up to 5 times a second); freezing what exists now (the
    # imported modules, the BIDS layout, the workflow graph) keeps each collection to the objects made since
    gc.freeze()
    started = time.time()
    from ..cli.signals import raise_if_interrupted, workers_die_with_us

    try:
        with workers_die_with_us(plugin_args):
            if plugin == "MultiProc":  # a worker's death fails its node instead of hanging the run
                from .plugin import multiproc_plugin

                wf.run(plugin=multiproc_plugin(plugin_args))
            else:
                wf.run(plugin=plugin, plugin_args=plugin_args)
    except RuntimeError as err:  # nipype raises after the other nodes finished
        LOG.debug("workflow finished with errors: %s", err)
    except OSError as err:  # a full/read-only disk (the plugin ends the run), or nipype could not write its files
        raise disk_error(settings, err.filename, err.strerror or str(err)) from err
    finally:
        gc.unfreeze()
    # SIGTERM/SIGINT while a node ran in this process (Linear): nipype reported it as the node's failure, but the
    # scan was stopped, not failed; no completion record, exit 143/130 (a rerun resumes)
    raise_if_interrupted()
    if plugin == "SLURMGraph":  # it submitted the graph's jobs and returned
        from .plugin import wait_for_slurm_graph

        wait_for_slurm_graph(Path(settings.work_dir) / wf.name / "batch", started)

    try:
        return _finish(settings, scans, crash_dir)
    except OSError as err:  # the reports, completion records, QC records in OUTPUT_DIR
        raise disk_error(settings, err.filename, err.strerror or str(err)) from err


def disk_error(settings, path: str | Path | None, reason: str) -> CannotCreateError:
    """Exit 73 naming the folder that cannot be written (OUTPUT_DIR or the work dir) and the fix.

    ``path`` is the file that failed, when known; without it, the folder that is full or read-only is named.
    """
    output_dir, work_dir = Path(settings.output_dir), Path(settings.work_dir)
    target = Path(path) if path else next((d for d in (output_dir, work_dir) if _unwritable(d)), None)
    where = f" ({target})" if target is not None and target not in (output_dir, work_dir) else ""
    if target is not None and target.is_relative_to(output_dir):
        return CannotCreateError(f"cannot write OUTPUT_DIR {output_dir}{where}: {reason}; fix: free space or restore "
                                 "write access to OUTPUT_DIR, then rerun (finished scans are reused)")
    if target is None or target.is_relative_to(work_dir):
        return CannotCreateError(f"cannot write the work dir {work_dir}{where}: {reason}; fix: free space or restore "
                                 "write access there, or pass -w with a folder on another disk, then rerun (finished "
                                 "scans are reused)")
    return CannotCreateError(f"cannot write {target}: {reason}; fix: free space or restore write access, then rerun")


def _unwritable(folder: Path, min_free: int = 1 << 20) -> bool:
    """Whether ``folder``'s file system is read-only or has less than ``min_free`` bytes left."""
    try:
        stat = os.statvfs(folder)
    except OSError:
        return False
    return bool(stat.f_flag & os.ST_RDONLY) or stat.f_bavail * stat.f_frsize < min_free


def _finish(settings, scans: list[T1wScan], crash_dir: Path) -> list[ScanFailure]:
    """After the workflow: the failures, the subject reports, the completion records and the gate's line."""
    from .plugin import find_disk_fault

    for crash in sorted(crash_dir.glob("crash-*.txt")) if crash_dir.exists() else []:
        fault = find_disk_fault(crash.read_text(errors="replace"))  # Linear or a cluster plugin ran on
        if fault is not None:
            raise disk_error(settings, fault[2], fault[1])
    messages = _crash_messages(crash_dir) if crash_dir.exists() else {}
    failures: list[ScanFailure] = []
    written: dict[str, list[str]] = {}
    for scan in scans:
        files = _sink_outputs(settings, scan) if _wf_name(scan) not in messages else None
        if files is not None:
            written[scan.name] = files
        else:
            message, code = messages.get(_wf_name(scan), ("did not finish; see the crash files", EXIT_DATA))
            failures.append(ScanFailure(scan.name, message, code))
    write_reports(settings, scans, [(f.name, f.message) for f in failures])
    write_completion_records(settings, scans, written, failures)
    from ..qc.gate import qc_summary_line

    done: dict[str, list[dict[str, Any]]] = {}
    for scan in scans:
        if scan.name in written:
            qc = settings.output_dir / output_names(scan.entities, settings.resolution_label)["orientation"]
            done.setdefault(scan.entities["subject"], []).append(json.loads(qc.read_text()))
    unusable = sorted(scan_qc_failures(done))
    (LOG.warning if unusable else LOG.info)(qc_summary_line(unusable, checked=len(written)))
    return failures


def write_completion_records(settings, scans: list[T1wScan], written: dict[str, list[str]],
                             failures: list[ScanFailure]) -> None:
    """The last write of every scan: ``ok`` with its files, or ``failed`` with the reason."""
    from ..bids.derivatives import STATUS_FAILED, STATUS_OK, write_completion_record

    failed = {f.name: f for f in failures}
    for scan in scans:
        rel = output_names(scan.entities, settings.resolution_label)["status"]
        if scan.name in written:
            write_completion_record(settings.output_dir, rel, status=STATUS_OK, scan=scan.path.name,
                                    run_id=settings.run_id, files=written[scan.name])
        elif failed[scan.name].exit_code == EXIT_DATA:  # not when the output itself failed
            write_completion_record(settings.output_dir, rel, status=STATUS_FAILED, scan=scan.path.name,
                                    run_id=settings.run_id, reason=failed[scan.name].message)


def scan_qc_failures(records: dict[str, list[dict[str, Any]]]) -> list[str]:
    """Names of the scans whose usable-scan gate failed, from the orientation QC records per subject."""
    return [str(rec.get("scan", "?")) for recs in records.values() for rec in recs if not rec.get("usable", True)]


#: Orientation QC fields the subject report shows.
ORIENTATION_REPORT_KEYS = (
    "lr_flip_probability", "lr_flip_suspected", "lr_flip_verdict", "lr_flip_confidence", "lr_flip_source",
    "lr_flip_statistic", "lr_flip_statistic_mirrored", "lr_flip_difference", "lr_flip_margin",
    "qc_status", "usable", "qc_reasons",
)


def write_reports(settings, scans: list[T1wScan], failures: list[tuple[str, str]]) -> list[Path]:
    """One ``sub-<label>.html`` per subject from the written derivatives (failed scans shown as such)."""
    from .. import __version__
    from ..reports.html import render_subject_report

    failed = dict(failures)
    by_subject: dict[str, list[dict[str, Any]]] = {}
    for scan in scans:
        names = output_names(scan.entities, settings.resolution_label)
        entry: dict[str, Any] = {"name": scan.name, "source": str(bids_relative(scan.path, settings.bids_dir))}
        if scan.name in failed:
            entry.update(error=failed[scan.name], header_checks=[], orientation={}, figures={})
        else:
            qc = json.loads((settings.output_dir / names["orientation"]).read_text())
            entry.update(
                header_checks=qc["header_checks"],
                orientation={key: qc.get(key) for key in ORIENTATION_REPORT_KEYS} | {"threshold": qc["lr_flip_threshold"]},
                figures={"Brain mask": str(names["figure_brainmask"]), "Registration": str(names["figure_reg"]),
                         "Orientation": str(names["figure_orientation"])},
                metrics={"Brain volume (cm³)": qc.get("brain_volume_cm3"),
                         "Correlation with template": qc.get("template_correlation"),
                         "Affine scales": "/".join(f"{v:.2f}" for v in qc.get("affine_scales", [])) or None,
                         "Field of view covers template brain": qc.get("fov_coverage"),
                         "Obliquity (information)": qc.get("obliquity") or None,
                         **reuse_summary(qc.get("anatomical_derivatives"))},
            )
        by_subject.setdefault(scan.entities["subject"], []).append(entry)
    written = []
    for subject, entries in by_subject.items():
        path = settings.output_dir / f"sub-{subject}.html"
        render_subject_report(subject, entries, out_path=path, app_version=__version__)
        written.append(path)
    return written
