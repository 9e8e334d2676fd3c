"""Group level: the one entry (:func:`run_group`), one short sequence of steps per ``--task``.

Every group run first writes the per-scan QC table ``group_orientation.tsv`` from the participant-level
results, then runs the task (:data:`TASKS`: one :class:`~bids_siamese.train.task.GroupTask` per ``--task``,
each in its own module: collect -> pairs or samples -> split -> fit -> evaluate -> write), then, after
``--task twin --explain``, the explanations (``explain/``). Each step returns the paths it wrote and the workflow
records them in ``group_outputs.json`` (:func:`~bids_siamese.bids.derivatives.write_group_record`), a task's with
how the report shows it (:meth:`~bids_siamese.train.task.GroupTask.report_view`); the report
(``reports/group.py``) is built from that record.

Importing this module imports every task module, which registers the tasks' model factories
(:mod:`bids_siamese.models.registry`) for :func:`~bids_siamese.models.checkpoint.load_checkpoint`.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Iterable

import pandas as pd

from ..bids.derivatives import ORIENTATION_QC_SUFFIX, QC_FILES, qc_record_names, write_group_record, write_tsv
from ..bids.records import STATUS_MISSING, STATUS_OK, check_completion_record
from ..config import Settings
from ..explain.run import run_explain
from ..models.checkpoint import load_checkpoint
from ..qc.orientation import failed_header_checks
from ..reports.group import write_group_report
from ..symmetry.run import SymmetryTask
from ..train.longitudinal import LongitudinalTask
from ..train.orientation import OrientationTask
from ..train.pretrain import PretrainTask
from ..train.task import GroupTask, run_task
from ..train.twins import TwinTask

LOG = logging.getLogger("bids_siamese.group")

ORIENTATION_COLUMNS = [
    "participant_id",
    "session_id",
    "qc_status",
    "usable",
    "qc_reasons",
    "lr_flip_verdict",
    "lr_flip_confidence",
    "lr_flip_probability",
    "lr_flip_suspected",
    "lr_flip_source",
    "header_checks_failed",
    "scan",
    "status",
    "reason",
]


def _probability(value: Any) -> Any:
    return "n/a" if value is None else round(float(value), 4)


#: The per-scan QC columns; ``n/a`` for scans without complete participant results (``status`` not ``ok``).
QC_COLUMNS = ORIENTATION_COLUMNS[2:10]


def qc_columns(rec: dict[str, Any], suspected: bool) -> dict[str, Any]:
    """The QC columns of one finished scan's orientation record."""
    return {
        "qc_status": rec.get("qc_status", "pass"),
        "usable": bool(rec.get("usable", True)),
        "qc_reasons": "; ".join(rec.get("qc_reasons", [])) or "n/a",
        "lr_flip_verdict": rec.get("lr_flip_verdict", "flipped" if suspected else "ok"),
        "lr_flip_confidence": round(float(rec.get("lr_flip_confidence", 0.0)), 4),
        "lr_flip_probability": _probability(rec.get("lr_flip_probability")),
        "lr_flip_suspected": suspected,
        "lr_flip_source": rec.get("lr_flip_source", "image"),
    }


def orientation_table(records: Iterable[dict[str, Any]]) -> pd.DataFrame:
    """One row per scan from orientation QC records (the ``*_desc-orientation_qc.json`` content).

    Records written before the usable-scan gate and the three-way verdict existed (no ``qc_status``)
    are read as usable, with the verdict derived from ``lr_flip_suspected``.
    """
    rows = []
    for rec in records:
        failed = failed_header_checks(rec.get("header_checks", []))
        suspected = bool(rec.get("lr_flip_suspected", False))
        rows.append(
            {
                "participant_id": rec["participant_id"],
                "session_id": rec.get("session_id") or "n/a",
                **(qc_columns(rec, suspected) if rec.get("status", "ok") == "ok" else dict.fromkeys(QC_COLUMNS, None)),
                "header_checks_failed": ";".join(failed) if failed else "n/a",
                "scan": rec.get("scan", "n/a"),
                "status": rec.get("status", "ok"),
                "reason": rec.get("reason") or "n/a",
            }
        )
    table = pd.DataFrame(rows, columns=ORIENTATION_COLUMNS)
    return table.sort_values(["participant_id", "session_id", "scan"], kind="stable").reset_index(drop=True)


