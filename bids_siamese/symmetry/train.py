"""The symmetry task's sample builder, training call and evaluation on planted lesions.

The training loop (:class:`~bids_siamese.train.trainer.Trainer`), its configuration
(:func:`~bids_siamese.train.trainer.train_config`: ``--epochs``, ``--batch-size``, ``--lr``, ``--patience``,
``--seed``; the task adds left-right flips), precise batch norm, the AUC and the threshold are the shared ones of
:mod:`bids_siamese.train`; this module holds what is specific to the task: its samples, its loss and its hooks
(:class:`SymmetryTrainer`).

Samples (:func:`make_example`): per epoch, ``samples_per_scan`` pairs of samples from every training scan: one
with a synthetic unilateral lesion (label 1; lesion volume from the epoch's curriculum range, see
:mod:`bids_siamese.symmetry.simulate`) and one without (label 0; with probability :data:`P_BILATERAL` the
negative carries a mirrored *pair* of lesions, a symmetric abnormality, so the model learns asymmetry rather
than "any lesion"). Both kinds get the same augmentations: a left-right flip of the whole brain (the lesion side
flips with it), a sub-voxel shift along x (:data:`SHIFT_X_VOX`; imperfect mid-sagittal alignment), an
intensity scale and offset (``TrainConfig.intensity``) and Gaussian noise inside the brain
(``TrainConfig.noise_std``).

Loss: the binary cross-entropy of p(abnormal) plus :data:`SIDE_WEIGHT` times that of the lesion side on the
lesioned samples plus :data:`POSITION_WEIGHT` times the cross-entropy of the model's per-position asymmetry logits
against the cells that hold the planted lesion (deep supervision: with it the encoder learns to see a focal
asymmetry within a few hundred steps, from the image label alone it had not after several hundred).

Training (:func:`train_symmetry_model`) runs :class:`SymmetryTrainer` on the shared loop: AdamW with a cosine decay of
the learning rate to 5 % over the epochs, batch-norm statistics re-estimated on the training scans after each
epoch, validation on a fixed simulated set (``val_draws`` lesion-free and ``val_draws`` lesioned samples of each
validation scan, volumes log-uniform over the whole range, augmented like the training samples); the weights
with the lowest validation loss are kept, early stopping only counts once the curriculum (:data:`RAMP_FRACTION`
of the epochs) has reached the full volume range, and the decision threshold on p(abnormal) is the one with the
largest Youden's J on the validation samples (:func:`bids_siamese.train.evaluate.choose_threshold`).
The training samples are assembled by the loop's DataLoader (:mod:`bids_siamese.train.batches`;
``--loader-workers``: with 0 workers from one numpy generator in order, with workers from a generator per batch)
out of the training volumes held at ``--volume-cache`` precision; ``--compile`` compiles the training forward.

The model works on its own grid, ``model_grid(resolution)`` (the participant-level resolution at the group
level); images on a finer grid are block-averaged to it (:func:`to_model_resolution`).

Evaluation (:func:`evaluate_detection`): lesions are planted in held-out scans at their own resolution, per
lesion-volume bin, and every image (plus the clean scans) is scored by any number of scorers (the Siamese
probability, the asymmetry score). Reported per bin: detection rate at the scorer's threshold, balanced
accuracy against the clean scans, AUC of lesioned versus clean scans; overall: AUC, and the false-positive
rate on the clean scans.
"""
from __future__ import annotations

import io
import logging
import time
from dataclasses import asdict
from typing import Callable, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from matplotlib import rc_context
from matplotlib.figure import Figure
from scipy import ndimage as ndi

