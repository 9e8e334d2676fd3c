"""Group level: train or apply the twin and longitudinal Siamese models (``group --task twin|longitudinal``).

:func:`run_twin` and :func:`run_longitudinal` read the participant-level model-grid T1w files, build pairs and
family-aware splits, train (``--mode train``) or load (``--mode apply --model PATH``) a model, and write
the ``group_*`` tables, figures and checkpoints at the top of OUTPUT_DIR (see docs/outputs.md). Under
torchrun only rank 0 writes.
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd
import torch
from torch import nn

from ..bids.derivatives import GROUP_FILES, write_tsv
from ..errors import BadDataError, NoInputError, UsageError
from ..models.checkpoint import load_checkpoint, make_card, save_checkpoint, sha256_bytes, sha256_file
from ..models.heads import build_model
from ..models.regional import REGIONAL_MODELS, RegionalChange, RegionalConvEncoder, RegionalEncoder, part_map_for
from ..models.losses import pair_distance
from ..resources import Grid, model_grid
from .data import VolumeFiles, find_preproc, first_scan_per_subject, load_masks, load_volumes
from .ddp import DistContext, barrier, cleanup, init_distributed
from .evaluate import (
    METRICS,
    binary_metrics,
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
from .loop import (
    PairData,
    TrainConfig,
    TwinData,
    embed,
    predict_pairs,
    shift_voxels,
    train_longitudinal,
    train_twin,
)
from .pairs import (
    FAMILY_FALLBACKS,
    Relations,
    find_column,
    longitudinal_pairs,
    longitudinal_split_table,
    normalise_label,
    participant_id,
    read_pairs_file,
    read_participants,
    read_session_times,
    relations_from_pairs_table,
    relations_from_participants,
    twin_split_table,
)
from .relatives import nearest_relatives, relatives_table

LOG = logging.getLogger("bids_siamese.group.models")

#: Output names at the top of OUTPUT_DIR.
TWIN_FILES = {
    "pairs": "group_twins_pairs.tsv",
    "metrics": "group_twins_metrics.tsv",
    "splits": "group_twins_splits.tsv",
    "history": "group_twins_history.tsv",
    "loss_figure": "figures/group_twins_loss.svg",
    "roc_figure": "figures/group_twins_roc.svg",
    "relatives": GROUP_FILES["twins_relatives"],
}
LONGITUDINAL_FILES = {
    "predictions": "group_longitudinal_predictions.tsv",
    "metrics": "group_longitudinal_metrics.tsv",
    "splits": "group_longitudinal_splits.tsv",
    "history": "group_longitudinal_history.tsv",
    "loss_figure": "figures/group_longitudinal_loss.svg",
    "roc_figure": "figures/group_longitudinal_roc.svg",
}
PAIR_COLUMNS = ["subject_a", "subject_b", "relation", "split", "distance", "twin_probability", "predicted_twin"]
PREDICTION_COLUMNS = ["participant_id", "session_a", "session_b", "label", "p_decline", "predicted"]


def model_folder(output_dir: Path, task: str, backbone: str) -> Path:
    """``OUTPUT_DIR/models/<twins|longitudinal>_<backbone>``.

    Examples:
        >>> model_folder(Path("/out"), "twin", "small").as_posix()
        '/out/models/twins_small'
    """
    return Path(output_dir) / "models" / f"{'twins' if task == 'twin' else task}_{backbone}"


def train_config(settings: Any) -> TrainConfig:
    """Training settings from the run's :class:`~bids_siamese.config.Settings`."""
    regional = settings.backbone in REGIONAL_MODELS  # compares voxels with the population: no shift/intensity jitter
    return TrainConfig(
        epochs=settings.epochs, batch_size=settings.batch_size, lr=settings.lr, patience=settings.patience,
        distance=settings.distance, margin=settings.margin, dz_positives=settings.dz_positives, seed=settings.seed,
        max_shift=0 if regional else shift_voxels(settings.resolution), intensity=0.0 if regional else 0.1,
        noise_std=0.0 if regional else 0.05,
    )


