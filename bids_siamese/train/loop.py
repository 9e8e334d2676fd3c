"""The tasks' trainers on the shared loop (:class:`~bids_siamese.train.trainer.Trainer`): triplet training of
the twin embedding (:class:`TwinTrainer`), BCE training of the longitudinal classifier
(:class:`LongitudinalTrainer`) and cross-entropy training of the left-right orientation classifier
(:class:`MirrorTrainer`: every scan stored and mirrored); the symmetry model's trainer is
:class:`bids_siamese.symmetry.train.SymmetryTrainer`. Each trainer fills in the hooks of the loop (``batches``,
``assemble``, ``train_step``, ``on_train_epoch_end``, ``validation_step``, ``score``); :func:`train_twin`,
:func:`train_longitudinal` and :func:`train_mirror_classifier` build one and run it.

All of them: AdamW, random augmentation (no left-right flips unless asked), early stopping on the validation
loss (the best epoch's weights are kept), batch-norm statistics re-estimated on the training data after each
epoch (:func:`recompute_batch_norm`), AMP on CUDA, and DistributedDataParallel when started by torchrun (see
:mod:`bids_siamese.train.ddp`). The history (one row per epoch) is returned as a table.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from scipy import sparse
from torch import nn

from ..models.backbones import precise_batch_norm
from ..models.losses import batch_hard_triplet_loss, pairwise_distance
from .data import VolumeCache, augment, family_batches, pair_batches, release_pages
from .ddp import DistContext, unwrap
from .evaluate import safe_auc
from .trainer import TrainConfig, Trainer, TrainResult, autocast

LOG = logging.getLogger("bids_siamese.train")


def read_batch(volumes: np.ndarray | VolumeCache, idx: np.ndarray) -> torch.Tensor:
    """``volumes[idx]`` as a float32 tensor; the pages of a memory-mapped stack (:func:`~bids_siamese.train.data.
    stack_array`) that the read brought into this process are let go again (:func:`~bids_siamese.train.data.
    release_pages`), so that passes over a cohort's stack hold one batch, not every scan they have touched."""
    x = torch.from_numpy(np.asarray(volumes[idx]))
    release_stack(volumes)
    return x


def release_stack(*stacks: np.ndarray | VolumeCache | None) -> None:
    """Let go of the resident pages of memory-mapped stacks (a :class:`VolumeCache`'s, a mask stack's;
    :func:`~bids_siamese.train.data.release_pages`); arrays in memory and ``None`` are left alone.

    Examples:
        >>> release_stack(np.zeros(3), None)
    """
    for stack in stacks:
        if stack is not None:
            release_pages(getattr(stack, "array", stack))


def _batches(volumes: np.ndarray, idx: np.ndarray, size: int) -> Iterator[tuple[np.ndarray, torch.Tensor]]:
    for start in range(0, len(idx), size):
        chunk = idx[start:start + size]
        yield chunk, read_batch(volumes, chunk)


@torch.no_grad()
def embed(model: nn.Module, volumes: np.ndarray, idx: np.ndarray | None = None, device: torch.device | str = "cpu",
          batch_size: int = 8, amp: bool = True) -> torch.Tensor:
    """Embeddings ``(len(idx), D)`` (float32, CPU) of ``volumes[idx]`` with the model in eval mode.

    Args:
        model: a model with ``embed`` (or a plain module returning embeddings).
        volumes: ``(N, 1, X, Y, Z)``.
        idx: which volumes (default all).
        device: where to run.
        batch_size: volumes per forward pass.
        amp: autocast on CUDA.
    """
    device = torch.device(device)
    net = unwrap(model)
    was_training = net.training
    net.eval()
    idx = np.arange(len(volumes)) if idx is None else np.asarray(idx)
    out: torch.Tensor | None = None  # filled in place: a list of per-batch results, each allocated between a
    start = 0  # batch's large temporaries, kept the freed heap from being reused (4 GB more at 4,000 scans)
    for _, x in _batches(volumes, idx, batch_size):
        with autocast(device, amp):
            e = net.embed(x.to(device)) if hasattr(net, "embed") else net(x.to(device))
        if out is None:
            out = torch.empty((len(idx), *e.shape[1:]), dtype=torch.float32)
        out[start:start + len(e)] = e.float().cpu()
        start += len(e)
    net.train(was_training)
    return out if out is not None else torch.zeros((0, 0))


