"""Fine-tuning from a pretrained encoder: ``--init PATH`` for ``--task twin``, ``longitudinal`` and ``symmetry``.

``group --task pretrain`` writes an encoder trained without labels on every scan of a study as a checkpoint folder
(:mod:`bids_siamese.models.checkpoint` layout: ``model.pt``, ``model.pt.sha256``, ``model_card.json``). Its card
says ``task: pretrain``, the ``backbone``, the model ``grid`` and ``in_channels: 1``; ``model.pt`` is the state dict
of ``build_backbone(backbone, in_channels=1)``, an :class:`~bids_siamese.models.backbones.Encoder` alone (the
pretraining heads are not part of it). :func:`save_pretrained_encoder` writes such a folder.

:func:`load_pretrained_encoder` checks the folder (files present, weights matching their sha256, a pretrain card,
the run's backbone and model grid) and returns the weights; :func:`init_encoder` copies them into the encoder of a
task's freshly built model, strictly: every tensor of the encoder must be in the file with the same shape, and
nothing else may be there, with one exception. The symmetry model's encoder reads two channels (the hemisphere's
intensities and the standardised left-minus-mirrored-right difference; :func:`bids_siamese.symmetry.model.
build_symmetry_model` with ``difference_channel``), so the convolutions that read the input have a second input
channel the pretrained encoder never saw. Those weights are copied into channel 0, and channel 1 starts at **zero**:

* the widened encoder then computes exactly the pretrained encoder's function of the intensities at the first step,
  so the batch-norm statistics estimated in pretraining still describe its activations and nothing pretrained is
  disturbed before the task's loss has said anything;
* the zero weights still learn from the first step (their gradient is the difference channel times the
  gradient at the layer's output, not zero);
* copying the intensity filters into channel 1 instead would push a z-score map, whose statistics have nothing in
  common with T1w contrast, through filters tuned to edges of grey and white matter, and shift every activation
  the pretrained normalisation was estimated for.

One channel more or fewer is all that may differ: a file for another backbone, another model grid or another task
is refused in one line naming the file and the fix (exit 64; a damaged folder exits 65 or 66).
"""
from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from ..errors import BadDataError, NoInputError, UsageError
from ..resources import Grid
from .checkpoint import (CARD, WEIGHTS, check_card, checkpoint_folder, load_weights, make_card, read_card,
                         save_checkpoint)

LOG = logging.getLogger("bids_siamese.group.models")

#: The ``task`` of a pretrained encoder's model card (``group --task pretrain``).
PRETRAIN_TASK = "pretrain"
#: The tasks ``--init`` can start: the ones whose models have a CNN or Swin encoder.
INIT_TASKS = ("twin", "longitudinal", "symmetry")


def check_init_options(init: Path | None, task: str | None, mode: str, backbone: str) -> None:
    """Refuse ``--init`` where it cannot be used (before any scan is read).

    Raises:
        UsageError: ``--init`` with ``--mode apply``, with a task other than :data:`INIT_TASKS`, or with an
            atlas-region model (``regional``, ``regional_cnn``: no encoder to start from).

    Examples:
        >>> check_init_options(Path("p"), "twin", "train", "unet")
        >>> check_init_options(Path("p"), "twin", "apply", "unet")
        Traceback (most recent call last):
        ...
        bids_siamese.errors.UsageError: --init p starts training; --mode apply uses the trained --model as it is; fix: drop --init, or use --mode train
    """
    if init is None:
        return
    if mode != "train":
        raise UsageError(f"--init {init} starts training; --mode apply uses the trained --model as it is; fix: drop "
                         "--init, or use --mode train")
    if task not in INIT_TASKS:
        raise UsageError(f"--init {init} starts the encoder of --task {', '.join(INIT_TASKS)}, not "
                         f"{task or '(no --task)'}; fix: drop --init or use one of those tasks")
    if backbone in ("regional", "regional_cnn"):
        raise UsageError(f"--init {init}: --backbone {backbone} is an atlas-region model with no encoder to start "
                         "from; fix: give the --backbone the encoder was pretrained with (e.g. --backbone unet)")


