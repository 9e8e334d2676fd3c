"""Group level: twin identification (``group --task twin``), trained (``--mode train``) or applied
(``--mode apply --model PATH``).

:func:`run_twin` reads the participant-level model-grid T1w files (the first usable scan of each subject),
builds the pairs and the family-aware split, fits (or loads) the model, scores every pair with the model and
the voxel-correlation baseline, evaluates on the test pairs with the threshold chosen on validation, and
writes the ``group_twins_*`` tables, figures and the checkpoint folder (names: :data:`TWIN_FILES`; columns in
docs/outputs.md). Under torchrun only rank 0 writes.
"""
from __future__ import annotations

import logging
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd
import torch
from scipy import sparse
from torch import nn

from ..bids.derivatives import TWIN_FILES, model_folder, write_tsv
from ..config import Settings
from ..errors import BadDataError, UsageError
from ..models.checkpoint import load_checkpoint, make_card, save_checkpoint
from ..models.init import init_record
from ..models.losses import pair_distance
from ..models.regional import RegionalEncoder
from ..resources import Grid
from .data import VolumeFiles, find_preproc, first_scan_per_subject, load_masks, load_volume_cache
from .ddp import DistContext
from .evaluate import (
    MAX_NEGATIVE_POSITIVE_RATE,
    MIN_THRESHOLD_POSITIVES,
    choose_threshold,
    draw_metrics,
    fit_probability_scale,
    plot_history,
    plot_roc,
    probability,
    safe_auc,
    save_figure,
    scalar_rows,
    summarise,
    voxel_correlation,
)
from .loop import TwinData, embed, train_twin
from .models import new_twin_model, write_region_weights
from .pairs import Relations, twin_split_table
from .relatives import nearest_relatives, relatives_table
from .reproducibility import reproducibility_record
from .run import (
    apply_relations,
    card_training_data,
    dataset_name,
    load_relations,
    log_metrics,
    seen_split,
    session_times,
    siamese_options,
)
from .task import GroupTask, run_task
from .trainer import TrainConfig, TrainResult, train_config

LOG = logging.getLogger("bids_siamese.group.models")

PAIR_COLUMNS = ["subject_a", "subject_b", "relation", "split", "distance", "twin_probability", "predicted_twin"]


def relation_lookup(relations: Relations):
    """``f(a, b) -> MZ|DZ|sibling|unrelated`` with one dictionary look-up per call (as ``Relations.relation``)."""
    known = {(r.subject_a, r.subject_b): r.relation for r in relations.pairs.itertuples(index=False)}

    def relation_of(a: str, b: str) -> str:
        if relations.family.get(a) != relations.family.get(b):
            return "unrelated"
        return known.get(tuple(sorted((a, b))), "sibling")

    return relation_of


#: Unrelated partners drawn per subject for the pair table (:func:`twin_pair_table`): the unrelated pairs of a
#: split grow as N^2 (26 million at 11,000 subjects), the metrics need only a sample of them.
UNRELATED_PER_SUBJECT = 20


def twin_pair_table(pids: Sequence[str], relations: Relations, split_of: dict[str, str], seed: int = 0,
                    per_subject: int = UNRELATED_PER_SUBJECT) -> pd.DataFrame:
    """Every MZ/DZ pair, and unrelated pairs of two subjects in the same split:
    ``subject_a, subject_b, relation, split, i, j`` (i, j: positions in ``pids``), sorted by the two ids.

    A split whose unrelated pairs are at most ``per_subject`` times its subjects keeps them all (every demo
    split); a larger one keeps a seeded random sample (:func:`sample_unrelated`): each subject draws
    ``per_subject`` unrelated partners of its split, so the table grows as N, not N^2. The same ``pids``,
    relations, split and ``seed`` give the same table.

    Examples:
        >>> r = Relations({"sub-1": "a", "sub-2": "a", "sub-3": "b"},
        ...               pd.DataFrame([("sub-1", "sub-2", "MZ")], columns=["subject_a", "subject_b", "relation"]))
        >>> twin_pair_table(["sub-1", "sub-2", "sub-3"], r, dict.fromkeys(["sub-1", "sub-2", "sub-3"], "test")
        ...                 )[["subject_a", "subject_b", "relation"]].values.tolist()
        [['sub-1', 'sub-2', 'MZ'], ['sub-1', 'sub-3', 'unrelated'], ['sub-2', 'sub-3', 'unrelated']]
    """
    index = {p: k for k, p in enumerate(pids)}
    rows = []
    for row in relations.pairs.itertuples(index=False):
        if row.relation in ("MZ", "DZ") and row.subject_a in index and row.subject_b in index:
            sa, sb = split_of[row.subject_a], split_of[row.subject_b]
            rows.append((row.subject_a, row.subject_b, row.relation, sa if sa == sb else f"{sa}/{sb}",
                         index[row.subject_a], index[row.subject_b]))
    rng = np.random.default_rng(seed)
    for split, members in _split_members(pids, split_of).items():
        families = [relations.family[p] for p in members]
        for a, b in sample_unrelated(families, per_subject, rng):
            rows.append((members[a], members[b], "unrelated", split, index[members[a]], index[members[b]]))
    table = pd.DataFrame(rows, columns=["subject_a", "subject_b", "relation", "split", "i", "j"])
    return table.sort_values(["subject_a", "subject_b"]).reset_index(drop=True)