#: Block size (mm) of the regional model's patterns: 2x2x2 blocks on the 2 mm grid, none on a 4 mm or coarser grid.
REGIONAL_BLOCK_MM = 4.0
#: Learned region weights of a ``regional`` twin model, written into its checkpoint folder.
REGION_WEIGHTS = "region_weights.tsv"


def region_weight_table(model: RegionalEncoder | RegionalChange, settings: Any) -> pd.DataFrame:
    """``region, hemisphere, structure_class, label, voxels, weight, rank`` of a regional model, most important
    first (``voxels``: pooled voxels of the part). Twin model: ``weight`` = learned region weight (sums to 1).
    Longitudinal model: ``weight`` = the classifier's coefficient of the standardised change of the region's
    mean (signed: negative = darkening means decline), ranked by its absolute value."""
    from ..explain.regions import load_atlas

    table = load_atlas(str(settings.atlas), settings.atlas_labels).table.set_index("index")
    labels = model.part_label.numpy()
    weight = (model.region_weights() if isinstance(model, RegionalEncoder) else model.classifier.weight[0])
    out = pd.DataFrame({
        "region": [table.at[lab, "region"] if lab in table.index else str(lab) for lab in labels],
        "hemisphere": [table.at[lab, "hemisphere"] if lab in table.index else "n/a" for lab in labels],
        "structure_class": [table.at[lab, "structure_class"] if lab in table.index else "n/a" for lab in labels],
        "label": labels,
        "voxels": model.part_count.numpy().astype(int),
        "weight": weight.detach().numpy().round(6),
    })
    order = np.argsort(-np.abs(out["weight"].to_numpy()), kind="stable")
    out = out.iloc[order].reset_index(drop=True)
    return out.assign(rank=np.arange(1, len(out) + 1))


def write_region_weights(model: RegionalEncoder | RegionalChange, settings: Any, card: dict[str, Any],
                         folder: Path) -> Path:
    """Write ``folder/region_weights.tsv`` (:func:`region_weight_table`) and record the regional layout in
    ``card`` (``pool``, ``atlas``, ``n_regions``, ``top_regions``); returns the TSV path."""
    weights = region_weight_table(model, settings)
    card.update(pool=model.pool, atlas=str(settings.atlas), n_regions=model.n_parts,
                top_regions=[f"{r.region} {r.hemisphere} {r.weight:.3f}" for r in weights.head(5).itertuples()])
    return write_tsv(folder / REGION_WEIGHTS, weights)


def _regional_parts(settings: Any, grid: Grid, brain: np.ndarray) -> tuple[np.ndarray, int, str]:
    """``(part map, pool, atlas name)`` of a regional model: ``settings.atlas`` labels inside ``brain``."""
    from ..explain.regions import labels_on_grid, load_atlas

    atlas = load_atlas(str(settings.atlas), settings.atlas_labels)
    pool = max(1, int(round(REGIONAL_BLOCK_MM / grid.resolution)))
    return part_map_for(grid.shape, grid.affine, partial(labels_on_grid, atlas), brain, pool), pool, atlas.name


def new_longitudinal_model(settings: Any, grid: Grid, data: PairData, train_idx: np.ndarray) -> nn.Module:
    """A fresh longitudinal model for ``settings.backbone``; the ``regional`` one takes its regions inside the
    training scans' brain and standardises its change features by the training pairs."""
    if settings.backbone != "regional":
        return build_model("longitudinal", settings.backbone, embedding_dim=settings.embedding_dim)
    scans = np.unique(data.pairs[train_idx])
    brain = (data.volumes[scans, 0] != 0).mean(axis=0) >= 0.5
    parts, pool, atlas = _regional_parts(settings, grid, brain)
    model = RegionalChange(grid.shape, parts, pool)
    with torch.no_grad():
        emb = model.embed(torch.from_numpy(data.volumes[scans]))
    row = {int(s): k for k, s in enumerate(scans)}
    pairs = data.pairs[train_idx]
    model.set_feature_scale(emb[[row[int(b)] for b in pairs[:, 1]]] - emb[[row[int(a)] for a in pairs[:, 0]]])
    LOG.info("regional longitudinal model: %d %s regions", model.n_parts, atlas)
    return model


