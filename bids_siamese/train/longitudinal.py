"""Group level: longitudinal change, decline vs stable (``group --task longitudinal``), trained or applied.

:func:`run_longitudinal` pairs the sessions of each participant, draws ``--n-draws`` family-aware,
label-stratified splits, fits one session-pair classifier per split (or loads ``--model``), predicts every
pair and writes the ``group_longitudinal_*`` tables, figures and the checkpoint folder (names:
:data:`LONGITUDINAL_FILES`; columns in docs/outputs.md). Under torchrun only rank 0 writes.
"""
from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd
import torch

from ..bids.derivatives import LONGITUDINAL_FILES, model_folder, write_tsv
from ..config import Settings
from ..errors import BadDataError, NoInputError, UsageError
from ..models.checkpoint import load_checkpoint, make_card, save_checkpoint
from ..models.init import init_record
from ..models.regional import RegionalChange
from ..resources import Grid, model_grid
from .data import VolumeCache, VolumeFiles, find_preproc, load_volume_cache
from .ddp import DistContext
from .evaluate import (MAX_NEGATIVE_POSITIVE_RATE, METRICS, MIN_THRESHOLD_POSITIVES, binary_metrics, choose_threshold,
                       plot_history, plot_roc, safe_auc, save_figure, scalar_rows, summarise)
from .loop import PairData, predict_pairs, train_longitudinal
from .models import new_longitudinal_model, write_region_weights
from .pairs import (family_folds, find_column, longitudinal_pairs, longitudinal_split_table, normalise_label,
                    read_participants)
from .reproducibility import reproducibility_record
from .run import card_training_data, dataset_name, log_metrics, seen_split, session_times, siamese_options
from .task import GroupTask, run_task
from .trainer import TrainConfig, TrainResult, train_config

LOG = logging.getLogger("bids_siamese.group.models")

PREDICTION_COLUMNS = ["participant_id", "session_a", "session_b", "label", "split", "p_decline", "predicted",
                      "p_decline_heldout", "heldout_draws"]
#: L1 penalties tried for the ``regional`` longitudinal classifier; the one with the best validation AUC is kept
#: (ties: the larger penalty, the sparser model).
L1_CHOICES = (0.01, 0.03, 0.1, 0.3)
#: Folds of the out-of-fold predictions on the training + validation pairs that set the decision point of the
#: refitted ``regional`` model.
REFIT_FOLDS = 5


@dataclass
class LongitudinalInputs:
    """collect + pairs: the session pairs with labels, their scans and volumes, and the families."""

    pairs: pd.DataFrame  # participant_id, session_a, session_b, label
    scans: pd.DataFrame  # participant_id, session, path (only scans used by pairs)
    volumes: np.ndarray | VolumeCache | VolumeFiles  # the training stack (--volume-cache); files with load=False
    pair_index: np.ndarray  # (P, 2) rows of volumes
    family: dict[str, str]
    stored: np.ndarray | VolumeFiles  # the volumes as stored (float32): what the written predictions come from


