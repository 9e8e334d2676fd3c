"""Running an analysis level once its arguments are checked: logging, selection, outputs, the level itself.

Imported by :func:`bids_siamese.cli.main.main` only after the arguments parse, so that ``--help``,
``--version`` and a usage error answer without loading nipype, torch or pybids.
"""
from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

from nipype import config as nipype_config
from nipype import logging as nipype_logging

from ..bids.derivatives import (
    CRASH_FOLDER,
    RUN_COMMAND,
    RUN_SETTINGS,
    RUN_TEMPLATES,
    TEMPLATE_STATE,
    init_output_dir,
    run_log_dir,
    sweep_partial_files,
    write_json,
    write_text,
)
from ..bids.layout import T1wScan, collect_t1w, resolve_participants, validate_dataset
from ..bids.locks import subject_locks
from ..config import Settings
from ..errors import EXIT_DATA, EXIT_NO_INPUT, EXIT_OK, NoInputError
from ..resources import templates_used
from ..train.pairs import read_participants
from ..workflows import participant
from ..workflows.group import check_checkpoint, collect_scan_status, run_group, status_summary
from ..workflows.scan import scan_wf_name
from ..workflows.workdir import clean_work_dir, folder_size, human_size
from .main import say

LOG = logging.getLogger("bids_siamese")


