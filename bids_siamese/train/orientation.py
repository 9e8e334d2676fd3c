"""Group level: train or apply the left-right orientation model (``group --task orientation``).

The method, as in LatNet: every usable scan is an example twice, as stored (label ``ok``) and mirrored
left-right on the model grid (label ``flipped``); no annotation is needed. Participants are dealt into
``K`` family-aware folds (:func:`~bids_siamese.train.pairs.family_folds`); member ``k`` of the ensemble
is trained on the other folds (fold ``k+1`` for early stopping) and scores the scans of fold ``k``, so every
scan's ``p_flipped`` comes from a model that never saw it. The ``K`` members together are the ensemble
(averaged softmax) saved for ``--mode apply`` and ``participant --orientation-model``.

Scans whose participant-level verdict is not ``ok`` (``flipped`` or ``undetermined``) are not trained on
and not counted in the AUC (their stored orientation is the question), but they are scored, and a scan
whose stored copy the model calls flipped (``p_flipped > 0.5``) is flagged.
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd
import torch

from ..bids.derivatives import ORIENTATION_MODEL_FILES, model_folder, orientation_qc_path, write_tsv
from ..config import Settings
from ..errors import NoInputError, UsageError, UserError
from ..models.checkpoint import load_checkpoint, make_card, save_checkpoint
from ..models.orientation import LatNet, OrientationEnsemble, ensemble_proba, inference_layout, latnet_fits
from ..resources import Grid, model_grid
from .data import find_preproc, load_volume_cache, stream_volumes
from .ddp import DistContext
from .evaluate import safe_auc
from .loop import MirrorData, predict_mirror, train_mirror_classifier
from .pairs import FAMILY_FALLBACKS, family_folds, find_column, read_participants
from .reproducibility import reproducibility_record, seed_everything
from .task import GroupTask, run_task
from .trainer import train_config

LOG = logging.getLogger("bids_siamese.group.orientation")

MODEL_COLUMNS = ["participant_id", "session_id", "p_flipped", "fold", "p_flipped_mirrored", "lr_flip_suspected",
                 "image_verdict", "scan"]
#: Architecture of the members (recorded in the model card).
CHANNELS = (8, 16, 32, 32)
INPUT_POOL = 2


def image_verdicts(paths: Sequence[Path]) -> list[str]:
    """The participant-level ``lr_flip_verdict`` of each scan (``ok`` for QC files from before the verdict)."""
    out = []
    for path in paths:
        try:
            rec = json.loads(orientation_qc_path(path).read_text())
        except (OSError, ValueError) as err:
            LOG.warning("orientation: unreadable QC record of %s (%s); its stored orientation is trusted (ok)",
                        path.name, err)
            out.append("ok")
            continue
        out.append(str(rec.get("lr_flip_verdict", "flipped" if rec.get("lr_flip_suspected") else "ok")))
    return out


def mirror_examples(n_scans: int) -> tuple[np.ndarray, np.ndarray]:
    """Examples ``(2N, 2)``: every scan stored (label 0), then every scan mirrored (label 1).

    Examples:
        >>> mirror_examples(2)[0].tolist(), mirror_examples(2)[1].tolist()
        ([[0, 0], [1, 0], [0, 1], [1, 1]], [0, 0, 1, 1])
    """
    examples = np.array([(i, m) for m in (0, 1) for i in range(n_scans)], dtype=np.int64)
    return examples, examples[:, 1].copy()


def _families(settings: Settings, pids: Sequence[str]) -> dict[str, str]:
    """participant -> family from participants.tsv (``--family-column``); every participant alone when absent."""
    family = {pid: pid for pid in pids}
    try:
        table = read_participants(settings.bids_dir)
    except UserError as err:
        LOG.info("orientation folds: no family information (%s); every participant is its own family", err)
        return family
    column = find_column(table, settings.family_column, FAMILY_FALLBACKS)
    if column is None:
        LOG.info("orientation folds: participants.tsv has no family column; every participant is its own family")
        return family
    for pid, fam in zip(table["participant_id"], table[column]):
        if pid in family and str(fam).strip() not in ("", "n/a"):
            family[pid] = f"family {fam}"
    return family


def _metrics(p_stored: np.ndarray, p_mirrored: np.ndarray, trusted: np.ndarray) -> dict[str, float]:
    labels = np.r_[np.zeros(int(trusted.sum())), np.ones(int(trusted.sum()))]
    scores = np.r_[p_stored[trusted], p_mirrored[trusted]]
    return {"auc_mirrored_copies": safe_auc(labels, scores),
            "accuracy": float(((scores > 0.5) == (labels == 1)).mean()) if len(labels) else float("nan"),
            "n_scans_evaluated": int(trusted.sum())}


def _score_table(scans: pd.DataFrame, p_stored: np.ndarray, p_mirrored: np.ndarray, folds: Sequence[Any],
                 verdicts: Sequence[str]) -> pd.DataFrame:
    table = pd.DataFrame({
        "participant_id": scans["participant_id"].to_numpy(),
        "session_id": [f"ses-{s}" if s else "n/a" for s in scans["session"]],
        "p_flipped": np.round(p_stored, 4),
        "fold": list(folds),
        "p_flipped_mirrored": np.round(p_mirrored, 4),
        "lr_flip_suspected": p_stored > 0.5,
        "image_verdict": list(verdicts),
        "scan": [Path(p).name.split("_space-")[0] for p in scans["path"]],
    })
    return table[MODEL_COLUMNS]


def predict_files(model: torch.nn.Module, paths: Sequence[Path], grid: Grid, device: torch.device | str = "cpu",
                  batch_size: int = 8, workers: int = 0, dtype: str = "float16") -> np.ndarray:
    """p(flipped) ``(2N,)`` of every scan as stored (first N) and mirrored left-right (last N), in the order of
    :func:`mirror_examples`: each file read once (:func:`~bids_siamese.train.data.stream_volumes`, ``workers``
    decoding ahead, values at the ``dtype`` stack's precision), its two copies in one inference batch
    (:func:`~bids_siamese.models.orientation.ensemble_proba`). Memory: a few batches, whatever N."""
    model = inference_layout(model.eval())
    n = len(paths)
    p = np.zeros(2 * n, dtype=np.float64)
    for idx, x in stream_volumes(paths, grid, max(1, batch_size // 2), workers, dtype):
        both = torch.cat([x, torch.flip(x, dims=[1])])[:, None].to(device)
        prob = ensemble_proba(model, both)[:, 1].float().cpu().numpy()
        p[idx], p[n + idx] = prob[:len(idx)], prob[len(idx):]
    return p


def run_orientation(settings: Settings, subjects: list[str]) -> list[Path]:
    """``group --task orientation --mode train|apply``; returns the files written."""
    return run_task(OrientationTask, settings, subjects)


class OrientationTask(GroupTask):
    """``--task orientation``: collect -> samples -> split -> fit -> evaluate -> write (module docstring)."""

    name = "orientation"
    title = "Orientation model"
    shown = ("table", "metrics")
    section = "orientation_model"
    steps = ("collect (usable scans, participant-level verdicts) -> samples (stored and mirrored copies) -> family "
             "folds -> fit (one member per fold, held-out scores) or --model -> evaluate -> write")

    def __init__(self, settings: Settings, ctx: DistContext, device: torch.device):
        super().__init__(settings, ctx, device)
        if self.train_mode and not latnet_fits(self.grid.shape, INPUT_POOL, len(CHANNELS)):
            finest = max((r for r in range(1, int(settings.resolution) + 1)
                          if latnet_fits(model_grid(r).shape, INPUT_POOL, len(CHANNELS))), default=1)
            raise UsageError(f"--task orientation trains LatNet, whose {len(CHANNELS)} pooling blocks need at least "
                             f"{2 ** len(CHANNELS) * INPUT_POOL} voxels a side; the --resolution {settings.resolution:g} "
                             f"grid is {'x'.join(map(str, self.grid.shape))}; fix: use --resolution {finest} or finer")

    def collect(self, subjects: list[str]) -> None:
        """The usable scans and their participant-level verdicts (``ok`` ones are trusted as stored)."""
        out_dir = Path(self.settings.output_dir)
        self.scans = find_preproc(out_dir, subjects, self.settings.session_label,
                                  include_unusable=self.settings.include_unusable)
        if self.scans.empty:
            raise NoInputError(f"no usable participant-level outputs in {out_dir}; fix: run the participant level "
                               "first (scans that failed the usable-scan gate are left out unless --include-unusable)")
        self.paths = [Path(p) for p in self.scans["path"]]
        self.verdicts = image_verdicts(self.paths)
        self.trusted = np.array([v == "ok" for v in self.verdicts])

    def samples(self) -> None:
        """Every scan as stored (label ``ok``) and mirrored (label ``flipped``) (:func:`mirror_examples`): held in
        the training stack (``--volume-cache``) to train; ``--mode apply`` streams the files instead
        (:func:`predict_files`, in :meth:`fit`)."""
        self.examples, labels = mirror_examples(len(self.paths))
        self.n = len(self.paths)
        if not self.train_mode:
            return
        t_load = time.perf_counter()
        volumes = load_volume_cache(self.paths, self.grid, self.settings.volume_cache)
        LOG.info("orientation: %d scan(s) loaded in %.1f s (%d trusted as stored, %d not trained on: image verdict "
                 "flipped/undetermined)", len(self.paths), time.perf_counter() - t_load, int(self.trusted.sum()),
                 int((~self.trusted).sum()))
        self.data = MirrorData(volumes, self.examples, labels)

    def split(self) -> None:
        """``--orientation-folds`` family-aware folds (train; at least 3 families)."""
        if not self.train_mode:
            self.folds: list[Any] = ["apply"] * self.n
            return
        settings = self.settings
        family = _families(settings, self.scans["participant_id"].unique().tolist())
        n_families = len(set(family.values()))
        self.k = min(int(settings.orientation_folds), n_families)
        if self.k < 3:
            raise NoInputError(f"--task orientation needs participants from at least 3 families, found {n_families}; "
                               "fix: run the participant level on more subjects")
        self.fold_of = family_folds(family, self.k, seed=int(settings.seed))
        self.scan_fold = np.array([self.fold_of[pid] for pid in self.scans["participant_id"]])
        self.folds = self.scan_fold.tolist()

    def fit(self) -> None:
        """Train: member ``k`` trained on the other folds (fold ``k+1`` for early stopping) scores the examples of
        fold ``k``; the members together are the ensemble. Apply: the checkpoint scores every example."""
        settings, device = self.settings, self.device
        if not self.train_mode:
            self.model, self.card = load_checkpoint(settings.model, task="orientation", grid=self.grid, device=device)
            t0 = time.perf_counter()
            self.p = predict_files(self.model, self.paths, self.grid, device, int(settings.batch_size),
                                   int(settings.loader_workers), settings.volume_cache)
            self.inference = (time.perf_counter() - t0) / max(1, 2 * self.n)
            return
        k, data = self.k, self.data
        example_fold = self.scan_fold[self.examples[:, 0]]
        example_trusted = self.trusted[self.examples[:, 0]]
        self.p = np.zeros(len(self.examples), dtype=np.float64)
        members, self.histories = [], []
        t_train = time.perf_counter()
        for fold in range(k):
            val_fold = (fold + 1) % k
            train_idx = np.flatnonzero(example_trusted & (example_fold != fold) & (example_fold != val_fold))
            val_idx = np.flatnonzero(example_trusted & (example_fold == val_fold))
            # each member starts from weights of its own seed (it was the global generator's state: unseeded
            # for the first member, issue 28)
            seed_everything(settings.seed + fold)
            member = LatNet(input_shape=self.grid.shape, channels=CHANNELS, input_pool=INPUT_POOL)
            config = train_config(settings, seed=settings.seed + fold, flip_lr=False, max_shift=1)
            result = train_mirror_classifier(member, data, train_idx, val_idx, config, device)
            held_out = np.flatnonzero(example_fold == fold)
            self.p[held_out] = predict_mirror(result.model, data, held_out, device)
            self.histories.append(result.history.assign(fold=fold))
            members.append(result.model.cpu())
            LOG.info("orientation fold %d/%d: %d training examples, best epoch %d, %.0f s", fold + 1, k,
                     len(train_idx), result.best_epoch, result.seconds)
        self.train_seconds = time.perf_counter() - t_train
        self.model = OrientationEnsemble(members).eval()

    def evaluate(self) -> None:
        """AUC and accuracy of the held-out scores on the trusted scans' stored and mirrored copies (and, after
        training, the ensemble's inference time per volume)."""
        n, p = self.n, self.p
        if not self.train_mode:
            self.metrics = {**_metrics(p[:n], p[n:], self.trusted),
                            "inference_seconds_per_volume": self.inference, "model": str(self.settings.model)}
            return
        t0 = time.perf_counter()
        predict_mirror(self.model, self.data, np.arange(min(n, 8)), "cpu")  # inference time of the whole ensemble
        inference = (time.perf_counter() - t0) / max(1, min(n, 8))
        self.metrics = {**_metrics(p[:n], p[n:], self.trusted), "training_seconds": self.train_seconds,
                        "inference_seconds_per_volume": inference, "folds": self.k, "members": self.k}

    def write(self) -> list[Path]:
        """The ensemble's checkpoint and the fold histories (train), the per-scan scores and the metrics."""
        settings, n, metrics = self.settings, self.n, self.metrics
        out_dir = Path(settings.output_dir)
        written = self.write_training() if self.train_mode else []
        table = _score_table(self.scans, self.p[:n], self.p[n:], self.folds, self.verdicts)
        written.append(write_tsv(out_dir / ORIENTATION_MODEL_FILES["table"], table))
        metric_rows = pd.DataFrame({"metric": list(metrics), "value": [str(v) for v in metrics.values()]})
        written.append(write_tsv(out_dir / ORIENTATION_MODEL_FILES["metrics"], metric_rows))
        LOG.info("orientation model: held-out AUC on mirrored copies %.4f, accuracy %.4f (%d scans)",
                 metrics["auc_mirrored_copies"], metrics["accuracy"], metrics["n_scans_evaluated"])
        flagged = table.loc[table["lr_flip_suspected"], "scan"].tolist()
        if flagged:
            LOG.warning("orientation model: %d scan(s) whose stored orientation looks mirrored: %s", len(flagged),
                        ", ".join(flagged))
        return written

    def write_training(self) -> list[Path]:
        """write, train: the ensemble's checkpoint folder and the members' histories."""
        settings, metrics = self.settings, self.metrics
        out_dir = Path(settings.output_dir)
        card = make_card(
            task="orientation", backbone="latnet", embedding_dim=2, grid=self.grid, seed=int(settings.seed),
            training_data={"n_scans": self.n, "n_trusted": int(self.trusted.sum()), "examples": "each usable scan "
                           "stored (ok) and mirrored left-right on the model grid (flipped)",
                           "folds": {str(pid): int(f) for pid, f in self.fold_of.items()}},
            decision={"threshold": 0.5, "output": "averaged softmax of the members; column 1 = p(flipped)"},
            metrics={key: metrics[key] for key in ("auc_mirrored_copies", "accuracy", "n_scans_evaluated")},
            hyperparameters={"epochs": settings.epochs, "batch_size": settings.batch_size, "lr": settings.lr,
                             "patience": settings.patience, "flip_lr": False},
            pooling="none", reproducibility=reproducibility_record(settings.device),
        )
        card["architecture"] = {"name": "LatNet-style", "members": self.k, "channels": list(CHANNELS),
                                "input_pool": INPUT_POOL}
        written = save_checkpoint(model_folder(out_dir, "orientation", "latnet"), self.model, card)
        written.append(write_tsv(out_dir / ORIENTATION_MODEL_FILES["history"],
                                 pd.concat(self.histories, ignore_index=True)))
        return written
