"""Training and evaluation of the Siamese symmetry model with simulated lesions.

Training (:func:`train_symmetry_model`) draws ``samples_per_scan`` pairs of samples from every training scan
per epoch: one with a synthetic unilateral lesion (label 1; lesion volume from the epoch's curriculum range,
see :mod:`bids_siamese.symmetry.simulate`) and one without (label 0; with probability ``p_bilateral`` the
negative carries a mirrored *pair* of lesions, a symmetric abnormality, so the model learns asymmetry rather
than "any lesion"). Both kinds get the same augmentations: a left-right flip of the whole brain (the lesion
side flips with it), a sub-voxel shift along x (imperfect mid-sagittal alignment), an intensity scale and
offset and Gaussian noise inside the brain. The loss is the binary cross-entropy of p(abnormal) plus
``side_weight`` times that of the lesion side on the lesioned samples plus ``position_weight`` times the
cross-entropy of the model's per-position asymmetry logits against the cells that hold the planted lesion
(deep supervision: with it the encoder learns to see a focal asymmetry within a few hundred steps, from the
image label alone it had not after several hundred). Validation uses a fixed simulated set (``val_draws``
lesion-free and ``val_draws`` lesioned samples of each validation scan, volumes log-uniform over the whole
range, augmented like the training samples); the weights with the lowest validation loss are kept, early
stopping (``patience`` epochs without improvement) only starts once the curriculum has reached the full volume
range, and the decision threshold on p(abnormal) is the one with the largest Youden's J on the validation
samples.

The model works on its own grid, ``model_grid(TrainConfig.resolution)`` (the participant-level resolution at
the group level); images on a finer grid are block-averaged to it (:func:`to_model_resolution`).

Batch norm: the backbones normalise with batch statistics during training; before every evaluation the
running statistics are re-estimated on the training scans (:func:`recompute_batch_norm`), without which the
evaluation-mode outputs of a model trained for a few hundred steps are meaningless.

Evaluation (:func:`evaluate_detection`): lesions are planted in held-out scans at their own resolution, per
lesion-volume bin, and every image (plus the clean scans) is scored by any number of scorers (the Siamese
probability, the asymmetry score). Reported per bin: detection rate at the scorer's threshold, balanced
accuracy against the clean scans, AUC of lesioned versus clean scans; overall: AUC, and the false-positive
rate on the clean scans.
"""
from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Callable, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from scipy import ndimage as ndi

from ..models.backbones import precise_batch_norm
from ..resources import model_grid
from ..preproc.grid import resample_array
from .model import SymmetrySiamese, build_symmetry_model, predict_proba, side_loss
from .simulate import VOLUME_BINS, LesionConfig, bin_label, curriculum_range, simulate_lesion

LOG = logging.getLogger("bids_siamese.symmetry")

#: Resolution (mm) of the symmetry model's grid unless told otherwise (the group level uses ``--resolution``;
#: the ``small`` backbone averages 2 mm inputs to 4 mm in its stem, so 2 mm inputs train on a CPU).
MODEL_RESOLUTION = 2.0