@torch.no_grad()
def recompute_batch_norm(model: nn.Module, volumes: np.ndarray, idx: np.ndarray, device: torch.device | str = "cpu",
                         batch_size: int = 8, forward: Callable[[torch.Tensor], object] | None = None) -> int:
    """Re-estimate the running statistics of every batch-norm layer on ``volumes[idx]`` (no augmentation).

    Run after each epoch, this makes evaluation use the statistics of the current weights rather than a
    momentum average over earlier weights, which matters with few steps per epoch ("precise BN"). The
    statistics are averaged over batches of about ``batch_size`` volumes, the size the model trains with.

    Args:
        model: the model (DDP wrapper accepted).
        volumes: ``(N, 1, X, Y, Z)``.
        idx: volumes to use (the training set).
        device: where to run.
        batch_size: volumes per batch.
        forward: what runs a batch through the network (default: its ``embed``, else the model itself).

    Returns:
        The number of batch-norm layers updated.
    """
    net = unwrap(model)
    idx = np.asarray(idx)
    if len(idx) == 0:
        return 0
    device = torch.device(device)
    run = forward or (net.embed if hasattr(net, "embed") else net)

    with precise_batch_norm(net) as layers:
        if layers:
            for chunk in np.array_split(idx, max(1, int(np.ceil(len(idx) / batch_size)))):
                run(read_batch(volumes, chunk).to(device))
    return layers


@dataclass
class TwinData:
    """Inputs of twin training.

    Attributes:
        volumes: ``(N, 1, X, Y, Z)``, one scan per subject: float32, or a float16 :class:`VolumeCache`.
        family: ``(N,)`` family index (relatives share it).
        positive: ``(N, N)`` positive weights (1 MZ co-twins, ``dz_weight`` DZ when used, else 0): an array, or a
            scipy sparse matrix (:func:`~bids_siamese.train.twins.twin_relations`; a cohort's N x N would not fit).
        unrelated: ``(N, N)`` bool, True for pairs from different families (the non-twin pairs); ``None``: from
            ``family`` (two subjects are unrelated when their families differ).

    Only blocks of the two matrices are ever formed (:meth:`positive_block`, :meth:`related_block`).

    Examples:
        >>> d = TwinData(np.zeros((3, 1, 2, 2, 2)), np.array([0, 0, 1]), sparse.csr_matrix(
        ...     ([1.0, 1.0], ([0, 1], [1, 0])), shape=(3, 3)))
        >>> d.positive_block(np.array([1, 0])).tolist(), d.related_block(np.array([0, 2])).tolist()
        ([[0.0, 1.0], [1.0, 0.0]], [[True, False], [False, True]])
    """

    volumes: np.ndarray | VolumeCache
    family: np.ndarray
    positive: np.ndarray | sparse.spmatrix
    unrelated: np.ndarray | None = None

    def positive_block(self, idx: np.ndarray) -> np.ndarray:
        """``positive[idx][:, idx]`` as a float32 array."""
        idx = np.asarray(idx)
        if sparse.issparse(self.positive):
            return self.positive[idx][:, idx].toarray().astype(np.float32)
        return np.asarray(self.positive[np.ix_(idx, idx)], dtype=np.float32)

    def related_block(self, idx: np.ndarray) -> np.ndarray:
        """Bool ``(len(idx), len(idx))``: True for two subjects of one family (a subject with itself included)."""
        idx = np.asarray(idx)
        if self.unrelated is not None:
            return ~self.unrelated[np.ix_(idx, idx)]
        family = np.asarray(self.family)[idx]
        return family[:, None] == family[None, :]

    def has_positive(self, idx: np.ndarray) -> np.ndarray:
        """Per subject of ``idx``: whether it has a positive partner among ``idx``."""
        idx = np.asarray(idx)
        if sparse.issparse(self.positive):
            return np.asarray((self.positive[idx][:, idx] > 0).sum(axis=1)).ravel() > 0
        return (self.positive[np.ix_(idx, idx)] > 0).any(axis=1)