def new_twin_model(settings: Any, grid: Grid, volumes: np.ndarray, masks: np.ndarray, train_idx: np.ndarray
                   ) -> nn.Module:
    """A fresh twin model for ``settings.backbone``; the ``regional`` model takes its regions from
    ``settings.atlas`` inside the training subjects' brain and its population reference from their scans."""
    if settings.backbone not in REGIONAL_MODELS:
        return build_model("twin", settings.backbone, embedding_dim=settings.embedding_dim)
    parts, pool, atlas = _regional_parts(settings, grid, masks[train_idx].mean(axis=0) >= 0.5)
    model = (RegionalConvEncoder if settings.backbone == "regional_cnn" else RegionalEncoder)(grid.shape, parts, pool)
    model.set_reference(volumes[train_idx], masks[train_idx])
    LOG.info("regional twin model: %d %s regions, %d-d embedding", model.n_parts, atlas, model.embedding_dim)
    return model


def _setup(settings: Any) -> tuple[DistContext, torch.device]:
    torch.set_num_threads(max(1, int(settings.omp_nthreads)))
    ctx, device = init_distributed(settings.device)
    torch.manual_seed(settings.seed)
    np.random.seed(settings.seed % (2**32))
    if ctx.is_distributed:
        LOG.info("distributed training: rank %d of %d (%s)", ctx.rank, ctx.world_size, ctx.backend)
    return ctx, device


def _dataset_name(bids_dir: Path) -> str:
    try:
        return str(json.loads((Path(bids_dir) / "dataset_description.json").read_text()).get("Name", ""))
    except (OSError, ValueError):
        return ""


def _session_times(bids_dir: Path, scans: pd.DataFrame) -> dict[str, dict]:
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


# ---------------------------------------------------------------------------------------------------------------
# Twins
# ---------------------------------------------------------------------------------------------------------------


def load_relations(settings: Any, subjects: Sequence[str]) -> Relations:
    """Twin relations from ``--pairs-file`` or from participants.tsv family/zygosity columns."""
    if settings.pairs_file is not None:
        return relations_from_pairs_table(read_pairs_file(settings.pairs_file), subjects,
                                          source=f"--pairs-file {settings.pairs_file}")
    table = read_participants(settings.bids_dir)
    return relations_from_participants(table, subjects, settings.family_column, settings.zygosity_column,
                                       source=str(Path(settings.bids_dir) / "participants.tsv"))


def apply_relations(settings: Any, subjects: Sequence[str]) -> Relations | None:
    """Relations for ``--mode apply``: as :func:`load_relations` when ``--pairs-file`` is given or participants.tsv
    has the family column; ``None`` (nothing to evaluate, only the closest relatives are written) otherwise."""
    if settings.pairs_file is None:
        path = Path(settings.bids_dir) / "participants.tsv"
        fallbacks = FAMILY_FALLBACKS if settings.family_column == "family_id" else ()
        if not path.is_file() or find_column(read_participants(settings.bids_dir), settings.family_column,
                                             fallbacks) is None:
            return None
    return load_relations(settings, subjects)


def relation_lookup(relations: Relations):
    """``f(a, b) -> MZ|DZ|sibling|unrelated`` with one dictionary look-up per call (as ``Relations.relation``)."""
    known = {(r.subject_a, r.subject_b): r.relation for r in relations.pairs.itertuples(index=False)}

    def relation_of(a: str, b: str) -> str:
        if relations.family.get(a) != relations.family.get(b):
            return "unrelated"
        return known.get(tuple(sorted((a, b))), "sibling")

    return relation_of


