"""The trainer every group task trains with, and the one place where the run's settings become a
:class:`TrainConfig` (:func:`train_config`).

:class:`Trainer` is the loop (nnU-Net's trainer is the model): a task subclasses it and fills in its hooks, the
loop stays here. One call of :meth:`Trainer.fit` runs, per epoch::

    on_epoch_start(epoch)           -> extra history columns (a curriculum, a learning-rate schedule)
    for each batch of batches(rng): train_step(batch) -> (loss, per-batch values); one optimiser step
    on_train_epoch_end()            re-estimate the batch-norm statistics on the training data ("precise BN")
    validation_step()               -> validation metrics, ``val_loss`` first
    score(train_loss, metrics)      -> (lower wins, then larger wins): the best epoch's weights are kept
    on_epoch_end(epoch, row)        the history row is complete (logged); early stopping after ``patience``

Set-up (:func:`setup_training`): the seed, ``channels_last_3d`` weights on CUDA, DistributedDataParallel under
torchrun (:mod:`bids_siamese.train.ddp`), ``torch.compile`` with ``TrainConfig.compile``
(:class:`~bids_siamese.train.batches.CompiledOrEager`), AdamW, the AMP grad scaler (bf16 autocast on CUDA:
:func:`autocast`) and the augmentation generator. Training batches are assembled by a DataLoader
(:class:`~bids_siamese.train.batches.BatchAssembly` from :meth:`Trainer.assemble`) with
``TrainConfig.loader_workers`` workers. A tqdm progress bar shows on stderr (only on a terminal, rank 0).

Determinism of the augmentation: with 0 loader workers every batch draws from the run's one generator in order;
with workers, batch ``k`` of epoch ``e`` draws from its own generator seeded by ``(seed, rank, e, k)``
(:func:`~bids_siamese.train.batches.batch_seed`), so a run is reproducible and gives the same result for any
number of workers >= 1, but not the same as with 0 workers.
"""
from __future__ import annotations

import contextlib
import copy
import logging
import sys
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn
from tqdm.auto import tqdm

from ..config import Settings
from .batches import BatchAssembly, BatchLoader, CompiledOrEager
from .ddp import DistContext, all_reduce_mean, shard, unwrap, wrap_model

LOG = logging.getLogger("bids_siamese.train")