def _split_members(pids: Sequence[str], split_of: dict[str, str]) -> dict[str, list[str]]:
    """Split name -> its subjects in id order (splits in name order)."""
    members: dict[str, list[str]] = {}
    for p in sorted(pids):
        members.setdefault(split_of[p], []).append(p)
    return dict(sorted(members.items()))


def unrelated_pairs_available(families: Sequence[str]) -> int:
    """How many unrelated pairs ``len(families)`` subjects form (pairs of two different families), counted
    without listing them.

    Examples:
        >>> unrelated_pairs_available(["a", "a", "b", "c"])
        5
    """
    n = len(families)
    return n * (n - 1) // 2 - sum(c * (c - 1) // 2 for c in Counter(families).values())


def unrelated_pair_counts(pids: Sequence[str], relations: Relations, split_of: dict[str, str]) -> dict[str, int]:
    """Per split, the unrelated pairs of two of its subjects (all of them, scored or not)."""
    return {split: unrelated_pairs_available([relations.family[p] for p in members])
            for split, members in _split_members(pids, split_of).items()}


def sample_unrelated(families: Sequence[str], per_subject: int, rng: np.random.Generator
                     ) -> list[tuple[int, int]]:
    """Unrelated pairs ``(a, b)``, ``a < b``, of subjects whose family ids are ``families``, in order.

    All of them when there are at most ``per_subject * len(families)``; else each subject in turn draws
    ``per_subject`` partners of another family (``rng.choice`` over the others without replacement, its
    relatives drawn and rejected), and the union is kept: at most ``per_subject * len(families)`` pairs, and
    no list of all N^2 pairs is ever made.

    Examples:
        >>> sample_unrelated(["a", "a", "b"], 20, np.random.default_rng(0))
        [(0, 2), (1, 2)]
        >>> len(sample_unrelated([str(k) for k in range(100)], 2, np.random.default_rng(0))) <= 200
        True
    """
    n = len(families)
    codes = np.unique(np.asarray(families, dtype=object).astype(str), return_inverse=True)[1]
    if unrelated_pairs_available(list(codes)) <= per_subject * n:
        return [(a, int(b)) for a in range(n) for b in a + 1 + np.flatnonzero(codes[a + 1:] != codes[a])]
    size = np.bincount(codes)
    pairs: set[tuple[int, int]] = set()
    for a in range(n):
        draw = rng.choice(n - 1, size=min(n - 1, per_subject + int(size[codes[a]]) - 1), replace=False)
        draw = draw + (draw >= a)  # the others: positions 0..n-1 without a
        for b in draw[codes[draw] != codes[a]][:per_subject]:
            pairs.add((min(a, int(b)), max(a, int(b))))
    return sorted(pairs)


