"""How the shared training loop (:meth:`bids_siamese.train.trainer.Trainer.fit`) gets its batches and runs its forward.

* :class:`BatchAssembly` / :class:`BatchLoader`: training batches (gather from the volume stack, float32
  conversion, augmentation) assembled by a torch ``DataLoader`` with ``TrainConfig.loader_workers`` worker
  processes and pinned memory on CUDA, copied to the device with ``non_blocking=True``. With 0 workers every batch
  draws from the run's one generator in order; with workers, batch ``k`` of epoch ``e`` draws from its own
  generator (:func:`batch_seed`).
* :class:`CompiledOrEager`: the training forward through ``torch.compile``, eager after the first failure.
"""
from __future__ import annotations

import logging
import multiprocessing
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch import nn

from .ddp import DistContext

LOG = logging.getLogger("bids_siamese.train")


def batch_seed(seed: int, rank: int, epoch: int, k: int) -> int:
    """Seed of the augmentation generator of batch ``k`` (0-based, on this rank) of ``epoch`` with loader workers.

    Examples:
        >>> batch_seed(0, 0, 1, 0) == batch_seed(0, 0, 1, 0) != batch_seed(0, 0, 1, 1)
        True
    """
    entropy = [int(seed) % 2**32, int(rank), int(epoch), int(k)]
    return int(np.random.SeedSequence(entropy).generate_state(1, dtype=np.uint64)[0])


@dataclass
class BatchAssembly:
    """How a task assembles a training batch outside its step: :meth:`~bids_siamese.train.trainer.Trainer.fit` runs
    ``assemble`` in a DataLoader.

    Attributes:
        assemble: ``(example indices, generator, epoch) -> tuple of CPU tensors`` (gather from the volume stack
            as float32, augment, labels; ``epoch`` is 1-based, for what changes per epoch such as a curriculum:
            workers persist across epochs, so it must come with the batch, not from the training process's
            state); runs in a loader worker when ``TrainConfig.loader_workers > 0``.
        generator: the run's augmentation generator, drawn in order with 0 workers.
        device: where the step runs; on CUDA the batches come in pinned memory and are copied with
            ``non_blocking=True``.
        seeded: the generator of one batch from its :func:`batch_seed` (with workers): a CPU ``torch.Generator``
            by default; e.g. ``numpy.random.default_rng`` for an assembly that draws from numpy.
    """

    assemble: Callable[..., tuple[torch.Tensor, ...]]
    generator: Any
    device: torch.device
    seeded: Callable[[int], Any] = lambda seed: torch.Generator().manual_seed(seed)


class _AssembledBatches(torch.utils.data.Dataset):
    """Item ``(epoch, k, indices)`` -> the assembled batch (see :func:`batch_seed` for the generators)."""

    def __init__(self, assembly: BatchAssembly, shared: bool, seed: int, rank: int):
        self.assembly, self.shared, self.seed, self.rank = assembly, shared, seed, rank

    def __getitem__(self, item: tuple[int, int, np.ndarray]) -> tuple[torch.Tensor, ...]:
        epoch, k, idx = item
        assembly = self.assembly
        gen = assembly.generator if self.shared else assembly.seeded(batch_seed(self.seed, self.rank, epoch, k))
        return tuple(assembly.assemble(idx, gen, epoch))


class _EpochItems(torch.utils.data.Sampler):
    """The items of the current epoch, set before each pass (the loader's workers persist across epochs)."""

    def __init__(self):
        self.items: list[tuple[int, int, np.ndarray]] = []

    def __iter__(self):
        return iter(self.items)

    def __len__(self) -> int:
        return len(self.items)


def usable_loader_workers(requested: int) -> int:
    """Worker processes the training DataLoader can use: ``requested``, or 0 (with a warning) where processes
    cannot be forked (the assembly functions are closures over the in-memory volumes, shared by forking)."""
    if requested > 0 and "fork" not in multiprocessing.get_all_start_methods():
        LOG.warning("loader workers need the 'fork' start method, not available here; assembling batches in the "
                    "training process")
        return 0
    return max(0, int(requested))


class BatchLoader:
    """The DataLoader of a training run (persistent workers, pinned memory on CUDA) and its per-epoch items."""

    def __init__(self, assembly: BatchAssembly, config, ctx: DistContext):
        """``config``: the run's :class:`~bids_siamese.train.trainer.TrainConfig` (``loader_workers``, ``seed``)."""
        workers = usable_loader_workers(config.loader_workers)
        self.items = _EpochItems()
        self.device = assembly.device
        self.pin = assembly.device.type == "cuda"
        self.loader = torch.utils.data.DataLoader(
            _AssembledBatches(assembly, workers == 0, config.seed, ctx.rank), batch_size=None, sampler=self.items,
            num_workers=workers, pin_memory=self.pin, persistent_workers=workers > 0,
            multiprocessing_context="fork" if workers else None,
            # the loader draws its workers' base seed from this generator, not from the global RNG (which the
            # model's dropout draws from): with or without a loader, the global stream stays the same
            generator=torch.Generator().manual_seed(int(config.seed) % 2**63))

    def epoch(self, epoch: int, batches: list[np.ndarray]) -> Iterator[tuple[torch.Tensor, ...]]:
        """The assembled batches of ``epoch``, on the device."""
        self.items.items = [(epoch, k, idx) for k, idx in enumerate(batches)]
        for batch in self.loader:
            yield tuple(t.to(self.device, non_blocking=self.pin) for t in batch)


class CompiledOrEager(nn.Module):
    """A training model whose forward runs through ``torch.compile``, in eager mode from the first failure on.

    Compiling needs a working backend (Triton on CUDA, a C++ compiler on the CPU) and happens at the first call;
    when ``torch.compile`` itself or that first compiled call raises, one warning line is logged and the wrapped
    model runs eagerly from then on. The compiled module is not a registered submodule: ``parameters()``,
    ``state_dict()``, ``train()`` and ``eval()`` are the wrapped model's, and
    :func:`~bids_siamese.train.ddp.unwrap` returns the wrapped model.

    Args:
        module: the model (or its DDP wrapper).
    """

    unwrap_to_module = True

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module
        try:
            compiled = torch.compile(module)
        except Exception as err:  # torch.compile raises many types (unsupported Python, platform, backend)
            compiled = None
            self._warn(err)
        object.__setattr__(self, "compiled", compiled)

    @property
    def is_compiled(self) -> bool:
        """False once compiling has failed (the forward is eager)."""
        return self.compiled is not None

    @staticmethod
    def _warn(err: Exception) -> None:
        text = (str(err).strip().splitlines() or [""])[0][:200]
        LOG.warning("torch.compile failed (%s: %s); training in eager mode", type(err).__name__, text)

    def forward(self, *args, **kwargs):
        if self.compiled is not None:
            try:
                return self.compiled(*args, **kwargs)
            except Exception as err:  # a backend error at the first compiled call: eager from now on
                object.__setattr__(self, "compiled", None)
                self._warn(err)
        return self.module(*args, **kwargs)