def twin_pair_table(pids: Sequence[str], relations: Relations, split_of: dict[str, str]) -> pd.DataFrame:
    """Every MZ/DZ pair, and every unrelated pair of two subjects in the same split:
    ``subject_a, subject_b, relation, split, i, j`` (i, j: positions in ``pids``).

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
    ordered = sorted(pids)
    for a_pos, a in enumerate(ordered):
        for b in ordered[a_pos + 1:]:
            if relations.family[a] != relations.family[b] and split_of[a] == split_of[b]:
                rows.append((a, b, "unrelated", split_of[a], index[a], index[b]))
    table = pd.DataFrame(rows, columns=["subject_a", "subject_b", "relation", "split", "i", "j"])
    return table.sort_values(["subject_a", "subject_b"]).reset_index(drop=True)


def twin_matrices(pids: Sequence[str], relations: Relations, dz_positives: bool, dz_weight: float = 0.5
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Family index ``(N,)``, positive weights ``(N, N)`` (MZ 1, DZ ``dz_weight`` if used) and the unrelated
    mask ``(N, N)`` for subjects ``pids``."""
    fam_ids = {f: k for k, f in enumerate(sorted(set(relations.family[p] for p in pids)))}
    family = np.array([fam_ids[relations.family[p]] for p in pids])
    index = {p: k for k, p in enumerate(pids)}
    positive = np.zeros((len(pids), len(pids)), dtype=np.float32)
    for row in relations.pairs.itertuples(index=False):
        if row.subject_a not in index or row.subject_b not in index:
            continue
        w = 1.0 if row.relation == "MZ" else dz_weight if (row.relation == "DZ" and dz_positives) else 0.0
        i, j = index[row.subject_a], index[row.subject_b]
        positive[i, j] = positive[j, i] = w
    unrelated = family[:, None] != family[None, :]
    return family, positive, unrelated


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


def run_twin(settings: Any, subjects: list[str]) -> list[Path]:
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
    t_start = time.perf_counter()
    ctx, device = _setup(settings)
    try:
        return _run_twin(settings, subjects, ctx, device, t_start)
    finally:
        cleanup(ctx)