def twin_relations(pids: Sequence[str], relations: Relations, dz_positives: bool, dz_weight: float = 0.5
                   ) -> tuple[np.ndarray, sparse.csr_matrix]:
    """What twin training needs to know of ``pids``: the family index ``(N,)`` (subjects of different families
    are the unrelated pairs) and the positive weights as a sparse ``(N, N)`` matrix (MZ 1, DZ ``dz_weight`` if
    used; only the twin pairs are stored, not N^2 values).

    Examples:
        >>> r = Relations({"sub-1": "a", "sub-2": "a", "sub-3": "b"},
        ...               pd.DataFrame([("sub-1", "sub-2", "MZ")], columns=["subject_a", "subject_b", "relation"]))
        >>> family, positive = twin_relations(["sub-1", "sub-2", "sub-3"], r, False)
        >>> family.tolist(), positive.toarray().tolist()
        ([0, 0, 1], [[0.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    """
    fam_ids = {f: k for k, f in enumerate(sorted(set(relations.family[p] for p in pids)))}
    family = np.array([fam_ids[relations.family[p]] for p in pids])
    index = {p: k for k, p in enumerate(pids)}
    rows, cols, weights = [], [], []
    for row in relations.pairs.itertuples(index=False):
        if row.subject_a not in index or row.subject_b not in index:
            continue
        w = 1.0 if row.relation == "MZ" else dz_weight if (row.relation == "DZ" and dz_positives) else 0.0
        if w:
            i, j = index[row.subject_a], index[row.subject_b]
            rows += [i, j]
            cols += [j, i]
            weights += [w, w]
    positive = sparse.csr_matrix((np.asarray(weights, dtype=np.float32), (rows, cols)), shape=(len(pids),) * 2)
    return family, positive


def _check_twin_splits(pairs: pd.DataFrame, positive_relations: Sequence[str]) -> None:
    for split in ("train", "validation"):
        sel = pairs[pairs["split"] == split]
        if not sel["relation"].isin(positive_relations).any() or not (sel["relation"] == "unrelated").any():
            raise BadDataError(
                f"the {split} split has no {'/'.join(positive_relations)} twin pair or no unrelated pair "
                f"({int(sel['relation'].isin(positive_relations).sum())} twin, "
                f"{int((sel['relation'] == 'unrelated').sum())} unrelated); fix: select more twin families "
                "(at least 3 MZ pairs and some unrelated subjects) or check --family-column/--zygosity-column")


def _twin_test_metrics(pairs: pd.DataFrame, score_col: str, threshold: float, n_draws: int, seed: int,
                       prefix: str) -> tuple[pd.DataFrame, dict[str, tuple[np.ndarray, np.ndarray]]]:
    test = pairs[pairs["split"] == "test"]
    neg = test.loc[test["relation"] == "unrelated", score_col].to_numpy()
    tables, curves = [], {}
    for rel, sub in (("MZ", ""), ("DZ", "dz_")):
        pos = test.loc[test["relation"] == rel, score_col].to_numpy()
        draws = draw_metrics(pos, neg, threshold, n_draws, seed)
        tables.append(summarise(draws, f"{prefix}{sub}"))
        curves[rel] = (np.r_[np.ones(len(pos)), np.zeros(len(neg))], np.r_[pos, neg])
    return pd.concat(tables, ignore_index=True), curves


def run_twin(settings: Settings, subjects: list[str]) -> list[Path]:
    """Twin identification at the group level: train (``--mode train``) or apply (``--mode apply --model``).

    Writes ``group_twins_splits.tsv`` (train), ``group_twins_pairs.tsv``, ``group_twins_metrics.tsv``,
    ``group_twins_history.tsv`` and the loss figure (train), the ROC figure and, when training, the checkpoint
    folder ``models/twins_<backbone>/``.

    Args:
        settings: the run's :class:`~bids_siamese.config.Settings`.
        subjects: selected participant labels.

    Returns:
        Paths written (empty on ranks other than 0).

    Raises:
        NoInputError: missing participant-level outputs or participants.tsv.
        UsageError: missing columns, or a checkpoint for another task/grid.
        BadDataError: too few twin families for the splits, unreadable volumes.
    """
    return run_task(TwinTask, settings, subjects)


@dataclass
class TwinCohort:
    """The collected inputs: one scan per subject (``participant_id, session, path``) and the relations
    (``None`` in ``--mode apply`` without family data)."""

    scans: pd.DataFrame
    relations: Relations | None

    @property
    def pids(self) -> list[str]:
        return self.scans["participant_id"].tolist()

    @property
    def paths(self) -> list[Path]:
        return [Path(p) for p in self.scans["path"]]


