"""Checkpoints: a folder with the weights, a model card and the weights' sha256.

Layout of a checkpoint folder (``OUTPUT_DIR/models/<task>_<backbone>/``)::

    model.pt             state dict (loaded with ``torch.load(weights_only=True)``)
    model.pt.sha256      "<hex>  model.pt" (the format of ``sha256sum``; check with ``sha256sum -c``)
    model_card.json      task, backbone, grid, template, input normalisation, training data fingerprint,
                         seed, decision threshold, metrics, library versions, weights sha256

``--model PATH`` accepts the folder, ``model.pt`` or ``model_card.json``.
"""
from __future__ import annotations

import hashlib
import io
import json
import platform
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
from torch import nn

from .. import __version__
from ..bids.derivatives import write_bytes, write_json, write_text
from ..errors import BadDataError, NoInputError, UsageError
from ..resources import TEMPLATE, Grid
from .heads import EmbeddingHead
from .registry import model_factory

WEIGHTS = "model.pt"
CARD = "model_card.json"
CARD_FORMAT = 1

INPUT_NORMALISATION = (
    "participant-level desc-preproc T1w: skull-stripped, affinely registered to MNI152NLin2009cAsym, resampled "
    "(linear) to the model grid, intensities normalised inside the brain mask to median 0 and inter-quartile "
    "range 1, 0 outside the mask"
)


def sha256_bytes(data: bytes) -> str:
    """Hex sha256 of ``data``.

    Examples:
        >>> sha256_bytes(b"")[:12]
        'e3b0c44298fc'
    """
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def library_versions() -> dict[str, str]:
    """Versions of the libraries a checkpoint depends on."""
    import monai  # deferred: monai takes seconds to import; only a card being written needs its version
    import sklearn  # deferred: as monai

    return {
        "bids_siamese": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "monai": monai.__version__,
        "numpy": np.__version__,
        "scikit-learn": sklearn.__version__,
    }


def grid_record(grid: Grid) -> dict[str, Any]:
    """The grid as stored in a model card.

    Examples:
        >>> from bids_siamese.resources import model_grid
        >>> grid_record(model_grid(4.0))["shape"]
        [42, 52, 44]
    """
    return {
        "resolution": float(grid.resolution),
        "shape": [int(s) for s in grid.shape],
        "affine": np.round(np.asarray(grid.affine, dtype=float), 6).tolist(),
    }