def _twin_validation(model: nn.Module, data: TwinData, idx: np.ndarray, config: TrainConfig,
                     device: torch.device) -> dict[str, float]:
    if len(idx) < 2:
        return {"val_loss": float("nan"), "val_twin_distance": float("nan"), "val_nontwin_distance": float("nan"),
                "val_auc": float("nan")}
    emb = embed(model, data.volumes, idx, device, config.eval_batch_size, config.amp)
    pos = torch.from_numpy(data.positive_block(idx))
    related_block = data.related_block(idx)
    related = torch.from_numpy(related_block)
    out = batch_hard_triplet_loss(emb, pos, related, config.margin, config.distance)
    dist = pairwise_distance(emb, config.distance).numpy()
    upper = np.triu(np.ones_like(dist, dtype=bool), 1)
    twin = upper & (pos.numpy() > 0)
    non = upper & ~related_block
    labels = np.r_[np.ones(twin.sum()), np.zeros(non.sum())]
    scores = -np.r_[dist[twin], dist[non]]
    return {
        "val_loss": float(out.loss) if out.n_anchors else float("nan"),
        "val_twin_distance": float(dist[twin].mean()) if twin.any() else float("nan"),
        "val_nontwin_distance": float(dist[non].mean()) if non.any() else float("nan"),
        "val_auc": safe_auc(labels, scores),
    }


def _classifier_validation(p: np.ndarray | None, y_val: np.ndarray | None, loss: float) -> dict[str, float]:
    """Validation loss, accuracy at p = 0.5 and AUC of a binary classifier (all NaN without validation data)."""
    if p is None or y_val is None:
        return {"val_loss": loss, "val_accuracy": float("nan"), "val_auc": float("nan")}
    return {"val_loss": loss, "val_accuracy": float(((p >= 0.5) == (y_val == 1)).mean()), "val_auc": safe_auc(y_val, p)}


def train_twin(model: nn.Module, data: TwinData, train_idx: np.ndarray, val_idx: np.ndarray, config: TrainConfig,
               device: torch.device | str = "cpu", ctx: DistContext | None = None) -> TrainResult:
    """Train an embedding model with the batch-hard triplet loss; keep the best validation epoch.

    Each step takes a batch of whole families (:func:`~bids_siamese.train.data.family_batches`), augments it,
    embeds it and mines, per anchor with a co-twin in the batch, the closest non-relative as the negative.

    Args:
        model: a :class:`~bids_siamese.models.heads.SiameseEncoder`.
        data: volumes and relations.
        train_idx: subjects to train on.
        val_idx: validation subjects (early stopping).
        config: training settings.
        device: where to train.
        ctx: distributed context (None: single process).

    Returns:
        :class:`TrainResult`; its history has ``epoch, train_loss, val_loss, val_twin_distance,
        val_nontwin_distance, val_auc, active_triplets, seconds, volumes_per_second``.
    """
    return TwinTrainer(model, data, train_idx, val_idx, config, device, ctx).fit()


