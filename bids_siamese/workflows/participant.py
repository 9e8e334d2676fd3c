"""Participant level: one nipype workflow per selected T1w scan, then the run's summary.

:func:`init_participant_wf` holds one :func:`~bids_siamese.workflows.scan.init_scan_wf` per scan (its
sub-workflows: preprocessing, orientation QC, asymmetry, embedding, derivatives). :func:`run_participant` runs
it with the plugin of :func:`plugin_settings`, then, per scan, reads what the derivatives writer wrote or the
failure record the failed step left (``workflows/failures.py``), and writes the subject reports and the
completion records.
"""
from __future__ import annotations

import gc
import logging
import os
import time
from pathlib import Path
from typing import Any

from nipype import config as nipype_config
from nipype.pipeline import engine as pe
from nipype.pipeline.engine.utils import load_resultfile

from .. import __version__
from ..atlas import atlas_on_grid
from ..bids.derivatives import CRASH_FOLDER, RUN_FAILURES, output_names, run_log_dir, subject_report_name, write_json
from ..bids.records import STATUS_FAILED, STATUS_OK, read_qc_record, write_completion_record
from ..bids.fmriprep import reuse_summary
from ..bids.layout import T1wScan, bids_relative
from ..config import Settings
from ..errors import EXIT_DATA, CannotCreateError
from ..interfaces.symmetry import DEFAULT_FWHM
from ..preproc.grid import template_on_grid
from ..qc.gate import qc_summary_line, record_usable
from ..reports.html import render_subject_report
from ..resources import model_grid
from ..symmetry.analysis import template_reference
from .failures import (
    ScanFailure,
    clear_failure_records,
    crash_file_disk_fault,
    disk_fault,
    failure_records,
    scan_failure,
)
from .plugin import load_plugin_file, multiproc_plugin, wait_for_slurm_graph
from .scan import init_scan_wf, scan_wf_name, uses_gpu
from .signals import raise_if_interrupted, workers_die_with_us
from .workdir import WORKFLOW_FOLDER

LOG = logging.getLogger("bids_siamese.participant")

#: With ``--device cuda``: GPU nodes (deepbet, registration, embedding) MultiProc may run at once on the device.
#: deepbet needs about 2 GB of GPU memory at its 256^3 input; two at a time keep the GPU busy while one of them
#: is in its CPU part (reading, post-processing) and fit on an 8 GB card.
GPU_NODES = 2


def init_participant_wf(scans: list[T1wScan], settings: Settings, name: str = WORKFLOW_FOLDER) -> pe.Workflow:
    """The participant-level workflow: one :func:`~bids_siamese.workflows.scan.init_scan_wf` per scan."""
    wf = pe.Workflow(name=name)
    wf.base_dir = str(settings.work_dir)
    for scan in scans:
        wf.add_nodes([init_scan_wf(scan, settings)])
    return wf


def plugin_settings(settings: Settings) -> tuple[str, dict[str, Any]]:
    """MultiProc with --nprocs/--mem-gb, or the plugin given by --use-plugin (YAML or JSON)."""
    if settings.use_plugin is not None:
        return load_plugin_file(settings.use_plugin)
    if settings.nprocs == 1:
        return "Linear", {}
    # MultiProc reuses its worker processes across nodes (nipype 1.11 MultiProc ignores maxtasksperchild), so
    # imports, deepbet's networks and the template caches are loaded once per worker, not once per node
    args: dict[str, Any] = {"n_procs": settings.nprocs, "memory_gb": settings.mem_gb, "raise_insufficient": False}
    if uses_gpu(settings.device):
        # GPU nodes (use_gpu) share GPU_NODES slots; workers start from a fresh forkserver process, since CUDA
        # cannot be used in a child forked from a process that has queried it
        args.update(n_gpu_procs=GPU_NODES, mp_context="forkserver")
    return "MultiProc", args


def warm_worker_caches(resolution: float, atlas: str) -> None:
    """Build, in the main process, the per-process caches every MultiProc worker would otherwise build for itself.

    MultiProc forks its workers when the first node is submitted, so they inherit these copy-on-write: the
    template on the model grid (orientation check, figures), and the atlas and the template's own asymmetry
    (asymmetry node). numpy/scipy only, so that forking stays safe. The template side of the registration is
    not warmed here: it is built with torch, which is not fork-safe once used, so each worker builds it once
    (:func:`~bids_siamese.preproc.register.template_side`, about 0.5 s).
    """
    template_on_grid(model_grid(resolution))
    atlas_on_grid(atlas, resolution)
    template_reference(resolution, DEFAULT_FWHM, atlas)