def collect_longitudinal(settings: Settings, subjects: Sequence[str], require_labels: bool, load: bool = True
                         ) -> LongitudinalInputs:
    """The session pairs, their labels and families, and their scans: held in memory as the training stack of
    ``--volume-cache`` with ``load`` (``--mode train``), else read from the files on demand (``--mode apply``:
    each scan is read once, when it is embedded)."""
    grid = model_grid(settings.resolution)
    scans = find_preproc(settings.output_dir, subjects, settings.session_label,
                         include_unusable=settings.include_unusable)
    times = session_times(settings.bids_dir, scans)
    labels: dict[str, int | None] = {}
    family: dict[str, str] = {}
    participants_tsv = Path(settings.bids_dir) / "participants.tsv"
    table = read_participants(settings.bids_dir) if (require_labels or participants_tsv.is_file()) else None
    if table is not None:
        col = find_column(table, settings.label_column)
        if col is None and require_labels:
            raise UsageError(f"{participants_tsv} has no column '{settings.label_column}' (columns: "
                             f"{', '.join(table.columns)}); fix: pass --label-column NAME (values decline|stable)")
        if col is not None:
            labels = {pid: normalise_label(v) for pid, v in zip(table["participant_id"], table[col])}
        fam_col = find_column(table, settings.family_column, ("family_id", "Family_ID"))
        if fam_col is not None:
            family = {pid: str(v) for pid, v in zip(table["participant_id"], table[fam_col]) if str(v).strip()
                      and str(v).strip().lower() not in ("n/a", "nan")}
    pairs = longitudinal_pairs(scans, times, labels)
    if pairs.empty:
        raise NoInputError(
            f"no selected participant has two sessions with participant-level outputs in {settings.output_dir}; "
            "fix: run the participant level for all sessions (or select longitudinal participants)")
    key = {(r.participant_id, str(r.session)): k for k, r in enumerate(scans.itertuples(index=False))}
    used = sorted({key[(r.participant_id, r.session_a)] for r in pairs.itertuples()}
                  | {key[(r.participant_id, r.session_b)] for r in pairs.itertuples()})
    remap = {old: new for new, old in enumerate(used)}
    pair_index = np.array([[remap[key[(r.participant_id, r.session_a)]], remap[key[(r.participant_id, r.session_b)]]]
                           for r in pairs.itertuples()], dtype=int)
    used_scans = scans.iloc[used].reset_index(drop=True)
    paths = [Path(p) for p in used_scans["path"]]
    files = VolumeFiles(paths, grid)
    volumes = load_volume_cache(paths, grid, settings.volume_cache) if load else files
    # the float32 stack is the stored volumes themselves; a float16 cache is for training only
    stored = volumes if isinstance(volumes, np.ndarray) else files
    return LongitudinalInputs(pairs, used_scans, volumes, pair_index, family, stored)


def _label_text(value: float) -> str:
    return "n/a" if pd.isna(value) else ("decline" if value == 1 else "stable")


def run_longitudinal(settings: Settings, subjects: list[str]) -> list[Path]:
    """Longitudinal change (decline vs stable) at the group level: train or apply the session-pair classifier.

    Training repeats a random family-aware, label-stratified split ``--n-draws`` times (seeds ``seed``,
    ``seed + 1``, ...), trains one model per split and reports the test metrics as mean +- std over these
    random sub-samplings (the protocol of the published 3D-SiameseNet); the model of the first split
    (``--seed``) is saved and writes the predictions. Each sub-sampling chooses its decision point on its own
    validation pairs (the largest Youden's J), as the twin task does, and the ``regional`` model also its L1
    penalty (:data:`L1_CHOICES`, by validation AUC) and its epoch count (the best validation epoch); the
    ``regional`` model is then refitted on the training + validation pairs with that penalty and epoch count, and
    its decision point comes from out-of-fold predictions on these pairs (:func:`out_of_fold_threshold`). Test
    pairs take part in no fit and no choice. Every pair also gets its held-out p(decline): the mean over the
    sub-samplings in which it was a test pair.

    Args:
        settings: the run's :class:`~bids_siamese.config.Settings`.
        subjects: selected participant labels.

    Returns:
        Paths written (empty on ranks other than 0).
    """
    return run_task(LongitudinalTask, settings, subjects)


@dataclass
class LongitudinalDraw:
    """One sub-sampling's outcome: the final fit (refitted on training + validation pairs for ``regional``), the
    fit that chose the penalty and the epoch count (``selection``: training pairs only, validation curves), its
    split, the test metrics row, the decision point and the test pairs' p(decline); ``before_refit``: the test
    metrics of ``selection`` at its validation-chosen decision point (empty without a refit); ``final_train_idx``:
    the pairs the final model was trained on."""

    result: TrainResult
    selection: TrainResult
    split_table: pd.DataFrame
    split_of: dict[str, str]
    row: dict[str, Any]
    threshold: float
    test_idx: np.ndarray
    test_p: np.ndarray
    before_refit: dict[str, float]
    final_train_idx: np.ndarray