class TwinTrainer(Trainer):
    """The twin task's hooks: family batches, the batch-hard triplet loss, twin/non-twin validation distances.

    The score of an epoch is the validation loss, then the gap between the non-twin and the twin distances
    (without validation data: the training loss, which keeps the last epoch)."""

    name = "twin"
    extra_columns = ("active_triplets",)

    def __init__(self, model: nn.Module, data: TwinData, train_idx: np.ndarray, val_idx: np.ndarray,
                 config: TrainConfig, device: torch.device | str = "cpu", ctx: DistContext | None = None):
        super().__init__(model, config, train_idx, device, ctx)
        self.data, self.val_idx = data, np.asarray(val_idx)
        self.has_pos = data.has_positive(self.train_idx)

    def batches(self, rng: np.random.Generator) -> list[np.ndarray]:
        return family_batches(self.data.family[self.train_idx], self.has_pos, self.config.batch_size, rng)

    def assemble(self, idx: np.ndarray, generator: torch.Generator, epoch: int) -> tuple[torch.Tensor, ...]:
        data, config = self.data, self.config
        pos = torch.from_numpy(data.positive_block(idx))
        related = torch.from_numpy(data.related_block(idx))
        x = augment(read_batch(data.volumes, idx), generator, config.flip_lr, config.max_shift,
                    config.intensity, config.noise_std)
        return x, pos, related

    def train_step(self, batch: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, dict[str, float]]:
        x, pos, related = batch
        with self.autocast():
            emb = self.net(x)
        out = batch_hard_triplet_loss(emb.float(), pos, related, self.config.margin, self.config.distance)
        return out.loss, {"active_triplets": out.active_fraction}

    def on_train_epoch_end(self) -> None:
        recompute_batch_norm(self.net, self.data.volumes, self.train_idx, self.device, self.config.batch_size)

    def validation_step(self) -> dict[str, float]:
        return _twin_validation(self.net, self.data, self.val_idx, self.config, self.device)

    def score(self, train_loss: float, val: dict[str, float]) -> tuple[float, float]:
        if np.isnan(val["val_loss"]):  # no validation set: keep the last epoch
            return train_loss, 0.0
        return val["val_loss"], val["val_nontwin_distance"] - val["val_twin_distance"]


# ---------------------------------------------------------------------------------------------------------------
# Longitudinal
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class PairData:
    """Inputs of longitudinal training.

    Attributes:
        volumes: ``(M, 1, X, Y, Z)``, one per scan: float32, or a float16 :class:`VolumeCache`.
        pairs: ``(P, 2)`` indices into ``volumes`` (earlier session, later session).
        labels: ``(P,)`` 1 decline, 0 stable, NaN unknown.
    """

    volumes: np.ndarray | VolumeCache
    pairs: np.ndarray
    labels: np.ndarray


@torch.no_grad()
def predict_pairs(model: nn.Module, data: PairData, idx: np.ndarray | None = None,
                  device: torch.device | str = "cpu", batch_size: int = 8, amp: bool = True) -> np.ndarray:
    """p(decline) for ``data.pairs[idx]``: each scan is embedded once, then the pairs are fused."""
    idx = np.arange(len(data.pairs)) if idx is None else np.asarray(idx)
    if len(idx) == 0:
        return np.zeros(0)
    net = unwrap(model)
    scans = np.unique(data.pairs[idx].ravel())
    emb = embed(net, data.volumes, scans, device, batch_size, amp)
    pos = {int(s): i for i, s in enumerate(scans)}
    a = emb[[pos[int(i)] for i in data.pairs[idx, 0]]]
    b = emb[[pos[int(i)] for i in data.pairs[idx, 1]]]
    was_training = net.training
    net.eval()
    logits = net.fuse(a.to(next(net.parameters()).device), b.to(next(net.parameters()).device))
    net.train(was_training)
    return torch.sigmoid(logits.float()).cpu().numpy()


def train_longitudinal(model: nn.Module, data: PairData, train_idx: np.ndarray, val_idx: np.ndarray,
                       config: TrainConfig, device: torch.device | str = "cpu",
                       ctx: DistContext | None = None) -> TrainResult:
    """Train the session-pair classifier with class-balanced BCE; keep the best validation epoch.

    Both sessions of a pair get the same random translation (they stay aligned); the positive class weight is
    ``n_stable / n_decline`` of the training pairs, so that p = 0.5 is the balanced decision point.

    Args:
        model: a :class:`~bids_siamese.models.heads.LongitudinalSiamese`.
        data: scans, pairs and labels.
        train_idx: training pair indices (labelled).
        val_idx: validation pair indices (labelled).
        config: training settings.
        device: where to train.
        ctx: distributed context.

    Returns:
        :class:`TrainResult`; history columns ``epoch, train_loss, val_loss, val_accuracy, val_auc, seconds,
        volumes_per_second``.
    """
    return LongitudinalTrainer(model, data, train_idx, val_idx, config, device, ctx).fit()