def _run_twin(settings: Any, subjects: list[str], ctx: DistContext, device: torch.device, t_start: float
              ) -> list[Path]:
    out_dir = Path(settings.output_dir)
    grid = model_grid(settings.resolution)
    scans_all = find_preproc(out_dir, subjects, settings.resolution_label, settings.session_label,
                             include_unusable=settings.include_unusable)
    scans = first_scan_per_subject(scans_all, _session_times(settings.bids_dir, scans_all))
    pids = scans["participant_id"].tolist()
    train_mode = settings.mode == "train"
    labels = [p.removeprefix("sub-") for p in pids]
    relations = load_relations(settings, labels) if train_mode else apply_relations(settings, labels)
    positive_relations = ["MZ", "DZ"] if settings.dz_positives else ["MZ"]
    card: dict[str, Any] = {}
    split_table = None
    if train_mode:
        split_table = twin_split_table(relations, seed=settings.seed)
        split_of = dict(zip(split_table["participant_id"], split_table["split"]))
    else:
        if settings.model is None:
            raise UsageError("--mode apply needs --model PATH; fix: pass the checkpoint of a trained model")
        model, card = load_checkpoint(settings.model, "twin", grid, device)
        positive_relations = ["MZ", "DZ"] if card.get("hyperparameters", {}).get("dz_positives") else ["MZ"]
        paths = [Path(p) for p in scans["path"]]
        # each scan is read and embedded once, one batch in memory at a time
        emb = embed(model, VolumeFiles(paths, grid), None, device, train_config(settings).eval_batch_size)
        if relations is None:
            LOG.info("twins: %d subjects, no family data (no --pairs-file, no '%s' column in participants.tsv): "
                     "writing the closest relatives only", len(pids), settings.family_column)
            if not ctx.is_main:
                barrier(ctx)
                return []
            written = [_write_relatives(out_dir, pids, emb, card, None, settings.top_k)]
            LOG.info("twins: closest relatives of %d scans in %.0f s", len(pids), time.perf_counter() - t_start)
            barrier(ctx)
            return written
        split_of = seen_split(card, scans, _dataset_name(settings.bids_dir))
    pairs = twin_pair_table(pids, relations, split_of)
    if train_mode:
        _check_twin_splits(pairs, positive_relations)
    LOG.info("twins: %d subjects, %d MZ and %d DZ pairs, %d unrelated pairs (%s)", len(pids),
             int((pairs.relation == "MZ").sum()), int((pairs.relation == "DZ").sum()),
             int((pairs.relation == "unrelated").sum()),
             ", ".join(f"{k} {v}" for k, v in pd.Series(split_of).value_counts().sort_index().items()))
    paths = [Path(p) for p in scans["path"]]
    volumes = load_volumes(paths, grid)
    masks = load_masks(paths, grid)
    family, positive, unrelated = twin_matrices(pids, relations, settings.dz_positives)
    config = train_config(settings)
    split_arr = np.array([split_of[p] for p in pids])
    result = None
    if train_mode:
        model = new_twin_model(settings, grid, volumes, masks, np.flatnonzero(split_arr == "train"))
        data = TwinData(volumes, family, positive, unrelated)
        result = train_twin(model, data, np.flatnonzero(split_arr == "train"),
                            np.flatnonzero(split_arr == "validation"), config, device, ctx)
        model = result.model
        LOG.info("twin training: %d epochs (best %d) in %.0f s, %.1f volumes/s", len(result.history),
                 result.best_epoch, result.seconds, result.volumes_per_second)
    distance = card.get("hyperparameters", {}).get("distance", settings.distance) if card else settings.distance
    if train_mode:
        emb = embed(model, volumes, None, device, config.eval_batch_size)
    i_idx, j_idx = (torch.tensor(pairs[c].to_numpy(dtype=np.int64)) for c in ("i", "j"))
    pairs["distance"] = pair_distance(emb[i_idx], emb[j_idx], distance).numpy()
    pairs["score"] = -pairs["distance"]
    pairs["baseline"] = voxel_correlation(volumes, masks, list(zip(pairs["i"], pairs["j"])))
    if train_mode:
        val = pairs[(pairs["split"] == "validation") & pairs["relation"].isin([*positive_relations, "unrelated"])]
        y_val = val["relation"].isin(positive_relations).astype(float).to_numpy()
        threshold = choose_threshold(y_val, val["score"])
        scale = fit_probability_scale(y_val, val["score"], threshold)
        b_val = val["baseline"].fillna(-1.0)
        b_threshold = choose_threshold(y_val, b_val)
        decision = {"threshold_distance": -threshold, "probability_scale": scale,
                    "baseline_threshold_correlation": b_threshold, "chosen_on": "validation pairs (Youden's J)",
                    "positive_relations": positive_relations}
        validation = {"validation_auc_roc": safe_auc(y_val, val["score"]),
                      "baseline_validation_auc_roc": safe_auc(y_val, b_val)}
    else:
        decision = card["decision"]
        threshold, scale = -float(decision["threshold_distance"]), float(decision["probability_scale"])
        b_threshold = float(decision["baseline_threshold_correlation"])
        validation = {}
    pairs["twin_probability"] = probability(pairs["score"].to_numpy(), threshold, scale)
    pairs["predicted_twin"] = pairs["score"] >= threshold
    learned, curves = _twin_test_metrics(pairs, "score", threshold, settings.n_draws, settings.seed, "")
    baseline, b_curves = _twin_test_metrics(pairs.assign(baseline=pairs["baseline"].fillna(-1.0)), "baseline",
                                            b_threshold, settings.n_draws, settings.seed, "baseline_")
    test = pairs[pairs["split"] == "test"]
    counts = {f"n_test_{r.lower()}_pairs": int((test["relation"] == r).sum()) for r in ("MZ", "DZ", "unrelated")}
    if not counts["n_test_mz_pairs"]:
        LOG.warning("no MZ pair among the test subjects: the twin metrics are n/a")
    metrics = pd.concat([learned, baseline, scalar_rows({
        **validation, "threshold_distance": round(-threshold, 6), "baseline_threshold_correlation": round(b_threshold, 6),
        **counts})], ignore_index=True)
    if not ctx.is_main:
        barrier(ctx)
        return []
    written: list[Path] = []
    if train_mode and result is not None and split_table is not None:
        written.append(write_tsv(out_dir / TWIN_FILES["splits"], split_table))
        history = result.history.round(6)
        written.append(write_tsv(out_dir / TWIN_FILES["history"], history))
        written.append(save_figure(plot_history(history, f"twin triplet loss ({settings.backbone})",
                                                ["val_twin_distance", "val_nontwin_distance"]),
                                   out_dir / TWIN_FILES["loss_figure"]))
        split_by_pid = split_of
        training_data = {
            **training_fingerprint(scans, split_by_pid),
            "dataset_name": _dataset_name(settings.bids_dir),
            "participants": {p: s for p, s in split_by_pid.items() if s in ("train", "validation")},
            "n_subjects": pd.Series(split_by_pid).value_counts().to_dict(),
            "pairs": {r: int((pairs["relation"] == r).sum()) for r in ("MZ", "DZ", "unrelated")},
        }
        regional = isinstance(model, RegionalEncoder)
        card = make_card(
            "twin", settings.backbone, model.embedding_dim if regional else settings.embedding_dim, grid,
            settings.seed, training_data, decision,
            {m: (None if pd.isna(v) else float(v)) for m, v in zip(metrics["metric"], metrics["mean"])},
            {"distance": settings.distance, "margin": settings.margin, "dz_positives": settings.dz_positives,
             "epochs": settings.epochs, "epochs_run": len(history), "best_epoch": result.best_epoch,
             "batch_size": settings.batch_size, "lr": settings.lr, "patience": settings.patience,
             "flip_lr": config.flip_lr, "max_shift_voxels": config.max_shift, "world_size": ctx.world_size,
             "training_seconds": round(result.seconds, 1),
             "volumes_per_second": round(result.volumes_per_second, 2)})
        folder = model_folder(out_dir, "twin", settings.backbone)
        if regional:
            card["input"]["population_reference"] = (
                f"voxelwise mean and spread of the {int((split_arr == 'train').sum())} training scans (model buffers "
                "reference_mean, reference_sd; spread floored at its 10th in-brain percentile)")
            written.append(write_region_weights(model, settings, card, folder))
        written += save_checkpoint(folder, model, card)
    table = pairs[["subject_a", "subject_b", "relation", "split", "distance", "twin_probability", "predicted_twin"]]
    table = table.assign(distance=table["distance"].round(6), twin_probability=table["twin_probability"].round(4))
    written.append(write_tsv(out_dir / TWIN_FILES["pairs"], table))
    written.append(_write_relatives(out_dir, pids, emb, card or {"decision": decision,
                                                                 "hyperparameters": {"distance": distance}},
                                    relations, settings.top_k))
    written.append(write_tsv(out_dir / TWIN_FILES["metrics"], metrics))
    roc = {f"learned, {k} vs unrelated": v for k, v in curves.items()}
    roc.update({f"voxel correlation, {k} vs unrelated": v for k, v in b_curves.items()})
    written.append(save_figure(plot_roc(roc, "twin identification, test pairs"), out_dir / TWIN_FILES["roc_figure"]))
    _log_metrics("twins", metrics, time.perf_counter() - t_start)
    barrier(ctx)
    return written


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