def scan_dir(settings: Settings, scan: T1wScan) -> Path:
    """The scan's workflow folder in the work dir."""
    return Path(settings.work_dir) / WORKFLOW_FOLDER / scan_wf_name(scan)


def sink_outputs(settings: Settings, scan: T1wScan) -> list[str] | None:
    """The files the scan's ``write_derivatives`` node wrote (None when it did not finish; a result file that
    cannot be read is named at WARNING and counts as not finished)."""
    result = scan_dir(settings, scan) / "derivatives_wf" / "write_derivatives" / "result_write_derivatives.pklz"
    if not result.is_file():
        return None
    try:
        outputs = load_resultfile(str(result)).outputs
    except Exception as err:  # noqa: BLE001 - a partial or foreign pickle fails in many ways
        LOG.warning("%s: cannot read %s (%s: %s): the scan counts as not finished; fix: rerun it", scan.name, result,
                    type(err).__name__, err)
        return None
    return list(outputs.out_files) if outputs is not None else None


def run_participant(settings: Settings, scans: list[T1wScan]) -> list[ScanFailure]:
    """Run the workflow; return a :class:`~bids_siamese.workflows.failures.ScanFailure` for each failed scan
    (the others finish).

    Each scan ends with its completion record (``*_desc-status_qc.json``, ``ok`` or ``failed`` with the
    reason), written after its derivatives and its subject's report.
    """
    crash_dir = run_log_dir(settings.output_dir, settings.run_id) / CRASH_FOLDER
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
        warm_worker_caches(settings.resolution, settings.atlas)  # forked workers inherit them
    clear_failure_records([scan_dir(settings, scan) for scan in scans])  # records read afterwards: this run's
    # MultiProc calls gc.collect() in its scheduling loop (up to 5 times a second); freezing what exists now (the
    # imported modules, the BIDS layout, the workflow graph) keeps each collection to the objects made since
    gc.freeze()
    started = time.time()
    try:
        with workers_die_with_us(plugin_args):
            if plugin == "MultiProc":  # a worker's death fails its node instead of hanging the run
                wf.run(plugin=multiproc_plugin(plugin_args))
            else:
                wf.run(plugin=plugin, plugin_args=plugin_args)
    except RuntimeError as err:  # nipype raises after the other nodes finished; each failure has its record
        LOG.debug("workflow finished with errors: %s", err)
    except OSError as err:  # a full/read-only disk (the plugin ends the run), or nipype could not write its files
        raise disk_error(settings, err.filename, err.strerror or str(err)) from err
    finally:
        gc.unfreeze()
    # SIGTERM/SIGINT while a node ran in this process (Linear): nipype reported it as the node's failure, but the
    # scan was stopped, not failed; no completion record, exit 143/130 (a rerun resumes)
    raise_if_interrupted()
    if plugin == "SLURMGraph":  # it submitted the graph's jobs and returned
        wait_for_slurm_graph(Path(settings.work_dir) / wf.name / "batch", started)

    try:
        return finish(settings, scans, crash_dir)
    except OSError as err:  # the reports, completion records, QC records in OUTPUT_DIR
        raise disk_error(settings, err.filename, err.strerror or str(err)) from err


def disk_error(settings: Settings, path: str | Path | None, reason: str) -> CannotCreateError:
    """Exit 73 naming the folder that cannot be written (OUTPUT_DIR or the work dir) and the fix.

    ``path`` is the file that failed, when known; without it, the folder that is full or read-only is named.
    """
    output_dir, work_dir = Path(settings.output_dir), Path(settings.work_dir)
    target = Path(path) if path else next((d for d in (output_dir, work_dir) if unwritable(d)), None)
    where = f" ({target})" if target is not None and target not in (output_dir, work_dir) else ""
    if target is not None and target.is_relative_to(output_dir):
        return CannotCreateError(f"cannot write OUTPUT_DIR {output_dir}{where}: {reason}; fix: free space or restore "
                                 "write access to OUTPUT_DIR, then rerun (finished scans are reused)")
    if target is None or target.is_relative_to(work_dir):
        return CannotCreateError(f"cannot write the work dir {work_dir}{where}: {reason}; fix: free space or restore "
                                 "write access there, or pass -w with a folder on another disk, then rerun (finished "
                                 "scans are reused)")
    return CannotCreateError(f"cannot write {target}: {reason}; fix: free space or restore write access, then rerun")