def collect_scan_status(output_dir: Path, scans: Iterable[Any], resolution_label: str) -> list[dict[str, Any]]:
    """One entry per selected scan: ``status`` ok/failed/missing (from its completion record), ``reason``, and
    for ok scans the orientation QC record (``record``)."""
    entries = []
    for scan in scans:
        # the two names this needs (output_names builds twelve: most of the time of 10,000 scans)
        status_name, orientation = qc_record_names(scan.entities)
        status, reason = check_completion_record(output_dir, status_name)
        record = None
        if status == STATUS_OK:
            try:
                record = json.loads((Path(output_dir) / orientation).read_text())
            except (OSError, ValueError) as err:
                status, reason = STATUS_MISSING, f"unreadable {orientation.name} ({err})"
        if status == STATUS_MISSING:
            reason = f"{reason}; fix: rerun the participant level for sub-{scan.entities['subject']}"
        entries.append({"name": scan.name, "scan": scan.path.name, "entities": dict(scan.entities),
                        "status": status, "reason": reason, "record": record})
    return entries


def status_summary(entries: list[dict[str, Any]]) -> str:
    """``"8 scans: 1 ok, 6 failed, 1 missing"``."""
    counts = {key: sum(1 for e in entries if e["status"] == key) for key in ("ok", "failed", "missing")}
    return f"{len(entries)} scans: " + ", ".join(f"{n} {key}" for key, n in counts.items())