@dataclass(frozen=True)
class TrainConfig:
    """Training settings of the symmetry model (recorded in the model card).

    Attributes:
        backbone: encoder name (:data:`bids_siamese.models.backbones.BACKBONES`).
        fusion: ``difference``, ``embedding`` or ``cross_attention``.
        embedding_dim: embedding size / token width.
        difference_channel: give the shared encoder each hemisphere together with its difference from the
            mirrored other hemisphere (2 input channels; see :class:`~bids_siamese.symmetry.model.SymmetrySiamese`).
        reference: standardise that difference by the training scans' voxelwise median and robust spread
            (:meth:`~bids_siamese.symmetry.model.SymmetrySiamese.set_reference`; stored with the weights).
        resolution: the model grid resolution in mm.
        epochs: maximum epochs.
        batch_size: scans per batch (each contributes both hemispheres).
        lr: AdamW learning rate (cosine decay to 5 % over ``epochs``).
        weight_decay: AdamW weight decay.
        patience: early-stopping patience (epochs), counted after the curriculum ramp.
        seed: random seed (weights, lesions, augmentation).
        lesion: lesion distribution.
        ramp_fraction: curriculum length as a fraction of ``epochs`` (0: no curriculum).
        p_bilateral: probability that a negative carries a mirrored pair of lesions.
        flip_lr: left-right flip augmentation.
        shift_x_vox: largest random shift along x (voxels).
        intensity_jitter: relative intensity scale jitter (and offset, in normalised units).
        noise_sd: Gaussian noise inside the brain (normalised units).
        side_weight: weight of the lesion-side loss.
        position_weight: weight of the deep supervision of the model's position map by the simulated lesion
            (binary cross-entropy per feature cell; 0 turns it off).
        val_draws: lesioned copies of each validation scan.
        samples_per_scan: lesioned (and as many lesion-free) samples drawn from each training scan per epoch.
        num_threads: torch threads.
    """

    backbone: str = "small"
    fusion: str = "difference"
    embedding_dim: int = 64
    difference_channel: bool = True
    reference: bool = True
    resolution: float = MODEL_RESOLUTION
    epochs: int = 30
    batch_size: int = 8
    lr: float = 1e-3
    weight_decay: float = 1e-4
    patience: int = 5
    seed: int = 0
    lesion: LesionConfig = field(default_factory=LesionConfig)
    ramp_fraction: float = 0.5
    p_bilateral: float = 0.2
    flip_lr: bool = True
    shift_x_vox: float = 0.5
    intensity_jitter: float = 0.1
    noise_sd: float = 0.05
    side_weight: float = 0.2
    position_weight: float = 1.0
    val_draws: int = 4
    samples_per_scan: int = 2
    num_threads: int = 1

    def as_dict(self) -> dict:
        out = asdict(self)
        out["lesion"] = asdict(self.lesion)
        return out


# ----------------------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------------------