class LongitudinalTrainer(Trainer):
    """The longitudinal task's hooks: batches of session pairs (both sessions get the same translation), the
    class-balanced BCE (plus the model's ``penalty()`` where it has one), validation loss, accuracy and AUC."""

    name = "longitudinal"
    volumes_per_example = 2

    def __init__(self, model: nn.Module, data: PairData, train_idx: np.ndarray, val_idx: np.ndarray,
                 config: TrainConfig, device: torch.device | str = "cpu", ctx: DistContext | None = None):
        super().__init__(model, config, train_idx, device, ctx)
        self.data, self.val_idx = data, np.asarray(val_idx)
        y_train = data.labels[self.train_idx]
        n_pos, n_neg = float((y_train == 1).sum()), float((y_train == 0).sum())
        self.pos_weight = torch.tensor([n_neg / n_pos if n_pos and n_neg else 1.0], device=self.device)

    def batches(self, rng: np.random.Generator) -> list[np.ndarray]:
        return pair_batches(len(self.train_idx), self.config.batch_size, rng)

    def assemble(self, idx: np.ndarray, generator: torch.Generator, epoch: int) -> tuple[torch.Tensor, ...]:
        data, config = self.data, self.config
        pa, pb = data.pairs[idx, 0], data.pairs[idx, 1]
        both = torch.cat([torch.from_numpy(data.volumes[pa]), torch.from_numpy(data.volumes[pb])], dim=1)
        both = augment(both, generator, config.flip_lr, config.max_shift, config.intensity, config.noise_std)
        return both[:, :1].contiguous(), both[:, 1:].contiguous(), torch.from_numpy(data.labels[idx]).float()

    def train_step(self, batch: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, dict[str, float]]:
        x_a, x_b, y = batch
        with self.autocast():
            logits = self.net(x_a, x_b)
        loss = F.binary_cross_entropy_with_logits(logits.float(), y, pos_weight=self.pos_weight)
        if hasattr(unwrap(self.net), "penalty"):  # e.g. the regional model's L1 on its coefficients
            loss = loss + unwrap(self.net).penalty()
        return loss, {}

    def on_train_epoch_end(self) -> None:
        recompute_batch_norm(self.net, self.data.volumes, np.unique(self.data.pairs[self.train_idx]), self.device,
                             2 * self.config.batch_size)

    def validation_step(self) -> dict[str, float]:
        if not len(self.val_idx):
            return _classifier_validation(None, None, float("nan"))
        p = predict_pairs(self.net, self.data, self.val_idx, self.device, self.config.eval_batch_size,
                          self.config.amp)
        y_val = self.data.labels[self.val_idx]
        logit = torch.logit(torch.from_numpy(p).double().clamp(1e-6, 1 - 1e-6))
        return _classifier_validation(p, y_val, float(F.binary_cross_entropy_with_logits(
            logit, torch.from_numpy(y_val).double(), pos_weight=self.pos_weight.double().cpu())))


@dataclass
class MirrorData:
    """Self-supervised left-right examples: every scan as stored and mirrored (the orientation task).

    Attributes:
        volumes: ``(N, 1, X, Y, Z)`` on the model grid (axis 2 of the tensor is x, symmetric about 0): float32,
            or a float16 :class:`VolumeCache`.
        examples: ``(M, 2)`` int: ``(volume index, mirrored 0/1)``.
        labels: ``(M,)`` int: 1 when the example's brain is left-right flipped.
    """

    volumes: np.ndarray | VolumeCache
    examples: np.ndarray
    labels: np.ndarray

    def batch(self, idx: np.ndarray) -> torch.Tensor:
        """The examples ``idx`` as a ``(B, 1, X, Y, Z)`` tensor (mirrored ones flipped along x)."""
        x = torch.from_numpy(self.volumes[self.examples[idx, 0]])
        mirrored = torch.from_numpy(self.examples[idx, 1].astype(bool))
        if bool(mirrored.any()):
            x = x.clone()
            x[mirrored] = torch.flip(x[mirrored], dims=[2])
        return x