def pretrained_card(path: Path, *, backbone: str, grid: Grid, in_channels: int = 1) -> dict[str, Any]:
    """The model card of a pretrained encoder, after checking that it fits this run.

    Args:
        path: the checkpoint folder, its ``model.pt`` or its ``model_card.json``.
        backbone: the run's ``--backbone``.
        grid: the run's model grid (``--resolution``).
        in_channels: input channels of the run's encoder (the card's may be fewer: :func:`init_encoder`).

    Raises:
        NoInputError: the folder or one of its files is missing.
        BadDataError: the card is not a model card, or the weights do not match their sha256.
        UsageError: not a pretrained encoder, or pretrained for another backbone or model grid.
    """
    folder = checkpoint_folder(path)
    for needed in (folder / CARD, folder / WEIGHTS):
        if not needed.is_file():
            raise NoInputError(f"--init {path}: {needed} is missing; fix: give the folder written by group --task "
                               f"pretrain (models/{PRETRAIN_TASK}_<backbone>/)")
    card = read_card(path)  # sha256 of the weights against the card and model.pt.sha256
    if card.get("task") != PRETRAIN_TASK:
        raise UsageError(f"--init {path}: {folder / CARD} is a --task {card.get('task')} checkpoint, not a pretrained "
                         f"encoder; fix: give the folder written by group --task {PRETRAIN_TASK} "
                         f"(models/{PRETRAIN_TASK}_{backbone}/)")
    if card.get("backbone") != backbone:
        raise UsageError(f"--init {path}: pretrained for backbone {card.get('backbone')}, this run uses {backbone}; "
                         f"fix: --backbone {card.get('backbone')} or pretrain with --backbone {backbone}")
    check_card(card, None, grid, source=f"--init {path}")
    have = int(card.get("in_channels", 1))
    if have > in_channels:
        raise UsageError(f"--init {path}: the encoder was pretrained on {have} input channels, this model reads "
                         f"{in_channels}; fix: pretrain with one input channel (group --task {PRETRAIN_TASK})")
    return card


def load_pretrained_encoder(path: Path, *, backbone: str, grid: Grid, in_channels: int = 1
                            ) -> dict[str, torch.Tensor]:
    """The weights of a pretrained encoder (``--init PATH``), after the checks of :func:`pretrained_card`.

    Args:
        path: the checkpoint folder, its ``model.pt`` or its ``model_card.json``.
        backbone: the run's ``--backbone``.
        grid: the run's model grid.
        in_channels: input channels of the encoder they will be copied into.

    Returns:
        The encoder's state dict (CPU tensors, read with ``weights_only=True``).
    """
    pretrained_card(path, backbone=backbone, grid=grid, in_channels=in_channels)
    return load_weights(checkpoint_folder(path) / WEIGHTS)


def init_record(path: Path) -> dict[str, str]:
    """What a fine-tuned model's card records of its start (``init``): the pretrained checkpoint folder, the sha256
    of its weights and its backbone (read again from its card, whose sha256 is checked)."""
    card = read_card(path)
    return {"path": str(checkpoint_folder(Path(path)).resolve()), "sha256": card["weights"]["sha256"],
            "backbone": card["backbone"]}


def widened(target: torch.Tensor, source: torch.Tensor) -> torch.Tensor | None:
    """``source`` (a convolution's weight, ``(out, in, *kernel)``) widened to ``target``'s extra input channels:
    the pretrained channels first, the new ones zero (module docstring); None when the shapes differ otherwise.

    Examples:
        >>> w = widened(torch.zeros(4, 2, 3, 3, 3), torch.ones(4, 1, 3, 3, 3))
        >>> w[:, 0].unique().tolist(), w[:, 1].unique().tolist()
        ([1.0], [0.0])
        >>> widened(torch.zeros(4, 2, 3, 3, 3), torch.ones(5, 1, 3, 3, 3)) is None
        True
    """
    if (target.ndim < 3 or source.ndim != target.ndim or source.shape[0] != target.shape[0]
            or source.shape[2:] != target.shape[2:] or not 0 < source.shape[1] < target.shape[1]):
        return None
    out = torch.zeros_like(target)
    out[:, :source.shape[1]] = source.to(target.dtype)
    return out


