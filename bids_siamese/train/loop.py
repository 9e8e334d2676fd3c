"""Training loops: triplet training of the twin embedding, BCE training of the longitudinal classifier and
cross-entropy training of the left-right orientation classifier (every scan stored and mirrored); the symmetry
model (:mod:`bids_siamese.symmetry.train`) runs the same loop (:func:`_fit`).

Both loops: AdamW, random augmentation (no left-right flips unless asked), early stopping on the validation
loss (the best epoch's weights are kept), AMP on CUDA, a tqdm progress bar on stderr (only on a terminal and
on rank 0), and DistributedDataParallel when started by torchrun (see :mod:`bids_siamese.train.ddp`).
The history (one row per epoch) is returned as a table.

GPU readiness: bf16 autocast and ``channels_last_3d`` weights on CUDA; training batches (gather from the volume
stack, float32 conversion, augmentation) are assembled by a torch ``DataLoader`` (:mod:`.batches`) with
``TrainConfig.loader_workers`` worker processes and pinned memory on CUDA, then copied to the device with
``non_blocking=True``; ``TrainConfig.compile`` runs the training forward through ``torch.compile``
(:class:`CompiledOrEager`: eager with one warning when compiling fails).

Determinism of the augmentation: with 0 loader workers every batch draws from the run's one generator in order
(the stream is the same as before the DataLoader); with workers, batch ``k`` of epoch ``e`` draws from its own
generator seeded by ``(seed, rank, e, k)`` (:func:`batch_seed`), so a run is reproducible and gives the same
result for any number of workers >= 1, but not the same as with 0 workers.
"""
from __future__ import annotations

import contextlib
import copy
import logging
import sys
import time
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from ..models.backbones import precise_batch_norm
from ..models.losses import batch_hard_triplet_loss, pairwise_distance
from .batches import BatchAssembly, BatchLoader, CompiledOrEager
from .data import VolumeCache, augment, family_batches, pair_batches
from .ddp import DistContext, all_reduce_mean, shard, unwrap, wrap_model
from .evaluate import safe_auc

LOG = logging.getLogger("bids_siamese.train")


@dataclass
class TrainConfig:
    """Training settings (the CLI's ``--epochs``, ``--batch-size``, ``--lr``, ``--patience``, ...).

    Attributes:
        epochs: maximum epochs.
        batch_size: subjects (twin) or pairs (longitudinal) per step and rank.
        lr: AdamW learning rate.
        weight_decay: AdamW weight decay.
        patience: epochs without a better validation loss before stopping.
        distance: ``cosine`` or ``euclidean`` (twin).
        margin: triplet margin (twin).
        dz_positives: DZ co-twins as positives with weight ``dz_weight`` (twin).
        dz_weight: margin scale of DZ positives.
        flip_lr: allow left-right flip augmentation (off: mirrored brains are different brains).
        max_shift: translation augmentation in voxels (registered brains: keep it at about 2 mm, see
            :func:`shift_voxels`; larger shifts destroy the positional cues the twin signal lives in).
        intensity: intensity scale/offset augmentation.
        noise_std: noise augmentation.
        seed: random seed.
        amp: mixed precision on CUDA (ignored on CPU).
        progress: show a progress bar (None: only when stderr is a terminal).
        eval_batch_size: volumes per forward pass at evaluation.
        loader_workers: DataLoader worker processes that assemble the training batches (0: in the training
            process; see the module docstring for what changes with workers).
        compile: run the training forward through ``torch.compile`` (eager with a warning when it fails).
    """

    epochs: int = 30
    batch_size: int = 8
    lr: float = 1e-3
    weight_decay: float = 1e-4
    patience: int = 5
    distance: str = "cosine"
    margin: float = 0.2
    dz_positives: bool = False
    dz_weight: float = 0.5
    flip_lr: bool = False
    max_shift: int = 1
    intensity: float = 0.1
    noise_std: float = 0.05
    seed: int = 0
    amp: bool = True
    progress: bool | None = None
    eval_batch_size: int = 8
    loader_workers: int = 0
    compile: bool = False


