"""Group level: self-supervised pretraining of an encoder on every usable scan (``group --task pretrain``).

No labels are read: every usable participant-level model-grid scan of the selection (``--participant-label``,
``--session-label``, the usable-scan gate) is an example. Each training step makes two views of each scan of a
batch (:func:`~bids_siamese.models.pretrain.make_views`: the shift/intensity/noise augmentation of the other tasks,
a shared left-right mirror with probability 1/2, a random quarter turn in the sagittal plane, 30 % of the grid
hidden in cubes of about 32 mm) and trains the backbone's :class:`~bids_siamese.models.backbones.Encoder` with
SA-Swin's proxy objectives (:func:`~bids_siamese.models.pretrain.view_losses`: InfoNCE with temperature 0.07
between the two views, rotation prediction, masked-cube inpainting, the left-right term), weighted equally.

About 10 % of the participants (at least 2 scans; :func:`validation_participants`, seeded by ``--seed``) are held
out: their losses, on the same views every epoch, are the validation losses of the loss table, and the epoch with
the lowest validation total is kept (early stopping after ``--patience`` epochs without a better one). The
trainer is the shared one (:class:`PretrainTrainer` fills its hooks): bf16 autocast on CUDA, ``--loader-workers``
DataLoader workers that make the views, the float16 volume cache (``--volume-cache``), precise batch norm after
each epoch.

The checkpoint ``models/pretrain_<backbone>/`` holds the encoder alone (``model.pt`` is
``Encoder.state_dict()`` of ``build_backbone(backbone, in_channels=1)``; the proxy heads are dropped) and a model
card with ``task: pretrain``, ``backbone``, ``grid``, ``in_channels`` and the training-data fingerprint: what
``--init PATH`` of the twin, longitudinal and symmetry tasks reads.
"""
from __future__ import annotations

import copy
import logging
import math
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
from matplotlib.figure import Figure
from torch import nn

from ..bids.derivatives import PRETRAIN_FILES, model_folder, write_tsv
from ..config import Settings
from ..errors import UsageError
from ..models.backbones import Encoder, build_backbone
from ..models.checkpoint import make_card, save_checkpoint
from ..models.pretrain import (DEFAULT_WEIGHTS, LOSSES, TEMPERATURE, PretrainHeads, PretrainViews, make_views,
                               view_losses)
from ..models.registry import register_model
from ..resources import model_grid
from .data import VolumeCache, augment, find_preproc, load_volume_cache, pair_batches
from .ddp import DistContext, unwrap
from .evaluate import save_figure
from .loop import recompute_batch_norm
from .reproducibility import reproducibility_record
from .run import card_training_data
from .task import GroupTask
from .trainer import TrainConfig, Trainer, TrainResult, shift_voxels, train_config

LOG = logging.getLogger("bids_siamese.group.pretrain")

#: Edge of the hidden cubes of the inpainting objective in mm (8 voxels at 4 mm, as in ``make_views``).
CUBE_MM = 32.0
#: Share of each view hidden in cubes.
MASK_FRACTION = 0.3
#: Share of the scans whose participants are held out for the validation losses (at least 2 scans).
VALIDATION_SHARE = 0.1
#: Size of the contrastive projection (dropped with the other heads).
PROJECTION_DIM = 128
#: The loss table's columns: per split, the total and each objective.
LOSS_COLUMNS = [f"{split}_{name}" for split in ("train", "val") for name in ("total", *LOSSES)]


def cube_voxels(resolution: float) -> int:
    """Edge of the inpainting cubes in voxels on a ``resolution`` mm grid: about :data:`CUBE_MM`, at least 2.

    Examples:
        >>> cube_voxels(2.0), cube_voxels(4.0), cube_voxels(8.0)
        (16, 8, 4)
    """
    return max(2, int(round(CUBE_MM / float(resolution))))


