"""Group level: gather per-scan participant results into group tables at the top of OUTPUT_DIR."""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Iterable

import pandas as pd

from ..bids.derivatives import GROUP_FILES, write_tsv

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
]


def _probability(value: Any) -> Any:
    return "n/a" if value is None else round(float(value), 4)


def orientation_table(records: Iterable[dict[str, Any]]) -> pd.DataFrame:
    """One row per scan from orientation QC records (the ``*_desc-orientation_qc.json`` content).

    Records written before the usable-scan gate and the three-way verdict existed (no ``qc_status``)
    are read as usable, with the verdict derived from ``lr_flip_suspected``.
    """
    from ..qc.orientation import failed_header_checks

    rows = []
    for rec in records:
        failed = failed_header_checks(rec.get("header_checks", []))
        suspected = bool(rec.get("lr_flip_suspected", False))
        rows.append(
            {
                "participant_id": rec["participant_id"],
                "session_id": rec.get("session_id") or "n/a",
                "qc_status": rec.get("qc_status", "pass"),
                "usable": bool(rec.get("usable", True)),
                "qc_reasons": "; ".join(rec.get("qc_reasons", [])) or "n/a",
                "lr_flip_verdict": rec.get("lr_flip_verdict", "flipped" if suspected else "ok"),
                "lr_flip_confidence": round(float(rec.get("lr_flip_confidence", 0.0)), 4),
                "lr_flip_probability": _probability(rec.get("lr_flip_probability")),
                "lr_flip_suspected": suspected,
                "lr_flip_source": rec.get("lr_flip_source", "image"),
                "header_checks_failed": ";".join(failed) if failed else "n/a",
                "scan": rec.get("scan", "n/a"),
            }
        )
    table = pd.DataFrame(rows, columns=ORIENTATION_COLUMNS)
    return table.sort_values(["participant_id", "session_id", "scan"], kind="stable").reset_index(drop=True)


def unusable_scans(table: pd.DataFrame) -> list[str]:
    """Scan names whose usable-scan gate failed (``usable`` false), from :func:`orientation_table`'s table."""
    if "usable" not in table.columns:
        return []
    usable = table["usable"].astype(str).str.lower().isin(["true", "1"])
    return [str(s) for s in table.loc[~usable, "scan"]]


def find_orientation_records(output_dir: Path, subjects: list[str]) -> list[dict[str, Any]]:
    records = []
    for subject in subjects:
        for path in sorted((Path(output_dir) / f"sub-{subject}").glob("**/*_desc-orientation_qc.json")):
            records.append(json.loads(path.read_text()))
    return records


def run_group(settings, subjects: list[str]) -> list[Path]:
    """Write the group tables that the available participant results allow; return their paths.

    Under ``torchrun`` every process runs this function: only the first (``RANK`` 0) writes the tables, the
    explanations and the report; the others take part in the distributed training only.
    """
    written = []
    main_process = int(os.environ.get("RANK", "0") or 0) == 0
    records = find_orientation_records(settings.output_dir, subjects) if main_process else []
    if records:
        path = settings.output_dir / GROUP_FILES["orientation"]
        table = orientation_table(records)
        write_tsv(path, table)
        LOG.info("%d scan(s) in %s; %d flagged as left-right flipped", len(table), path.name,
                 int(table["lr_flip_suspected"].sum()))
        failed = unusable_scans(table)
        if failed:
            LOG.warning("%d scan(s) failed the usable-scan gate and are left out of group training and scoring "
                        "(--include-unusable to keep them): %s", len(failed), ", ".join(failed))
        written.append(path)
    elif main_process:
        LOG.warning("no participant-level orientation results found in %s", settings.output_dir)

    task = getattr(settings, "task", None)
    if task == "twin":
        from ..explain.run import run_explain
        from ..train.run import run_twin

        written += run_twin(settings, subjects)
        if getattr(settings, "explain", True) and main_process:
            written += run_explain(settings, subjects)
    elif task == "orientation" and main_process:
        from ..train.orientation import run_orientation

        written += run_orientation(settings, subjects)
    elif task == "longitudinal":
        from ..train.run import run_longitudinal

        written += run_longitudinal(settings, subjects)
    elif task == "symmetry" and not main_process:
        LOG.info("symmetry training is not distributed: process %s leaves it to process 0", os.environ["RANK"])
    elif task == "symmetry":
        from ..symmetry.run import run_symmetry

        written += run_symmetry(settings, subjects)
    explained = task == "twin" and getattr(settings, "explain", True)
    if main_process and not explained:  # the explanation step writes the report with its maps
        from ..reports.group import write_group_report

        written.append(write_group_report(settings))
    return written
