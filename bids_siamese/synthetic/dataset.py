"""Writing a whole demo dataset: output-folder checks, one task per subject (in worker processes), truth."""
from __future__ import annotations

import json
import multiprocessing
import shutil
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import pandas as pd

from ..errors import CannotCreateError
from .bids_files import write_dataset_files, write_scan, write_subject_tables
from .model import get_model
from .params import GENERATOR_NAME, SignalParams
from .plan import plan_dataset
from .synthesize import synthesize_subject
from .truth import truth_parameters, truth_tables, write_truth


def check_outdir(outdir: Path, truth_dir: Path, overwrite: bool) -> None:
    """Refuse a non-empty OUTDIR or truth dir unless ``overwrite``; never overwrite someone else's dataset."""
    for d in (outdir, truth_dir):
        if d.exists() and not d.is_dir():
            raise CannotCreateError(f"{d} exists and is not a directory; fix: choose another path")
    busy = [d for d in (outdir, truth_dir) if d.is_dir() and any(d.iterdir())]
    if busy and not overwrite:
        raise CannotCreateError(f"output directory {busy[0]} is not empty; fix: choose a new or empty directory, "
                                f"or pass --overwrite to replace a previous demo dataset")
    description = outdir / "dataset_description.json"
    if overwrite and description.is_file():
        try:
            generated = json.loads(description.read_text()).get("GeneratedBy", [{}])[0].get("Name")
        except (ValueError, AttributeError, IndexError):
            generated = None
        if generated != GENERATOR_NAME:
            raise CannotCreateError(f"{outdir} holds a dataset not made by {GENERATOR_NAME}; refusing to overwrite "
                                    f"it; fix: choose another output directory")


def clear_previous(outdir: Path, truth_dir: Path) -> None:
    """Remove what a previous run wrote (subject folders, top-level BIDS files, truth files)."""
    for sub in outdir.glob("sub-*"):
        if sub.is_dir():
            shutil.rmtree(sub)
    for name in ("dataset_description.json", "README", "CHANGES", "participants.tsv", "participants.json",
                 "sessions.json"):
        (outdir / name).unlink(missing_ok=True)
    if truth_dir.is_dir():
        shutil.rmtree(truth_dir / "masks", ignore_errors=True)
        for name in ("scans.tsv", "subjects.tsv", "volumes.tsv", "families.tsv", "truth.json", "README.md"):
            (truth_dir / name).unlink(missing_ok=True)


def _subject_task(task: tuple) -> tuple[list[dict], list[dict], dict]:
    """Synthesize and write one subject (runs in a worker process or in-line)."""
    params, subject, scans, seed, root, truth_dir = task
    model = get_model(params)
    results, info = synthesize_subject(model, subject, scans, seed)
    for result in results:
        write_scan(result, root, truth_dir)
    write_subject_tables(root, subject, scans)
    return [r.truth for r in results], [r.volumes for r in results], info


def _run_tasks(tasks: list[tuple], jobs: int) -> list[tuple[list[dict], list[dict], dict]]:
    """Run subject tasks serially or in ``jobs`` forked worker processes (results in task order)."""
    if jobs <= 1 or len(tasks) <= 1:
        return [_subject_task(t) for t in tasks]
    get_model(tasks[0][0])  # build once in the parent; forked workers inherit it
    context = multiprocessing.get_context("fork")
    with ProcessPoolExecutor(max_workers=jobs, mp_context=context) as pool:
        return list(pool.map(_subject_task, tasks))


def generate(outdir: str | Path, size: str = "tiny", seed: int = 0, truth_dir: str | Path | None = None,
             overwrite: bool = False, jobs: int = 1, params: SignalParams | None = None) -> pd.DataFrame:
    """Write a synthetic BIDS dataset to ``outdir`` and its ground truth; return the per-scan truth table.

    The truth goes to ``truth_dir`` (default ``outdir/sourcedata/truth``). Raises :class:`CannotCreateError`
    when ``outdir`` (or ``truth_dir``) is not empty and ``overwrite`` is false, or cannot be written.
    """
    params = params or SignalParams()
    root = Path(outdir).absolute()
    truth = Path(truth_dir).absolute() if truth_dir is not None else root / "sourcedata" / "truth"
    check_outdir(root, truth, overwrite)
    subjects, scans = plan_dataset(size, int(seed), params)
    try:
        clear_previous(root, truth)
        root.mkdir(parents=True, exist_ok=True)
        truth.mkdir(parents=True, exist_ok=True)
        write_dataset_files(root, subjects, size, int(seed))
        tasks = [(params, s, [x for x in scans if x.participant_id == s.participant_id], int(seed), root, truth)
                 for s in subjects]
        outputs = _run_tasks(tasks, max(1, int(jobs)))
        model = get_model(params)
        tables = truth_tables(subjects, outputs, model)
        write_truth(truth, root, tables, truth_parameters(model, size, int(seed)))
    except (OSError, CannotCreateError) as err:
        # the atomic writers raise CannotCreateError with the app's OUTPUT_DIR advice: keep its first part only
        detail = str(err).split("; fix:")[0]
        raise CannotCreateError(f"cannot write the demo dataset: {detail}; fix: choose a writable output "
                                f"directory with about 20 MB per scan free") from err
    return tables["scans"]