def refit_folds(split_table: pd.DataFrame, n_folds: int = REFIT_FOLDS, seed: int = 0) -> dict[str, int]:
    """Family-aware, label-stratified folds of the training + validation participants of one sub-sampling.

    A family's stratum is its first member's label (as in the split). Fewer folds than ``n_folds`` when a
    stratum has fewer families; empty when one has fewer than 2 (no out-of-fold decision point then).

    Returns:
        participant_id -> fold (0-based); test and unlabelled participants are not in it.

    Examples:
        >>> t = pd.DataFrame({"participant_id": list("abcdef"), "family_id": list("abcdef"),
        ...                   "label": [1.0, 0.0] * 3, "split": ["train"] * 4 + ["validation", "test"]})
        >>> folds = refit_folds(t, 5)  # 2 stable families: 2 folds
        >>> sorted(folds), sorted(set(folds.values()))
        (['a', 'b', 'c', 'd', 'e'], [0, 1])
    """
    seen = split_table[split_table["split"].isin(("train", "validation")) & split_table["label"].notna()]
    stratum = seen.groupby("family_id")["label"].transform("first")
    groups = {value: dict(zip(part["participant_id"], part["family_id"].astype(str)))
              for value, part in seen.groupby(stratum)}
    if not groups:
        return {}
    k = min([n_folds, *(len(set(members.values())) for members in groups.values())])
    if k < 2:
        return {}
    folds: dict[str, int] = {}
    for members in groups.values():
        folds.update(family_folds(members, k, seed))
    return folds


def _fixed_epochs_fit(settings: Settings, grid: Grid, data: PairData, config: TrainConfig, train_idx: np.ndarray,
                      l1: float | None, epochs: int, device: torch.device, ctx: DistContext) -> TrainResult:
    """A fresh model (regions and feature scale from ``train_idx``) trained on ``train_idx`` for ``epochs`` epochs
    (no early stopping) with penalty ``l1``. No pair outside ``train_idx`` is looked at: the epoch whose weights
    are kept is the one with the lowest unpenalised, unaugmented loss on ``train_idx`` itself (given as the
    monitoring set of :func:`~bids_siamese.train.loop.train_longitudinal`; the penalised, augmented training loss
    would favour the first epoch, when the L1 penalty is still zero)."""
    model = new_longitudinal_model(settings, grid, data, train_idx)
    if l1 is not None:
        model.l1 = float(l1)
    fixed = replace(config, epochs=max(1, int(epochs)), patience=int(epochs) + 1)
    return train_longitudinal(model, data, train_idx, train_idx, fixed, device, ctx)


def out_of_fold_threshold(settings: Settings, grid: Grid, data: PairData, config: TrainConfig, pairs: pd.DataFrame,
                          split_table: pd.DataFrame, l1: float | None, epochs: int, device: torch.device,
                          ctx: DistContext) -> tuple[float, int] | None:
    """Decision point of a model refitted on the training + validation pairs: the largest Youden's J of the
    out-of-fold p(decline) of these pairs (:func:`refit_folds`; each fold predicted by a model trained on the
    other folds with the same penalty and epoch count). Test pairs take no part. ``(threshold, folds)``, or None
    when the pairs do not make two folds with both labels."""
    fold_of = refit_folds(split_table, REFIT_FOLDS, seed=config.seed)
    fold = pairs["participant_id"].map(fold_of).to_numpy(dtype=float)
    labels = data.labels
    scores = np.full(len(pairs), np.nan)
    for k in range(int(np.nanmax(fold)) + 1 if fold_of else 0):
        inner, outer = np.flatnonzero(~np.isnan(fold) & (fold != k)), np.flatnonzero(fold == k)
        if len(np.unique(labels[inner])) < 2:
            return None
        torch.manual_seed(config.seed + 1000 * (k + 1))
        fit = _fixed_epochs_fit(settings, grid, data, config, inner, l1, epochs, device, ctx)
        scores[outer] = predict_pairs(fit.model, data, outer, device)
    done = ~np.isnan(scores)
    if not fold_of or len(np.unique(labels[done])) < 2:
        return None
    return choose_threshold(labels[done], scores[done]), int(np.nanmax(fold)) + 1


