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
    "lr_flip_probability",
    "lr_flip_suspected",
    "header_checks_failed",
    "scan",
]


def orientation_table(records: Iterable[dict[str, Any]]) -> pd.DataFrame:
    """One row per scan from orientation QC records (the ``*_desc-orientation_qc.json`` content)."""
    rows = []
    for rec in records:
        failed = [c["name"] for c in rec.get("header_checks", []) if not c.get("passed", True)]
        rows.append(
            {
                "participant_id": rec["participant_id"],
                "session_id": rec.get("session_id") or "n/a",
                "lr_flip_probability": round(float(rec["lr_flip_probability"]), 4),
                "lr_flip_suspected": bool(rec["lr_flip_suspected"]),
                "header_checks_failed": ";".join(failed) if failed else "n/a",
                "scan": rec.get("scan", "n/a"),
            }
        )
    table = pd.DataFrame(rows, columns=ORIENTATION_COLUMNS)
    return table.sort_values(["participant_id", "session_id", "scan"], kind="stable").reset_index(drop=True)


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