def status_records(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows for :func:`orientation_table`: the QC record of ok scans, identifiers and reason of the others."""
    rows = []
    for entry in entries:
        if entry["record"] is not None:
            rows.append({**entry["record"], "status": entry["status"], "reason": None})
            continue
        ents = entry["entities"]
        rows.append({"participant_id": f"sub-{ents['subject']}",
                     "session_id": f"ses-{ents['session']}" if ents.get("session") else None,
                     "scan": entry["scan"], "status": entry["status"], "reason": entry["reason"],
                     "lr_flip_probability": None, "lr_flip_suspected": None, "header_checks": []})
    return rows


def unusable_scans(table: pd.DataFrame) -> list[str]:
    """Scan names whose usable-scan gate failed (``usable`` false), from :func:`orientation_table`'s table."""
    if "usable" not in table.columns:
        return []
    usable = table["usable"].astype(str).str.lower().isin(["true", "1"])
    finished = table["status"].astype(str) == "ok" if "status" in table.columns else usable | True
    return [str(s) for s in table.loc[finished & ~usable, "scan"]]


def find_orientation_records(output_dir: Path, subjects: list[str]) -> list[dict[str, Any]]:
    records = []
    for subject in subjects:
        for path in sorted((Path(output_dir) / f"sub-{subject}").glob(f"**/*_{ORIENTATION_QC_SUFFIX}")):
            records.append(json.loads(path.read_text()))
    return records


def _main_process() -> bool:
    """Under ``torchrun`` every process runs the group level; only the first (``RANK`` 0) writes."""
    return int(os.environ.get("RANK", "0") or 0) == 0


def write_orientation_table(settings: Settings, subjects: list[str], status: list[dict[str, Any]] | None) -> list[Path]:
    """The QC step of every group run: ``group_orientation.tsv``, one row per selected scan (with ``status``:
    every selected scan, ok or not; without: the scans with an orientation record)."""
    records = status_records(status) if status is not None else find_orientation_records(settings.output_dir,
                                                                                          subjects)
    if not records:
        LOG.warning("no participant-level orientation results found in %s", settings.output_dir)
        return []
    path = settings.output_dir / QC_FILES["orientation"]
    table = orientation_table(records)
    write_tsv(path, table)
    LOG.info("%d scan(s) in %s; %d flagged as left-right flipped", len(table), path.name,
             int((table["lr_flip_suspected"] == True).sum()))  # noqa: E712 - None for scans without results
    failed = unusable_scans(table)
    if failed:
        LOG.warning("%d scan(s) failed the usable-scan gate and are left out of group training and scoring "
                    "(--include-unusable to keep them): %s", len(failed), ", ".join(failed))
    return [path]


def usable_subjects(task: str, subjects: list[str], status: list[dict[str, Any]] | None) -> list[str]:
    """The subjects a group task sees: those with complete participant results (the others are logged)."""
    if status is None:
        return subjects
    usable = {e["entities"]["subject"] for e in status if e["status"] == "ok"}
    left_out = [s for s in subjects if s not in usable]
    if left_out:
        LOG.warning("--task %s: %d subject(s) without complete participant results left out (%s)", task,
                    len(left_out), ", ".join(f"sub-{s}" for s in left_out[:10]) + (" ..." if len(left_out) > 10
                                                                                   else ""))
    return [s for s in subjects if s in usable]


class _Steps:
    """Runs the group steps and records what each wrote (``group_outputs.json``, read by the report)."""

    def __init__(self, settings: Settings, main_process: bool):
        self.settings, self.main, self.written = settings, main_process, []

    def __call__(self, step: str, written: list[Path], report: dict[str, Any] | None = None) -> list[Path]:
        """Record ``written`` as ``step``'s outputs (with ``report``: how the group report shows them)."""
        if self.main and written:
            write_group_record(self.settings.output_dir, step, written, self.settings, report)
        self.written += written
        return written


#: The group tasks (``--task``): one :class:`~bids_siamese.train.task.GroupTask` subclass each, in its own module,
#: with the same steps (collect -> samples -> split -> fit -> evaluate -> write), run by
#: :func:`~bids_siamese.train.task.run_task`.
TASKS: dict[str, type[GroupTask]] = {task.name: task for task in (TwinTask, LongitudinalTask, OrientationTask,
                                                                   SymmetryTask, PretrainTask)}


def check_checkpoint(path: Path, task: str | None = None) -> dict[str, Any]:
    """Load the checkpoint at ``path`` (``--model``, ``--orientation-model``) once, before any scan is processed,
    whatever its task: importing this module imported every task module, so every task's model factory is
    registered (:mod:`bids_siamese.models.registry`). Returns the model card.

    Raises:
        UsageError: a checkpoint of another task than ``task`` (None: any).
        NoInputError, BadDataError: missing, damaged or unsafe checkpoint files.
    """
    return load_checkpoint(path, task=task)[1]


def run_group(settings: Settings, subjects: list[str], status: list[dict[str, Any]] | None = None) -> list[Path]:
    """The group level: the per-scan QC table, then ``--task``'s steps, then the report; returns the paths written
    (the record ``group_outputs.json`` aside).

    Args:
        settings: the run's :class:`~bids_siamese.config.Settings`.
        subjects: selected participant labels.
        status: :func:`collect_scan_status` of the selected scans; a task sees only the subjects whose scans
            are complete.

    Under ``torchrun`` every process runs this function: only the first (``RANK`` 0) writes the tables, the
    explanations and the report; the others take part in the distributed training only.
    """
    step = _Steps(settings, _main_process())
    if step.main:
        step("qc", write_orientation_table(settings, subjects, status))
    task = TASKS[settings.task] if settings.task else None
    if task is not None:
        selected = usable_subjects(task.name, subjects, status)
        LOG.info("--task %s: %s", task.name, task.steps)
        if task.distributed or step.main:
            step(task.name, run_task(task, settings, selected), task.report_view())
        else:
            LOG.info("%s training is not distributed: process %s leaves it to process 0", task.name,
                     os.environ["RANK"])
    explained = settings.task == "twin" and settings.explain
    if explained and step.main:  # the explanation step writes the report with its maps
        step("explain", run_explain(settings, selected))
    elif step.main:
        step.written.append(write_group_report(settings))
    return step.written