from ..models.checkpoint import load_checkpoint, make_card, save_checkpoint
from ..preproc.grid import resample_array
from ..reports.figures import SVG_HASHSALT
from ..resources import model_grid
from ..train.batches import BatchAssembly
from ..train.data import pair_batches, stack_array, volume_cache
from ..train.ddp import DistContext, unwrap
from ..train.evaluate import choose_threshold, safe_auc
from ..train.loop import recompute_batch_norm
from ..train.trainer import TrainConfig, Trainer, TrainResult
from ..train.reproducibility import reproducibility_record
from .calibration import siamese_z
from .model import SymmetrySiamese, predict_logits, predict_proba, side_loss
from .scans import Scan, ScanStack, scan_arrays
from .simulate import VOLUME_BINS, LesionConfig, bin_label, curriculum_range, simulate_lesion

LOG = logging.getLogger("bids_siamese.symmetry")

TASK = "symmetry"

#: Fraction of the lesion-free samples that carry a mirrored pair of lesions (a symmetric abnormality).
P_BILATERAL = 0.2
#: Largest random shift of a sample along x, in voxels (imperfect mid-sagittal alignment).
SHIFT_X_VOX = 0.5
#: Weight of the lesion-side loss.
SIDE_WEIGHT = 0.2
#: Weight of the deep supervision of the position map by the simulated lesion (0 turns it off).
POSITION_WEIGHT = 1.0
#: Curriculum length as a fraction of the epochs (0: no curriculum).
RAMP_FRACTION = 0.5
#: Lesioned (and as many lesion-free) samples drawn from each training scan per epoch.
SAMPLES_PER_SCAN = 2
#: Lesioned (and as many lesion-free) samples of each validation scan.
VAL_DRAWS = 4
#: At most this many validation scans give the simulated validation samples (2 x ``val_draws`` each, 4.5 MB a
#: sample at 2 mm): a large cohort's validation loss per epoch costs a bounded time and disk.
MAX_VALIDATION_SCANS = 64
#: False-positive rate on the validation lesion-free samples that ``threshold_fp5`` allows.
FP_TARGET = 0.05


def sample_settings(lesion: LesionConfig, samples_per_scan: int, val_draws: int) -> dict:
    """The sample builder's settings, as recorded in the model card and the evaluation JSON."""
    return {"lesion": asdict(lesion), "p_bilateral": P_BILATERAL, "shift_x_vox": SHIFT_X_VOX,
            "side_weight": SIDE_WEIGHT, "position_weight": POSITION_WEIGHT, "ramp_fraction": RAMP_FRACTION,
            "samples_per_scan": int(samples_per_scan), "val_draws": int(val_draws)}


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


def augment(volume: np.ndarray, rng: np.random.Generator, config: TrainConfig) -> tuple[np.ndarray, bool]:
    """Shift along x (up to :data:`SHIFT_X_VOX`), intensity jitter and noise inside the brain (non-zero voxels),
    and an optional left-right flip.

    Returns:
        ``(volume, flipped)``.

    Examples:
        >>> v = np.ones((8, 4, 4), np.float32)
        >>> out, flipped = augment(v, np.random.default_rng(0), TrainConfig(flip_lr=True))
        >>> out.shape, out.dtype
        ((8, 4, 4), dtype('float32'))
    """
    out = np.asarray(volume, np.float32)
    if SHIFT_X_VOX > 0:
        shift = float(rng.uniform(-SHIFT_X_VOX, SHIFT_X_VOX))
        out = ndi.shift(out, (shift, 0.0, 0.0), order=1, mode="constant", cval=0.0)
    scale = 1.0 + float(rng.uniform(-config.intensity, config.intensity))
    offset = float(rng.uniform(-config.intensity, config.intensity))
    inside = out != 0
    out = np.where(inside, out * scale + offset, 0.0)
    if config.noise_std > 0:
        out = out + np.where(inside, rng.normal(0.0, config.noise_std, size=out.shape), 0.0)
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


