"""Diagnostic experiments for twin identification: which model and loss variants learn the demo's family signal?

Not part of the app: each variant is trained with the app's own loop (``bids_siamese.train.loop.train_twin``,
batch-hard mining, family-aware split of ``--seed``, early stopping on validation) on the model-grid images of a
group-level folder (``benchmarks/twins.py`` writes one), and the test AUC (MZ co-twins vs unrelated test pairs,
all of them, no draws) is printed with the training AUC and a few epochs of the history.

Variants (``KEY=VALUE`` arguments):

* ``arch=cnn`` (default: ``build_model("twin", backbone)`` with ``pool=avg|avgmax``), ``arch=spatial`` (a
  ``small`` encoder with ``ch=16,16`` channels, features standardised, weighted by a learned softmax map over
  positions and flattened: no global pooling) or ``arch=voxel`` (no network: the 4 mm block-averaged input
  weighted by a learned softmax map over voxels; the embedding is the weighted, centred image) or
  ``arch=regional`` (the app's ``--backbone regional``, :class:`bids_siamese.models.regional.RegionalEncoder`,
  regions of ``atlas=harvard_oxford``; use ``input=raw``: it standardises by the training scans itself).
* ``input=raw`` (default), ``residual`` (minus the training subjects' mean) or ``zscore`` (also divided by their
  voxelwise standard deviation).
* ``loss=hinge`` (the app's batch-hard hinge, margin ``margin``) or ``soft`` (batch-hard soft margin:
  ``softplus((d_ap - d_an) / tau)``).
* ``epochs``, ``lr``, ``bs``, ``pat`` (patience), ``shift`` (translation augmentation, voxels), ``noise``.

Usage::

    python benchmarks/twins_variants.py --results /tmp/twins_full --bids /tmp/demo_full --seeds 0 \
        arch=voxel input=zscore loss=soft lr=0.05 shift=0 noise=0 epochs=15 pat=5
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from bids_siamese.cli.parser import parse_args
from bids_siamese.models.backbones import small_encoder
from bids_siamese.models.heads import build_model
from bids_siamese.models.losses import pairwise_distance
from bids_siamese.resources import model_grid
from bids_siamese.train import loop
from bids_siamese.train.data import find_preproc, first_scan_per_subject, load_masks, load_volumes
from bids_siamese.train.ddp import DistContext
from bids_siamese.train.evaluate import safe_auc
from bids_siamese.train.pairs import twin_split_table
from bids_siamese.train.run import load_relations
from bids_siamese.train.twins import twin_pair_table, twin_relations

HINGE = loop.batch_hard_triplet_loss


def soft_margin_loss(tau: float):
    """Batch-hard triplet loss with a soft margin: ``softplus((d(a, p) - d(a, n)) / tau)``, same mining."""

    def loss(emb, positive, related, margin=0.2, distance="cosine"):
        out = HINGE(emb, positive, related, margin, distance)
        n = emb.shape[0]
        eye = torch.eye(n, dtype=torch.bool, device=emb.device)
        d = pairwise_distance(emb, distance)
        is_pos, is_neg = (positive > 0) & ~eye, ~(related.bool() | eye)
        anchors = is_pos.any(1) & is_neg.any(1)
        d_an = torch.where(is_neg, d, torch.full_like(d, float("inf"))).min(1).values
        d_ap = torch.where(is_pos, d, torch.full_like(d, -float("inf"))).max(1).values
        return dataclasses.replace(out, loss=F.softplus((d_ap - d_an)[anchors] / tau).mean())

    return loss


class WeightedMap(nn.Module):
    """Features (or the block-averaged image) weighted by a learned softmax map over positions, flattened."""

    def __init__(self, shape, encoder: nn.Module | None):
        super().__init__()
        self.encoder = encoder if encoder is not None else nn.AvgPool3d(2, ceil_mode=True)
        with torch.no_grad():
            features = self.encoder(torch.zeros(1, 1, *shape))
        self.norm = nn.BatchNorm3d(features.shape[1], affine=False) if encoder is not None else None
        self.logit = nn.Parameter(torch.zeros(1, 1, *features.shape[2:]))

    def forward(self, x):
        f = self.encoder(x)
        f = self.norm(f) if self.norm is not None else f - f.flatten(1).mean(1).view(-1, 1, 1, 1, 1)
        weight = torch.softmax(self.logit.flatten(), 0).view_as(self.logit)
        return F.normalize((f * weight.sqrt()).flatten(1), dim=1)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--bids", type=Path, default=Path("/tmp/demo_small"))
    p.add_argument("--results", type=Path, default=Path("/tmp/twins_benchmark"), help="folder with sub-* inputs")
    p.add_argument("--seeds", default="0")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("options", nargs="*", help="KEY=VALUE (see the module docstring)")
    args = p.parse_args(argv)
    kw = dict(o.split("=", 1) for o in args.options)
    torch.set_num_threads(args.threads)
    if kw.get("loss", "hinge") == "soft":
        loop.batch_hard_triplet_loss = soft_margin_loss(float(kw.get("tau", 0.1)))
    settings = parse_args([str(args.bids), str(args.results), "group", "--task", "twin", "--skip-bids-validation"])
    subjects = sorted(d.name[4:] for d in args.results.glob("sub-*"))
    scans = first_scan_per_subject(find_preproc(args.results, subjects))
    pids = scans["participant_id"].tolist()
    relations = load_relations(settings, [s[4:] for s in pids])
    paths = [Path(s) for s in scans["path"]]
    grid = model_grid(2.0)
    volumes, masks = load_volumes(paths, grid), load_masks(paths, grid)
    masks = (masks if masks.ndim == volumes.ndim else masks[:, None]) > 0
    aucs = []
    for seed in (int(s) for s in args.seeds.split(",")):
        table = twin_split_table(relations, seed=seed)
        split_of = dict(zip(table["participant_id"], table["split"]))
        split = np.array([split_of[s] for s in pids])
        train, val = np.flatnonzero(split == "train"), np.flatnonzero(split == "validation")
        x = volumes.copy()
        if kw.get("input", "raw") in ("residual", "zscore"):
            mean = x[train].mean(0, keepdims=True)
            x = x - mean
            if kw["input"] == "zscore":
                sd = x[train].std(0, keepdims=True)
                x = x / np.maximum(sd, np.percentile(sd[sd > 0], 10))
            x = np.where(masks, x, 0).astype(np.float32)
        family, positive = twin_relations(pids, relations, False)
        torch.manual_seed(seed)
        arch = kw.get("arch", "cnn")
        if arch == "regional":
            from bids_siamese.atlas import labels_on_grid, load_atlas
            from bids_siamese.models.regional import RegionalEncoder, part_map_for
            atlas = load_atlas(kw.get("atlas", "harvard_oxford"))
            brain = masks[train, 0].mean(0) >= 0.5
            model = RegionalEncoder(grid.shape, part_map_for(grid.shape, grid.affine,
                                                             lambda s, a: labels_on_grid(atlas, s, a), brain))
            model.set_reference(x[train], masks[train])
        elif arch == "voxel":
            model = WeightedMap(x.shape[2:], None)
        elif arch == "spatial":
            model = WeightedMap(x.shape[2:], small_encoder(channels=tuple(int(c) for c in kw.get("ch", "16,16").split(","))))
        else:
            model = build_model("twin", kw.get("backbone", "small"), pooling=kw.get("pool", "avgmax"))
        config = loop.TrainConfig(epochs=int(kw.get("epochs", 40)), batch_size=int(kw.get("bs", 12)),
                                  lr=float(kw.get("lr", 1e-3)), patience=int(kw.get("pat", 10)),
                                  margin=float(kw.get("margin", 0.2)), max_shift=int(kw.get("shift", 1)),
                                  noise_std=float(kw.get("noise", 0.05)), seed=seed, progress=False)
        result = loop.train_twin(model, loop.TwinData(x, family, positive), train, val, config, "cpu",
                                 DistContext())
        dist = pairwise_distance(loop.embed(result.model, x, None, "cpu", 8), "cosine").numpy()
        pairs = twin_pair_table(pids, relations, split_of)

        def auc(part: str) -> float:
            sub = pairs[(pairs["split"] == part) & pairs["relation"].isin(["MZ", "unrelated"])]
            return safe_auc((sub["relation"] == "MZ").to_numpy(float), -dist[sub["i"], sub["j"]])

        aucs.append(auc("test"))
        history = result.history[["train_loss", "val_loss", "val_twin_distance", "val_nontwin_distance"]]
        print(f"seed {seed} {kw}: test AUC {aucs[-1]:.3f}, validation {auc('validation'):.3f}, training "
              f"{auc('train'):.3f}; {len(result.history)} epochs (best {result.best_epoch})", flush=True)
        print(history.round(3).iloc[sorted({0, len(history) // 2, len(history) - 1})].to_string(), flush=True)
    print(f"mean test AUC {np.mean(aucs):.3f} +- {np.std(aucs):.3f} over {len(aucs)} split(s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