def validation_participants(scans_per_participant: Mapping[str, int], seed: int,
                            share: float = VALIDATION_SHARE) -> set[str]:
    """The participants held out for the validation losses: in a seeded random order, until their scans are at
    least ``max(2, ceil(share * scans))`` (contrastive learning needs two scans in a batch); none when that would
    leave fewer than 2 training scans.

    Examples:
        >>> held = validation_participants({f"sub-{i}": 1 for i in range(30)}, seed=0)
        >>> len(held)
        3
        >>> validation_participants({"sub-1": 2, "sub-2": 1}, seed=0)
        set()
    """
    total = sum(scans_per_participant.values())
    want = max(2, math.ceil(share * total))
    order = sorted(scans_per_participant)
    held: set[str] = set()
    n_held = 0
    for k in np.random.default_rng([int(seed), 26]).permutation(len(order)):
        if n_held >= want:
            break
        held.add(order[k])
        n_held += scans_per_participant[order[k]]
    return held if total - n_held >= 2 else set()


def scan_batches(n: int, batch_size: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Shuffled batches of ``n`` scans, each of at least 2 (a last single scan joins the batch before it; InfoNCE
    contrasts the scans of a batch).

    Examples:
        >>> [len(b) for b in scan_batches(5, 2, np.random.default_rng(0))]
        [2, 3]
    """
    batches = pair_batches(n, max(2, int(batch_size)), rng)
    if len(batches) > 1 and len(batches[-1]) < 2:
        batches[-2:] = [np.concatenate(batches[-2:])]
    return batches


class PretrainNet(nn.Module):
    """The encoder and its proxy heads as one module (one optimiser, one ``state_dict``); ``forward`` is the
    encoder's, so that ``torch.compile`` runs the encoder's pass.

    Args:
        encoder: the backbone's encoder (what is saved).
        heads: the proxy heads (dropped after training).
    """

    def __init__(self, encoder: Encoder, heads: PretrainHeads):
        super().__init__()
        self.encoder, self.heads = encoder, heads

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x)


def view_shape(grid_shape: Sequence[int]) -> tuple[int, int, int]:
    """The spatial shape of a view of a ``grid_shape`` scan: the sagittal plane padded to a square
    (:func:`~bids_siamese.models.pretrain.square_sagittal`).

    Examples:
        >>> view_shape((42, 52, 44))
        (42, 52, 52)
    """
    x, y, z = (int(n) for n in grid_shape)
    return x, max(y, z), max(y, z)


def shapes_passing(encoder: nn.Module, shapes: Sequence[tuple[int, ...]]) -> list[bool]:
    """Whether a batch of two one-channel volumes of each shape passes through ``encoder`` (a network whose
    pooling runs out of voxels on a coarse grid does not): one forward per shape through a copy of the encoder on
    PyTorch's ``meta`` device, which computes shapes only.

    Examples:
        >>> shapes_passing(nn.AvgPool3d(4), [(8, 8, 8), (2, 8, 8)])  # a 4-voxel pooling needs 4 voxels a side
        [True, False]
    """
    meta = copy.deepcopy(encoder).to("meta")
    passing = []
    for shape in shapes:
        try:
            meta(torch.empty(2, 1, *shape, device="meta"))
        except RuntimeError:  # a pooling or convolution larger than what is left of the grid: the answer is no
            passing.append(False)
        else:
            passing.append(True)
    return passing


def views_on(views: PretrainViews, device: torch.device) -> PretrainViews:
    """The views moved to ``device``."""
    return PretrainViews(*(t.to(device) for t in (views.inputs, views.targets, views.masks, views.rotations,
                                                  views.mirrored)))


class PretrainTrainer(Trainer):
    """The pretraining hooks of the shared loop: batches of scans, their views made where the batch is assembled
    (in a loader worker with ``--loader-workers``), the proxy losses under autocast (the per-objective training
    losses are the history's extra columns), precise batch norm on views of the training scans, and the
    validation losses of the held-out scans on the same views every epoch.

    Args:
        model: encoder and heads.
        volumes: ``(N, 1, X, Y, Z)`` model-grid scans: float32, or a float16 :class:`VolumeCache`.
        train_idx: training scans.
        val_idx: validation scans (fewer than 2: no validation losses; the epoch with the lowest training
            loss is kept).
        config: training settings (``max_shift``, ``intensity``, ``noise_std``: the views' augmentation).
        cube: edge of the hidden cubes in voxels.
        device: where to train.
        ctx: distributed context.
    """

    name = "pretrain"
    extra_columns = LOSSES

    def __init__(self, model: PretrainNet, volumes: np.ndarray | VolumeCache, train_idx: np.ndarray,
                 val_idx: np.ndarray, config: TrainConfig, cube: int, device: torch.device | str = "cpu",
                 ctx: DistContext | None = None):
        super().__init__(model, config, train_idx, device, ctx)
        self.volumes, self.val_idx, self.cube = volumes, np.asarray(val_idx), int(cube)
        self.heads = unwrap(self.net).heads

    def augment(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """The other tasks' augmentation (never a left-right flip: the mirror is the views' own, with its label)."""
        config = self.config
        return augment(x, generator, False, config.max_shift, config.intensity, config.noise_std)

    def views(self, x: torch.Tensor, generator: torch.Generator) -> PretrainViews:
        """Two views of each scan of ``x`` (:func:`~bids_siamese.models.pretrain.make_views`)."""
        return make_views(x, generator, self.augment, MASK_FRACTION, self.cube)

    def batches(self, rng: np.random.Generator) -> list[np.ndarray]:
        return scan_batches(len(self.train_idx), self.config.batch_size, rng)

    def assemble(self, idx: np.ndarray, generator: torch.Generator, epoch: int) -> tuple[torch.Tensor, ...]:
        v = self.views(torch.from_numpy(self.volumes[idx]), generator)
        return v.inputs, v.targets, v.masks, v.rotations, v.mirrored

    def train_step(self, batch: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, dict[str, float]]:
        with self.autocast():
            losses = view_losses(self.net, self.heads, PretrainViews(*batch))
        return losses["total"], {name: float(losses[name].detach()) for name in LOSSES}

    def on_train_epoch_end(self) -> None:
        generator = torch.Generator().manual_seed(self.config.seed)

        def forward(x: torch.Tensor) -> torch.Tensor:
            views = views_on(self.views(x.cpu(), generator), self.device)
            with self.autocast():
                return self.heads.project(self.net(views.inputs))

        recompute_batch_norm(self.net, self.volumes, self.train_idx, self.device, self.config.batch_size, forward)

    def on_epoch_end(self, epoch: int, row: dict[str, Any]) -> None:
        """One log line per epoch (pretraining runs long): the training and validation total and objectives."""
        def losses(prefix: str) -> str:
            return ", ".join(f"{name} {row[prefix + name]:.3f}" for name in LOSSES)

        LOG.info("pretrain epoch %d/%d (%.0f s, %.2f scans/s): training %.4f (%s); validation %.4f (%s)", epoch,
                 self.config.epochs, row["seconds"], row["volumes_per_second"], row["train_loss"], losses(""),
                 row["val_loss"], losses("val_"))

    @torch.no_grad()
    def validation_step(self) -> dict[str, float]:
        names = ("total", *LOSSES)
        n = len(self.val_idx)
        if n < 2:
            return {"val_loss": float("nan"), **{f"val_{name}": float("nan") for name in LOSSES}}
        net = unwrap(self.net)
        was_training = net.training
        net.eval()
        generator = torch.Generator().manual_seed(self.config.seed + 1)  # the same views every epoch
        sums = dict.fromkeys(names, 0.0)
        for chunk in np.array_split(self.val_idx, max(1, n // max(2, self.config.eval_batch_size))):
            views = views_on(self.views(torch.from_numpy(self.volumes[chunk]), generator), self.device)
            with self.autocast():
                losses = view_losses(net, net.heads, views)
            for name in names:
                sums[name] += float(losses[name]) * len(chunk)
        net.train(was_training)
        return {"val_loss": sums["total"] / n, **{f"val_{name}": sums[name] / n for name in LOSSES}}


def loss_table(history: pd.DataFrame, best_epoch: int) -> pd.DataFrame:
    """The written loss table from the trainer's history: ``epoch``, ``train_total`` and each objective,
    ``val_total`` and each objective, ``seconds``, ``scans_per_second``, ``kept`` (the epoch whose weights were
    saved)."""
    renamed = history.rename(columns={"train_loss": "train_total", "val_loss": "val_total",
                                      "volumes_per_second": "scans_per_second",
                                      **{name: f"train_{name}" for name in LOSSES}})
    table = renamed[["epoch", *LOSS_COLUMNS, "seconds", "scans_per_second"]].copy()
    table["kept"] = table["epoch"] == best_epoch
    return table.round(6)


def plot_losses(table: pd.DataFrame, title: str) -> Figure:
    """One panel per objective and the total: training (solid) and validation (dashed) loss per epoch, the kept
    epoch marked."""
    names = ("total", *LOSSES)
    fig = Figure(figsize=(3.0 * len(names), 3.2))
    axes = fig.subplots(1, len(names), squeeze=False)[0]
    kept = table.loc[table["kept"], "epoch"]
    for ax, name in zip(axes, names):
        ax.plot(table["epoch"], table[f"train_{name}"], "o-", ms=3, label="training")
        if table[f"val_{name}"].notna().any():
            ax.plot(table["epoch"], table[f"val_{name}"], "s--", ms=3, label="validation")
        for epoch in kept:
            ax.axvline(epoch, color="grey", lw=0.8, ls=":")
        ax.set_title(name)
        ax.set_xlabel("epoch")
    axes[0].set_ylabel("loss")
    axes[0].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def epoch_losses(table: pd.DataFrame, epoch: int) -> dict[str, Any]:
    """``{"epoch", "train": {...}, "validation": {...}}`` of one epoch of the loss table (None for NaN)."""
    row = table[table["epoch"] == epoch].iloc[0]

    def value(column: str) -> float | None:
        return None if pd.isna(row[column]) else float(row[column])

    return {"epoch": int(epoch), "train": {name: value(f"train_{name}") for name in ("total", *LOSSES)},
            "validation": {name: value(f"val_{name}") for name in ("total", *LOSSES)}}


class PretrainTask(GroupTask):
    """``--task pretrain``: collect -> samples -> split -> fit -> evaluate -> write (module docstring)."""

    name = "pretrain"
    title = "Self-supervised pretraining"
    shown = ("losses", "losses_figure")
    steps = ("collect (every usable scan, no labels) -> samples (two augmented views per scan) -> split (about 10 % "
             "of the participants for validation losses) -> fit (contrastive, rotation, inpainting, left-right) -> "
             "evaluate (loss table) -> write (encoder checkpoint, loss curves)")

    def __init__(self, settings: Settings, ctx: DistContext, device: torch.device):
        """Builds the encoder (seeded by ``--seed``) and refuses, before any scan is read, a grid too coarse for it."""
        super().__init__(settings, ctx, device)
        torch.manual_seed(int(settings.seed))
        self.encoder = build_backbone(settings.backbone, in_channels=1)
        if not shapes_passing(self.encoder, [view_shape(self.grid.shape)])[0]:
            finer = [float(r) for r in range(int(math.ceil(settings.resolution)) - 1, 0, -1)]
            passing = shapes_passing(self.encoder, [view_shape(model_grid(r).shape) for r in finer])
            fits = next((f"--resolution {r:g} or finer" for r, ok in zip(finer, passing) if ok), "a finer grid")
            raise UsageError(f"--backbone {settings.backbone} cannot encode the {settings.resolution:g} mm model grid "
                             f"({'x'.join(map(str, self.grid.shape))}): its pooling runs out of voxels; fix: use "
                             f"{fits} (and the participant level at that resolution), or another --backbone")

    def collect(self, subjects: list[str]) -> None:
        """Every usable scan of the selection (every session)."""
        settings = self.settings
        self.scans = find_preproc(settings.output_dir, subjects, settings.session_label,
                                  include_unusable=settings.include_unusable)
        if len(self.scans) < 2:
            raise UsageError(f"--task pretrain needs at least 2 usable participant-level scans in "
                             f"{settings.output_dir}, found {len(self.scans)} (contrastive learning compares scans); "
                             "fix: select more participants or sessions, or run the participant level for them")

    def samples(self) -> None:
        """The training stack (``--volume-cache``); the views are made per batch by the trainer."""
        self.volumes = load_volume_cache([Path(p) for p in self.scans["path"]], self.grid, self.settings.volume_cache)

    def split(self) -> None:
        """About 10 % of the participants for the validation losses (:func:`validation_participants`)."""
        counts = self.scans["participant_id"].value_counts().to_dict()
        held = validation_participants(counts, int(self.settings.seed))
        self.split_of = {pid: "validation" if pid in held else "train" for pid in sorted(counts)}
        split = self.scans["participant_id"].map(self.split_of).to_numpy()
        self.train_idx, self.val_idx = np.flatnonzero(split == "train"), np.flatnonzero(split == "validation")
        if not len(self.val_idx):
            LOG.warning("--task pretrain: %d scan(s) are too few to hold out a validation set (2 scans, leaving 2 "
                        "for training); no validation losses, the epoch with the lowest training loss is kept",
                        len(self.scans))
        LOG.info("pretrain: %d training scan(s), %d validation scan(s) (%d held-out participant(s))",
                 len(self.train_idx), len(self.val_idx), len(held))

    def fit(self) -> None:
        """The fresh encoder (``--backbone``, built with the task) and heads, trained by :class:`PretrainTrainer`."""
        settings, encoder = self.settings, self.encoder
        heads = PretrainHeads(encoder.out_channels, projection_dim=PROJECTION_DIM)
        self.config = train_config(settings, flip_lr=False, max_shift=shift_voxels(settings.resolution))
        self.cube = cube_voxels(settings.resolution)
        trainer = PretrainTrainer(PretrainNet(encoder, heads), self.volumes, self.train_idx, self.val_idx,
                                  self.config, self.cube, self.device, self.ctx)
        self.result: TrainResult = trainer.fit()
        self.encoder = self.result.model.encoder

    def evaluate(self) -> None:
        """The loss table (one row per epoch) and the losses of the kept and the last epoch."""
        result = self.result
        self.table = loss_table(result.history, result.best_epoch)
        self.kept = epoch_losses(self.table, result.best_epoch)
        self.last = epoch_losses(self.table, int(self.table["epoch"].iloc[-1]))
        LOG.info("pretrain: %d epoch(s) in %.0f s (%.2f scans/s), kept epoch %d: training loss %.4f, validation "
                 "loss %s", len(self.table), result.seconds, result.volumes_per_second, result.best_epoch,
                 self.kept["train"]["total"], "n/a" if self.kept["validation"]["total"] is None
                 else f"{self.kept['validation']['total']:.4f}")

    def write(self) -> list[Path]:
        """The loss table and curves, and the encoder's checkpoint folder."""
        settings, result = self.settings, self.result
        out_dir = Path(settings.output_dir)
        written = [write_tsv(out_dir / PRETRAIN_FILES["losses"], self.table),
                   save_figure(plot_losses(self.table, f"self-supervised pretraining ({settings.backbone})"),
                               out_dir / PRETRAIN_FILES["losses_figure"])]
        training_data = card_training_data(self.scans, self.split_of, settings.bids_dir,
                                           n_scans={"train": len(self.train_idx), "validation": len(self.val_idx)})
        card = make_card(
            "pretrain", settings.backbone, self.encoder.out_channels, self.grid, int(settings.seed), training_data,
            decision={}, metrics={"kept": self.kept, "last": self.last},
            hyperparameters={"epochs": settings.epochs, "epochs_run": len(self.table), "best_epoch": result.best_epoch,
                             "batch_size": settings.batch_size, "lr": settings.lr, "patience": settings.patience,
                             "objectives": list(LOSSES), "weights": dict(DEFAULT_WEIGHTS), "temperature": TEMPERATURE,
                             "mask_fraction": MASK_FRACTION, "cube_voxels": self.cube,
                             "projection_dim": PROJECTION_DIM, "flip_lr": False,
                             "max_shift_voxels": self.config.max_shift, "intensity": self.config.intensity,
                             "noise_std": self.config.noise_std, "training_seconds": round(result.seconds, 1),
                             "scans_per_second": round(result.volumes_per_second, 3)},
            pooling="none", reproducibility=reproducibility_record(settings.device))
        card["encoder"] = {"out_channels": int(self.encoder.out_channels),
                           "saved": "the encoder alone (build_backbone(backbone, in_channels=1)); the proxy heads "
                                    "are dropped"}
        folder = model_folder(out_dir, "pretrain", settings.backbone)
        return written + save_checkpoint(folder, self.encoder, card)


def pretrained_encoder(card: Mapping[str, Any], state: Mapping[str, Any]) -> Encoder:
    """The untrained encoder of a pretraining checkpoint, for its weights (the model registry's factory)."""
    return build_backbone(str(card["backbone"]), in_channels=int(card.get("in_channels", 1)))


register_model(pretrained_encoder, task="pretrain")