@dataclass
class TrainResult:
    """A trained model (best validation epoch, unwrapped, eval mode) and its history.

    Attributes:
        model: the model with the best epoch's weights.
        history: one row per epoch.
        best_epoch: 1-based epoch of the kept weights.
        seconds: wall time of the whole loop.
        volumes_per_second: training throughput (forward + backward, all ranks).
    """

    model: nn.Module
    history: pd.DataFrame
    best_epoch: int
    seconds: float
    volumes_per_second: float


def shift_voxels(resolution: float, max_shift_mm: float = 2.0) -> int:
    """Translation augmentation in voxels for a grid: ``floor(max_shift_mm / resolution)``.

    Examples:
        >>> shift_voxels(2.0), shift_voxels(4.0), shift_voxels(1.0)
        (1, 0, 2)
    """
    return max(0, int(max_shift_mm // float(resolution)))


def _autocast(device: torch.device, enabled: bool) -> contextlib.AbstractContextManager:
    if device.type != "cuda" or not enabled:
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.autocast(device_type="cuda", dtype=dtype)


def _scaler(device: torch.device, enabled: bool) -> torch.amp.GradScaler:
    use = device.type == "cuda" and enabled and not torch.cuda.is_bf16_supported()
    return torch.amp.GradScaler("cuda", enabled=use)


def _progress(total: int, desc: str, config: TrainConfig, ctx: DistContext):
    from tqdm.auto import tqdm

    show = config.progress if config.progress is not None else sys.stderr.isatty()
    return tqdm(total=total, desc=desc, file=sys.stderr, disable=not show or not ctx.is_main, leave=False)


def _batches(volumes: np.ndarray, idx: np.ndarray, size: int) -> Iterator[tuple[np.ndarray, torch.Tensor]]:
    for start in range(0, len(idx), size):
        chunk = idx[start:start + size]
        yield chunk, torch.from_numpy(volumes[chunk])


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
    out = []
    for _, x in _batches(volumes, idx, batch_size):
        with _autocast(device, amp):
            e = net.embed(x.to(device)) if hasattr(net, "embed") else net(x.to(device))
        out.append(e.float().cpu())
    net.train(was_training)
    return torch.cat(out) if out else torch.zeros((0, 0))


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

    def forward_batches() -> None:
        for chunk in np.array_split(idx, max(1, int(np.ceil(len(idx) / batch_size)))):
            run(torch.from_numpy(volumes[chunk]).to(device))

    return precise_batch_norm(net, forward_batches)


@dataclass
class TwinData:
    """Inputs of twin training.

    Attributes:
        volumes: ``(N, 1, X, Y, Z)``, one scan per subject: float32, or a float16 :class:`VolumeCache`.
        family: ``(N,)`` family index (relatives share it).
        positive: ``(N, N)`` positive weights (1 MZ co-twins, ``dz_weight`` DZ when used, else 0).
        unrelated: ``(N, N)`` bool, True for pairs from different families (the non-twin pairs).
    """

    volumes: np.ndarray | VolumeCache
    family: np.ndarray
    positive: np.ndarray
    unrelated: np.ndarray


def _twin_validation(model: nn.Module, data: TwinData, idx: np.ndarray, config: TrainConfig,
                     device: torch.device) -> dict[str, float]:
    if len(idx) < 2:
        return {"val_loss": float("nan"), "val_twin_distance": float("nan"), "val_nontwin_distance": float("nan"),
                "val_auc": float("nan")}
    emb = embed(model, data.volumes, idx, device, config.eval_batch_size, config.amp)
    pos = torch.from_numpy(data.positive[np.ix_(idx, idx)]).float()
    related = torch.from_numpy(~data.unrelated[np.ix_(idx, idx)])
    out = batch_hard_triplet_loss(emb, pos, related, config.margin, config.distance)
    dist = pairwise_distance(emb, config.distance).numpy()
    upper = np.triu(np.ones_like(dist, dtype=bool), 1)
    twin = upper & (pos.numpy() > 0)
    non = upper & data.unrelated[np.ix_(idx, idx)]
    labels = np.r_[np.ones(twin.sum()), np.zeros(non.sum())]
    scores = -np.r_[dist[twin], dist[non]]
    return {
        "val_loss": float(out.loss) if out.n_anchors else float("nan"),
        "val_twin_distance": float(dist[twin].mean()) if twin.any() else float("nan"),
        "val_nontwin_distance": float(dist[non].mean()) if non.any() else float("nan"),
        "val_auc": safe_auc(labels, scores),
    }


def _improved(score: tuple[float, float], best: tuple[float, float] | None, tol: float = 1e-6) -> bool:
    """Lower loss wins; on (near) equal loss a larger twin/non-twin gap wins."""
    if best is None:
        return True
    if np.isnan(score[0]):
        return False
    if np.isnan(best[0]) or score[0] < best[0] - tol:
        return True
    return abs(score[0] - best[0]) <= tol and score[1] > best[1] + tol


def _setup(model: nn.Module, config: TrainConfig, device: torch.device | str, ctx: DistContext | None):
    """Seeded start of a training run: ``(ctx, device, wrapped model, AdamW, grad scaler, augmentation RNG)``.

    On CUDA the model's 5-D weights take the ``channels_last_3d`` memory format (the inputs have one channel, so
    they are in both formats already); on the CPU nothing changes. With ``config.compile`` the wrapped model is a
    :class:`CompiledOrEager`."""
    ctx = ctx or DistContext()
    device = torch.device(device)
    torch.manual_seed(config.seed)
    if device.type == "cuda":  # NDHWC weights: cuDNN's faster 3D convolutions (the values are unchanged)
        model = model.to(memory_format=torch.channels_last_3d)
    net = wrap_model(model, ctx, device)
    if config.compile:
        net = CompiledOrEager(net)
    groups = unwrap(net).param_groups(config.lr) if hasattr(unwrap(net), "param_groups") else net.parameters()
    opt = torch.optim.AdamW(groups, lr=config.lr, weight_decay=config.weight_decay)
    gen = torch.Generator().manual_seed(config.seed + 1000 * ctx.rank)
    return ctx, device, net, opt, _scaler(device, config.amp), gen


class _BestEpoch:
    """Keeps the weights of the best epoch (:func:`_improved`) and counts epochs without improvement."""

    def __init__(self, patience: int):
        self.patience = patience
        self.score: tuple[float, float] | None = None
        self.epoch = 0
        self.stale = 0
        self.state: dict[str, torch.Tensor] | None = None

    def update(self, score: tuple[float, float], epoch: int, net: nn.Module, count_stale: bool = True) -> bool:
        """Record an epoch's score; True when training should stop (``patience`` counted epochs without
        improvement; an epoch with ``count_stale`` False does not count)."""
        if _improved(score, self.score):
            self.score, self.epoch, self.stale = score, epoch, 0
            self.state = copy.deepcopy({k: v.detach().cpu() for k, v in unwrap(net).state_dict().items()})
        elif count_stale:
            self.stale += 1
        if self.stale >= self.patience:
            LOG.info("early stopping after epoch %d (best epoch %d)", epoch, self.epoch)
            return True
        return False

    def result(self, net: nn.Module, rows: list[dict], start: float, n_vols: int, train_time: float) -> "TrainResult":
        """The model with the best epoch's weights, in eval mode, and the training record."""
        final = unwrap(net)
        if self.state is not None:
            final.load_state_dict(self.state)
        final.eval()
        return TrainResult(final, pd.DataFrame(rows), self.epoch, time.perf_counter() - start,
                           n_vols / train_time if train_time else float("nan"))


@dataclass
class _Epochs:
    """What one task's training loop does differently (the loop itself is :func:`_fit`, shared by all tasks).

    Attributes:
        name: the task, for the progress bar and the log.
        batches: the epoch's batches, as positions into the training examples, from the epoch's RNG.
        step: the loss of one batch, and per-batch values to average into the history; called with the batch's
            training examples, or with ``assembly``'s tensors of the batch (on the device) when that is set.
        volumes_per_example: volumes one example feeds through the network (2 for a session pair).
        recompute_batch_norm: re-estimates batch-norm statistics on the training data after each epoch.
        validate: the validation metrics (``val_loss`` first; NaN without validation data).
        score: the score of an epoch from ``(train_loss, validation metrics)``: lower first value wins, then a
            larger second (:func:`_improved`).
        extra_columns: names of the per-batch values ``step`` returns (NaN in an epoch without batches).
        start_epoch: called with the 1-based epoch before its batches (a curriculum, a learning-rate schedule);
            what it returns goes into the epoch's history row, after ``epoch``.
        patience_after: epochs up to this one do not count towards early stopping (e.g. a curriculum ramp).
        assembly: the batches are assembled by a DataLoader (:class:`BatchAssembly`); None: ``step`` does it.
    """

    name: str
    batches: Callable[[np.random.Generator], list[np.ndarray]]
    step: Callable[..., tuple[torch.Tensor, dict[str, float]]]
    volumes_per_example: int
    recompute_batch_norm: Callable[[], None]
    validate: Callable[[], dict[str, float]]
    score: Callable[[float, dict[str, float]], tuple[float, float]]
    extra_columns: tuple[str, ...] = ()
    start_epoch: Callable[[int], dict[str, float]] | None = None
    patience_after: int = 0
    assembly: BatchAssembly | None = None


def _fit(net: nn.Module, opt: torch.optim.Optimizer, scaler, ctx: DistContext, config: TrainConfig,
         train_idx: np.ndarray, epochs: _Epochs) -> TrainResult:
    """The training loop of every task: batches, optimiser steps, batch-norm re-estimation, validation, best epoch
    and early stopping; one history row per epoch (``epoch, train_loss``, the validation metrics, the extra
    columns, ``seconds, volumes_per_second``)."""
    rows, best = [], _BestEpoch(config.patience)
    start = time.perf_counter()
    n_vols, train_time = 0, 0.0
    bar = _progress(config.epochs, f"{epochs.name} training", config, ctx)
    loader = BatchLoader(epochs.assembly, config, ctx) if epochs.assembly is not None else None
    for epoch in range(1, config.epochs + 1):
        t0 = time.perf_counter()
        started = epochs.start_epoch(epoch) if epochs.start_epoch is not None else {}
        net.train()
        batches = shard(epochs.batches(np.random.default_rng([config.seed, epoch])), ctx)
        losses: list[float] = []
        extras: dict[str, list[float]] = {name: [] for name in epochs.extra_columns}
        examples = [train_idx[local] for local in batches]
        inputs = loader.epoch(epoch, examples) if loader is not None else iter(examples)
        for batch, local in zip(inputs, batches):  # the loader's pass first: it ends when the epoch's batches do
            loss, extra = epochs.step(batch)
            losses.append(_optimiser_step(loss, opt, scaler))
            for name, value in extra.items():
                extras[name].append(value)
            n_vols += epochs.volumes_per_example * len(local) * ctx.world_size
        step_time = time.perf_counter() - t0
        train_time += step_time
        train_loss = all_reduce_mean(float(np.mean(losses)) if losses else float("nan"), ctx)
        epochs.recompute_batch_norm()
        val = epochs.validate()
        row = {"epoch": epoch, **started, "train_loss": train_loss, **val,
               **{name: float(np.mean(v)) if v else float("nan") for name, v in extras.items()},
               "seconds": time.perf_counter() - t0,
               "volumes_per_second": epochs.volumes_per_example * sum(len(b) for b in batches) * ctx.world_size
               / step_time}
        rows.append(row)
        stop = best.update(epochs.score(train_loss, val), epoch, net, count_stale=epoch > epochs.patience_after)
        bar.update(1)
        bar.set_postfix(loss=f"{train_loss:.3f}", val=f"{val['val_loss']:.3f}")
        LOG.debug("%s epoch %d: %s", epochs.name, epoch, row)
        if stop:
            break
    bar.close()
    return best.result(net, rows, start, n_vols, train_time)


def _optimiser_step(loss: torch.Tensor, opt: torch.optim.Optimizer, scaler) -> float:
    """One optimiser step on ``loss`` (through the AMP grad scaler); returns the loss value."""
    opt.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(opt)
    scaler.update()
    return float(loss.detach())


def _classifier_validation(p: np.ndarray | None, y_val: np.ndarray | None, loss: float) -> dict[str, float]:
    """Validation loss, accuracy at p = 0.5 and AUC of a binary classifier (all NaN without validation data)."""
    if p is None or y_val is None:
        return {"val_loss": loss, "val_accuracy": float("nan"), "val_auc": float("nan")}
    return {"val_loss": loss, "val_accuracy": float(((p >= 0.5) == (y_val == 1)).mean()), "val_auc": safe_auc(y_val, p)}


def _classifier_score(train_loss: float, val: dict[str, float]) -> tuple[float, float]:
    """Validation loss, then accuracy; the training loss without validation data (keeps the last epoch)."""
    return (val["val_loss"], val["val_accuracy"]) if not np.isnan(val["val_loss"]) else (train_loss, 0.0)


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
    ctx, device, net, opt, scaler, gen = _setup(model, config, device, ctx)
    train_idx, val_idx = np.asarray(train_idx), np.asarray(val_idx)
    has_pos = (data.positive[np.ix_(train_idx, train_idx)] > 0).any(axis=1)

    def assemble(idx: np.ndarray, generator: torch.Generator, epoch: int) -> tuple[torch.Tensor, ...]:
        pos = torch.from_numpy(data.positive[np.ix_(idx, idx)]).float()
        related = torch.from_numpy(~data.unrelated[np.ix_(idx, idx)])
        x = augment(torch.from_numpy(data.volumes[idx]), generator, config.flip_lr, config.max_shift,
                    config.intensity, config.noise_std)
        return x, pos, related

    def step(batch: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, dict[str, float]]:
        x, pos, related = batch
        with _autocast(device, config.amp):
            emb = net(x)
        out = batch_hard_triplet_loss(emb.float(), pos, related, config.margin, config.distance)
        return out.loss, {"active_triplets": out.active_fraction}

    def score(train_loss: float, val: dict[str, float]) -> tuple[float, float]:
        if np.isnan(val["val_loss"]):  # no validation set: keep the last epoch
            return train_loss, 0.0
        return val["val_loss"], val["val_nontwin_distance"] - val["val_twin_distance"]

    return _fit(net, opt, scaler, ctx, config, train_idx, _Epochs(
        name="twin",
        batches=lambda rng: family_batches(data.family[train_idx], has_pos, config.batch_size, rng),
        step=step, volumes_per_example=1,
        recompute_batch_norm=lambda: recompute_batch_norm(net, data.volumes, train_idx, device, config.batch_size),
        validate=lambda: _twin_validation(net, data, val_idx, config, device),
        score=score, extra_columns=("active_triplets",), assembly=BatchAssembly(assemble, gen, device)))


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
    ctx, device, net, opt, scaler, gen = _setup(model, config, device, ctx)
    train_idx, val_idx = np.asarray(train_idx), np.asarray(val_idx)
    y_train = data.labels[train_idx]
    n_pos, n_neg = float((y_train == 1).sum()), float((y_train == 0).sum())
    pos_weight = torch.tensor([n_neg / n_pos if n_pos and n_neg else 1.0], device=device)

    def assemble(idx: np.ndarray, generator: torch.Generator, epoch: int) -> tuple[torch.Tensor, ...]:
        pa, pb = data.pairs[idx, 0], data.pairs[idx, 1]
        both = torch.cat([torch.from_numpy(data.volumes[pa]), torch.from_numpy(data.volumes[pb])], dim=1)
        both = augment(both, generator, config.flip_lr, config.max_shift, config.intensity, config.noise_std)
        return both[:, :1].contiguous(), both[:, 1:].contiguous(), torch.from_numpy(data.labels[idx]).float()

    def step(batch: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, dict[str, float]]:
        x_a, x_b, y = batch
        with _autocast(device, config.amp):
            logits = net(x_a, x_b)
        loss = F.binary_cross_entropy_with_logits(logits.float(), y, pos_weight=pos_weight)
        if hasattr(unwrap(net), "penalty"):  # e.g. the regional model's L1 on its coefficients
            loss = loss + unwrap(net).penalty()
        return loss, {}

    def validate() -> dict[str, float]:
        if not len(val_idx):
            return _classifier_validation(None, None, float("nan"))
        p = predict_pairs(net, data, val_idx, device, config.eval_batch_size, config.amp)
        y_val = data.labels[val_idx]
        logit = torch.logit(torch.from_numpy(p).double().clamp(1e-6, 1 - 1e-6))
        return _classifier_validation(p, y_val, float(F.binary_cross_entropy_with_logits(
            logit, torch.from_numpy(y_val).double(), pos_weight=pos_weight.double().cpu())))

    return _fit(net, opt, scaler, ctx, config, train_idx, _Epochs(
        name="longitudinal", batches=lambda rng: pair_batches(len(train_idx), config.batch_size, rng), step=step,
        volumes_per_example=2,
        recompute_batch_norm=lambda: recompute_batch_norm(net, data.volumes, np.unique(data.pairs[train_idx]), device,
                                                          2 * config.batch_size),
        validate=validate, score=_classifier_score, assembly=BatchAssembly(assemble, gen, device)))


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
    ctx, device, net, opt, scaler, gen = _setup(model, config, device, ctx)
    train_idx, val_idx = np.asarray(train_idx), np.asarray(val_idx)
    train_volumes = np.unique(data.examples[train_idx, 0])

    def assemble(idx: np.ndarray, generator: torch.Generator, epoch: int) -> tuple[torch.Tensor, ...]:
        x = augment(data.batch(idx), generator, False, config.max_shift, config.intensity, config.noise_std)
        return x, torch.from_numpy(data.labels[idx]).long()

    def step(batch: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, dict[str, float]]:
        x, y = batch
        with _autocast(device, config.amp):
            logits = net(x)
        return F.cross_entropy(logits.float(), y), {}

    def validate() -> dict[str, float]:
        if not len(val_idx):
            return _classifier_validation(None, None, float("nan"))
        p = predict_mirror(net, data, val_idx, device, config.eval_batch_size)
        y_val = data.labels[val_idx]
        p_true = np.clip(np.where(y_val == 1, p, 1 - p), 1e-7, 1.0)
        return _classifier_validation(p, y_val, float(-np.log(p_true).mean()))

    return _fit(net, opt, scaler, ctx, config, train_idx, _Epochs(
        name="orientation", batches=lambda rng: pair_batches(len(train_idx), config.batch_size, rng), step=step,
        volumes_per_example=1,
        recompute_batch_norm=lambda: recompute_batch_norm(net, data.volumes, train_volumes, device, config.batch_size),
        validate=validate, score=_classifier_score, assembly=BatchAssembly(assemble, gen, device)))