def decision_support(runs: pd.DataFrame) -> pd.DataFrame:
    """How far the sub-samplings' decision points can be trusted (metrics rows): the fewest decline pairs one was
    placed on (``threshold_decline_pairs_min``), ``threshold_reliable`` (1 when that is at least
    :data:`~bids_siamese.train.evaluate.MIN_THRESHOLD_POSITIVES`, else 0 and one WARNING line) and the share of
    test pairs, and of stable test pairs, each draw's decision point calls decline (mean over the draws; one
    WARNING line when the stable share exceeds :data:`~bids_siamese.train.evaluate.MAX_NEGATIVE_POSITIVE_RATE`)."""
    fewest = int(runs["threshold_decline_pairs"].min())
    reliable = fewest >= MIN_THRESHOLD_POSITIVES
    stable_rate = float(runs["test_stable_predicted_decline_rate"].mean())
    if not reliable:
        LOG.warning("longitudinal: a decision point rests on %d decline pair(s), fewer than %d: predicted and the "
                    "accuracy/precision/recall/f1 are unreliable (threshold_reliable 0 in %s; auc_roc is not "
                    "affected); fix: select more labelled participants with two sessions, or judge the model by "
                    "auc_roc only", fewest, MIN_THRESHOLD_POSITIVES, LONGITUDINAL_FILES["metrics"])
    if stable_rate > MAX_NEGATIVE_POSITIVE_RATE:
        LOG.warning("longitudinal: the decision points call %.0f%% of the stable test pairs decline (mean over %d "
                    "sub-sampling(s), test_stable_predicted_decline_rate in %s): their decisions are not usable; fix: "
                    "select more labelled participants, or use p_decline and auc_roc instead of predicted",
                    100 * stable_rate, len(runs), LONGITUDINAL_FILES["metrics"])
    return pd.concat([summarise(runs, "", ["test_predicted_decline_rate", "test_stable_predicted_decline_rate"]),
                      scalar_rows({"threshold_decline_pairs_min": fewest, "threshold_reliable": int(reliable)})],
                     ignore_index=True)


def draw_split(inputs: LongitudinalInputs, seed: int) -> pd.DataFrame:
    """One sub-sampling's family-aware, label-stratified split (seed ``--seed + run``)."""
    return longitudinal_split_table(inputs.pairs, inputs.family, seed=seed)


def fit_longitudinal_draw(settings: Settings, grid: Grid, inputs: LongitudinalInputs, data: PairData,
                          config: TrainConfig, run: int, device: torch.device, ctx: DistContext,
                          outputs: PairData | None = None, split_table: pd.DataFrame | None = None
                          ) -> LongitudinalDraw:
    """split -> fit (and, for ``regional``, choose the L1 penalty) -> decision point on the validation pairs ->
    (``regional``: refit on the training + validation pairs, decision point from out-of-fold predictions on them)
    -> evaluate on the test pairs, for one random sub-sampling (seed ``--seed + run``). Test pairs take no part in
    any fit or choice.

    ``data`` holds the training stack (``--volume-cache``): every fit and every choice (early stopping, penalty,
    decision point) uses it. The test pairs' p(decline) (``test_p``, the test metrics, the held-out predictions)
    come from ``outputs``: the same pairs on the volumes as stored (float32), as in ``--mode apply``; None: ``data``.
    ``split_table``: the draw's split (:func:`draw_split`; None: drawn here).
    """
    pairs, labels = inputs.pairs, data.labels
    seed = settings.seed + run
    split_table = draw_split(inputs, seed) if split_table is None else split_table
    split_of = dict(zip(split_table["participant_id"], split_table["split"]))
    split = pairs["participant_id"].map(split_of).to_numpy()
    y_train, y_val = labels[split == "train"], labels[split == "validation"]
    if not ((y_train == 1).any() and (y_train == 0).any()) or not ((y_val == 1).any() and (y_val == 0).any()) \
            or not (split == "test").any():
        raise BadDataError(
            f"too few labelled longitudinal participants for train/validation/test splits with both labels in "
            f"training and validation ({int((labels == 1).sum())} decline, {int((labels == 0).sum())} stable); fix: "
            f"select at least 3 decline and 3 stable participants with two sessions (column "
            f"'{settings.label_column}')")
    torch.manual_seed(seed)
    train_idx, val_idx = np.flatnonzero(split == "train"), np.flatnonzero(split == "validation")
    draw_config = TrainConfig(**{**config.__dict__, "seed": seed})
    start = new_longitudinal_model(settings, grid, data, train_idx)
    candidates = L1_CHOICES if isinstance(start, RegionalChange) else (None,)
    best: tuple | None = None
    for l1 in candidates:
        model = copy.deepcopy(start)
        if l1 is not None:
            model.l1 = float(l1)
        result = train_longitudinal(model, data, train_idx, val_idx, draw_config, device, ctx)
        p_val = predict_pairs(result.model, data, val_idx, device)
        auc = safe_auc(labels[val_idx], p_val)
        key = (-np.inf if np.isnan(auc) else auc, l1 or 0.0)
        if l1 is not None:
            LOG.info("longitudinal run %d: L1 %g, validation AUC %.3f", run + 1, l1, auc)
        if best is None or key > best[0]:
            best = (key, result, p_val, l1)
    _, selection, p_val, l1 = best
    threshold = val_threshold = choose_threshold(labels[val_idx], p_val)
    test_idx = np.flatnonzero(split == "test")
    result, final_train_idx, before, extra = selection, train_idx, {}, {}
    if l1 is not None:  # regional: refit on training + validation pairs with the chosen penalty and epoch count
        before = binary_metrics(labels[test_idx], predict_pairs(selection.model, outputs or data, test_idx, device),
                                val_threshold)
        final_train_idx = np.sort(np.concatenate([train_idx, val_idx]))
        oof = out_of_fold_threshold(settings, grid, data, draw_config, pairs, split_table, l1, selection.best_epoch,
                                    device, ctx)
        torch.manual_seed(seed)
        result = _fixed_epochs_fit(settings, grid, data, draw_config, final_train_idx, l1, selection.best_epoch,
                                   device, ctx)
        if oof is not None:
            threshold = oof[0]
        extra = {"l1": l1, "refit": 1.0, "refit_folds": float(oof[1] if oof else 0),
                 "threshold_p_decline_validation": val_threshold}
    test_p = predict_pairs(result.model, outputs or data, test_idx, device)
    placed_on = final_train_idx if extra.get("refit_folds") else val_idx  # the pairs the decision point came from
    called, stable = test_p >= threshold, labels[test_idx] == 0
    row = {"run": run, **binary_metrics(labels[test_idx], test_p, threshold), "threshold_p_decline": threshold,
           **extra, "threshold_decline_pairs": int((labels[placed_on] == 1).sum()),
           "test_predicted_decline_rate": float(called.mean()) if len(called) else float("nan"),
           "test_stable_predicted_decline_rate": float(called[stable].mean()) if stable.any() else float("nan")}
    if l1 is not None:
        row["accuracy_validation_threshold"] = binary_metrics(labels[test_idx], test_p, val_threshold)["accuracy"]
    LOG.info("longitudinal run %d/%d: %d epochs (best %d), %.0f s, threshold %.3f (%s), test accuracy %.3f%s",
             run + 1, settings.n_draws, len(selection.history), selection.best_epoch, selection.seconds, threshold,
             "out-of-fold on training + validation" if extra.get("refit_folds") else "validation",
             row["accuracy"], f" (refitted with L1 {l1:g}; before the refit {before['accuracy']:.3f})" if before
             else "")
    return LongitudinalDraw(result, selection, split_table, split_of, row, threshold, test_idx, test_p, before,
                            final_train_idx)


