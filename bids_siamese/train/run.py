"""Group level: pieces the tasks share beyond the trainer.

The twin and longitudinal tasks (:class:`bids_siamese.train.twins.TwinTask`,
:class:`bids_siamese.train.longitudinal.LongitudinalTask`) take their training configuration's own fields from
:func:`siamese_options`; every task may use the family relations, the dataset name, the session times, and the
training-data fingerprint of a model card with the "seen in training" split of ``--mode apply``
(:func:`seen_split`). Output names come from :mod:`bids_siamese.bids.derivatives`.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Sequence

import pandas as pd

from ..config import Settings
from ..models.checkpoint import sha256_bytes, sha256_file
from ..models.regional import REGIONAL_MODELS
from .pairs import (
    FAMILY_FALLBACKS,
    Relations,
    find_column,
    read_pairs_file,
    read_participants,
    read_session_times,
    relations_from_pairs_table,
    relations_from_participants,
)
from .trainer import shift_voxels

LOG = logging.getLogger("bids_siamese.group.models")


def siamese_options(settings: Settings) -> dict[str, Any]:
    """The twin and longitudinal tasks' own :class:`~bids_siamese.train.trainer.TrainConfig` fields (the overrides
    they pass to :func:`~bids_siamese.train.trainer.train_config`): ``--distance``, ``--margin``,
    ``--dz-positives`` and the augmentation: a translation of about 2 mm (:func:`shift_voxels`), intensity and
    noise jitter; none for the regional models, which compare voxels with the population."""
    regional = settings.backbone in REGIONAL_MODELS
    return {"distance": settings.distance, "margin": settings.margin, "dz_positives": settings.dz_positives,
            "max_shift": 0 if regional else shift_voxels(settings.resolution), "intensity": 0.0 if regional else 0.1,
            "noise_std": 0.0 if regional else 0.05}


def dataset_name(bids_dir: Path) -> str:
    """``Name`` of the input dataset's ``dataset_description.json`` (empty when there is none)."""
    try:
        return str(json.loads((Path(bids_dir) / "dataset_description.json").read_text()).get("Name", ""))
    except (OSError, ValueError):
        return ""


def session_times(bids_dir: Path, scans: pd.DataFrame) -> dict[str, dict]:
    """Session acquisition times (``sessions.tsv``) of the participants with more than one session."""
    multi = scans.groupby("participant_id")["session"].nunique()
    return {pid: read_session_times(bids_dir, pid) for pid in multi[multi > 1].index}


def training_fingerprint(scans: pd.DataFrame, split_of: dict[str, str]) -> dict[str, Any]:
    """Fingerprint of the data a model saw: sha256 over the sorted ``sha256(file) split`` lines of its training and
    validation scans, with the per-scan hashes (so that ``--mode apply`` can recognise seen scans).

    Args:
        scans: ``participant_id, path`` of the scans used.
        split_of: participant -> split.
    """
    seen: dict[str, str] = {}
    for row in scans.itertuples(index=False):
        split = split_of.get(row.participant_id, "")
        if split in ("train", "validation"):
            seen[sha256_file(Path(row.path))] = split
    lines = "".join(f"{h}\t{s}\n" for h, s in sorted(seen.items()))
    return {"fingerprint": sha256_bytes(lines.encode()), "scans": seen}


def seen_split(card: dict[str, Any], scans: pd.DataFrame, dataset_name: str) -> dict[str, str]:
    """Per participant, the split in which the checkpoint saw it (``train``/``validation``), else ``test``.

    A scan counts as seen when its sha256 is among the training scans of the model card, or when the dataset
    name matches the training dataset's and the participant id was in a training/validation split.
    """
    data = card.get("training_data", {})
    by_hash = data.get("scans", {})
    by_pid = data.get("participants", {}) if dataset_name and data.get("dataset_name") == dataset_name else {}
    out: dict[str, str] = {}
    for row in scans.itertuples(index=False):
        split = by_hash.get(sha256_file(Path(row.path))) or by_pid.get(row.participant_id)
        if split in ("train", "validation"):
            out[row.participant_id] = split
        else:
            out.setdefault(row.participant_id, "test")
    return out


def load_relations(settings: Settings, subjects: Sequence[str]) -> Relations:
    """Twin relations from ``--pairs-file`` or from participants.tsv family/zygosity columns."""
    if settings.pairs_file is not None:
        return relations_from_pairs_table(read_pairs_file(settings.pairs_file), subjects,
                                          source=f"--pairs-file {settings.pairs_file}")
    table = read_participants(settings.bids_dir)
    return relations_from_participants(table, subjects, settings.family_column, settings.zygosity_column,
                                       source=str(Path(settings.bids_dir) / "participants.tsv"))


def apply_relations(settings: Settings, subjects: Sequence[str]) -> Relations | None:
    """Relations for ``--mode apply``: as :func:`load_relations` when ``--pairs-file`` is given or participants.tsv
    has the family column; ``None`` (nothing to evaluate, only the closest relatives are written) otherwise."""
    if settings.pairs_file is None:
        path = Path(settings.bids_dir) / "participants.tsv"
        fallbacks = FAMILY_FALLBACKS if settings.family_column == "family_id" else ()
        if not path.is_file() or find_column(read_participants(settings.bids_dir), settings.family_column,
                                             fallbacks) is None:
            return None
    return load_relations(settings, subjects)


def log_metrics(task: str, metrics: pd.DataFrame, seconds: float) -> None:
    """One log line with a task's main test metrics (mean +- std)."""
    shown = metrics[metrics["metric"].isin(["accuracy", "f1", "auc_roc", "baseline_auc_roc"])]
    LOG.info("%s done in %.0f s: %s", task, seconds,
             ", ".join(f"{r.metric} {r.mean:.3f} +- {r.std:.3f}" for r in shown.itertuples()))


def card_training_data(scans: pd.DataFrame, split_of: dict[str, str], bids_dir: Path, **extra: Any) -> dict[str, Any]:
    """The ``training_data`` of a model card: :func:`training_fingerprint`, the dataset name, the participants of
    the training and validation splits, and the task's ``extra`` counts."""
    return {**training_fingerprint(scans, split_of), "dataset_name": dataset_name(bids_dir),
            "participants": {p: s for p, s in split_of.items() if s in ("train", "validation")}, **extra}

