"""Group level: the model factories of the twin and longitudinal tasks.

A CNN backbone comes from :func:`bids_siamese.models.heads.build_model`; the ``regional`` models take their
regions from the atlas inside the training scans' brain (:func:`new_twin_model`, :func:`new_longitudinal_model`)
and write their learned region weights next to the checkpoint (:func:`write_region_weights`).
"""
from __future__ import annotations

import logging
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from torch import nn

from ..atlas import labels_on_grid, load_atlas
from ..bids.derivatives import REGION_WEIGHTS, write_tsv
from ..config import Settings
from ..models.heads import LongitudinalSiamese, SiameseEncoder, build_model
from ..models.init import start_from_pretrained
from ..models.regional import (
    REGIONAL_MODELS,
    RegionalChange,
    RegionalConvEncoder,
    RegionalEncoder,
    brain_majority,
    part_map_for,
)
from ..resources import Grid
from .data import VolumeCache, release_pages
from .loop import PairData, embed, release_stack

LOG = logging.getLogger("bids_siamese.group.models")


#: Block size (mm) of the regional model's patterns: 2x2x2 blocks on the 2 mm grid, none on a 4 mm or coarser grid.
REGIONAL_BLOCK_MM = 4.0


def region_weight_table(model: RegionalEncoder | RegionalChange, settings: Settings) -> pd.DataFrame:
    """``region, hemisphere, structure_class, label, voxels, weight, rank`` of a regional model, most important
    first (``voxels``: pooled voxels of the part). Twin model: ``weight`` = learned region weight (sums to 1).
    Longitudinal model: ``weight`` = the classifier's coefficient of the standardised change of the region's
    mean (signed: negative = darkening means decline), ranked by its absolute value."""
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


def write_region_weights(model: RegionalEncoder | RegionalChange, settings: Settings, card: dict[str, Any],
                         folder: Path) -> Path:
    """Write ``folder/region_weights.tsv`` (:func:`region_weight_table`) and record the regional layout in
    ``card`` (``pool``, ``atlas``, ``n_regions``, ``top_regions``); returns the TSV path."""
    weights = region_weight_table(model, settings)
    card.update(pool=model.pool, atlas=str(settings.atlas), n_regions=model.n_parts,
                top_regions=[f"{r.region} {r.hemisphere} {r.weight:.3f}" for r in weights.head(5).itertuples()])
    return write_tsv(folder / REGION_WEIGHTS, weights)


def _regional_parts(settings: Settings, grid: Grid, brain: np.ndarray) -> tuple[np.ndarray, int, str]:
    """``(part map, pool, atlas name)`` of a regional model: ``settings.atlas`` labels inside ``brain``."""
    atlas = load_atlas(str(settings.atlas), settings.atlas_labels)
    pool = max(1, int(round(REGIONAL_BLOCK_MM / grid.resolution)))
    return part_map_for(grid.shape, grid.affine, partial(labels_on_grid, atlas), brain, pool), pool, atlas.name


def pretrained_start(model: SiameseEncoder | LongitudinalSiamese, settings: Settings, grid: Grid) -> nn.Module:
    """``model`` with its encoder's weights from ``--init`` (:func:`~bids_siamese.models.init.start_from_pretrained`;
    the heads keep their fresh weights); unchanged without ``--init``."""
    if settings.init is not None:
        backbone = model.backbone if isinstance(model, SiameseEncoder) else model.encoder.backbone
        start_from_pretrained(backbone, settings.init, settings.backbone, grid)
    return model


#: Volumes read at once by the passes over the training scans that set a model up (:func:`nonzero_majority`, the
#: embeddings of :func:`new_longitudinal_model`): the memory of a chunk, not of every training scan (issue 27).
SCAN_CHUNK = 16


def nonzero_majority(volumes: np.ndarray | VolumeCache, idx: np.ndarray, chunk: int = SCAN_CHUNK) -> np.ndarray:
    """The voxels that are non-zero (inside the brain) in at least half of ``volumes[idx]`` ``(N, 1, X, Y, Z)``,
    counted a chunk of volumes at a time (the stack may be memory-mapped); the same as
    ``(volumes[idx, 0] != 0).mean(axis=0) >= 0.5`` without the ``(N, X, Y, Z)`` copy.

    Examples:
        >>> v = np.zeros((3, 1, 2, 1, 1), np.float32); v[:2, 0, 0] = 1.0
        >>> nonzero_majority(v, np.arange(3), chunk=2).ravel().tolist()
        [True, False]
    """
    return brain_majority(volumes, np.asarray(idx), chunk, inside=lambda part: np.asarray(part)[:, 0] != 0,
                          after_chunk=lambda: release_pages(getattr(volumes, "array", volumes)))


def new_longitudinal_model(settings: Settings, grid: Grid, data: PairData, train_idx: np.ndarray) -> nn.Module:
    """A fresh longitudinal model for ``settings.backbone``; the ``regional`` one takes its regions inside the
    training scans' brain and standardises its change features by the training pairs."""
    if settings.backbone != "regional":
        return pretrained_start(build_model("longitudinal", settings.backbone, embedding_dim=settings.embedding_dim),
                                settings, grid)
    scans = np.unique(data.pairs[train_idx])
    parts, pool, atlas = _regional_parts(settings, grid, nonzero_majority(data.volumes, scans, SCAN_CHUNK))
    model = RegionalChange(grid.shape, parts, pool)
    emb = embed(model, data.volumes, scans, batch_size=SCAN_CHUNK)  # a chunk of volumes at a time
    row = {int(s): k for k, s in enumerate(scans)}
    pairs = data.pairs[train_idx]
    model.set_feature_scale(emb[[row[int(b)] for b in pairs[:, 1]]] - emb[[row[int(a)] for a in pairs[:, 0]]])
    LOG.info("regional longitudinal model: %d %s regions", model.n_parts, atlas)
    return model


def new_twin_model(settings: Settings, grid: Grid, volumes: np.ndarray, masks: np.ndarray, train_idx: np.ndarray
                   ) -> nn.Module:
    """A fresh twin model for ``settings.backbone``; the ``regional`` model takes its regions from
    ``settings.atlas`` inside the training subjects' brain and its population reference from their scans."""
    if settings.backbone not in REGIONAL_MODELS:
        return pretrained_start(build_model("twin", settings.backbone, embedding_dim=settings.embedding_dim),
                                settings, grid)
    release = partial(release_stack, volumes, masks)  # a cohort's stacks are memory-mapped: hold a chunk at a time
    parts, pool, atlas = _regional_parts(settings, grid, brain_majority(masks, train_idx, after_chunk=release))
    model = (RegionalConvEncoder if settings.backbone == "regional_cnn" else RegionalEncoder)(grid.shape, parts, pool)
    model.set_reference(volumes, masks, train_idx, after_chunk=release)
    LOG.info("regional twin model: %d %s regions, %d-d embedding", model.n_parts, atlas, model.embedding_dim)
    return model