def init_encoder(encoder: nn.Module, state: Mapping[str, torch.Tensor], source: str = "--init") -> list[str]:
    """Copy a pretrained encoder's weights into ``encoder`` (strict; a 1-channel first layer onto a 2-channel one).

    Args:
        encoder: the encoder of a freshly built task model (``SiameseEncoder.backbone``,
            ``LongitudinalSiamese.encoder.backbone``, ``SymmetrySiamese.encoder``).
        state: the pretrained encoder's state dict (:func:`load_pretrained_encoder`).
        source: the file, for messages.

    Returns:
        The names of the tensors copied (every tensor of ``encoder``'s state dict).

    Raises:
        BadDataError: a tensor missing, left over or of another shape (other than the input channels of a
            convolution weight, see :func:`widened`).

    Examples:
        >>> from bids_siamese.models.backbones import small_encoder
        >>> one, two = small_encoder(channels=(4, 8)), small_encoder(in_channels=2, channels=(4, 8))
        >>> names = init_encoder(two, one.state_dict())
        >>> w = two.body[1][0].weight
        >>> torch.equal(w[:, :1], one.body[1][0].weight), bool((w[:, 1] == 0).all()), len(names)
        (True, True, 24)
    """
    own = encoder.state_dict()
    missing, extra = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if missing or extra:
        raise BadDataError(f"{source}: the pretrained weights do not fit this {getattr(encoder, 'name', '')} encoder "
                           f"(missing {len(missing)}: {', '.join(missing[:3]) or '-'}; unexpected {len(extra)}: "
                           f"{', '.join(extra[:3]) or '-'}); fix: pretrain again with this version of bids-siamese")
    copied, widened_names = {}, []
    for name, target in own.items():
        value = state[name]
        if tuple(value.shape) != tuple(target.shape):
            wide = widened(target, value)
            if wide is None:
                raise BadDataError(f"{source}: pretrained {name} has shape {tuple(value.shape)}, this encoder's "
                                   f"{tuple(target.shape)}; fix: pretrain again with the same --backbone")
            value = wide
            widened_names.append(name)
        copied[name] = value
    encoder.load_state_dict(copied, strict=True)
    groups = Counter(".".join(name.split(".")[:2]) for name in copied)
    LOG.info("%s: %d pretrained tensors copied into the %s encoder (%s)%s", source, len(copied),
             getattr(encoder, "name", "task"), ", ".join(f"{k}: {v}" for k, v in groups.items()),
             f"; input channels widened, new channels zero: {', '.join(widened_names)}" if widened_names else "")
    LOG.debug("%s: tensors copied: %s", source, ", ".join(copied))
    return list(copied)


def start_from_pretrained(encoder: nn.Module, path: Path, backbone: str, grid: Grid) -> list[str]:
    """``--init PATH`` at a task's model construction: check and load the pretrained weights for ``encoder`` (its
    input channels from its first convolution) and copy them in (:func:`init_encoder`); returns the tensor names."""
    first = next((m for m in encoder.modules() if isinstance(m, nn.modules.conv._ConvNd)), None)
    in_channels = int(first.in_channels) if first is not None else 1
    state = load_pretrained_encoder(path, backbone=backbone, grid=grid, in_channels=in_channels)
    return init_encoder(encoder, state, source=f"--init {path}")


def save_pretrained_encoder(folder: Path, encoder: nn.Module, grid: Grid, seed: int = 0,
                            training_data: Mapping[str, Any] | None = None, metrics: Mapping[str, Any] | None = None,
                            hyperparameters: Mapping[str, Any] | None = None) -> list[Path]:
    """Write a pretrained encoder as ``--init`` reads it: ``model.pt`` (the encoder's state dict), its sha256 and a
    model card with ``task: pretrain``, the backbone (``encoder.name``), the grid and ``in_channels: 1``.

    Returns:
        The three paths written (:func:`~bids_siamese.models.checkpoint.save_checkpoint`).
    """
    card = make_card(PRETRAIN_TASK, getattr(encoder, "name", "custom"), int(getattr(encoder, "out_channels", 0)),
                     grid, seed, dict(training_data or {}), {}, dict(metrics or {}), dict(hyperparameters or {}))
    return save_checkpoint(folder, encoder, card)