class LongitudinalTask(GroupTask):
    """``--task longitudinal``: collect -> samples -> split -> fit -> evaluate -> write (:func:`run_longitudinal`)."""

    name = "longitudinal"
    title = "Longitudinal model"
    shown = ("metrics", "predictions", "loss_figure", "roc_figure")
    section = "longitudinal"
    distributed = True
    steps = ("collect (every session, labels, families) -> samples (session pairs) -> --n-draws family splits -> "
             "fit (BCE, one model per draw) or --model -> evaluate (test pairs) -> write")

    def __init__(self, settings: Settings, ctx: DistContext, device: torch.device):
        super().__init__(settings, ctx, device)
        self.config = train_config(settings, **siamese_options(settings))
        self.model, self.card, self.threshold = None, {}, 0.5
        self.draws: list[LongitudinalDraw] = []

    def collect(self, subjects: list[str]) -> None:
        """The session pairs and their scans (:func:`collect_longitudinal`) and, in ``--mode apply``, the
        checkpoint and its decision point."""
        self.inputs = collect_longitudinal(self.settings, subjects, require_labels=self.train_mode,
                                           load=self.train_mode)
        if not self.train_mode:
            if self.settings.model is None:
                raise UsageError("--mode apply needs --model PATH; fix: pass the checkpoint of a trained model")
            self.model, self.card = load_checkpoint(self.settings.model, "longitudinal", self.grid, self.device)
            self.threshold = float(self.card.get("decision", {}).get("threshold_p_decline", 0.5))

    def samples(self) -> None:
        """The pairs on the training stack (``--volume-cache``) and on the volumes as stored (float32), from which
        the written predictions come."""
        inputs = self.inputs
        self.pairs = inputs.pairs
        self.labels = self.pairs["label"].to_numpy(dtype=float)
        self.data = PairData(inputs.volumes, inputs.pair_index, self.labels)
        self.outputs = PairData(inputs.stored, inputs.pair_index, self.labels)

    def split(self) -> None:
        """``--n-draws`` random splits (:func:`draw_split`, seeds ``--seed``, ``--seed + 1``, ...), or the split in
        which the checkpoint saw each participant."""
        settings = self.settings
        if self.train_mode:
            self.split_tables = [draw_split(self.inputs, settings.seed + run) for run in range(settings.n_draws)]
        else:
            split_of = seen_split(self.card, self.inputs.scans, dataset_name(settings.bids_dir))
            self.pairs["split"] = self.pairs["participant_id"].map(split_of)

    def fit(self) -> None:
        """One model per draw (:func:`fit_longitudinal_draw`); the first draw's model writes the predictions."""
        if not self.train_mode:
            return
        for run, split_table in enumerate(self.split_tables):
            self.draws.append(fit_longitudinal_draw(self.settings, self.grid, self.inputs, self.data, self.config,
                                                    run, self.device, self.ctx, self.outputs, split_table))
        first = self.draws[0]
        self.model, self.threshold = first.result.model, first.threshold
        self.pairs["split"] = self.pairs["participant_id"].map(first.split_of)

    def evaluate(self) -> None:
        """Every pair's p(decline) (as ``--mode apply`` computes them), its held-out p(decline) over the draws in
        which it was a test pair, and the test metrics (mean +- std over the draws)."""
        pairs, labels, threshold = self.pairs, self.labels, self.threshold
        heldout_sum, heldout_n = np.zeros(len(pairs)), np.zeros(len(pairs), dtype=int)
        for draw in self.draws:
            np.add.at(heldout_sum, draw.test_idx, draw.test_p)
            np.add.at(heldout_n, draw.test_idx, 1)
        p_all = predict_pairs(self.model, self.outputs, None, self.device)
        pairs["p_decline"] = p_all
        pairs["predicted"] = np.where(p_all >= threshold, "decline", "stable")
        pairs["p_decline_heldout"] = np.where(heldout_n > 0, heldout_sum / np.maximum(heldout_n, 1), np.nan)
        pairs["heldout_draws"] = heldout_n
        self.test_mask = test_mask = (pairs["split"] == "test").to_numpy() & ~np.isnan(labels)
        if self.train_mode:
            run_rows = [draw.row for draw in self.draws]
            before_rows = [draw.before_refit for draw in self.draws if draw.before_refit]
            runs = pd.DataFrame(run_rows)
            metrics = summarise(runs)
            refitted = bool(before_rows)  # regional: the final model of each draw also trained on its validation pairs
            seen = ("train", "validation") if refitted else ("train",)
            in_sample = pairs["split"].isin(seen).to_numpy() & ~np.isnan(labels)
            metrics = pd.concat([metrics, scalar_rows({
                "train_accuracy_run0": binary_metrics(labels[in_sample], p_all[in_sample], threshold)["accuracy"],
                "threshold_p_decline_mean": float(np.mean([r["threshold_p_decline"] for r in run_rows])),
            }), decision_support(runs)], ignore_index=True)
            if refitted:
                metrics = pd.concat([
                    metrics, summarise(pd.DataFrame(before_rows), "before_refit_"),
                    summarise(runs, "", ["accuracy_validation_threshold", "threshold_p_decline_validation", "l1"]),
                    scalar_rows({"refitted": 1, **{f"l1_run{r['run']}": r["l1"] for r in run_rows},
                                 **{f"refit_folds_run{r['run']}": r["refit_folds"] for r in run_rows}})],
                    ignore_index=True)
        else:
            one = binary_metrics(labels[test_mask], p_all[test_mask], threshold) if test_mask.any() else {}
            metrics = summarise(pd.DataFrame([one]) if one else pd.DataFrame(columns=METRICS))
        self.metrics = pd.concat([metrics, scalar_rows({
            "threshold_p_decline": threshold,
            "n_test_pairs": int(test_mask.sum()),
            "n_test_decline": int((labels[test_mask] == 1).sum()),
            "n_test_stable": int((labels[test_mask] == 0).sum()),
        })], ignore_index=True)

    def write(self) -> list[Path]:
        """The splits, history, loss figure and checkpoint (train), the predictions, metrics and ROC figure."""
        settings, pairs, labels, test_mask = self.settings, self.pairs, self.labels, self.test_mask
        out_dir = Path(settings.output_dir)
        written = self.write_training() if self.train_mode else []
        table = pairs.assign(label=pairs["label"].map(_label_text), p_decline=pairs["p_decline"].round(4),
                             p_decline_heldout=pairs["p_decline_heldout"].round(4))
        written.append(write_tsv(out_dir / LONGITUDINAL_FILES["predictions"], table[PREDICTION_COLUMNS]))
        written.append(write_tsv(out_dir / LONGITUDINAL_FILES["metrics"], self.metrics))
        if test_mask.any():
            curve = {"learned": (labels[test_mask], pairs["p_decline"].to_numpy()[test_mask])}
            written.append(save_figure(plot_roc(curve, "decline vs stable, test pairs"),
                                       out_dir / LONGITUDINAL_FILES["roc_figure"]))
        log_metrics("longitudinal", self.metrics, time.perf_counter() - self.t_start)
        return written

    def write_training(self) -> list[Path]:
        """write, train: the splits of every draw, the histories, the first draw's loss figure and its checkpoint
        folder (with the learned region weights of a regional model)."""
        settings, config, model, metrics = self.settings, self.config, self.model, self.metrics
        out_dir = Path(settings.output_dir)
        first, final0 = self.draws[0].selection, self.draws[0].result
        run_rows = [draw.row for draw in self.draws]
        splits = pd.concat([draw.split_table.assign(run=run) for run, draw in enumerate(self.draws)],
                           ignore_index=True)
        splits["label"] = splits["label"].map(_label_text)
        written = [write_tsv(out_dir / LONGITUDINAL_FILES["splits"],
                             splits[["participant_id", "family_id", "label", "run", "split"]])]
        history = pd.concat([draw.selection.history.assign(run=run) for run, draw in enumerate(self.draws)],
                            ignore_index=True).round(6)
        history = history[["run", *[c for c in history.columns if c != "run"]]]
        written.append(write_tsv(out_dir / LONGITUDINAL_FILES["history"], history))
        figure = plot_history(first.history, f"longitudinal BCE loss ({settings.backbone}, run 0)",
                              ["val_accuracy", "val_auc"])
        written.append(save_figure(figure, out_dir / LONGITUDINAL_FILES["loss_figure"]))
        training_data = card_training_data(self.inputs.scans, self.draws[0].split_of, settings.bids_dir,
                                           n_pairs=pd.Series(self.pairs["split"]).value_counts().to_dict(),
                                           label_column=settings.label_column)
        regional = isinstance(model, RegionalChange)
        refit_folds0 = run_rows[0].get("refit_folds", 0)
        chosen_on = (f"out-of-fold p(decline) of the training + validation pairs of the first sub-sampling "
                     f"({refit_folds0:g} family-aware folds, largest Youden's J)" if refit_folds0 else
                     "validation pairs of the first sub-sampling (largest Youden's J)")
        card = make_card(
            "longitudinal", settings.backbone, model.embedding_dim if regional else settings.embedding_dim, self.grid,
            settings.seed, training_data, {"threshold_p_decline": self.threshold, "chosen_on": chosen_on},
            {m: (None if pd.isna(v) else float(v)) for m, v in zip(metrics["metric"], metrics["mean"])},
            {"epochs": settings.epochs, "epochs_run": len(first.history), "best_epoch": first.best_epoch,
             "batch_size": settings.batch_size, "lr": settings.lr, "patience": settings.patience,
             "flip_lr": config.flip_lr, "max_shift_voxels": config.max_shift, "n_runs": len(run_rows),
             "world_size": self.ctx.world_size, "training_seconds": round(first.seconds, 1),
             "volumes_per_second": round(first.volumes_per_second, 2)},
            reproducibility=reproducibility_record(settings.device))
        if settings.init is not None:
            card["init"] = init_record(settings.init)
        folder = model_folder(out_dir, "longitudinal", settings.backbone)
        if regional:
            card["hyperparameters"].update(l1=model.l1, l1_choices=list(L1_CHOICES),
                                           l1_chosen_on="validation AUC of the first sub-sampling",
                                           refitted_on="training + validation pairs",
                                           refit_epochs=len(final0.history))
            written.append(write_region_weights(model, settings, card, folder))
        return written + save_checkpoint(folder, model, card)