def unwritable(folder: Path, min_free: int = 1 << 20) -> bool:
    """Whether ``folder``'s file system is read-only or has less than ``min_free`` bytes left (False when it
    cannot be asked: a probe that only chooses which folder a message names)."""
    try:
        stat = os.statvfs(folder)
    except OSError:
        return False
    return bool(stat.f_flag & os.ST_RDONLY) or stat.f_bavail * stat.f_frsize < min_free


def finish(settings: Settings, scans: list[T1wScan], crash_dir: Path) -> list[ScanFailure]:
    """After the workflow: the failures (also as ``logs/<run_id>/failures.json``), the subject reports, the
    completion records and the gate's line."""
    failures: list[ScanFailure] = []
    written: dict[str, list[str]] = {}
    unrecorded = False
    for scan in scans:
        records = failure_records(scan_dir(settings, scan))
        fault = disk_fault(records)  # Linear or a cluster plugin ran on after a full or read-only disk
        if fault is not None:
            raise disk_error(settings, fault[2], fault[1])
        files = sink_outputs(settings, scan) if not records else None
        if files is not None:
            written[scan.name] = files
        else:
            failures.append(scan_failure(scan.name, records))
            unrecorded = unrecorded or not records
    # a full disk can also stop the step from leaving its record: then only nipype's crash file names the fault
    fault = crash_file_disk_fault(crash_dir) if unrecorded else None
    if fault is not None:
        raise disk_error(settings, fault[2], fault[1])
    if failures:  # the FAILED lines as data, for scripts that rerun or report the failed scans
        write_json(run_log_dir(settings.output_dir, settings.run_id) / RUN_FAILURES,
                   [failure.as_record() for failure in failures])
    write_reports(settings, scans, failures)
    write_completion_records(settings, scans, written, failures)
    qc_records = {scan.name: read_qc_record(settings.output_dir / output_names(scan.entities)["orientation"])
                  for scan in scans if scan.name in written}
    unusable = sorted(str((record or {}).get("scan", name)) for name, record in qc_records.items()
                      if not record_usable(record))
    (LOG.warning if unusable else LOG.info)(qc_summary_line(unusable, checked=len(written)))
    return failures


def write_completion_records(settings: Settings, scans: list[T1wScan], written: dict[str, list[str]],
                             failures: list[ScanFailure]) -> None:
    """The last write of every scan: ``ok`` with its files, or ``failed`` with the reason."""
    failed = {f.name: f for f in failures}
    for scan in scans:
        rel = output_names(scan.entities)["status"]
        if scan.name in written:
            write_completion_record(settings.output_dir, rel, status=STATUS_OK, scan=scan.path.name,
                                    run_id=settings.run_id, files=written[scan.name])
        elif failed[scan.name].exit_code == EXIT_DATA:  # not when the output itself failed
            write_completion_record(settings.output_dir, rel, status=STATUS_FAILED, scan=scan.path.name,
                                    run_id=settings.run_id, reason=failed[scan.name].message)


#: Orientation QC fields the subject report shows.
ORIENTATION_REPORT_KEYS = (
    "lr_flip_probability", "lr_flip_suspected", "lr_flip_verdict", "lr_flip_confidence", "lr_flip_source",
    "lr_flip_statistic", "lr_flip_statistic_mirrored", "lr_flip_difference", "lr_flip_margin",
    "qc_status", "usable", "qc_reasons",
)


def write_reports(settings: Settings, scans: list[T1wScan], failures: list[ScanFailure]) -> list[Path]:
    """One ``sub-<label>.html`` per subject from the written derivatives (failed scans shown as such)."""
    failed = {failure.name: failure.message for failure in failures}
    by_subject: dict[str, list[dict[str, Any]]] = {}
    for scan in scans:
        names = output_names(scan.entities)
        entry: dict[str, Any] = {"name": scan.name, "source": str(bids_relative(scan.path, settings.bids_dir))}
        if scan.name in failed:
            entry.update(error=failed[scan.name], header_checks=[], orientation={}, figures={})
        else:
            qc = read_qc_record(settings.output_dir / names["orientation"]) or {}
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
        path = settings.output_dir / subject_report_name(subject)
        render_subject_report(subject, entries, out_path=path, app_version=__version__)
        written.append(path)
    return written