@dataclass
class TwinDecision:
    """The decision rule: the learned score's threshold and probability scale, the baseline's threshold, and (train
    only) the metrics rows of its choice: validation AUCs and pair counts, whether the threshold is reliable, and
    the share of test pairs it calls twins (:func:`choose_twin_decision`); ``card`` is the ``decision`` entry of a
    model card."""

    threshold: float
    scale: float
    baseline_threshold: float
    validation: dict[str, float]
    card: dict[str, Any]


def collect_twins(settings: Settings, subjects: Sequence[str]) -> TwinCohort:
    """collect: the first usable model-grid scan of each subject and the twin relations."""
    scans = find_preproc(settings.output_dir, subjects, settings.session_label,
                         include_unusable=settings.include_unusable)
    scans = first_scan_per_subject(scans, session_times(settings.bids_dir, scans))
    labels = [p.removeprefix("sub-") for p in scans["participant_id"]]
    train_mode = settings.mode == "train"
    return TwinCohort(scans, load_relations(settings, labels) if train_mode else apply_relations(settings, labels))


def twin_splits(settings: Settings, cohort: TwinCohort, card: dict[str, Any]
                ) -> tuple[dict[str, str], pd.DataFrame | None]:
    """split: participant -> split, and the split table when training (family-aware, stratified by family type);
    in ``--mode apply`` the split in which the checkpoint saw each participant (else ``test``)."""
    if settings.mode != "train":
        return seen_split(card, cohort.scans, dataset_name(settings.bids_dir)), None
    table = twin_split_table(cohort.relations, seed=settings.seed)
    return dict(zip(table["participant_id"], table["split"])), table


#: Embedding values gathered at once when scoring pairs (about 256 MB per side in float32): the full demo's
#: 28,680 pairs of a 125,000-d ``regional_cnn`` embedding would otherwise take 29 GB.
PAIR_CHUNK_VALUES = 2 ** 26