@dataclass
class TrainConfig:
    """Training settings (the CLI's ``--epochs``, ``--batch-size``, ``--lr``, ``--patience``, ...); built from the
    run's settings by :func:`train_config`.

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


def train_config(settings: Settings, **task_overrides: Any) -> TrainConfig:
    """The one place where the run's settings become a :class:`TrainConfig`: ``--epochs``, ``--batch-size``,
    ``--lr``, ``--patience``, ``--seed``, ``--loader-workers`` and ``--compile``, then the task's own fields
    (``task_overrides``: e.g. the twin task's distance, margin and augmentation, the symmetry task's left-right
    flips, the orientation ensemble member's seed).

    Examples:
        >>> s = Settings(bids_dir="/bids", output_dir="/out", work_dir="/work", analysis_level="group", epochs=3)
        >>> c = train_config(s, flip_lr=True)
        >>> c.epochs, c.flip_lr, c.seed
        (3, True, 0)
    """
    shared = {"epochs": int(settings.epochs), "batch_size": int(settings.batch_size), "lr": float(settings.lr),
              "patience": int(settings.patience), "seed": int(settings.seed),
              "loader_workers": int(settings.loader_workers), "compile": bool(settings.compile)}
    return TrainConfig(**{**shared, **task_overrides})


def shift_voxels(resolution: float, max_shift_mm: float = 2.0) -> int:
    """Translation augmentation in voxels for a grid: ``floor(max_shift_mm / resolution)``.

    Examples:
        >>> shift_voxels(2.0), shift_voxels(4.0), shift_voxels(1.0)
        (1, 0, 2)
    """
    return max(0, int(max_shift_mm // float(resolution)))


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


def autocast(device: torch.device, enabled: bool) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA (fp16 where bf16 is not supported; the grad scaler then scales the loss); nothing on
    the CPU or with ``enabled`` False."""
    if device.type != "cuda" or not enabled:
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.autocast(device_type="cuda", dtype=dtype)


def grad_scaler(device: torch.device, enabled: bool) -> torch.amp.GradScaler:
    """The AMP grad scaler: active only for fp16 autocast on CUDA."""
    use = device.type == "cuda" and enabled and not torch.cuda.is_bf16_supported()
    return torch.amp.GradScaler("cuda", enabled=use)


def improved(score: tuple[float, float], best: tuple[float, float] | None, tol: float = 1e-6) -> bool:
    """Lower first value wins; on (near) equal first values a larger second value wins; NaN never wins.

    Examples:
        >>> improved((0.5, 0.0), None), improved((0.5, 0.2), (0.5, 0.1)), improved((float("nan"), 0), (1.0, 0))
        (True, True, False)
    """
    if best is None:
        return True
    if np.isnan(score[0]):
        return False
    if np.isnan(best[0]) or score[0] < best[0] - tol:
        return True
    return abs(score[0] - best[0]) <= tol and score[1] > best[1] + tol


def setup_training(model: nn.Module, config: TrainConfig, device: torch.device | str, ctx: DistContext | None):
    """Seeded start of a training run: ``(ctx, device, wrapped model, AdamW, grad scaler, augmentation RNG)``.

    On CUDA the model's 5-D weights take the ``channels_last_3d`` memory format (the inputs have one channel, so
    they are in both formats already); on the CPU nothing changes. With ``config.compile`` the wrapped model is a
    :class:`~bids_siamese.train.batches.CompiledOrEager`."""
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
    return ctx, device, net, opt, grad_scaler(device, config.amp), gen


class BestEpoch:
    """Keeps the weights of the best epoch (:func:`improved`) and counts epochs without improvement."""

    def __init__(self, patience: int):
        self.patience = patience
        self.score: tuple[float, float] | None = None
        self.epoch = 0
        self.stale = 0
        self.state: dict[str, torch.Tensor] | None = None

    def update(self, score: tuple[float, float], epoch: int, net: nn.Module, count_stale: bool = True) -> bool:
        """Record an epoch's score; True when training should stop (``patience`` counted epochs without
        improvement; an epoch with ``count_stale`` False does not count)."""
        if improved(score, self.score):
            self.score, self.epoch, self.stale = score, epoch, 0
            self.state = copy.deepcopy({k: v.detach().cpu() for k, v in unwrap(net).state_dict().items()})
        elif count_stale:
            self.stale += 1
        if self.stale >= self.patience:
            LOG.info("early stopping after epoch %d (best epoch %d)", epoch, self.epoch)
            return True
        return False

    def result(self, net: nn.Module, rows: list[dict], start: float, n_vols: int, train_time: float) -> TrainResult:
        """The model with the best epoch's weights, in eval mode, and the training record."""
        final = unwrap(net)
        if self.state is not None:
            final.load_state_dict(self.state)
        final.eval()
        return TrainResult(final, pd.DataFrame(rows), self.epoch, time.perf_counter() - start,
                           n_vols / train_time if train_time else float("nan"))


def optimiser_step(loss: torch.Tensor, opt: torch.optim.Optimizer, scaler: torch.amp.GradScaler) -> float:
    """One optimiser step on ``loss`` (through the AMP grad scaler); returns the loss value."""
    opt.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(opt)
    scaler.update()
    return float(loss.detach())


class Trainer:
    """The training loop of every task; a task subclasses it and implements the hooks (module docstring).

    The constructor runs :func:`setup_training` (``self.ctx``, ``self.device``, ``self.net`` — the wrapped model
    to train —, ``self.optimizer``, ``self.scaler``, ``self.generator``); a subclass calls it first and then
    prepares what its hooks need.

    Class attributes a task may set:
        name: the task, for the progress bar and the log.
        volumes_per_example: volumes one example feeds through the network (2 for a session pair).
        extra_columns: names of the per-batch values ``train_step`` returns (NaN in an epoch without batches).
        patience_after: epochs up to this one do not count towards early stopping (e.g. a curriculum ramp).

    Args:
        model: the model to train.
        config: training settings.
        train_idx: the training examples (positions the batches index into).
        device: where to train.
        ctx: distributed context (None: single process).
    """

    name = "task"
    volumes_per_example = 1
    extra_columns: tuple[str, ...] = ()
    patience_after = 0

    def __init__(self, model: nn.Module, config: TrainConfig, train_idx: np.ndarray,
                 device: torch.device | str = "cpu", ctx: DistContext | None = None):
        self.config = config
        self.ctx, self.device, self.net, self.optimizer, self.scaler, self.generator = setup_training(
            model, config, device, ctx)
        self.train_idx = np.asarray(train_idx)

    # ---- hooks ------------------------------------------------------------------------------------------------
    def batches(self, rng: np.random.Generator) -> list[np.ndarray]:
        """The epoch's batches, as positions into ``train_idx``, drawn from the epoch's generator."""
        raise NotImplementedError

    def assemble(self, idx: np.ndarray, generator: Any, epoch: int) -> tuple[torch.Tensor, ...]:
        """The CPU tensors of one batch of training examples ``idx`` (gather, augment, labels); runs in a loader
        worker with ``loader_workers > 0`` (see :class:`~bids_siamese.train.batches.BatchAssembly`)."""
        raise NotImplementedError

    def assembly(self) -> BatchAssembly:
        """How the DataLoader assembles the batches: :meth:`assemble` with the run's torch generator."""
        return BatchAssembly(self.assemble, self.generator, self.device)

    def train_step(self, batch: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, dict[str, float]]:
        """The loss of one assembled batch (on the device) and per-batch values for ``extra_columns``."""
        raise NotImplementedError

    def validation_step(self) -> dict[str, float]:
        """The validation metrics of the current weights (``val_loss`` first; NaN without validation data)."""
        raise NotImplementedError

    def score(self, train_loss: float, val: dict[str, float]) -> tuple[float, float]:
        """The epoch's score for :func:`improved` (default: validation loss; the training loss without
        validation data, which keeps the last epoch)."""
        return (val["val_loss"], 0.0) if not np.isnan(val["val_loss"]) else (train_loss, 0.0)

    def on_epoch_start(self, epoch: int) -> dict[str, float]:
        """Called with the 1-based epoch before its batches; what it returns goes into the epoch's history row."""
        return {}

    def on_train_epoch_end(self) -> None:
        """After the epoch's optimiser steps, before validation (e.g. re-estimate the batch-norm statistics)."""

    def on_epoch_end(self, epoch: int, row: dict[str, Any]) -> None:
        """The epoch's complete history row."""
        LOG.debug("%s epoch %d: %s", self.name, epoch, row)

    def autocast(self) -> contextlib.AbstractContextManager:
        """:func:`autocast` for this run's device and ``config.amp``."""
        return autocast(self.device, self.config.amp)

    # ---- the loop ---------------------------------------------------------------------------------------------
    def fit(self) -> TrainResult:
        """Batches, optimiser steps, validation, best epoch and early stopping; one history row per epoch
        (``epoch``, :meth:`on_epoch_start`'s columns, ``train_loss``, the validation metrics, the extra columns,
        ``seconds, volumes_per_second``)."""
        config, ctx, net = self.config, self.ctx, self.net
        rows, best = [], BestEpoch(config.patience)
        start = time.perf_counter()
        n_vols, train_time = 0, 0.0
        show = config.progress if config.progress is not None else sys.stderr.isatty()
        bar = tqdm(total=config.epochs, desc=f"{self.name} training", file=sys.stderr,
                   disable=not show or not ctx.is_main, leave=False)
        loader = BatchLoader(self.assembly(), config, ctx)
        for epoch in range(1, config.epochs + 1):
            t0 = time.perf_counter()
            started = self.on_epoch_start(epoch)
            net.train()
            batches = shard(self.batches(np.random.default_rng([config.seed, epoch])), ctx)
            losses: list[float] = []
            extras: dict[str, list[float]] = {name: [] for name in self.extra_columns}
            examples = [self.train_idx[local] for local in batches]
            for batch, local in zip(loader.epoch(epoch, examples), batches):  # ends when the epoch's batches do
                loss, extra = self.train_step(batch)
                losses.append(optimiser_step(loss, self.optimizer, self.scaler))
                for name, value in extra.items():
                    extras[name].append(value)
                n_vols += self.volumes_per_example * len(local) * ctx.world_size
            step_time = time.perf_counter() - t0
            train_time += step_time
            train_loss = all_reduce_mean(float(np.mean(losses)) if losses else float("nan"), ctx)
            self.on_train_epoch_end()
            val = self.validation_step()
            row = {"epoch": epoch, **started, "train_loss": train_loss, **val,
                   **{name: float(np.mean(v)) if v else float("nan") for name, v in extras.items()},
                   "seconds": time.perf_counter() - t0,
                   "volumes_per_second": self.volumes_per_example * sum(len(b) for b in batches) * ctx.world_size
                   / step_time}
            rows.append(row)
            stop = best.update(self.score(train_loss, val), epoch, net, count_stale=epoch > self.patience_after)
            bar.update(1)
            bar.set_postfix(loss=f"{train_loss:.3f}", val=f"{val['val_loss']:.3f}")
            self.on_epoch_end(epoch, row)
            if stop:
                break
        bar.close()
        return best.result(net, rows, start, n_vols, train_time)