def setup_logging(verbosity: int) -> None:
    level = logging.WARNING - 10 * min(verbosity + 1, 2)  # default INFO, -v DEBUG
    logging.basicConfig(level=level, format="%(asctime)s [%(name)s] %(levelname)s: %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("bidsschematools").setLevel(logging.WARNING)
    # matplotlib announces at INFO that it built its font cache (first run of each user): not the run's news
    logging.getLogger("matplotlib").setLevel(logging.WARNING)
    if verbosity == 0:  # header repairs nibabel announces are reported by our header checks
        logging.getLogger("nibabel").setLevel(logging.ERROR)
    # nipype logs every crashed node with its traceback (39-68 lines): the traceback stays in the crash file
    # and the terminal gets our one line per failed scan; -vv shows nipype's own log again
    nipype_level = "INFO" if verbosity >= 2 else "CRITICAL"
    for key in ("workflow_level", "interface_level", "utils_level"):
        nipype_config.set("logging", key, nipype_level if key == "workflow_level" or verbosity >= 2 else "WARNING")
    nipype_logging.update_logging(nipype_config)
    for name in ("nipype", "nipype.workflow", "nipype.interface", "nipype.utils"):
        logging.getLogger(name).propagate = False  # nipype has its own handler: avoid double lines
    if verbosity < 2:  # nipype's CRITICAL lines (a hash file it cannot write on a full disk) come with our own line
        logging.getLogger("nipype.workflow").setLevel(logging.CRITICAL + 1)


def save_settings(settings: Settings) -> Path:
    """Write ``logs/<run_id>/settings.json`` (:meth:`~bids_siamese.config.Settings.to_dict`) and ``command.txt``;
    returns the log folder."""
    log_dir = run_log_dir(settings.output_dir, settings.run_id)
    write_json(log_dir / RUN_SETTINGS, settings.to_dict())
    write_text(log_dir / RUN_COMMAND, " ".join(settings.command_line) + "\n")
    return log_dir


def record_templates(log_dir: Path) -> None:
    """Write ``logs/<run_id>/templates.json``: every template file this run reads, its source and sha256."""
    used = templates_used(announce=True, state_file=log_dir.parent / TEMPLATE_STATE)
    write_json(log_dir / RUN_TEMPLATES, used)
    sources = sorted({entry["Source"] for entry in used})
    LOG.info("templates: %d file(s) from %s (logs/%s/%s)", len(used), " and ".join(sources),
             log_dir.name, RUN_TEMPLATES)


def _selection(settings: Settings) -> tuple[list[str], list[T1wScan]]:
    """Selected subjects and scans; the selection (and a typo in it) comes before validation."""
    subjects = resolve_participants(settings.bids_dir, settings.participant_label)
    if not settings.skip_bids_validation:
        warnings = validate_dataset(settings.bids_dir, subjects)
        LOG.info("BIDS validation passed (%d warnings)", len(warnings))
    scans = collect_t1w(settings.bids_dir, subjects, settings.session_label, settings.bids_filters)
    LOG.info("%d T1w scan(s) selected from %d participant(s)", len(scans), len(subjects))
    return subjects, scans


def run(settings: Settings) -> int:
    """Run one analysis level with checked ``settings``; returns the exit code."""
    if settings.analysis_level == "group" and not (settings.output_dir / "dataset_description.json").is_file():
        raise NoInputError(
            f"{settings.output_dir} holds no participant-level results; fix: run the participant level first"
        )
    subjects, scans = _selection(settings)
    check_models(settings)
    if settings.analysis_level == "participant":
        # the subjects' locks first: a run that finds a subject locked (75) writes nothing but the lock files
        with subject_locks(settings.output_dir, subjects, settings.run_id):
            _start_outputs(settings)
            return run_participant_level(settings, subjects, scans)
    _start_outputs(settings)
    return run_group_level(settings, subjects, scans)


def check_models(settings: Settings) -> None:
    """Load every checkpoint given (--model, --orientation-model) before any scan is processed: a damaged or unsafe
    file is one line and exit 65 now, not after hours of preprocessing."""
    for path, task in ((settings.model, None), (settings.orientation_model, "orientation")):
        if path is not None:
            check_checkpoint(path, task)


def _start_outputs(settings: Settings) -> None:
    """OUTPUT_DIR's top-level files, ``logs/<run_id>/`` (settings, command, templates)."""
    init_output_dir(settings.output_dir, settings.bids_dir, list(settings.derivatives.values()))
    log_dir = save_settings(settings)
    LOG.info("run %s: settings saved in %s", settings.run_id, log_dir)
    record_templates(log_dir)


def run_participant_level(settings: Settings, subjects: list[str], scans: list[T1wScan]) -> int:
    """The participant level; the caller holds the subjects' locks."""
    swept = sweep_partial_files(settings.output_dir, subjects)
    if swept:
        LOG.info("removed %d partial file(s) left by an interrupted run, e.g. %s", len(swept), swept[0])
    failures = participant.run_participant(settings, scans)
    for failure in failures:
        say(f"FAILED {failure[0]}: {failure[1]}", error=True)
    if failures:
        code = max(getattr(f, "exit_code", EXIT_DATA) for f in failures)  # 73 (output) before 65 (data)
        others = "; other scans finished" if len(failures) < len(scans) else ""
        say(f"error: {len(failures)} of {len(scans)} scan(s) failed ({', '.join(f[0] for f in failures)}); "
             f"crash files in {run_log_dir(settings.output_dir, settings.run_id) / CRASH_FOLDER}{others}", error=True)
        say(_work_dir_line(settings), error=True)
        return code
    say(f"{len(scans)} scan(s) processed; outputs in {settings.output_dir}")
    if settings.clean_workdir:
        removed = clean_work_dir(settings.work_dir, [scan_wf_name(s) for s in scans])
        say(f"work dir {settings.work_dir} " + ("removed" if removed else "cleaned of this run's scans "
                                                 "(other runs' folders kept)"))
    else:
        say(_work_dir_line(settings))
    return EXIT_OK


def _work_dir_line(settings: Settings) -> str:
    size = human_size(folder_size(settings.work_dir))
    return (f"work dir {settings.work_dir} holds {size} of intermediate files (a rerun reuses them); "
            "remove it, or pass --clean-workdir, when done")


def run_group_level(settings: Settings, subjects: list[str], scans: list[T1wScan]) -> int:
    if settings.task and (settings.bids_dir / "participants.tsv").is_file():
        read_participants(settings.bids_dir)  # a malformed table or a participant listed twice: one line now
    sweep_partial_files(settings.output_dir)
    status = collect_scan_status(settings.output_dir, scans, settings.resolution_label)
    summary = status_summary(status)
    n_ok = sum(1 for s in status if s["status"] == "ok")
    for row in status:
        if row["status"] != "ok":
            say(f"{row['status'].upper()} {row['name']}: {row['reason']}", error=True)
    if n_ok == 0:  # nothing to train or evaluate on: write the table and the report that say why
        settings = dataclasses.replace(settings, task=None)
    written = run_group(settings, subjects, status=status)
    for path in written:
        say(f"wrote {path}")
    if n_ok == 0:
        say(f"error: no selected scan has participant-level results ({summary}); fix: run the participant "
             "level (see the reasons above)", error=True)
        return EXIT_NO_INPUT
    say(f"group level: {summary}")
    return EXIT_OK