def make_example(scan: Scan, lesioned: bool, rng: np.random.Generator, config: TrainConfig, lesion: LesionConfig,
                 volume_range: tuple[float, float], affine: np.ndarray) -> tuple[np.ndarray, float, float, np.ndarray]:
    """One sample: ``(volume, label, is_left, target)``; ``is_left`` is 0 for negatives, ``target`` the
    unilateral lesion's weights in hemisphere coordinates (:func:`hemisphere_weights`; zeros for negatives)."""
    is_left = 0.0
    half = scan.volume.shape[0] // 2
    target = np.zeros((half, *scan.volume.shape[1:]), dtype=np.float32)
    if lesioned:
        image, planted, weights = simulate_lesion(scan.volume, scan.mask, affine, rng, lesion, volume_range,
                                                  depth_mm=scan.depth_mm, return_weights=True)
        is_left = 1.0 if planted.hemisphere == "L" else 0.0
        target = hemisphere_weights(weights)
    elif rng.random() < P_BILATERAL:
        image, _ = simulate_lesion(scan.volume, scan.mask, affine, rng, lesion, volume_range, bilateral=True,
                                   depth_mm=scan.depth_mm)
    else:
        image = scan.volume
    image, flipped = augment(image, rng, config)
    if flipped and lesioned:
        is_left = 1.0 - is_left  # the hemisphere-coordinate target is the same after a flip
    return image, float(lesioned), is_left, target