def _log_metrics(task: str, metrics: pd.DataFrame, seconds: float) -> None:
    shown = metrics[metrics["metric"].isin(["accuracy", "f1", "auc_roc", "baseline_auc_roc"])]
    LOG.info("%s done in %.0f s: %s", task, seconds,
             ", ".join(f"{r.metric} {r.mean:.3f} +- {r.std:.3f}" for r in shown.itertuples()))


# ---------------------------------------------------------------------------------------------------------------
# Longitudinal
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class _LongitudinalInputs:
    pairs: pd.DataFrame  # participant_id, session_a, session_b, label
    scans: pd.DataFrame  # participant_id, session, path (only scans used by pairs)
    volumes: np.ndarray
    pair_index: np.ndarray  # (P, 2) rows of volumes
    family: dict[str, str]


def _longitudinal_inputs(settings: Any, subjects: Sequence[str], require_labels: bool) -> _LongitudinalInputs:
    grid = model_grid(settings.resolution)
    scans = find_preproc(settings.output_dir, subjects, settings.resolution_label, settings.session_label,
                         include_unusable=settings.include_unusable)
    times = _session_times(settings.bids_dir, scans)
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
    volumes = load_volumes([Path(p) for p in used_scans["path"]], grid)
    return _LongitudinalInputs(pairs, used_scans, volumes, pair_index, family)