@torch.no_grad()
def predict_mirror(model: nn.Module, data: MirrorData, idx: np.ndarray | None = None, device: torch.device | str = "cpu",
                   batch_size: int = 8) -> np.ndarray:
    """Softmax probability of class 1 (flipped) for ``data`` examples ``idx`` (all when None)."""
    net = unwrap(model)
    was_training = net.training
    net.eval()
    idx = np.arange(len(data.labels)) if idx is None else np.asarray(idx)
    out = [torch.softmax(net(data.batch(idx[s:s + batch_size]).to(device)).float(), dim=1)[:, 1].cpu()
           for s in range(0, len(idx), batch_size)]
    net.train(was_training)
    return torch.cat(out).numpy() if out else np.zeros(0, dtype=np.float32)


def train_mirror_classifier(model: nn.Module, data: MirrorData, train_idx: np.ndarray, val_idx: np.ndarray,
                            config: TrainConfig, device: torch.device | str = "cpu",
                            ctx: DistContext | None = None) -> TrainResult:
    """Train a two-class (ok / flipped) classifier on :class:`MirrorData` with cross-entropy; keep the best
    validation epoch. Augmentation never flips left-right (that would change the label).

    Returns:
        :class:`TrainResult`; history columns ``epoch, train_loss, val_loss, val_accuracy, val_auc, seconds,
        volumes_per_second``.
    """
    if config.flip_lr:
        raise ValueError("left-right flip augmentation would change the orientation labels")
    return MirrorTrainer(model, data, train_idx, val_idx, config, device, ctx).fit()


class MirrorTrainer(Trainer):
    """The orientation task's hooks: batches of stored/mirrored examples (never flipped by the augmentation),
    cross-entropy, validation loss, accuracy and AUC."""

    name = "orientation"

    def __init__(self, model: nn.Module, data: MirrorData, train_idx: np.ndarray, val_idx: np.ndarray,
                 config: TrainConfig, device: torch.device | str = "cpu", ctx: DistContext | None = None):
        super().__init__(model, config, train_idx, device, ctx)
        self.data, self.val_idx = data, np.asarray(val_idx)
        self.train_volumes = np.unique(data.examples[self.train_idx, 0])

    def batches(self, rng: np.random.Generator) -> list[np.ndarray]:
        return pair_batches(len(self.train_idx), self.config.batch_size, rng)

    def assemble(self, idx: np.ndarray, generator: torch.Generator, epoch: int) -> tuple[torch.Tensor, ...]:
        config = self.config
        x = augment(self.data.batch(idx), generator, False, config.max_shift, config.intensity, config.noise_std)
        return x, torch.from_numpy(self.data.labels[idx]).long()

    def train_step(self, batch: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, dict[str, float]]:
        x, y = batch
        with self.autocast():
            logits = self.net(x)
        return F.cross_entropy(logits.float(), y), {}

    def on_train_epoch_end(self) -> None:
        recompute_batch_norm(self.net, self.data.volumes, self.train_volumes, self.device, self.config.batch_size)

    def validation_step(self) -> dict[str, float]:
        if not len(self.val_idx):
            return _classifier_validation(None, None, float("nan"))
        p = predict_mirror(self.net, self.data, self.val_idx, self.device, self.config.eval_batch_size)
        y_val = self.data.labels[self.val_idx]
        p_true = np.clip(np.where(y_val == 1, p, 1 - p), 1e-7, 1.0)
        return _classifier_validation(p, y_val, float(-np.log(p_true).mean()))