def _stack(samples: Sequence[tuple]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(x, label, is_left, target)`` tensors of :func:`make_example` samples."""
    return (torch.from_numpy(np.stack([e[0] for e in samples])[:, None]), torch.tensor([e[1] for e in samples]),
            torch.tensor([e[2] for e in samples]), torch.from_numpy(np.stack([e[3] for e in samples])))


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


def validation_set(scans: Sequence[Scan], config: TrainConfig, lesion: LesionConfig, affine: np.ndarray,
                   val_draws: int = VAL_DRAWS) -> tuple[np.ndarray, torch.Tensor, torch.Tensor, np.ndarray]:
    """Fixed validation samples ``(x, label, is_left, target)`` (seed ``config.seed + 1``): from each of the first
    :data:`MAX_VALIDATION_SCANS` scans ``val_draws`` lesion-free and ``val_draws`` lesioned samples, drawn like
    training samples (same augmentation) but with lesion volumes over the whole range (no curriculum). ``x``
    ``(M, 1, X, Y, Z)`` and ``target`` are :func:`~bids_siamese.train.data.stack_array` stacks (memory-mapped when
    large), filled a sample at a time."""
    rng = np.random.default_rng(config.seed + 1)
    if len(scans) > MAX_VALIDATION_SCANS:
        LOG.info("symmetry: simulated validation samples from the first %d of %d validation scans",
                 MAX_VALIDATION_SCANS, len(scans))
    chosen = range(min(len(scans), MAX_VALIDATION_SCANS))
    kinds = [lesioned for lesioned in (False, True) for _ in range(max(1, val_draws))]
    m, shape = len(chosen) * len(kinds), tuple(np.shape(scans[0].volume)) if len(scans) else (0, 0, 0)
    x = stack_array((m, 1, *shape), np.float32)
    target = stack_array((m, shape[0] // 2, *shape[1:]), np.float32)
    labels, sides, k = [], [], 0
    for i in chosen:
        scan = scans[i]
        for lesioned in kinds:
            x[k, 0], label, side, target[k] = make_example(scan, lesioned, rng, config, lesion, lesion.volume_mm3,
                                                           affine)
            labels.append(label)
            sides.append(side)
            k += 1
    return x, torch.tensor(labels), torch.tensor(sides), target


# ----------------------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------------------


def _loss(model: SymmetrySiamese, x: torch.Tensor, y: torch.Tensor, left: torch.Tensor,
          target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(total loss, logits)``: image BCE + side BCE (lesioned samples) + position BCE (deep supervision)."""
    out = model(x, all_outputs=True)  # forward, so that a torch.compile (or DDP) wrapper runs it
    loss = F.binary_cross_entropy_with_logits(out["logit"], y) + SIDE_WEIGHT * side_loss(out["side"], y, left)
    if "positions" in out and POSITION_WEIGHT > 0:
        tgt = position_targets(target, out["positions"].shape[1:])
        loss = loss + POSITION_WEIGHT * F.binary_cross_entropy_with_logits(out["positions"], tgt)
    return loss, out["logit"]


class SymmetryTrainer(Trainer):
    """The symmetry task's hooks on the shared loop: samples with and without planted lesions drawn from the
    training volumes (held at ``volume_cache_dtype``; lesion volumes from the epoch's curriculum range), the loss
    of :func:`_loss`, a cosine decay of the learning rate to 5 % over the epochs, batch-norm statistics
    re-estimated on the training volumes, and a fixed simulated validation set (:func:`validation_set`); the score
    is the validation loss, and early stopping counts only once the curriculum has reached the full range.

    With a ``difference_channel`` model, its reference is set here from the training scans as given (float32),
    before the training set-up. Arguments: as :func:`train_symmetry_model`.
    """

    name = TASK

    def __init__(self, model: SymmetrySiamese, train_scans: Sequence[Scan] | ScanStack,
                 val_scans: Sequence[Scan] | ScanStack,
                 config: TrainConfig, resolution: float, lesion: LesionConfig = LesionConfig(),
                 samples_per_scan: int = SAMPLES_PER_SCAN, val_draws: int = VAL_DRAWS, ctx: DistContext | None = None,
                 volume_cache_dtype: str = "float32", device: torch.device | str = "cpu"):
        self.affine = np.diag([float(resolution)] * 3 + [1.0])  # only the voxel size matters to the simulator
        volumes, _ = scan_arrays(train_scans)
        if getattr(model, "difference_channel", False):  # the reference of the volumes as given (float32)
            model.set_reference(volumes if isinstance(train_scans, ScanStack) else np.stack(volumes))
        # a ScanStack's float32 stack is the float32 training stack itself: no second copy
        self.volumes = (volumes[:, None] if isinstance(train_scans, ScanStack) and volume_cache_dtype == "float32"
                        else volume_cache(volumes, volume_cache_dtype))
        self.items = [(i, lesioned) for i in range(len(train_scans)) for lesioned in (True, False)
                      for _ in range(max(1, samples_per_scan))]
        super().__init__(model, config, np.arange(len(self.items)), device, ctx)
        self.train_scans, self.lesion = train_scans, lesion
        self.patience_after = int(np.ceil(RAMP_FRACTION * config.epochs))
        self.schedule = torch.optim.lr_scheduler.CosineAnnealingLR(self.optimizer, T_max=max(1, config.epochs),
                                                                   eta_min=0.05 * config.lr)
        self.val_x, self.val_y, self.val_side, self.val_target = validation_set(val_scans, config, lesion,
                                                                                self.affine, val_draws)

    def volume_range(self, epoch: int) -> tuple[float, float]:
        """The lesion volumes of the 1-based ``epoch``'s curriculum."""
        return curriculum_range(epoch - 1, self.config.epochs, self.lesion.volume_mm3, RAMP_FRACTION)

    def on_epoch_start(self, epoch: int) -> dict[str, float]:
        if epoch > 1:
            self.schedule.step()  # cosine decay per epoch
        vrange = self.volume_range(epoch)
        return {"volume_min_mm3": round(vrange[0], 1), "volume_max_mm3": round(vrange[1], 1)}

    def batches(self, rng: np.random.Generator) -> list[np.ndarray]:
        return pair_batches(len(self.items), self.config.batch_size, rng)

    def assembly(self) -> BatchAssembly:
        # 0 loader workers: one numpy generator (seed ``config.seed``) drawn batch after batch; with workers:
        # batch k of epoch e draws from default_rng(batch_seed(seed, rank, e, k))
        return BatchAssembly(self.assemble, np.random.default_rng(self.config.seed), self.device,
                             seeded=np.random.default_rng)

    def assemble(self, idx: np.ndarray, rng: np.random.Generator, epoch: int) -> tuple[torch.Tensor, ...]:
        """The samples of a batch (lesion simulation and augmentation on numpy: a loader worker's job)."""
        samples = []
        for j in idx:
            scan = self.train_scans[self.items[j][0]]
            training = Scan(self.volumes[self.items[j][0], 0], scan.mask, scan.depth_mm, scan.key)
            samples.append(make_example(training, self.items[j][1], rng, self.config, self.lesion,
                                        self.volume_range(epoch), self.affine))
        return _stack(samples)

    def train_step(self, batch: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, dict[str, float]]:
        with self.autocast():  # bf16 (else fp16 with the scaler) on CUDA, as the other tasks
            return _loss(self.net, *batch)[0], {}

    def on_train_epoch_end(self) -> None:
        recompute_batch_norm(self.net, self.volumes, np.arange(len(self.volumes)), self.device,
                             self.config.batch_size, forward=unwrap(self.net))

    @torch.no_grad()
    def validation_step(self) -> dict[str, float]:
        self.net.eval()
        losses, scores = [], []
        size, val_y = self.config.eval_batch_size, self.val_y
        for b in range(0, len(val_y), size):
            sl = slice(b, b + size)
            batch = (torch.from_numpy(np.asarray(self.val_x[sl])), val_y[sl], self.val_side[sl],
                     torch.from_numpy(np.asarray(self.val_target[sl])))
            loss, logit = _loss(unwrap(self.net), *(t.to(self.device) for t in batch))
            losses.append(float(loss) * len(val_y[sl]))
            scores.append(torch.sigmoid(logit.float()).cpu())
        return {"val_loss": sum(losses) / len(val_y), "val_auc": safe_auc(val_y.numpy(), torch.cat(scores).numpy())}

    def score(self, train_loss: float, val: dict[str, float]) -> tuple[float, float]:
        return val["val_loss"], 0.0


def train_symmetry_model(
    model: SymmetrySiamese,
    train_scans: Sequence[Scan] | ScanStack,
    val_scans: Sequence[Scan] | ScanStack,
    config: TrainConfig,
    resolution: float,
    lesion: LesionConfig = LesionConfig(),
    samples_per_scan: int = SAMPLES_PER_SCAN,
    val_draws: int = VAL_DRAWS,
    ctx: DistContext | None = None,
    volume_cache_dtype: str = "float32",
    device: torch.device | str = "cpu",
) -> tuple[TrainResult, dict]:
    """Train the Siamese symmetry model on lesion-free scans (on its grid) with simulated lesions, in the shared
    training loop; keep the best validation epoch.

    Args:
        model: a fresh :class:`SymmetrySiamese` (with ``difference_channel`` its reference is set here from the
            training scans).
        train_scans: training scans (:func:`~bids_siamese.symmetry.scans.prepare_scan` on ``model_grid(resolution)``;
            a list, or a :class:`~bids_siamese.symmetry.scans.ScanStack`: memory-mapped, the same results).
        val_scans: validation scans (at least one).
        config: the shared training settings (:func:`~bids_siamese.train.trainer.train_config`).
        resolution: the model grid resolution (mm).
        lesion: lesion distribution.
        samples_per_scan: lesioned (and as many lesion-free) samples per training scan and epoch.
        val_draws: lesioned (and as many lesion-free) validation samples per validation scan.
        ctx: distributed context (None: single process).
        volume_cache_dtype: the precision at which the trainer holds the training volumes the samples are drawn
            from (``--volume-cache``: ``float16`` halves that copy; :func:`~bids_siamese.train.data.volume_cache`);
            the reference of the difference channel and the validation samples come from the scans as given.
        device: where the model trains (``--device``; the samples are built on the CPU and copied, in pinned
            memory on CUDA); the returned model stays there.

    Returns:
        ``(result, info)``: :class:`~bids_siamese.train.loop.TrainResult` (the model with the best validation
        weights, in eval mode, and its history: ``epoch, volume_min_mm3, volume_max_mm3, train_loss, val_loss,
        val_auc, seconds, volumes_per_second``); ``info`` holds ``best_epoch``, ``best_val_loss``,
        ``best_val_auc``, ``threshold`` (the probability with the largest Youden's J on the validation samples:
        the network is trained on balanced simulated data, so 0.5 is not a calibrated cut-off),
        ``stopped_early``, ``epochs_run``, ``seconds``, ``volume_cache`` and ``samples`` (:func:`sample_settings`).

    Examples:
        >>> from bids_siamese.symmetry.model import build_symmetry_model
        >>> from bids_siamese.symmetry.scans import prepare_scan
        >>> m = np.zeros((20, 40, 40), bool); m[3:17, 6:34, 6:34] = True
        >>> rng = np.random.default_rng(0)
        >>> scans = [prepare_scan(np.where(m, rng.normal(size=m.shape), 0), m, 4.0) for _ in range(3)]
        >>> cfg = TrainConfig(epochs=1, batch_size=2, flip_lr=True)
        >>> result, info = train_symmetry_model(build_symmetry_model("small"), scans[:2], scans[2:], cfg, 4.0,
        ...                                     LesionConfig(volume_mm3=(500.0, 2000.0)), val_draws=1)
        >>> list(result.history.columns)[:3], info["best_epoch"]
        (['epoch', 'volume_min_mm3', 'volume_max_mm3'], 1)
    """
    if not train_scans or not val_scans:
        raise ValueError("need at least one training and one validation scan")
    trainer = SymmetryTrainer(model, train_scans, val_scans, config, resolution, lesion, samples_per_scan,
                              val_draws, ctx, volume_cache_dtype, device)
    start = time.time()
    result = trainer.fit()
    val_x, val_y = trainer.val_x, trainer.val_y
    chunk = config.eval_batch_size * max(1, 64 // config.eval_batch_size)  # whole batches: the same as at once
    p_val = torch.cat([predict_proba(result.model, torch.from_numpy(np.asarray(val_x[b:b + chunk])),
                                     batch_size=config.eval_batch_size)[0] for b in range(0, len(val_x), chunk)])
    threshold = choose_threshold(val_y.numpy(), p_val.numpy()) if 0 < float(val_y.sum()) < len(val_y) else 0.5
    negatives = p_val.numpy()[val_y.numpy() < 0.5]
    # the alternative decision point for a screen: at most FP_TARGET of the validation lesion-free samples above it
    threshold_fp = float(np.quantile(negatives, 1.0 - FP_TARGET)) if negatives.size else float("nan")
    # ... and the same on the validation scans themselves, unaugmented and without a lesion, scored as any scan is
    p_clean, _ = siamese_predict(result.model, *scan_arrays(val_scans), resolution, resolution,
                                 config.eval_batch_size)
    threshold_clean = float(np.quantile(p_clean, 1.0 - FP_TARGET)) if p_clean.size else float("nan")
    best = result.history.loc[result.history["epoch"] == result.best_epoch].iloc[0]
    info = {"best_epoch": int(result.best_epoch), "best_val_loss": float(best["val_loss"]),
            "best_val_auc": float(best["val_auc"]), "threshold": float(threshold),
            "threshold_fp5": threshold_fp, "threshold_clean_fp5": threshold_clean,
            "stopped_early": len(result.history) < config.epochs, "epochs_run": len(result.history),
            "seconds": round(time.time() - start, 1), "volume_cache": volume_cache_dtype,
            "samples": sample_settings(lesion, samples_per_scan, val_draws)}
    return result, info


def siamese_logits(model: SymmetrySiamese, volumes: Sequence[np.ndarray], masks: Sequence[np.ndarray],
                   in_resolution: float, model_resolution: float,
                   batch_size: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """``(logit, side_logit)`` (float64) of images on ``model_grid(in_resolution)`` (brought to the model's grid)."""
    logit_all, side_all = [], []
    for start in range(0, len(volumes), batch_size):
        small = [to_model_resolution(v, m, in_resolution, model_resolution)[0]
                 for v, m in zip(volumes[start:start + batch_size], masks[start:start + batch_size])]
        logit, side = predict_logits(model, torch.from_numpy(np.stack(small)), batch_size=batch_size)
        logit_all.append(logit.numpy())
        side_all.append(side.numpy())
    if not logit_all:
        return np.zeros(0), np.zeros(0)
    return np.concatenate(logit_all).astype(float), np.concatenate(side_all).astype(float)


def siamese_predict(model: SymmetrySiamese, volumes: Sequence[np.ndarray], masks: Sequence[np.ndarray],
                    in_resolution: float, model_resolution: float, batch_size: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """``(p_abnormal, p_left)`` of images on ``model_grid(in_resolution)`` (brought to the model's grid)."""
    logit, side = siamese_logits(model, volumes, masks, in_resolution, model_resolution, batch_size)
    return 1.0 / (1.0 + np.exp(-logit)), 1.0 / (1.0 + np.exp(-side))


def siamese_scorers(model: SymmetrySiamese, in_resolution: float, model_resolution: float,
                    reference: Mapping | None = None, batch_size: int = 8) -> dict[str, Callable]:
    """Scorers ``f(volumes, masks) -> scores`` for images on ``model_grid(in_resolution)``, for
    :func:`evaluate_detection`: ``siamese_probability`` and, given the reference statistics of
    :func:`~bids_siamese.symmetry.calibration.reference_statistics` (with a median), ``siamese_z``. Both come
    from one forward pass: :func:`evaluate_detection` hands every scorer the same list of images in turn, and the
    logits of the last list are kept."""
    last: dict = {}

    def logits(volumes: Sequence[np.ndarray], masks: Sequence[np.ndarray]) -> np.ndarray:
        if last.get("volumes") is not volumes:
            last["volumes"] = volumes
            last["logits"] = siamese_logits(model, volumes, masks, in_resolution, model_resolution, batch_size)[0]
        return last["logits"]

    scorers = {"siamese_probability": lambda volumes, masks: 1.0 / (1.0 + np.exp(-logits(volumes, masks)))}
    if reference is not None and np.isfinite(reference["median_logit"]):
        scorers["siamese_z"] = lambda volumes, masks: siamese_z(logits(volumes, masks), reference)
    return scorers


def siamese_scorer(model: SymmetrySiamese, in_resolution: float, model_resolution: float,
                   batch_size: int = 8) -> Callable[[Sequence[np.ndarray], Sequence[np.ndarray]], np.ndarray]:
    """A scorer ``f(volumes, masks) -> p(abnormal)`` for images on ``model_grid(in_resolution)``."""
    return siamese_scorers(model, in_resolution, model_resolution, batch_size=batch_size)["siamese_probability"]


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
                "auc": round(safe_auc(both["label"], both[name]), 4),
            })
        overall.append({"scorer": name, "threshold": thr,
                        "auc": round(safe_auc(samples["label"], samples[name]), 4),
                        "false_positive_rate": round(fpr, 4), "n_clean": len(clean),
                        "n_lesion": int((samples["label"] == 1).sum())})
    return pd.DataFrame(rows), pd.DataFrame(overall)


def detection_figure(per_bin: pd.DataFrame, title: str = "Lesion detection by volume") -> str:
    """An SVG of detection rate (solid) and AUC (dashed) against lesion volume, one colour per scorer, with
    the sphere-equivalent cross-section (mm^2) on a second axis, like the neonatal study's curve."""
    fig = Figure(figsize=(6.4, 4.0), dpi=100)  # no pyplot: no global figure state, no GUI backend
    ax = fig.add_subplot()
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
    with rc_context({"svg.hashsalt": SVG_HASHSALT}):  # the same bytes run after run: no date, fixed ids
        fig.savefig(buffer, format="svg", metadata={"Date": None})
    return buffer.getvalue()


# ----------------------------------------------------------------------------------------------------------
# Checkpoints (bids_siamese.models.checkpoint, task "symmetry")
# ----------------------------------------------------------------------------------------------------------


def hyperparameters(model: SymmetrySiamese, config: TrainConfig, resolution: float,
                    samples: Mapping | None = None) -> dict:
    """Everything a trained symmetry model depends on: the shared training settings, the model's build and the
    sample builder's settings (model card and evaluation JSON)."""
    return {**asdict(config), "backbone": model.backbone_name, "fusion": model.fusion,
            "embedding_dim": model.embedding_dim, "difference_channel": bool(model.difference_channel),
            "reference": bool(model.reference_mean.numel()), "resolution": float(resolution), **dict(samples or {})}


def save_symmetry_checkpoint(folder, model: SymmetrySiamese, config: TrainConfig, resolution: float,
                             training_data: Mapping, metrics: Mapping, threshold: float = 0.5,
                             samples: Mapping | None = None, device: str = "cpu", init: Mapping | None = None) -> list:
    """Write ``model.pt``, ``model.pt.sha256`` and ``model_card.json`` for a trained symmetry model.

    Args:
        folder: checkpoint folder (``OUTPUT_DIR/models/symmetry_<backbone>/``).
        model: the trained model.
        config: its training settings (stored as the card's hyper-parameters, with the model's and the samples').
        resolution: the model grid resolution (mm).
        training_data: ``fingerprint`` and counts of the scans used.
        metrics: validation/test metrics.
        threshold: decision threshold on p(abnormal).
        samples: the sample builder's settings (:func:`sample_settings`).
        device: the device it was trained on (the card's ``reproducibility``).
        init: the pretrained encoder it started from (``--init``; the card's ``init``), None: none.

    Returns:
        The paths written.
    """
    hyper = hyperparameters(model, config, resolution, samples)
    card = make_card(
        task=TASK, backbone=model.backbone_name, embedding_dim=model.embedding_dim, grid=model_grid(resolution),
        seed=config.seed, training_data=training_data,
        decision={"threshold": float(threshold), "output": "p_abnormal = sigmoid(logit); p_left = sigmoid(side_logit)",
                  "calibration": "none (probabilities of a model trained on balanced simulated data)"},
        metrics=metrics, hyperparameters=hyper, reproducibility=reproducibility_record(device),
    )
    card["input"]["left_right_flip_augmentation"] = bool(config.flip_lr)
    card["input"]["resampling"] = ("finer participant-level grids are block-averaged to the model grid "
                                   "(bids_siamese.symmetry.train.to_model_resolution)")
    card.update({"init": dict(init)} if init is not None else {})
    return save_checkpoint(folder, model, card)


def load_symmetry_model(path) -> tuple[SymmetrySiamese, dict]:
    """The symmetry model of a checkpoint (folder, ``model.pt`` or ``model_card.json``), in eval mode
    (:func:`bids_siamese.models.checkpoint.load_checkpoint` with task ``symmetry``).

    Raises:
        UsageError: the checkpoint is for another task.
        NoInputError, BadDataError: missing or corrupt checkpoint files.
    """
    return load_checkpoint(path, TASK)  # type: ignore[return-value]


def model_resolution(card: Mapping) -> float:
    """The model grid resolution recorded in a card.

    Examples:
        >>> model_resolution({"grid": {"resolution": 4.0}})
        4.0
    """
    return float(card["grid"]["resolution"])