def make_card(
    task: str,
    backbone: str,
    embedding_dim: int,
    grid: Grid,
    seed: int,
    training_data: Mapping[str, Any],
    decision: Mapping[str, Any],
    metrics: Mapping[str, Any],
    hyperparameters: Mapping[str, Any],
    pooling: str = "avgmax",
    reproducibility: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """A model card (the weights' sha256 is added by :func:`save_checkpoint`).

    Args:
        task: ``twin`` or ``longitudinal``.
        backbone: backbone name.
        embedding_dim: embedding size.
        grid: the model grid the inputs are on.
        seed: the run's random seed.
        training_data: ``fingerprint`` (sha256 over the training/validation scans and their splits) and any
            details (counts, per-scan hashes).
        decision: how scores become decisions (``threshold`` chosen on validation, probability calibration).
        metrics: test (and validation) metrics of this model.
        hyperparameters: training settings (distance, margin, epochs, lr, ...).
        pooling: the embedding head's global pooling (rebuilds the same architecture).
        reproducibility: the training device and whether a rerun reproduces it bit for bit
            (:func:`bids_siamese.train.reproducibility.reproducibility_record`); left out when None.
    """
    card = {
        "format_version": CARD_FORMAT,
        "task": task,
        "backbone": backbone,
        "embedding_dim": int(embedding_dim),
        "pooling": pooling,
        "in_channels": 1,
        "grid": grid_record(grid),
        "template": TEMPLATE,
        "input": {
            "suffix": f"space-{TEMPLATE}_desc-preproc_T1w.nii.gz",
            "normalisation": INPUT_NORMALISATION,
            "left_right_flip_augmentation": bool(hyperparameters.get("flip_lr", False)),
        },
        "training_data": dict(training_data),
        "seed": int(seed),
        "decision": dict(decision),
        "metrics": dict(metrics),
        "hyperparameters": dict(hyperparameters),
        "library_versions": library_versions(),
        "created": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }
    if reproducibility is not None:
        card["reproducibility"] = dict(reproducibility)
    return card


def save_checkpoint(folder: Path, model: nn.Module, card: Mapping[str, Any]) -> list[Path]:
    """Write ``model.pt``, ``model.pt.sha256`` and ``model_card.json`` (atomically) into ``folder``.

    Args:
        folder: checkpoint folder (created).
        model: the trained model (a DDP wrapper is unwrapped).
        card: the model card from :func:`make_card`.

    Returns:
        The three paths written.
    """
    folder = Path(folder)
    model = getattr(model, "module", model)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    buffer = io.BytesIO()
    torch.save(state, buffer)
    data = buffer.getvalue()
    digest = sha256_bytes(data)
    full = dict(card)
    heads = [m for m in model.modules() if isinstance(m, EmbeddingHead)]
    if heads and "pooling" in full:  # the card records the architecture actually saved
        full["pooling"] = heads[0].pooling
    full["weights"] = {"file": WEIGHTS, "sha256": digest, "bytes": len(data),
                       "parameters": int(sum(p.numel() for p in model.parameters()))}
    weights = write_bytes(folder / WEIGHTS, data)
    checksum = write_text(folder / f"{WEIGHTS}.sha256", f"{digest}  {WEIGHTS}\n")
    card_path = write_json(folder / CARD, full)
    return [weights, checksum, card_path]


def checkpoint_folder(path: Path) -> Path:
    """The checkpoint folder for ``--model PATH`` (the folder, its ``model.pt`` or its ``model_card.json``)."""
    path = Path(path)
    return path if path.is_dir() else path.parent


def read_card(path: Path) -> dict[str, Any]:
    """The model card of a checkpoint, after checking that its files exist and the weights' sha256 matches.

    Raises:
        NoInputError: a file of the checkpoint is missing.
        BadDataError: the card is not valid JSON or the weights do not match their sha256.
    """
    folder = checkpoint_folder(path)
    card_path, weights = folder / CARD, folder / WEIGHTS
    for needed in (card_path, weights):
        if not needed.is_file():
            raise NoInputError(f"--model {path}: {needed} is missing; fix: give a checkpoint folder written by "
                               "--mode train (model.pt, model.pt.sha256, model_card.json)")
    try:
        card = json.loads(card_path.read_text())
    except ValueError as err:
        raise BadDataError(f"{card_path} is not valid JSON ({err}); fix: restore the checkpoint folder") from err
    if card.get("format_version") != CARD_FORMAT or "task" not in card or "weights" not in card:
        raise BadDataError(f"{card_path} is not a bids-siamese model card (format {CARD_FORMAT}); fix: retrain "
                           "with --mode train")
    actual = sha256_file(weights)
    expected = {card["weights"].get("sha256")}
    sum_file = folder / f"{WEIGHTS}.sha256"
    if sum_file.is_file():
        expected.add(sum_file.read_text().split()[0] if sum_file.read_text().split() else "")
    if expected != {actual}:
        raise BadDataError(f"{weights} does not match its sha256 in {card_path.name} (corrupt or replaced); fix: "
                           "copy the checkpoint folder again or retrain")
    return card


def check_card(card: Mapping[str, Any], task: str | None = None, grid: Grid | None = None,
               source: Path | str = "--model") -> None:
    """Refuse a checkpoint made for another task or another model grid.

    Raises:
        UsageError: task or grid mismatch, with the fix in the message.

    Examples:
        >>> from bids_siamese.resources import model_grid
        >>> card = {"task": "twin", "grid": grid_record(model_grid(4.0))}
        >>> check_card(card, "twin", model_grid(4.0))
        >>> check_card(card, "longitudinal")
        Traceback (most recent call last):
        ...
        bids_siamese.errors.UsageError: --model: the checkpoint was trained for --task twin, not longitudinal; fix: pass a longitudinal checkpoint or use --task twin
    """
    if task is not None and card.get("task") != task:
        raise UsageError(f"{source}: the checkpoint was trained for --task {card.get('task')}, not {task}; "
                         f"fix: pass a {task} checkpoint or use --task {card.get('task')}")
    if grid is not None:
        want = grid_record(grid)
        have = card.get("grid", {})
        same = have.get("shape") == want["shape"] and np.allclose(
            np.asarray(have.get("affine", np.zeros((4, 4)))), np.asarray(want["affine"]), atol=1e-4)
        if not same:
            raise UsageError(
                f"{source}: the checkpoint expects the {float(have.get('resolution', 0)):g} mm model grid "
                f"({'x'.join(map(str, have.get('shape', [])))}), but this run uses {want['resolution']:g} mm "
                f"({'x'.join(map(str, want['shape']))}); fix: use --resolution {float(have.get('resolution', 0)):g} "
                "(and run the participant level at that resolution)")


def load_weights(weights: Path) -> dict[str, Any]:
    """The state dict in ``weights``, read with ``torch.load(weights_only=True)``: tensors only, no code runs.

    Raises:
        BadDataError: the file is not a tensor file (a pickle that would run code, random bytes, a truncated
            file). One line, without PyTorch's advice to turn the safety off.
    """
    try:
        state = torch.load(weights, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - UnpicklingError, RuntimeError, EOFError, zipfile errors, ...
        raise BadDataError(f"{weights} is not a PyTorch tensor file that can be loaded safely ({type(err).__name__}: "
                           "it holds something other than plain tensors, or is damaged); fix: give a checkpoint "
                           "written by bids-siamese --mode train") from None
    if not isinstance(state, dict):
        raise BadDataError(f"{weights} holds a {type(state).__name__}, not a model's weights; fix: give a checkpoint "
                           "written by bids-siamese --mode train")
    return state


def load_checkpoint(path: Path, task: str | None = None, grid: Grid | None = None,
                    device: str | torch.device = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the model of a checkpoint (the factory that :mod:`bids_siamese.models.registry` holds for its task and
    backbone) and load its weights, after the checks of :func:`read_card` and :func:`check_card`.

    Args:
        path: checkpoint folder, ``model.pt`` or ``model_card.json``.
        task: expected task (``None``: any).
        grid: expected model grid (``None``: any).
        device: where to put the model.

    Returns:
        ``(model in eval mode, model card)``.
    """
    card = read_card(path)
    check_card(card, task, grid, source=f"--model {path}")
    weights = checkpoint_folder(path) / WEIGHTS
    state = load_weights(weights)
    factory = model_factory(card["task"], card.get("backbone"))  # models/registry.py: filled by the models' owners
    try:
        model = factory(card, state)
        model.load_state_dict(state)
    except (RuntimeError, KeyError, ValueError) as err:
        raise BadDataError(f"{weights} does not fit a {card['task']}/{card['backbone']} model ({err}); fix: "
                           "retrain with --mode train") from err
    return model.to(device).eval(), card