def _label_text(value: float) -> str:
    return "n/a" if pd.isna(value) else ("decline" if value == 1 else "stable")


def run_longitudinal(settings: Any, subjects: list[str]) -> list[Path]:
    """Longitudinal change (decline vs stable) at the group level: train or apply the session-pair classifier.

    Training repeats a random family-aware, label-stratified split ``--n-draws`` times (seeds ``seed``,
    ``seed + 1``, ...), trains one model per split and reports the test metrics as mean +- std over these
    random sub-samplings (the protocol of the published 3D-SiameseNet); the model of the first split
    (``--seed``) is saved and writes the predictions. p(decline) >= 0.5 predicts decline (the training
    loss is class-balanced).

    Args:
        settings: the run's :class:`~bids_siamese.config.Settings`.
        subjects: selected participant labels.

    Returns:
        Paths written (empty on ranks other than 0).
    """
    t_start = time.perf_counter()
    ctx, device = _setup(settings)
    try:
        return _run_longitudinal(settings, subjects, ctx, device, t_start)
    finally:
        cleanup(ctx)


def _run_longitudinal(settings: Any, subjects: list[str], ctx: DistContext, device: torch.device, t_start: float
                      ) -> list[Path]:
    out_dir = Path(settings.output_dir)
    grid = model_grid(settings.resolution)
    train_mode = settings.mode == "train"
    inputs = _longitudinal_inputs(settings, subjects, require_labels=train_mode)
    pairs = inputs.pairs
    labels = pairs["label"].to_numpy(dtype=float)
    data = PairData(inputs.volumes, inputs.pair_index, labels)
    config = train_config(settings)
    written: list[Path] = []
    run_rows, split_tables, histories = [], [], []
    model, card, threshold = None, {}, 0.5
    if train_mode:
        n_runs = settings.n_draws
        for run in range(n_runs):
            seed = settings.seed + run
            split_table = longitudinal_split_table(pairs, inputs.family, seed=seed)
            split_of = dict(zip(split_table["participant_id"], split_table["split"]))
            split = pairs["participant_id"].map(split_of).to_numpy()
            y_train = labels[split == "train"]
            if not ((y_train == 1).any() and (y_train == 0).any()) or not (split == "validation").any() \
                    or not (split == "test").any():
                raise BadDataError(
                    f"too few labelled longitudinal participants for train/validation/test splits "
                    f"({int((labels == 1).sum())} decline, {int((labels == 0).sum())} stable); fix: select at least "
                    f"3 decline and 3 stable participants with two sessions (column '{settings.label_column}')")
            torch.manual_seed(seed)
            train_idx, val_idx = np.flatnonzero(split == "train"), np.flatnonzero(split == "validation")
            if settings.backbone == "regional":  # convex, nothing to stop early: validation pairs train too
                train_idx, val_idx = np.sort(np.r_[train_idx, val_idx]), val_idx[:0]
            run_model = new_longitudinal_model(settings, grid, data, train_idx)
            run_config = TrainConfig(**{**config.__dict__, "seed": seed})
            result = train_longitudinal(run_model, data, train_idx, val_idx, run_config, device, ctx)
            test_idx = np.flatnonzero(split == "test")
            p_test = predict_pairs(result.model, data, test_idx, device)
            run_rows.append({"run": run, **binary_metrics(labels[test_idx], p_test, threshold)})
            LOG.info("longitudinal run %d/%d: %d epochs (best %d), %.0f s, test accuracy %.3f", run + 1, n_runs,
                     len(result.history), result.best_epoch, result.seconds, run_rows[-1]["accuracy"])
            split_tables.append(split_table.assign(run=run))
            histories.append(result.history.assign(run=run))
            if run == 0:
                model, first, split0 = result.model, result, split_of
        pairs["split"] = pairs["participant_id"].map(split0)
    else:
        if settings.model is None:
            raise UsageError("--mode apply needs --model PATH; fix: pass the checkpoint of a trained model")
        model, card = load_checkpoint(settings.model, "longitudinal", grid, device)
        threshold = float(card.get("decision", {}).get("threshold_p_decline", 0.5))
        split_of = seen_split(card, inputs.scans, _dataset_name(settings.bids_dir))
        pairs["split"] = pairs["participant_id"].map(split_of)
    p_all = predict_pairs(model, data, None, device)
    pairs["p_decline"] = p_all
    pairs["predicted"] = np.where(p_all >= threshold, "decline", "stable")
    test_mask = (pairs["split"] == "test").to_numpy() & ~np.isnan(labels)
    if train_mode:
        metrics = summarise(pd.DataFrame(run_rows))
    else:
        one = binary_metrics(labels[test_mask], p_all[test_mask], threshold) if test_mask.any() else {}
        metrics = summarise(pd.DataFrame([one]) if one else pd.DataFrame(columns=METRICS))
    metrics = pd.concat([metrics, scalar_rows({
        "threshold_p_decline": threshold,
        "n_test_pairs": int(test_mask.sum()),
        "n_test_decline": int((labels[test_mask] == 1).sum()),
        "n_test_stable": int((labels[test_mask] == 0).sum()),
    })], ignore_index=True)
    if not ctx.is_main:
        barrier(ctx)
        return []
    if train_mode:
        splits = pd.concat(split_tables, ignore_index=True)
        splits["label"] = splits["label"].map(_label_text)
        written.append(write_tsv(out_dir / LONGITUDINAL_FILES["splits"],
                                 splits[["participant_id", "family_id", "label", "run", "split"]]))
        history = pd.concat(histories, ignore_index=True).round(6)
        history = history[["run", *[c for c in history.columns if c != "run"]]]
        written.append(write_tsv(out_dir / LONGITUDINAL_FILES["history"], history))
        written.append(save_figure(plot_history(first.history, f"longitudinal BCE loss ({settings.backbone}, run 0)",
                                                ["val_accuracy", "val_auc"]), out_dir / LONGITUDINAL_FILES["loss_figure"]))
        scans_split = {p: s for p, s in split0.items()}
        training_data = {
            **training_fingerprint(inputs.scans, scans_split),
            "dataset_name": _dataset_name(settings.bids_dir),
            "participants": {p: s for p, s in scans_split.items() if s in ("train", "validation")},
            "n_pairs": pd.Series(pairs["split"]).value_counts().to_dict(),
            "label_column": settings.label_column,
        }
        regional = isinstance(model, RegionalChange)
        card = make_card(
            "longitudinal", settings.backbone, model.embedding_dim if regional else settings.embedding_dim, grid,
            settings.seed, training_data,
            {"threshold_p_decline": threshold, "chosen_on": "fixed a priori (class-balanced loss)"},
            {m: (None if pd.isna(v) else float(v)) for m, v in zip(metrics["metric"], metrics["mean"])},
            {"epochs": settings.epochs, "epochs_run": len(first.history), "best_epoch": first.best_epoch,
             "batch_size": settings.batch_size, "lr": settings.lr, "patience": settings.patience,
             "flip_lr": config.flip_lr, "max_shift_voxels": config.max_shift, "n_runs": len(run_rows),
             "world_size": ctx.world_size, "training_seconds": round(first.seconds, 1),
             "volumes_per_second": round(first.volumes_per_second, 2)})
        folder = model_folder(out_dir, "longitudinal", settings.backbone)
        if regional:
            card["hyperparameters"].update(l1=model.l1, validation_pairs="used for training (no early stopping)")
            written.append(write_region_weights(model, settings, card, folder))
        written += save_checkpoint(folder, model, card)
    table = pairs.assign(label=pairs["label"].map(_label_text), p_decline=pairs["p_decline"].round(4))
    written.append(write_tsv(out_dir / LONGITUDINAL_FILES["predictions"], table[PREDICTION_COLUMNS]))
    written.append(write_tsv(out_dir / LONGITUDINAL_FILES["metrics"], metrics))
    if test_mask.any():
        written.append(save_figure(plot_roc({"learned": (labels[test_mask], p_all[test_mask])},
                                            "decline vs stable, test pairs"), out_dir / LONGITUDINAL_FILES["roc_figure"]))
    _log_metrics("longitudinal", metrics, time.perf_counter() - t_start)
    barrier(ctx)
    return written