def block_average(volume: np.ndarray, factor: int) -> np.ndarray:
    """Mean over ``factor``^3 blocks (the shape must be divisible by ``factor``).

    Examples:
        >>> block_average(np.arange(8.0).reshape(2, 2, 2), 2).ravel().tolist()
        [3.5]
    """
    if factor == 1:
        return np.asarray(volume, dtype=np.float32)
    s = np.asarray(volume, dtype=np.float32).shape
    if any(n % factor for n in s):
        raise ValueError(f"shape {s} is not divisible by {factor}")
    v = np.asarray(volume, dtype=np.float32).reshape(s[0] // factor, factor, s[1] // factor, factor,
                                                     s[2] // factor, factor)
    return v.mean(axis=(1, 3, 5))


def to_model_resolution(volume: np.ndarray, mask: np.ndarray, in_resolution: float,
                        out_resolution: float) -> tuple[np.ndarray, np.ndarray]:
    """Bring a model-grid image and mask from ``model_grid(in_resolution)`` to ``model_grid(out_resolution)``.

    Block averaging when the ratio is an integer and the shapes fit (the grids are then nested exactly), else
    Gaussian anti-aliasing and linear resampling. The mask is the block/resampled mean > 0.5.

    Examples:
        >>> v = np.ones((84, 104, 88), np.float32)
        >>> out, m = to_model_resolution(v, v > 0, 2.0, 4.0)
        >>> out.shape, bool(m.all())
        ((42, 52, 44), True)
    """
    in_resolution, out_resolution = float(in_resolution), float(out_resolution)
    target = model_grid(out_resolution)
    if np.isclose(in_resolution, out_resolution) and tuple(volume.shape) == tuple(target.shape):
        return np.asarray(volume, np.float32), np.asarray(mask) > 0
    ratio = out_resolution / in_resolution
    factor = int(round(ratio))
    if np.isclose(ratio, factor) and factor >= 1 and tuple(n // factor for n in volume.shape) == tuple(target.shape) \
            and all(n % factor == 0 for n in volume.shape):
        return block_average(volume, factor), block_average(np.asarray(mask, np.float32), factor) > 0.5
    source = model_grid(in_resolution)
    if ratio > 1:
        sigma = np.sqrt(max(ratio ** 2 - 1.0, 0.0)) / 2.355
        volume = ndi.gaussian_filter(np.asarray(volume, np.float32), sigma)
        mask_f = ndi.gaussian_filter(np.asarray(mask, np.float32), sigma)
    else:
        mask_f = np.asarray(mask, np.float32)
    out = resample_array(volume, source.affine, target, order=1)
    out_mask = resample_array(mask_f, source.affine, target, order=1) > 0.5
    return np.where(out_mask, out, 0.0).astype(np.float32), out_mask


@dataclass
class Scan:
    """A scan on the model grid with what the simulator needs."""

    volume: np.ndarray
    mask: np.ndarray
    depth_mm: np.ndarray
    key: str = ""


def prepare_scan(volume: np.ndarray, mask: np.ndarray, resolution: float, key: str = "") -> Scan:
    """A :class:`Scan` (the distance-to-border map is computed once here).

    Examples:
        >>> m = np.zeros((8, 8, 8), bool); m[2:6, 2:6, 2:6] = True
        >>> float(prepare_scan(np.ones((8, 8, 8)), m, 4.0).depth_mm.max())
        8.0
    """
    mask = np.asarray(mask) > 0
    depth = ndi.distance_transform_edt(mask) * float(resolution)
    return Scan(np.where(mask, np.asarray(volume, np.float32), 0.0).astype(np.float32), mask, depth, key)


def augment(volume: np.ndarray, mask: np.ndarray, rng: np.random.Generator, config: TrainConfig) -> tuple[np.ndarray, bool]:
    """Shift along x, intensity jitter and noise inside the mask, and an optional left-right flip.

    Returns:
        ``(volume, flipped)``.

    Examples:
        >>> v = np.ones((8, 4, 4), np.float32)
        >>> out, flipped = augment(v, v > 0, np.random.default_rng(0), TrainConfig())
        >>> out.shape, out.dtype
        ((8, 4, 4), dtype('float32'))
    """
    out = np.asarray(volume, np.float32)
    if config.shift_x_vox > 0:
        shift = float(rng.uniform(-config.shift_x_vox, config.shift_x_vox))
        out = ndi.shift(out, (shift, 0.0, 0.0), order=1, mode="constant", cval=0.0)
    scale = 1.0 + float(rng.uniform(-config.intensity_jitter, config.intensity_jitter))
    offset = float(rng.uniform(-config.intensity_jitter, config.intensity_jitter))
    inside = out != 0
    out = np.where(inside, out * scale + offset, 0.0)
    if config.noise_sd > 0:
        out = out + np.where(inside, rng.normal(0.0, config.noise_sd, size=out.shape), 0.0)
    flipped = bool(config.flip_lr and rng.random() < 0.5)
    if flipped:
        out = out[::-1]
    return np.ascontiguousarray(out, dtype=np.float32), flipped


def hemisphere_weights(weights: np.ndarray) -> np.ndarray:
    """Lesion weights in hemisphere coordinates: the left half and the mirrored right half, overlaid (the
    position map of the model is indexed this way).

    Examples:
        >>> w = np.zeros((4, 1, 1)); w[3] = 1.0
        >>> hemisphere_weights(w).ravel().tolist()
        [1.0, 0.0]
    """
    half = weights.shape[0] // 2
    return np.maximum(weights[:half], weights[::-1][:half]).astype(np.float32)


def make_example(scan: Scan, lesioned: bool, rng: np.random.Generator, config: TrainConfig,
                 volume_range: tuple[float, float], affine: np.ndarray) -> tuple[np.ndarray, float, float, np.ndarray]:
    """One training sample: ``(volume, label, is_left, target)``; ``is_left`` is 0 for negatives, ``target`` the
    unilateral lesion's weights in hemisphere coordinates (:func:`hemisphere_weights`; zeros for negatives)."""
    is_left = 0.0
    half = scan.volume.shape[0] // 2
    target = np.zeros((half, *scan.volume.shape[1:]), dtype=np.float32)
    if lesioned:
        image, lesion, weights = simulate_lesion(scan.volume, scan.mask, affine, rng, config.lesion, volume_range,
                                                 depth_mm=scan.depth_mm, return_weights=True)
        is_left = 1.0 if lesion.hemisphere == "L" else 0.0
        target = hemisphere_weights(weights)
    elif rng.random() < config.p_bilateral:
        image, _ = simulate_lesion(scan.volume, scan.mask, affine, rng, config.lesion, volume_range,
                                   bilateral=True, depth_mm=scan.depth_mm)
    else:
        image = scan.volume
    image, flipped = augment(image, scan.mask, rng, config)
    if flipped and lesioned:
        is_left = 1.0 - is_left  # the hemisphere-coordinate target is the same after a flip
    return image, float(lesioned), is_left, target


def position_targets(weights: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Binary targets of the position head: the feature cells holding at least half as much of the lesion as
    the cell holding most of it (all zeros without a lesion).

    Args:
        weights: ``(B, X/2, Y, Z)`` lesion weights in hemisphere coordinates.
        shape: the feature-map shape ``(d, h, w)``.

    Examples:
        >>> w = torch.zeros(1, 8, 8, 8); w[0, :2, :2, :2] = 1.0
        >>> position_targets(w, (2, 2, 2))[0].flatten().tolist()
        [1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]
    """
    pooled = F.adaptive_avg_pool3d(weights[:, None], tuple(int(s) for s in shape))[:, 0]
    peak = pooled.flatten(1).amax(dim=1).clamp_min(1e-12).reshape(-1, 1, 1, 1)
    return ((pooled / peak >= 0.5) & (pooled > 0)).float()


def validation_set(scans: Sequence[Scan], config: TrainConfig, affine: np.ndarray,
                   seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fixed validation samples ``(x, label, is_left, target)``: from each scan ``val_draws`` lesion-free and
    ``val_draws`` lesioned samples, drawn like training samples (same augmentation) but with lesion volumes over
    the whole range (no curriculum)."""
    rng = np.random.default_rng(seed)
    samples = [make_example(scan, lesioned, rng, config, config.lesion.volume_mm3, affine)
               for scan in scans for lesioned in (False, True) for _ in range(max(1, config.val_draws))]
    return (torch.from_numpy(np.stack([e[0] for e in samples])[:, None]), torch.tensor([e[1] for e in samples]),
            torch.tensor([e[2] for e in samples]), torch.from_numpy(np.stack([e[3] for e in samples])))


# ----------------------------------------------------------------------------------------------------------
# Metrics
# ----------------------------------------------------------------------------------------------------------


def roc_auc(labels: Sequence[float], scores: Sequence[float]) -> float:
    """Area under the ROC curve (ties count one half); NaN when a class is missing.

    Examples:
        >>> roc_auc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8])
        0.75
    """
    y = np.asarray(labels, dtype=float)
    s = np.asarray(scores, dtype=float)
    pos, neg = s[y > 0.5], s[y <= 0.5]
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    greater = (pos[:, None] > neg[None, :]).sum()
    ties = (pos[:, None] == neg[None, :]).sum()
    return float((greater + 0.5 * ties) / (len(pos) * len(neg)))


# ----------------------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------------------


def _loss(model: SymmetrySiamese, x: torch.Tensor, y: torch.Tensor, left: torch.Tensor, target: torch.Tensor,
          config: TrainConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """``(total loss, logits)``: image BCE + side BCE (lesioned samples) + position BCE (deep supervision)."""
    out = model.forward_all(x)
    loss = F.binary_cross_entropy_with_logits(out["logit"], y) + config.side_weight * side_loss(out["side"], y, left)
    if "positions" in out and config.position_weight > 0:
        tgt = position_targets(target, out["positions"].shape[1:])
        loss = loss + config.position_weight * F.binary_cross_entropy_with_logits(out["positions"], tgt)
    return loss, out["logit"]


@torch.no_grad()
def recompute_batch_norm(model: SymmetrySiamese, volumes: torch.Tensor, batch_size: int = 8) -> int:
    """Re-estimate the running statistics of every batch-norm layer on ``volumes`` ``(N, 1, X, Y, Z)``.

    The backbones normalise with batch norm; after a few dozen steps its momentum-averaged running statistics
    still describe earlier weights, and evaluation mode then gives meaningless outputs. Run before every
    evaluation ("precise BN", as the twin trainer does; that one embeds single volumes, this one runs the
    hemisphere model). Returns the number of layers updated.

    Examples:
        >>> m = build_symmetry_model("small")
        >>> recompute_batch_norm(m, torch.randn(2, 1, 42, 52, 44))
        6
    """
    if len(volumes) == 0:
        return 0

    def forward_batches() -> None:
        for start in range(0, len(volumes), batch_size):
            model(volumes[start:start + batch_size])

    return precise_batch_norm(model, forward_batches)


def train_symmetry_model(
    train_scans: Sequence[Scan],
    val_scans: Sequence[Scan],
    config: TrainConfig = TrainConfig(),
    log: Callable[[str], None] | None = None,
) -> tuple[SymmetrySiamese, pd.DataFrame, dict]:
    """Train the Siamese symmetry model on lesion-free scans (on the model grid) with simulated lesions.

    Args:
        train_scans: training scans (:func:`prepare_scan` on ``model_grid(config.resolution)``).
        val_scans: validation scans (at least one).
        config: :class:`TrainConfig`.
        log: called with one line per epoch (default: the module logger).

    Returns:
        ``(model with the best validation weights, in eval mode, history, info)``; the history has one row
        per epoch (``epoch, volume_min_mm3, volume_max_mm3, train_loss, val_loss, val_auc, seconds``), ``info``
        holds ``best_epoch``, ``best_val_loss``, ``best_val_auc``, ``threshold`` (the probability with the
        largest Youden's J on the validation samples, ``bids_siamese.train.evaluate.choose_threshold``: the
        network is trained on balanced simulated data, so 0.5 is not a calibrated cut-off), ``stopped_early``,
        ``epochs_run``, ``seconds``.

    Examples:
        >>> m = np.zeros((20, 40, 40), bool); m[3:17, 6:34, 6:34] = True
        >>> rng = np.random.default_rng(0)
        >>> scans = [prepare_scan(np.where(m, rng.normal(size=m.shape), 0), m, 4.0) for _ in range(3)]
        >>> cfg = TrainConfig(epochs=1, batch_size=2, val_draws=1, lesion=LesionConfig(volume_mm3=(500.0, 2000.0)))
        >>> model, hist, info = train_symmetry_model(scans[:2], scans[2:], cfg, log=lambda s: None)
        >>> list(hist.columns)[:3], info["best_epoch"]
        (['epoch', 'volume_min_mm3', 'volume_max_mm3'], 1)
    """
    if not train_scans or not val_scans:
        raise ValueError("need at least one training and one validation scan")
    log = log or LOG.info
    torch.manual_seed(config.seed)
    torch.set_num_threads(max(1, int(config.num_threads)))
    rng = np.random.default_rng(config.seed)
    affine = np.diag([config.resolution] * 3 + [1.0])  # only the voxel size matters to the simulator
    model = build_symmetry_model(config.backbone, config.fusion, config.embedding_dim,
                                 difference_channel=config.difference_channel)
    optimiser = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, T_max=max(1, config.epochs),
                                                          eta_min=0.05 * config.lr)
    val_x, val_y, val_side, val_target = validation_set(val_scans, config, affine, config.seed + 1)
    bn_x = torch.from_numpy(np.stack([scan.volume for scan in train_scans])[:, None])
    if config.difference_channel and config.reference:
        model.set_reference(bn_x)
    ramp_end = int(np.ceil(config.ramp_fraction * config.epochs))
    best = {"loss": np.inf, "epoch": 0, "auc": float("nan"), "state": None}
    rows, waited, stopped, start = [], 0, False, time.time()
    for epoch in range(config.epochs):
        t0 = time.time()
        vrange = curriculum_range(epoch, config.epochs, config.lesion.volume_mm3, config.ramp_fraction)
        items = [(i, lesioned) for i in range(len(train_scans)) for lesioned in (True, False)
                 for _ in range(max(1, config.samples_per_scan))]
        order = rng.permutation(len(items))
        model.train()
        losses = []
        for b in range(0, len(order), config.batch_size):
            batch = [make_example(train_scans[items[j][0]], items[j][1], rng, config, vrange, affine)
                     for j in order[b:b + config.batch_size]]
            x = torch.from_numpy(np.stack([e[0] for e in batch])[:, None])
            y = torch.tensor([e[1] for e in batch])
            left = torch.tensor([e[2] for e in batch])
            target = torch.from_numpy(np.stack([e[3] for e in batch]))
            loss, _ = _loss(model, x, y, left, target, config)
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            losses.append(float(loss.detach()) * len(batch))
        schedule.step()
        recompute_batch_norm(model, bn_x, config.batch_size)
        model.eval()
        with torch.no_grad():
            val_losses, val_scores = [], []
            for b in range(0, len(val_y), config.batch_size):
                sl = slice(b, b + config.batch_size)
                loss, logit = _loss(model, val_x[sl], val_y[sl], val_side[sl], val_target[sl], config)
                val_losses.append(float(loss) * len(val_y[sl]))
                val_scores.append(torch.sigmoid(logit))
        val_loss = sum(val_losses) / len(val_y)
        val_auc = roc_auc(val_y.numpy(), torch.cat(val_scores).numpy())
        row = {"epoch": epoch + 1, "volume_min_mm3": round(vrange[0], 1), "volume_max_mm3": round(vrange[1], 1),
               "train_loss": sum(losses) / len(items), "val_loss": val_loss, "val_auc": val_auc,
               "seconds": round(time.time() - t0, 2)}
        rows.append(row)
        log(f"symmetry epoch {epoch + 1}/{config.epochs}: lesions {vrange[0]:.0f}-{vrange[1]:.0f} mm3, "
            f"train loss {row['train_loss']:.4f}, val loss {val_loss:.4f}, val AUC {val_auc:.3f} "
            f"({row['seconds']:.1f} s)")
        if val_loss < best["loss"]:
            best = {"loss": val_loss, "epoch": epoch + 1, "auc": val_auc,
                    "state": {k: v.detach().clone() for k, v in model.state_dict().items()}}
            waited = 0
        elif epoch + 1 > ramp_end:
            waited += 1
            if waited >= config.patience:
                stopped = True
                break
    if best["state"] is not None:
        model.load_state_dict(best["state"])
    model.eval()
    from ..train.evaluate import choose_threshold

    p_val, _ = predict_proba(model, val_x, batch_size=config.batch_size)
    threshold = choose_threshold(val_y.numpy(), p_val.numpy()) if 0 < float(val_y.sum()) < len(val_y) else 0.5
    info = {"best_epoch": int(best["epoch"]), "best_val_loss": float(best["loss"]), "best_val_auc": float(best["auc"]),
            "threshold": float(threshold), "stopped_early": stopped, "epochs_run": len(rows),
            "seconds": round(time.time() - start, 1)}
    return model, pd.DataFrame(rows), info


def siamese_predict(model: SymmetrySiamese, volumes: Sequence[np.ndarray], masks: Sequence[np.ndarray],
                    in_resolution: float, model_resolution: float, batch_size: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """``(p_abnormal, p_left)`` of images on ``model_grid(in_resolution)`` (brought to the model's grid)."""
    p_all, side_all = [], []
    for start in range(0, len(volumes), batch_size):
        small = [to_model_resolution(v, m, in_resolution, model_resolution)[0]
                 for v, m in zip(volumes[start:start + batch_size], masks[start:start + batch_size])]
        p, side = predict_proba(model, torch.from_numpy(np.stack(small)), batch_size=batch_size)
        p_all.append(p.numpy())
        side_all.append(side.numpy())
    if not p_all:
        return np.zeros(0), np.zeros(0)
    return np.concatenate(p_all).astype(float), np.concatenate(side_all).astype(float)


def siamese_scorer(model: SymmetrySiamese, in_resolution: float, model_resolution: float,
                   batch_size: int = 8) -> Callable[[Sequence[np.ndarray], Sequence[np.ndarray]], np.ndarray]:
    """A scorer ``f(volumes, masks) -> p(abnormal)`` for images on ``model_grid(in_resolution)``."""

    def score(volumes: Sequence[np.ndarray], masks: Sequence[np.ndarray]) -> np.ndarray:
        return siamese_predict(model, volumes, masks, in_resolution, model_resolution, batch_size)[0]

    return score


# ----------------------------------------------------------------------------------------------------------
# Evaluation
# ----------------------------------------------------------------------------------------------------------


def evaluate_detection(
    scans: Sequence[Scan],
    resolution: float,
    scorers: Mapping[str, Callable[[Sequence[np.ndarray], Sequence[np.ndarray]], np.ndarray]],
    thresholds: Mapping[str, float],
    lesion: LesionConfig = LesionConfig(),
    bins: Sequence[float] = VOLUME_BINS,
    draws: int = 3,
    seed: int = 0,
) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """Plant lesions per volume bin in held-out scans and score everything.

    Args:
        scans: held-out lesion-free scans (at ``resolution``).
        resolution: their grid resolution.
        scorers: name -> ``f(volumes, masks) -> scores`` (higher = more abnormal).
        thresholds: name -> decision threshold.
        lesion: lesion shapes/intensities (its volume range is replaced by each bin).
        bins: bin edges (mm^3).
        draws: lesions per scan and bin.
        seed: random seed.

    Returns:
        ``(samples, per_bin, overall)``: one row per image (``scan, label, bin, volume_mm3,
        cross_section_mm2, hemisphere, shape, <scorer>...``); per scorer and bin ``n, volume_mm3 (median),
        cross_section_mm2 (median), detection_rate, balanced_accuracy, auc``; per scorer ``auc,
        false_positive_rate, n_clean, n_lesion``.
    """
    rng = np.random.default_rng(seed)
    affine = model_grid(resolution).affine
    rows = []
    for s_index, scan in enumerate(scans):
        images = [scan.volume]
        meta = [{"scan": scan.key or str(s_index), "label": 0, "bin": "none", "volume_mm3": 0.0,
                 "cross_section_mm2": 0.0, "hemisphere": "n/a", "shape": "n/a"}]
        for lo, hi in zip(bins[:-1], bins[1:]):
            for _ in range(draws):
                image, les = simulate_lesion(scan.volume, scan.mask, affine, rng, lesion, (lo, hi),
                                             depth_mm=scan.depth_mm)
                images.append(image)
                meta.append({"scan": scan.key or str(s_index), "label": 1, "bin": bin_label(lo, hi),
                             "volume_mm3": round(les.volume_mm3, 1),
                             "cross_section_mm2": round(les.cross_section_mm2, 1),
                             "hemisphere": les.hemisphere, "shape": les.shape})
        masks = [scan.mask] * len(images)
        scores = {name: np.asarray(fn(images, masks), dtype=float) for name, fn in scorers.items()}
        for i, m in enumerate(meta):
            rows.append({**m, **{name: float(v[i]) for name, v in scores.items()}})
    samples = pd.DataFrame(rows)
    per_bin, overall = summarise_detection(samples, list(scorers), thresholds, bins)
    return samples, per_bin, overall


def summarise_detection(samples: pd.DataFrame, scorers: Sequence[str], thresholds: Mapping[str, float],
                        bins: Sequence[float] = VOLUME_BINS) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Per-bin and overall metrics of scored samples (see :func:`evaluate_detection`).

    Examples:
        >>> s = pd.DataFrame({"label": [0, 0, 1, 1], "bin": ["none", "none", "25-50", "25-50"],
        ...                   "volume_mm3": [0, 0, 30, 40], "cross_section_mm2": [0, 0, 10, 12],
        ...                   "score": [0.1, 0.6, 0.7, 0.9]})
        >>> per_bin, overall = summarise_detection(s, ["score"], {"score": 0.5}, (25.0, 50.0))
        >>> per_bin[["detection_rate", "auc"]].values.tolist(), overall.false_positive_rate.tolist()
        ([[1.0, 1.0]], [0.5])
    """
    clean = samples[samples["label"] == 0]
    rows, overall = [], []
    for name in scorers:
        thr = float(thresholds.get(name, 0.5))
        fpr = float((clean[name] >= thr).mean()) if len(clean) else float("nan")
        for lo, hi in zip(bins[:-1], bins[1:]):
            label = bin_label(lo, hi)
            pos = samples[(samples["label"] == 1) & (samples["bin"] == label)]
            if pos.empty:
                continue
            tpr = float((pos[name] >= thr).mean())
            both = pd.concat([clean, pos])
            rows.append({
                "scorer": name, "bin_mm3": label, "n": len(pos),
                "volume_mm3": round(float(pos["volume_mm3"].median()), 1),
                "cross_section_mm2": round(float(pos["cross_section_mm2"].median()), 1),
                "detection_rate": round(tpr, 4),
                "balanced_accuracy": round((tpr + 1.0 - fpr) / 2.0, 4) if np.isfinite(fpr) else float("nan"),
                "auc": round(roc_auc(both["label"], both[name]), 4),
            })
        overall.append({"scorer": name, "threshold": thr,
                        "auc": round(roc_auc(samples["label"], samples[name]), 4),
                        "false_positive_rate": round(fpr, 4), "n_clean": len(clean),
                        "n_lesion": int((samples["label"] == 1).sum())})
    return pd.DataFrame(rows), pd.DataFrame(overall)


def detection_figure(per_bin: pd.DataFrame, title: str = "Lesion detection by volume") -> str:
    """An SVG of detection rate (solid) and AUC (dashed) against lesion volume, one colour per scorer, with
    the sphere-equivalent cross-section (mm^2) on a second axis, like the neonatal study's curve."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=100)
    for i, (name, part) in enumerate(per_bin.groupby("scorer", sort=False)):
        colour = f"C{i}"
        ax.plot(part["volume_mm3"], part["detection_rate"], "o-", color=colour, label=f"{name}: detection rate")
        ax.plot(part["volume_mm3"], part["auc"], "s--", color=colour, alpha=0.7, label=f"{name}: AUC")
    ax.set_xscale("log")
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("lesion volume (mm$^3$, median of bin)")
    ax.set_ylabel("detection rate / AUC")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    ax.set_title(title, fontsize=10)
    top = ax.secondary_xaxis("top", functions=(lambda v: np.pi * (3 * np.maximum(v, 1e-9) / (4 * np.pi)) ** (2 / 3),
                                               lambda a: 4 / 3 * np.pi * (np.maximum(a, 1e-9) / np.pi) ** 1.5))
    top.set_xlabel("sphere-equivalent cross-section (mm$^2$)", fontsize=8)
    fig.tight_layout()
    buffer = io.StringIO()
    fig.savefig(buffer, format="svg")
    plt.close(fig)
    return buffer.getvalue()


def with_overrides(config: TrainConfig, **kwargs) -> TrainConfig:
    """A copy of ``config`` with some fields replaced (``lesion_*`` keys go to the lesion config).

    Examples:
        >>> with_overrides(TrainConfig(), epochs=2, lesion_volume_mm3=(10.0, 20.0)).lesion.volume_mm3
        (10.0, 20.0)
    """
    lesion_kw = {k[len("lesion_"):]: v for k, v in kwargs.items() if k.startswith("lesion_")}
    other = {k: v for k, v in kwargs.items() if not k.startswith("lesion_")}
    lesion = replace(config.lesion, **lesion_kw) if lesion_kw else config.lesion
    return replace(config, lesion=lesion, **other)


# ----------------------------------------------------------------------------------------------------------
# Checkpoints (the layout of bids_siamese.models.checkpoint, task "symmetry")
# ----------------------------------------------------------------------------------------------------------

TASK = "symmetry"


def save_symmetry_checkpoint(folder, model: SymmetrySiamese, config: TrainConfig, training_data: Mapping,
                             metrics: Mapping, threshold: float = 0.5) -> list:
    """Write ``model.pt``, ``model.pt.sha256`` and ``model_card.json`` for a trained symmetry model.

    Args:
        folder: checkpoint folder (``OUTPUT_DIR/models/symmetry_<backbone>/``).
        model: the trained model.
        config: its :class:`TrainConfig` (stored as the card's hyper-parameters).
        training_data: ``fingerprint`` and counts of the scans used.
        metrics: validation/test metrics.
        threshold: decision threshold on p(abnormal).

    Returns:
        The paths written.
    """
    from ..models.checkpoint import make_card, save_checkpoint

    hyper = config.as_dict()
    card = make_card(
        task=TASK, backbone=config.backbone, embedding_dim=config.embedding_dim,
        grid=model_grid(config.resolution), seed=config.seed, training_data=training_data,
        decision={"threshold": float(threshold), "output": "p_abnormal = sigmoid(logit); p_left = sigmoid(side_logit)",
                  "calibration": "none (probabilities of a model trained on balanced simulated data)"},
        metrics=metrics, hyperparameters=hyper,
    )
    card["input"]["left_right_flip_augmentation"] = bool(config.flip_lr)
    card["input"]["resampling"] = ("finer participant-level grids are block-averaged to the model grid "
                                   "(bids_siamese.symmetry.train.to_model_resolution)")
    return save_checkpoint(folder, model, card)


def load_symmetry_model(path) -> tuple[SymmetrySiamese, dict]:
    """The symmetry model of a checkpoint (folder, ``model.pt`` or ``model_card.json``), in eval mode.

    Raises:
        UsageError: the checkpoint is for another task.
        NoInputError, BadDataError: missing or corrupt checkpoint files.
    """
    from ..errors import BadDataError
    from ..models.checkpoint import WEIGHTS, check_card, checkpoint_folder, read_card

    card = read_card(path)
    check_card(card, TASK, None, source=f"--model {path}")
    hyper = card.get("hyperparameters", {})
    model = build_symmetry_model(card["backbone"], hyper.get("fusion", "difference"), int(card["embedding_dim"]),
                                 difference_channel=bool(hyper.get("difference_channel", False)))
    weights = checkpoint_folder(path) / WEIGHTS
    try:
        state = torch.load(weights, map_location="cpu", weights_only=True)
        for name in ("reference_mean", "reference_sd"):  # buffers sized by the training grid
            if name in state:
                setattr(model, name, torch.zeros_like(state[name]))
        model.load_state_dict(state)
    except (RuntimeError, KeyError, ValueError) as err:
        raise BadDataError(f"{weights} does not fit a symmetry/{card['backbone']} model ({err}); fix: retrain "
                           "with --task symmetry --mode train") from err
    return model.eval(), card


def model_resolution(card: Mapping) -> float:
    """The model grid resolution recorded in a card.

    Examples:
        >>> model_resolution({"grid": {"resolution": 4.0}})
        4.0
    """
    return float(card["grid"]["resolution"])