def score_twin_pairs(pairs: pd.DataFrame, emb: torch.Tensor, volumes: np.ndarray, masks: np.ndarray,
                     distance: str) -> pd.DataFrame:
    """evaluate (1): each pair's embedding ``distance``, ``score`` (= -distance) and voxel-correlation
    ``baseline``."""
    i_idx, j_idx = (torch.tensor(pairs[c].to_numpy(dtype=np.int64)) for c in ("i", "j"))
    chunk = max(1, PAIR_CHUNK_VALUES // max(1, emb.shape[1]))  # all pairs at once: n_pairs x dim floats, twice
    pairs["distance"] = torch.cat([pair_distance(emb[i_idx[k:k + chunk]], emb[j_idx[k:k + chunk]], distance)
                                   for k in range(0, len(i_idx), chunk)] or [torch.zeros(0)]).numpy()
    pairs["score"] = -pairs["distance"]
    pairs["baseline"] = voxel_correlation(volumes, masks, list(zip(pairs["i"], pairs["j"])))
    return pairs


def choose_twin_decision(pairs: pd.DataFrame, positive_relations: list[str]) -> TwinDecision:
    """evaluate (2), train: thresholds (Youden's J) and probability scale from the validation pairs only, and how
    far to trust them.

    Fewer than :data:`MIN_THRESHOLD_POSITIVES` validation twin pairs leave the threshold to chance: one WARNING
    line says so, and ``threshold_reliable`` is 0 in the metrics (1 otherwise) with ``validation_positive_pairs``.
    The threshold is then applied to the held-out test pairs (it is not changed by them): ``test_predicted_twin_rate``
    is the share of all test pairs it calls twins, ``test_unrelated_predicted_twin_rate`` the share of unrelated
    test pairs (the false-positive rate); above :data:`MAX_NEGATIVE_POSITIVE_RATE` another WARNING line says so. The
    balanced draws of the test metrics (as many unrelated pairs as twin pairs) would otherwise hide a threshold
    that calls most pairs twins.
    """
    val = pairs[(pairs["split"] == "validation") & pairs["relation"].isin([*positive_relations, "unrelated"])]
    y_val = val["relation"].isin(positive_relations).astype(float).to_numpy()
    threshold = choose_threshold(y_val, val["score"])
    scale = fit_probability_scale(y_val, val["score"], threshold)
    b_val = val["baseline"].fillna(-1.0)
    b_threshold = choose_threshold(y_val, b_val)
    n_positive = int(y_val.sum())
    reliable = n_positive >= MIN_THRESHOLD_POSITIVES
    kind = "/".join(positive_relations)
    if not reliable:
        LOG.warning("twins: the decision threshold rests on %d validation %s pair(s), fewer than %d: predicted_twin, "
                    "twin_probability and the accuracy/precision/recall/f1 are unreliable (threshold_reliable 0 in "
                    "%s; the ranking, auc_roc, is not affected); fix: select more twin families (the validation "
                    "split holds about a fifth of them) or judge the model by auc_roc only", n_positive, kind,
                    MIN_THRESHOLD_POSITIVES, TWIN_FILES["metrics"])
    test = pairs[pairs["split"] == "test"]
    called = test["score"] >= threshold
    unrelated = test["relation"] == "unrelated"
    rate = float(called.mean()) if len(test) else float("nan")
    unrelated_rate = float(called[unrelated].mean()) if unrelated.any() else float("nan")
    if unrelated_rate > MAX_NEGATIVE_POSITIVE_RATE:
        LOG.warning("twins: the threshold chosen on validation calls %.0f%% of the %d unrelated test pairs twins "
                    "(test_unrelated_predicted_twin_rate in %s): its decisions are not usable; fix: select more "
                    "twin families, or use the ranking (distance, auc_roc) instead of predicted_twin",
                    100 * unrelated_rate, int(unrelated.sum()), TWIN_FILES["metrics"])
    card = {"threshold_distance": -threshold, "probability_scale": scale,
            "baseline_threshold_correlation": b_threshold, "chosen_on": "validation pairs (Youden's J)",
            "positive_relations": positive_relations, "validation_positive_pairs": n_positive,
            "threshold_reliable": reliable}
    validation = {"validation_auc_roc": safe_auc(y_val, val["score"]),
                  "baseline_validation_auc_roc": safe_auc(y_val, b_val),
                  "validation_positive_pairs": n_positive, "validation_unrelated_pairs": int(len(y_val) - n_positive),
                  "threshold_reliable": int(reliable), "test_predicted_twin_rate": round(rate, 4),
                  "test_unrelated_predicted_twin_rate": round(unrelated_rate, 4)}
    return TwinDecision(threshold, scale, b_threshold, validation, card)


def card_decision(card: dict[str, Any]) -> TwinDecision:
    """evaluate (2), apply: the decision rule saved in a checkpoint's model card."""
    decision = card["decision"]
    return TwinDecision(-float(decision["threshold_distance"]), float(decision["probability_scale"]),
                        float(decision["baseline_threshold_correlation"]), {}, decision)


def evaluate_twins(pairs: pd.DataFrame, decision: TwinDecision, n_draws: int, seed: int,
                   test_unrelated_available: int | None = None
                   ) -> tuple[pd.DataFrame, dict[str, tuple[np.ndarray, np.ndarray]]]:
    """evaluate (3): every pair's twin probability and decision, and the test metrics of the model and the
    baseline (MZ and DZ vs unrelated, ``n_draws`` draws from the scored unrelated test pairs) with their ROC
    curves. ``test_unrelated_available``: all unrelated test pairs, scored or not (a metrics row; default: the
    scored ones)."""
    pairs["twin_probability"] = probability(pairs["score"].to_numpy(), decision.threshold, decision.scale)
    pairs["predicted_twin"] = pairs["score"] >= decision.threshold
    learned, curves = _twin_test_metrics(pairs, "score", decision.threshold, n_draws, seed, "")
    baseline, b_curves = _twin_test_metrics(pairs.assign(baseline=pairs["baseline"].fillna(-1.0)), "baseline",
                                            decision.baseline_threshold, n_draws, seed, "baseline_")
    test = pairs[pairs["split"] == "test"]
    counts = {f"n_test_{r.lower()}_pairs": int((test["relation"] == r).sum()) for r in ("MZ", "DZ", "unrelated")}
    counts["n_test_unrelated_pairs_available"] = (counts["n_test_unrelated_pairs"] if test_unrelated_available is None
                                                  else int(test_unrelated_available))
    if not counts["n_test_mz_pairs"]:
        LOG.warning("no MZ pair among the test subjects: the twin metrics are n/a")
    metrics = pd.concat([learned, baseline, scalar_rows({
        **decision.validation, "threshold_distance": round(-decision.threshold, 6),
        "baseline_threshold_correlation": round(decision.baseline_threshold, 6), **counts})], ignore_index=True)
    roc = {f"learned, {k} vs unrelated": v for k, v in curves.items()}
    roc.update({f"voxel correlation, {k} vs unrelated": v for k, v in b_curves.items()})
    return metrics, roc


class TwinTask(GroupTask):
    """``--task twin``: collect -> samples -> split -> fit -> evaluate -> write (module docstring).

    ``--mode apply`` without family data (no ``--pairs-file``, no family column) has nothing to split or evaluate:
    only the closest relatives are written."""

    name = "twin"
    title = "Twin model"
    shown = ("metrics", "loss_figure", "roc_figure")
    section = "twin"
    distributed = True
    steps = ("collect (first usable scan per subject, relations) -> samples (volumes, masks) -> family split and "
             "pairs -> fit (triplet loss) or --model -> evaluate (test pairs, threshold from validation) -> write")

    def __init__(self, settings: Settings, ctx: DistContext, device: torch.device):
        super().__init__(settings, ctx, device)
        self.config = train_config(settings, **siamese_options(settings))
        self.positive_relations = ["MZ", "DZ"] if settings.dz_positives else ["MZ"]
        self.model: nn.Module | None = None
        self.card: dict[str, Any] = {}
        self.result: TrainResult | None = None

    @property
    def relatives_only(self) -> bool:
        """``--mode apply`` without family data."""
        return self.cohort.relations is None

    def collect(self, subjects: list[str]) -> None:
        """The cohort (:func:`collect_twins`) and, in ``--mode apply``, the checkpoint."""
        self.cohort = collect_twins(self.settings, subjects)
        self.pids = self.cohort.pids
        if not self.train_mode:
            if self.settings.model is None:
                raise UsageError("--mode apply needs --model PATH; fix: pass the checkpoint of a trained model")
            self.model, self.card = load_checkpoint(self.settings.model, "twin", self.grid, self.device)
            dz = self.card.get("hyperparameters", {}).get("dz_positives")
            self.positive_relations = ["MZ", "DZ"] if dz else ["MZ"]

    def samples(self) -> None:
        """The subjects' volumes (the ``--volume-cache`` stack) and brain masks (the baseline's); none are held
        for the closest relatives only."""
        if self.relatives_only:
            return
        paths = self.cohort.paths
        self.volumes, self.masks = load_volume_cache(paths, self.grid, self.settings.volume_cache), load_masks(
            paths, self.grid)

    def split(self) -> None:
        """The split (:func:`twin_splits`) and the pairs to score (:func:`twin_pair_table`)."""
        if self.relatives_only:
            return
        self.split_of, self.split_table = twin_splits(self.settings, self.cohort, self.card)
        self.pairs = twin_pair_table(self.pids, self.cohort.relations, self.split_of, self.settings.seed)
        self.unrelated_available = unrelated_pair_counts(self.pids, self.cohort.relations, self.split_of)
        if self.train_mode:
            _check_twin_splits(self.pairs, self.positive_relations)
        _log_pairs(self.pids, self.pairs, self.split_of, self.unrelated_available)
        self.split_arr = np.array([self.split_of[p] for p in self.pids])

    def fit(self) -> None:
        """Train (:func:`fit_twin`) or take the checkpoint; then every subject's embedding. The embeddings come
        from the volumes as stored (float32), as in ``--mode apply``: the float16 cache is for training only."""
        if self.train_mode:
            self.result = fit_twin(self.settings, self.grid, self.cohort, self.volumes, self.masks, self.split_arr,
                                   self.config, self.device, self.ctx)
            self.model = self.result.model
            stored = self.volumes if isinstance(self.volumes, np.ndarray) else VolumeFiles(self.cohort.paths,
                                                                                             self.grid)
        else:  # each scan is read and embedded once, one batch in memory at a time
            stored = VolumeFiles(self.cohort.paths, self.grid)
        self.emb = embed(self.model, stored, None, self.device, self.config.eval_batch_size)

    def evaluate(self) -> None:
        """Pair scores, the decision rule (validation pairs, or the card's) and the test metrics."""
        if self.relatives_only:
            return
        settings, card = self.settings, self.card
        self.distance = card.get("hyperparameters", {}).get("distance", settings.distance) if card \
            else settings.distance
        self.pairs = score_twin_pairs(self.pairs, self.emb, self.volumes, self.masks, self.distance)
        self.decision = (choose_twin_decision(self.pairs, self.positive_relations) if self.train_mode
                         else card_decision(card))
        self.metrics, self.roc = evaluate_twins(self.pairs, self.decision, settings.n_draws, settings.seed,
                                                self.unrelated_available.get("test", 0))

    def write(self) -> list[Path]:
        """The training outputs and checkpoint (train), the pairs, relatives, metrics and ROC figure."""
        settings = self.settings
        if self.relatives_only:
            LOG.info("twins: %d subjects, no family data (no --pairs-file, no '%s' column in participants.tsv): "
                     "writing the closest relatives only", len(self.pids), settings.family_column)
            written = [_write_relatives(Path(settings.output_dir), self.pids, self.emb, self.card, None,
                                        settings.top_k)]
            LOG.info("twins: closest relatives of %d scans in %.0f s", len(self.pids),
                     time.perf_counter() - self.t_start)
            return written
        written: list[Path] = []
        card = self.card
        if self.result is not None:
            card = _twin_card(settings, self.grid, self.model, self.cohort, self.split_of, self.pairs,
                              self.decision, self.metrics, self.result, self.config, self.ctx,
                              self.unrelated_available)
            written += write_twin_training(settings, self.model, card, self.result, self.split_table,
                                           int((self.split_arr == "train").sum()))
        written += write_twins(settings, self.pids, self.pairs, self.emb,
                               card or {"decision": self.decision.card, "hyperparameters": {"distance": self.distance}},
                               self.cohort.relations, self.metrics, self.roc)
        log_metrics("twins", self.metrics, time.perf_counter() - self.t_start)
        return written


def _log_pairs(pids: list[str], pairs: pd.DataFrame, split_of: dict[str, str], available: dict[str, int]) -> None:
    LOG.info("twins: %d subjects, %d MZ and %d DZ pairs, %d unrelated pairs scored of %d (%s)", len(pids),
             int((pairs.relation == "MZ").sum()), int((pairs.relation == "DZ").sum()),
             int((pairs.relation == "unrelated").sum()), sum(available.values()),
             ", ".join(f"{k} {v}" for k, v in pd.Series(split_of).value_counts().sort_index().items()))


def fit_twin(settings: Settings, grid: Grid, cohort: TwinCohort, volumes: np.ndarray, masks: np.ndarray,
             split_arr: np.ndarray, config: TrainConfig, device: torch.device, ctx: DistContext) -> TrainResult:
    """fit: a fresh model (:func:`~bids_siamese.train.models.new_twin_model`) trained with the batch-hard triplet
    loss on the training subjects, early-stopped on the validation subjects."""
    train_idx, val_idx = np.flatnonzero(split_arr == "train"), np.flatnonzero(split_arr == "validation")
    model = new_twin_model(settings, grid, volumes, masks, train_idx)
    family, positive = twin_relations(cohort.pids, cohort.relations, settings.dz_positives)
    result = train_twin(model, TwinData(volumes, family, positive), train_idx, val_idx, config, device, ctx)
    LOG.info("twin training: %d epochs (best %d) in %.0f s, %.1f volumes/s", len(result.history),
             result.best_epoch, result.seconds, result.volumes_per_second)
    return result


def _twin_card(settings: Settings, grid: Grid, model: nn.Module, cohort: TwinCohort, split_of: dict[str, str],
               pairs: pd.DataFrame, decision: TwinDecision, metrics: pd.DataFrame, result: TrainResult,
               config: TrainConfig, ctx: DistContext, unrelated_available: dict[str, int]) -> dict[str, Any]:
    """The model card of a trained twin model."""
    training_data = card_training_data(
        cohort.scans, split_of, settings.bids_dir, n_subjects=pd.Series(split_of).value_counts().to_dict(),
        pairs={**{r: int((pairs["relation"] == r).sum()) for r in ("MZ", "DZ", "unrelated")},
               "unrelated_available": int(sum(unrelated_available.values())),
               "unrelated_per_subject": UNRELATED_PER_SUBJECT})
    regional = isinstance(model, RegionalEncoder)
    card = make_card(
        "twin", settings.backbone, model.embedding_dim if regional else settings.embedding_dim, grid,
        settings.seed, training_data, decision.card,
        {m: (None if pd.isna(v) else float(v)) for m, v in zip(metrics["metric"], metrics["mean"])},
        {"distance": settings.distance, "margin": settings.margin, "dz_positives": settings.dz_positives,
         "epochs": settings.epochs, "epochs_run": len(result.history), "best_epoch": result.best_epoch,
         "batch_size": settings.batch_size, "lr": settings.lr, "patience": settings.patience,
         "flip_lr": config.flip_lr, "max_shift_voxels": config.max_shift, "world_size": ctx.world_size,
         "training_seconds": round(result.seconds, 1),
         "volumes_per_second": round(result.volumes_per_second, 2)},
        reproducibility=reproducibility_record(settings.device))
    if settings.init is not None:
        card["init"] = init_record(settings.init)
    return card


def write_twin_training(settings: Settings, model: nn.Module, card: dict[str, Any], result: TrainResult,
                        split_table: pd.DataFrame, n_train: int) -> list[Path]:
    """write, train: the split table, the loss history and figure, and the checkpoint folder (with the learned
    region weights of a regional model)."""
    out_dir = Path(settings.output_dir)
    history = result.history.round(6)
    figure = plot_history(history, f"twin triplet loss ({settings.backbone})",
                          ["val_twin_distance", "val_nontwin_distance"])
    written = [write_tsv(out_dir / TWIN_FILES["splits"], split_table),
               write_tsv(out_dir / TWIN_FILES["history"], history),
               save_figure(figure, out_dir / TWIN_FILES["loss_figure"])]
    folder = model_folder(out_dir, "twin", settings.backbone)
    if isinstance(model, RegionalEncoder):
        card["input"]["population_reference"] = (
            f"voxelwise mean and spread of the {n_train} training scans (model buffers "
            "reference_mean, reference_sd; spread floored at its 10th in-brain percentile)")
        written.append(write_region_weights(model, settings, card, folder))
    return written + save_checkpoint(folder, model, card)


def write_twins(settings: Settings, pids: list[str], pairs: pd.DataFrame, emb: torch.Tensor, card: dict[str, Any],
                relations: Relations | None, metrics: pd.DataFrame,
                roc: dict[str, tuple[np.ndarray, np.ndarray]]) -> list[Path]:
    """write: the pairs table, the closest relatives, the metrics and the ROC figure."""
    out_dir = Path(settings.output_dir)
    table = pairs[PAIR_COLUMNS]
    table = table.assign(distance=table["distance"].round(6), twin_probability=table["twin_probability"].round(4))
    return [write_tsv(out_dir / TWIN_FILES["pairs"], table),
            _write_relatives(out_dir, pids, emb, card, relations, settings.top_k),
            write_tsv(out_dir / TWIN_FILES["metrics"], metrics),
            save_figure(plot_roc(roc, "twin identification, test pairs"), out_dir / TWIN_FILES["roc_figure"])]


def _write_relatives(out_dir: Path, pids: Sequence[str], emb: torch.Tensor, card: dict[str, Any],
                     relations: Relations | None, top_k: int) -> Path:
    """``group_twins_relatives.tsv``: each scan's ``top_k`` nearest scans in embedding space (blocked exact search,
    O(N d) memory), with the model's distance, twin probability and decision, and the known relation."""
    decision = card.get("decision", {})
    distance = card.get("hyperparameters", {}).get("distance", "cosine")
    t0 = time.perf_counter()
    index, dist = nearest_relatives(emb.numpy(), top_k, distance)
    LOG.info("twins: %d nearest relatives of each of %d scans (%s distance) in %.1f s", index.shape[1], len(pids),
             distance, time.perf_counter() - t0)
    threshold = decision.get("threshold_distance")
    table = relatives_table(pids, index, dist, None if threshold is None else float(threshold),
                            decision.get("probability_scale"),
                            relation_lookup(relations) if relations is not None else None)
    return write_tsv(out_dir / TWIN_FILES["relatives"], table)
