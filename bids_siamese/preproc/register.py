"""Affine registration of a subject brain to the MNI152NLin2009cAsym brain, and ITK transform files.

Direction conventions (read this before using the matrices)
-----------------------------------------------------------
* :func:`register_affine` returns ``template_to_subject``: a 4x4 matrix mapping a point in template
  space (MNI152NLin2009cAsym, RAS mm) to the corresponding point in the subject's world space (the
  T1w image's RAS mm, i.e. ``t1w_img.affine @ ijk``). This is the *resampling* (pull-back) direction:
  to build a template-space image, each template-grid point ``x`` is looked up in the subject image
  at ``template_to_subject @ x`` (see :func:`bids_siamese.preproc.grid.resample_to_grid`).
* :func:`write_itk_affine` stores that same mapping as fMRIPrep/ANTs do for
  ``from-T1w_to-MNI152NLin2009cAsym_mode-image_xfm.txt``: an ITK ``AffineTransform_double_3_3`` that
  maps *fixed* (MNI) physical points to *moving* (T1w) physical points, in ITK's LPS convention
  (``lps = diag(-1, -1, 1) @ ras``). ``antsApplyTransforms -r MNI.nii.gz -i T1w.nii.gz -t xfm.txt``
  and ``nitransforms.linear.load(xfm, fmt="itk").matrix`` (RAS, reference -> moving) both read it in
  this sense, so ``nitransforms.linear.load(path, fmt="itk").matrix == template_to_subject``.
* The subject-to-template direction (mapping T1w points into MNI, e.g. for coordinates or
  landmarks) is ``numpy.linalg.inv(template_to_subject)``.

Engine
------
A small world-coordinate affine registration written on torch (``grid_sample``), chosen over
``torchreg.AffineRegistration`` and ANTs after the measurements in ``docs/benchmarks.md``. It is
parametrised as

    x_subject = c_subject + t + R(w) @ diag(s0 * exp(l)) @ H(h) @ (x_template - c_template)

with ``R(w) = expm(skew(w))`` a proper rotation, positive scales and a unit upper-triangular shear,
so its determinant is always > 0: **it cannot produce a reflection**, and a left-right flipped scan
stays flipped in template space (the image-based orientation check relies on this). Initialisation
aligns the brain-mask centres of mass, scales by the cube root of the brain volume ratio and tries
the identity and the principal-axes rotations; then Adam minimises ``1 - Pearson correlation``
between the template brain and the subject brain over a pyramid (8 mm, 4 mm, ``resolution`` mm),
sampling a seeded random subset of template voxels at each level. On CPU it is deterministic for a
given ``seed`` and ``n_threads``. ``dof`` restricts the model to 9 (no shear), 7 (one isotropic
scale) or 6 (rigid) parameters; the left-right orientation check needs a shear-free (``dof=9``)
registration (see :mod:`bids_siamese.qc.orientation`). Use ``n_threads=1``: the tensors are small
(at most :data:`MAX_POINTS` samples), so more threads gain little and stall badly on a busy machine.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from functools import lru_cache, reduce
from pathlib import Path

import h5py
import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from ..resources import ITK_AFFINE_TYPES, LPS_FROM_RAS, itk_affine_to_ras, read_itk_affine
from .brain import torch_threads

@dataclass(frozen=True)
class Level:
    """One pyramid level: images are box-averaged to ``spacing_mm`` and Adam runs ``iterations``."""

    spacing_mm: float
    iterations: int
    learning_rate: float


#: Pyramid used by :func:`register_affine`: the levels coarser than ``resolution``, then a last level
#: at ``resolution`` with the last entry's iterations (8, 4, 2 mm for the model grid at 2 mm).
LEVELS: tuple[Level, ...] = (Level(8.0, 120, 0.03), Level(4.0, 80, 0.01), Level(2.0, 40, 0.004))

#: Iterations spent on each initial rotation candidate (coarsest level) before keeping the best.
CANDIDATE_ITERATIONS = 40

#: Rotation candidates refined at the coarsest level: the identity (the header is usually roughly
#: right) plus this many of the best-scoring principal-axes rotations.
N_PRINCIPAL_CANDIDATES = 2

#: Adam steps per pyramid level (the coarsest skipped) when :func:`register_affine` starts from an estimate.
WARM_ITERATIONS = 20

#: At most this many template voxels (a seeded random subset) enter the similarity at each level.
MAX_POINTS = 60_000

#: Template voxels within this distance (mm) of the template brain take part in the similarity.
MASK_MARGIN_MM = 12.0

#: Translation parameters are optimised in units of this many mm (to balance them with radians).
TRANSLATION_UNIT_MM = 20.0


# --------------------------------------------------------------------------------------------------
# Image pyramid
# --------------------------------------------------------------------------------------------------

def _box_downsample(data: np.ndarray, affine: np.ndarray, spacing_mm: float) -> tuple[np.ndarray, np.ndarray]:
    """Average ``data`` over blocks of about ``spacing_mm``; returns the array and its new affine."""
    voxel = np.linalg.norm(affine[:3, :3], axis=0)
    kernel = tuple(int(max(1, round(spacing_mm / v))) for v in voxel)
    if kernel == (1, 1, 1):
        return data.astype(np.float32, copy=False), affine.copy()
    tensor = torch.from_numpy(np.ascontiguousarray(data, dtype=np.float32))[None, None]
    pooled = F.avg_pool3d(tensor, kernel_size=kernel, stride=kernel)[0, 0].numpy()
    step = np.diag([*kernel, 1]).astype(np.float64)
    step[:3, 3] = (np.asarray(kernel) - 1) / 2.0
    return pooled, affine @ step


def centre_and_cov(mask: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """World centre of mass, covariance (mm^2) and volume (mm^3) of a boolean mask.

    Computed from the mask's 1D and 2D marginal sums (no per-voxel coordinate arrays).
    """
    mask = np.asarray(mask, dtype=bool)
    count = int(np.count_nonzero(mask))
    pair_sums = {(0, 1): mask.sum(axis=2, dtype=np.int64), (0, 2): mask.sum(axis=1, dtype=np.int64),
                 (1, 2): mask.sum(axis=0, dtype=np.int64)}
    index = [np.arange(n, dtype=np.float64) for n in mask.shape]
    marginals = [
        pair_sums[(0, 1)].sum(axis=1),
        pair_sums[(0, 1)].sum(axis=0),
        pair_sums[(0, 2)].sum(axis=0),
    ]
    mean = np.array([index[a] @ marginals[a] for a in range(3)]) / count
    second = np.empty((3, 3))
    for a in range(3):
        second[a, a] = (index[a] ** 2) @ marginals[a] / count
    for (a, b), table in pair_sums.items():
        second[a, b] = second[b, a] = index[a] @ table @ index[b] / count
    cov_voxel = second - np.outer(mean, mean)
    linear = affine[:3, :3]
    centre = linear @ mean + affine[:3, 3]
    cov = linear @ cov_voxel @ linear.T
    volume = float(count * abs(np.linalg.det(linear)))
    return centre, cov, volume


def _signed_permutations() -> list[np.ndarray]:
    """The 24 proper rotations that map coordinate axes onto coordinate axes."""
    out = []
    for perm in ((0, 1, 2), (0, 2, 1), (1, 0, 2), (1, 2, 0), (2, 0, 1), (2, 1, 0)):
        for signs in np.ndindex(2, 2, 2):
            p = np.zeros((3, 3))
            p[np.arange(3), perm] = [1 - 2 * s for s in signs]
            if np.linalg.det(p) > 0:
                out.append(p)
    return out


def _principal_rotations(cov_fixed: np.ndarray, cov_moving: np.ndarray) -> list[np.ndarray]:
    """Proper rotations taking the template's principal axes onto the subject's principal axes.

    All 24 axis assignments are returned (brains are close enough to spherical that the order of
    the principal axes is not reliable); the caller ranks them by similarity.
    """
    _, v_fixed = np.linalg.eigh(cov_fixed)
    _, v_moving = np.linalg.eigh(cov_moving)
    if np.linalg.det(v_fixed) < 0:
        v_fixed[:, 0] *= -1
    if np.linalg.det(v_moving) < 0:
        v_moving[:, 0] *= -1
    return [v_moving @ p @ v_fixed.T for p in _signed_permutations()]


def _rotation_to_vector(r: np.ndarray) -> np.ndarray:
    """Axis-angle vector ``w`` with ``expm(skew(w)) == r`` for a proper rotation ``r``."""
    cos = np.clip((np.trace(r) - 1.0) / 2.0, -1.0, 1.0)
    angle = math.acos(cos)
    if angle < 1e-8:
        return np.zeros(3)
    if math.pi - angle < 1e-6:
        # 180 degrees: the axis is the eigenvector of r with eigenvalue 1
        values, vectors = np.linalg.eigh((r + r.T) / 2.0)
        return angle * vectors[:, int(np.argmax(values))]
    axis = np.array([r[2, 1] - r[1, 2], r[0, 2] - r[2, 0], r[1, 0] - r[0, 1]]) / (2.0 * math.sin(angle))
    return angle * axis


# --------------------------------------------------------------------------------------------------
# Transform model
# --------------------------------------------------------------------------------------------------

def _skew(w: torch.Tensor) -> torch.Tensor:
    zero = torch.zeros((), dtype=w.dtype, device=w.device)
    return torch.stack(
        [
            torch.stack([zero, -w[2], w[1]]),
            torch.stack([w[2], zero, -w[0]]),
            torch.stack([-w[1], w[0], zero]),
        ]
    )


def _linear_part(params: torch.Tensor, log_scale0: float) -> torch.Tensor:
    """``R(w) @ diag(s0 * exp(l)) @ H(h)`` from ``params = [t(3), w(3), l(3), h(3)]``; det > 0."""
    rotation = torch.linalg.matrix_exp(_skew(params[3:6]))
    scale = torch.diag(torch.exp(params[6:9] + log_scale0))
    one = torch.ones((), dtype=params.dtype, device=params.device)
    zero = torch.zeros((), dtype=params.dtype, device=params.device)
    shear = torch.stack(
        [
            torch.stack([one, params[9], params[10]]),
            torch.stack([zero, one, params[11]]),
            torch.stack([zero, zero, one]),
        ]
    )
    return rotation @ scale @ shear


def _template_to_subject(
    params: torch.Tensor, centre_fixed: torch.Tensor, centre_moving: torch.Tensor, log_scale0: float
) -> torch.Tensor:
    """The 4x4 template->subject world matrix for the parameter vector (differentiable)."""
    linear = _linear_part(params, log_scale0)
    translation = centre_moving + TRANSLATION_UNIT_MM * params[:3] - linear @ centre_fixed
    top = torch.cat([linear, translation[:, None]], dim=1)
    bottom = torch.tensor([[0.0, 0.0, 0.0, 1.0]], dtype=params.dtype, device=params.device)
    return torch.cat([top, bottom], dim=0)


# --------------------------------------------------------------------------------------------------
# Similarity on one level
# --------------------------------------------------------------------------------------------------

@dataclass
class _LevelData:
    """Pre-computed tensors for one pyramid level."""

    points: torch.Tensor  # (4, N) homogeneous template world points (float64)
    fixed_values: torch.Tensor  # (N,) template intensities at the points, standardised
    moving: torch.Tensor  # (1, 1, D, H, W) subject brain at this level
    world_to_grid: torch.Tensor  # (4, 4) subject world mm -> grid_sample coordinates (x=W, y=H, z=D)


def _world_to_grid(affine: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Matrix from world mm to ``grid_sample`` normalised coordinates (align_corners=True)."""
    to_norm = np.zeros((4, 4))
    for out_axis, array_axis in enumerate((2, 1, 0)):  # grid_sample's x indexes the last array axis
        n = shape[array_axis]
        to_norm[out_axis, array_axis] = 2.0 / max(n - 1, 1)
        to_norm[out_axis, 3] = -1.0
    to_norm[3, 3] = 1.0
    return to_norm @ np.linalg.inv(affine)


@dataclass(frozen=True)
class _FixedData:
    """The template side of a registration: brain-mask moments and the sample points of each level."""

    centre: np.ndarray
    cov: np.ndarray
    volume: float
    levels: tuple[tuple[np.ndarray, np.ndarray], ...]  # per level: (4, N) world points, (N,) standardised values


def _fixed_level(fixed: np.ndarray, fixed_affine: np.ndarray, fixed_mask: np.ndarray, spacing_mm: float,
                 rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Downsample the template brain to ``spacing_mm`` and pick its sample points (``fixed_mask``: float32 0/1)."""
    fixed_small, fixed_small_aff = _box_downsample(fixed, fixed_affine, spacing_mm)
    mask_small, _ = _box_downsample(fixed_mask, fixed_affine, spacing_mm)
    voxel = float(np.mean(np.linalg.norm(fixed_small_aff[:3, :3], axis=0)))
    margin = max(1, int(round(MASK_MARGIN_MM / voxel)))
    region = ndimage.binary_dilation(mask_small > 0.5, iterations=margin)
    ijk = np.argwhere(region)
    if len(ijk) > MAX_POINTS:
        ijk = ijk[np.sort(rng.choice(len(ijk), size=MAX_POINTS, replace=False))]
    values = fixed_small[tuple(ijk.T)].astype(np.float64)
    values = (values - values.mean()) / (values.std() + 1e-12)
    points = np.c_[ijk.astype(np.float64), np.ones(len(ijk))] @ fixed_small_aff.T
    return np.ascontiguousarray(points.T), values.astype(np.float32)


def _fixed_data(fixed_img: nib.spatialimages.SpatialImage, fixed_mask: np.ndarray | None, levels: list[Level],
                seed: int) -> _FixedData:
    """Everything :func:`register_affine` needs from the template (its mask: ``fixed > 0`` when None)."""
    fixed = fixed_img.get_fdata(dtype=np.float32)
    fixed_affine = np.asarray(fixed_img.affine, dtype=np.float64)
    mask = fixed > 0 if fixed_mask is None else np.asarray(fixed_mask, dtype=bool)
    centre, cov, volume = centre_and_cov(mask, fixed_affine)
    rng = np.random.default_rng(seed)
    mask_f32 = mask.astype(np.float32)
    data = tuple(_fixed_level(fixed, fixed_affine, mask_f32, lv.spacing_mm, rng) for lv in levels)
    for points, values in data:
        points.flags.writeable = False
        values.flags.writeable = False
    return _FixedData(centre, cov, volume, data)


@lru_cache(maxsize=8)
def _fixed_data_cached(path: str, mtime_ns: int, levels: tuple[Level, ...], seed: int) -> _FixedData:
    """:func:`_fixed_data` of a template file, once per process (MultiProc workers are reused across nodes)."""
    return _fixed_data(nib.load(path), None, list(levels), seed)


def template_side(fixed_img: nib.spatialimages.SpatialImage, fixed_mask: np.ndarray | None, levels: list[Level],
                  seed: int) -> _FixedData:
    """The template side of :func:`register_affine` (mask moments, each level's sample points and values).

    Cached once per process when ``fixed_img`` was loaded from a file and no mask is given (the workflow warms
    this cache before its workers fork), else computed.
    """
    filename = fixed_img.get_filename() if hasattr(fixed_img, "get_filename") else None
    if fixed_mask is None and filename and os.path.isfile(filename) and isinstance(fixed_img.dataobj,
                                                                                   nib.arrayproxy.ArrayProxy):
        return _fixed_data_cached(str(filename), os.stat(filename).st_mtime_ns, tuple(levels), int(seed))
    return _fixed_data(fixed_img, fixed_mask, levels, seed)


def _kernel(affine: np.ndarray, spacing_mm: float) -> tuple[int, ...]:
    """Box-averaging kernel (voxels per axis) of :func:`_box_downsample` for ``spacing_mm``."""
    voxel = np.linalg.norm(affine[:3, :3], axis=0)
    return tuple(int(max(1, round(spacing_mm / v))) for v in voxel)


def crop_to_mask(data: np.ndarray, mask: np.ndarray, affine: np.ndarray, spacings_mm: list[float]
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The masked image cut to the mask's bounding box, so registration cost follows the brain, not the scan's
    field of view; returns ``(data, mask, affine)`` of the box.

    The box starts at the mask's first voxel on each axis and spans a whole number of every pyramid level's
    box-averaging kernel, so the averaging blocks are anchored to the brain rather than to the image's first
    voxel: padding or cutting the field of view around the brain changes neither the downsampled images nor
    the registration result (only a brain touching the image's far edge loses its last partial block).
    """
    data = np.where(mask, data, np.float32(0)).astype(np.float32, copy=False)
    hits = [np.flatnonzero(np.any(mask, axis=tuple(a for a in range(3) if a != axis))) for axis in range(3)]
    period = [reduce(math.lcm, (_kernel(affine, s)[axis] for s in spacings_mm), 1) for axis in range(3)]
    start = [int(h[0]) for h in hits]
    stop = [min(n, s + -(-(int(h[-1]) + 1 - s) // p) * p) for n, h, s, p in zip(data.shape, hits, start, period)]
    box = tuple(slice(a, b) for a, b in zip(start, stop))
    shift = np.eye(4)
    shift[:3, 3] = start
    return np.ascontiguousarray(data[box]), np.ascontiguousarray(mask[box]), np.asarray(affine) @ shift


def _moving_level(moving: np.ndarray, moving_affine: np.ndarray, spacing_mm: float) -> tuple[torch.Tensor,
                                                                                              torch.Tensor]:
    """The subject brain at ``spacing_mm`` as a ``grid_sample`` input, and its world -> grid matrix."""
    moving_small, moving_small_aff = _box_downsample(moving, moving_affine, spacing_mm)
    return (torch.from_numpy(np.ascontiguousarray(moving_small, dtype=np.float32))[None, None],
            torch.from_numpy(_world_to_grid(moving_small_aff, moving_small.shape)))


def _loss(level: _LevelData, matrix: torch.Tensor) -> torch.Tensor:
    """``1 - Pearson correlation`` between template values and the subject brain sampled at ``matrix``."""
    coords = (level.world_to_grid @ matrix @ level.points)[:3].T.to(torch.float32)
    sampled = F.grid_sample(
        level.moving, coords[None, None, None], mode="bilinear", padding_mode="zeros", align_corners=True
    ).reshape(-1)
    centred = sampled - sampled.mean()
    corr = (centred * level.fixed_values).mean() / (centred.pow(2).mean().sqrt() + 1e-6)
    return 1.0 - corr


#: Degrees of freedom :func:`register_affine` accepts: rigid, rigid + isotropic scale, rigid +
#: anisotropic scale, full affine (rigid + scales + shears).
DOF_CHOICES = (6, 7, 9, 12)


def _project_gradient(grad: torch.Tensor, dof: int) -> torch.Tensor:
    """Zero the gradient of the parameters that ``dof`` keeps fixed.

    Parameters are ``[t(3), w(3), l(3), h(3)]``: 6 dof frees ``t, w``; 7 adds one isotropic scale
    (the three log-scales share the summed gradient, so they stay equal); 9 frees the three
    log-scales; 12 frees the shears too.
    """
    if dof == 12:
        return grad
    grad = grad.clone()
    grad[9:12] = 0.0
    if dof == 7:
        grad[6:9] = grad[6:9].sum()
    elif dof == 6:
        grad[6:9] = 0.0
    return grad


def _optimise(
    level: _LevelData,
    params: torch.Tensor,
    centres: tuple[torch.Tensor, torch.Tensor],
    log_scale0: float,
    iterations: int,
    learning_rate: float,
    dof: int = 12,
) -> tuple[torch.Tensor, float]:
    """Adam on ``params`` for one level; returns the best parameters seen and their loss.

    ``dof`` restricts the free parameters (see :func:`_project_gradient`).

    Adam is written out (12 parameters) rather than taken from ``torch.optim``, whose first step
    costs about a second of imports in a fresh process.
    """
    beta1, beta2, eps = 0.9, 0.999, 1e-8
    params = params.detach().clone()
    first, second = torch.zeros_like(params), torch.zeros_like(params)
    best_loss, best = math.inf, params.clone()
    for step in range(1, iterations + 1):
        current = params.clone().requires_grad_(True)
        loss = _loss(level, _template_to_subject(current, *centres, log_scale0))
        (grad,) = torch.autograd.grad(loss, current)
        grad = _project_gradient(grad, dof)
        value = float(loss.detach())
        if value < best_loss:
            best_loss, best = value, params.clone()
        first.mul_(beta1).add_(grad, alpha=1 - beta1)
        second.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        step_size = learning_rate * math.sqrt(1 - beta2**step) / (1 - beta1**step)
        params = params - step_size * first / (second.sqrt() + eps)
    with torch.no_grad():
        final = float(_loss(level, _template_to_subject(params, *centres, log_scale0)))
    if final < best_loss:
        best_loss, best = final, params.clone()
    return best, best_loss


# --------------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------------

def register_affine(
    moving_img: nib.spatialimages.SpatialImage,
    moving_mask: np.ndarray,
    fixed_img: nib.spatialimages.SpatialImage,
    resolution: float = 2.0,
    seed: int = 0,
    device: str = "cpu",
    n_threads: int | None = 1,
    fixed_mask: np.ndarray | None = None,
    dof: int = 12,
    initial: np.ndarray | None = None,
) -> np.ndarray:
    """Affine (12-dof, no reflection) registration of a subject brain to a template brain.

    Args:
        moving_img: the subject's brain (skull-stripped T1w; any voxel orientation).
        moving_mask: boolean brain mask on ``moving_img``'s voxel grid.
        fixed_img: the template brain (``template_brain_path()``, MNI152NLin2009cAsym).
        resolution: finest pyramid spacing in mm (the model grid resolution, e.g. 2).
        seed: seeds the random subset of template voxels used at each level.
        device: torch device; CPU results are deterministic for a given ``seed`` and ``n_threads``.
        n_threads: torch CPU threads for this call (restored afterwards; ``None``: unchanged).
        fixed_mask: template brain mask (default: ``fixed_img > 0``).
        dof: 12 (affine, the default), 9 (no shear), 7 (rigid + isotropic scale) or 6 (rigid).
        initial: a template_to_subject estimate to start from (e.g. the mirror of a registration already
            made, :func:`bids_siamese.qc.orientation.mirrored_matrix`): the rotation search is skipped and
            the pyramid runs :func:`warm_schedule` (a start within a few millimetres and degrees). Its 3x3 part
            must have a positive determinant; parameters ``dof`` keeps fixed are dropped.

    Returns:
        ``template_to_subject``: float64 4x4 matrix mapping template (MNI RAS mm) points to subject
        world (RAS mm) points, i.e. the resampling transform; its 3x3 part has a positive
        determinant.
    """
    if resolution <= 0:
        raise ValueError(f"resolution must be positive, got {resolution}")
    if dof not in DOF_CHOICES:
        raise ValueError(f"dof must be one of {DOF_CHOICES}, got {dof}")
    moving_mask = np.asarray(moving_mask, dtype=bool)
    if not moving_mask.any():
        raise ValueError("the moving brain mask is empty")
    levels = pyramid_levels(float(resolution))
    template = template_side(fixed_img, fixed_mask, levels, seed)
    centre_f, cov_f, volume_f = template.centre, template.cov, template.volume
    moving_data = moving_img.get_fdata(dtype=np.float32)
    moving_data = moving_data.reshape(moving_data.shape[:3]) if moving_data.ndim > 3 else moving_data
    moving, moving_mask, moving_affine = crop_to_mask(moving_data, moving_mask, np.asarray(moving_img.affine,
                                                                                           dtype=np.float64),
                                                      [lv.spacing_mm for lv in levels])
    del moving_data
    centre_m, cov_m, volume_m = centre_and_cov(moving_mask, moving_affine)
    log_scale0 = math.log(volume_m / volume_f) / 3.0 if dof > 6 else 0.0

    with torch_threads(n_threads):
        data = []
        for lv, (points, values) in zip(levels, template.levels):
            moving_t, to_grid = _moving_level(moving, moving_affine, lv.spacing_mm)
            data.append(_to_device(_LevelData(points=torch.from_numpy(points.copy()),
                                              fixed_values=torch.from_numpy(values.copy()),
                                              moving=moving_t, world_to_grid=to_grid), device))
        centres = (torch.from_numpy(centre_f).to(device), torch.from_numpy(centre_m).to(device))
        if initial is None:
            params = _initial_parameters(data[0], centres, log_scale0, levels[0].learning_rate, cov_f, cov_m, dof)
            schedule = [(lv.iterations - (CANDIDATE_ITERATIONS if index == 0 else 0), lv.learning_rate)
                        for index, lv in enumerate(levels)]
        else:
            params = torch.from_numpy(matrix_to_parameters(initial, centre_f, centre_m, log_scale0, dof)).to(device)
            schedule = warm_schedule(levels)
        for level, (iterations, learning_rate) in zip(data, schedule):
            if iterations > 0:
                params, _ = _optimise(level, params, centres, log_scale0, iterations, learning_rate, dof)
        matrix = _template_to_subject(params.detach(), *centres, log_scale0).cpu()
    return matrix.numpy().astype(np.float64)


def warm_schedule(levels: list[Level]) -> list[tuple[int, float]]:
    """``(iterations, learning rate)`` per pyramid level when :func:`register_affine` starts from an estimate.

    The coarsest level is skipped (its large steps would shake a good start loose), every other level runs
    :data:`WARM_ITERATIONS` steps at its own learning rate (docs/benchmarks.md, issue 27).

    Examples:
        >>> warm_schedule(pyramid_levels(2.0))
        [(0, 0.03), (20, 0.01), (20, 0.004)]
    """
    return [(0 if index == 0 and len(levels) > 1 else min(WARM_ITERATIONS, lv.iterations), lv.learning_rate)
            for index, lv in enumerate(levels)]


def matrix_to_parameters(matrix: np.ndarray, centre_fixed: np.ndarray, centre_moving: np.ndarray, log_scale0: float,
                         dof: int = 12) -> np.ndarray:
    """The parameter vector ``[t(3), w(3), l(3), h(3)]`` of :func:`_template_to_subject` for a 4x4 matrix.

    The 3x3 part is split as ``R @ diag(s) @ H`` (QR, positive diagonal); what ``dof`` keeps fixed is dropped
    (shears below 12 dof, anisotropic scales below 9, scales at 6); the template's centre lands where it did.
    Raises ``ValueError`` for a reflection or a singular matrix (the model cannot represent them).
    """
    matrix = np.asarray(matrix, dtype=np.float64)
    linear = matrix[:3, :3]
    if not np.linalg.det(linear) > 0:
        raise ValueError("the initial matrix must have a positive determinant (no reflection)")
    q, u = np.linalg.qr(linear)
    signs = np.sign(np.diag(u))
    q, u = q * signs, signs[:, None] * u
    scales = np.diag(u).copy()
    shear = u / scales[:, None]
    params = np.zeros(12)
    params[3:6] = _rotation_to_vector(q)
    log_scales = np.log(scales) - log_scale0
    params[6:9] = {6: np.zeros(3), 7: np.full(3, log_scales.mean())}.get(dof, log_scales)
    if dof == 12:
        params[9:12] = shear[0, 1], shear[0, 2], shear[1, 2]
    # t is where the template's centre lands (whatever the model keeps of the linear part)
    params[:3] = (linear @ centre_fixed + matrix[:3, 3] - centre_moving) / TRANSLATION_UNIT_MM
    return params


def pyramid_levels(resolution: float) -> list[Level]:
    """The pyramid :func:`register_affine` runs for a final spacing: the coarser levels of :data:`LEVELS`, then
    ``resolution`` (with the last entry's iterations and learning rate).

    Examples:
        >>> [lv.spacing_mm for lv in pyramid_levels(2.0)]
        [8.0, 4.0, 2.0]
        >>> [(lv.spacing_mm, lv.iterations) for lv in pyramid_levels(4.0)]
        [(8.0, 120), (4.0, 40)]
    """
    coarse = [lv for lv in LEVELS[:-1] if lv.spacing_mm > resolution * 1.01]
    last = LEVELS[-1] if coarse else LEVELS[0]
    return [*coarse, Level(resolution, last.iterations, last.learning_rate)]


def _initial_parameters(
    level: _LevelData,
    centres: tuple[torch.Tensor, torch.Tensor],
    log_scale0: float,
    learning_rate: float,
    cov_fixed: np.ndarray,
    cov_moving: np.ndarray,
    dof: int,
) -> torch.Tensor:
    """Pick the start rotation: identity or a principal-axes rotation, after a short refinement.

    Each of the 24 principal-axes rotations is scored (loss at the start, no optimisation); the
    identity and the :data:`N_PRINCIPAL_CANDIDATES` best are refined for
    :data:`CANDIDATE_ITERATIONS` Adam steps and the lowest-loss result is returned. Every
    candidate is a proper rotation, so no reflection can be introduced here either.
    """
    def start(rotation: np.ndarray) -> torch.Tensor:
        params = torch.zeros(12, dtype=torch.float64, device=level.points.device)
        params[3:6] = torch.from_numpy(_rotation_to_vector(rotation))
        return params

    principal = [start(r) for r in _principal_rotations(cov_fixed, cov_moving)]
    with torch.no_grad():
        scores = [float(_loss(level, _template_to_subject(p, *centres, log_scale0))) for p in principal]
    ranked = [principal[i] for i in np.argsort(scores, kind="stable")[:N_PRINCIPAL_CANDIDATES]]
    best_params, best_loss = None, math.inf
    for params in (start(np.eye(3)), *ranked):
        params, loss = _optimise(level, params, centres, log_scale0, CANDIDATE_ITERATIONS, learning_rate, dof)
        if loss < best_loss:
            best_params, best_loss = params, loss
    return best_params


def _to_device(level: _LevelData, device: str) -> _LevelData:
    """Move a level's tensors to ``device`` (no-op on CPU)."""
    if str(device) == "cpu":
        return level
    target = torch.device(device)
    return _LevelData(*(getattr(level, f).to(target) for f in ("points", "fixed_values", "moving", "world_to_grid")))


# --------------------------------------------------------------------------------------------------
# ITK transform files
# --------------------------------------------------------------------------------------------------

def itk_affine_text(template_to_subject: np.ndarray) -> str:
    """ITK ``AffineTransform_double_3_3`` text for a template->subject (MNI->T1w, RAS) matrix.

    The ITK transform maps fixed (template) LPS points to moving (subject) LPS points, which is how
    antsRegistration/fMRIPrep store ``from-T1w_to-<template>_mode-image_xfm``. The centre
    (FixedParameters) is 0, so the ITK offset is the LPS translation.
    """
    matrix = np.asarray(template_to_subject, dtype=np.float64)
    if matrix.shape != (4, 4) or not np.allclose(matrix[3], [0, 0, 0, 1]):
        raise ValueError("expected a 4x4 affine matrix with last row [0, 0, 0, 1]")
    lps = LPS_FROM_RAS @ matrix @ LPS_FROM_RAS
    values = [*lps[:3, :3].ravel(), *lps[:3, 3]]
    params = " ".join(repr(float(v)) for v in values)
    return (
        "#Insight Transform File V1.0\n"
        "#Transform 0\n"
        "Transform: AffineTransform_double_3_3\n"
        f"Parameters: {params}\n"
        "FixedParameters: 0 0 0\n"
    )


def write_itk_affine(template_to_subject: np.ndarray, path: str | Path) -> Path:
    """Write ``template_to_subject`` as an ITK text transform (see :func:`itk_affine_text`).

    Returns the path written. Use it for ``from-T1w_to-MNI152NLin2009cAsym_mode-image_xfm.txt``.
    """
    path = Path(path)
    path.write_text(itk_affine_text(template_to_subject))
    return path


def read_itk_composite_h5(path: str | Path) -> tuple[np.ndarray, list[str]]:
    """The affine part of an ITK composite transform file (``.h5``, as antsRegistration and fMRIPrep write).

    Returns ``(matrix, dropped)``: the RAS 4x4 composition of the file's affine transforms, in the same
    (fixed -> moving, i.e. template -> subject for ``from-T1w_to-<template>_mode-image``) sense as
    :func:`read_itk_affine`, and the ITK types of the non-linear transforms left out (fMRIPrep's
    ``DisplacementFieldTransform``). ITK applies a composite's queue last-first, so the affines compose as
    ``A1 @ A2 @ ...`` in file order.
    """
    matrix, dropped, affines = np.eye(4), [], 0
    with h5py.File(str(path), "r") as handle:
        if "TransformGroup" not in handle:
            raise ValueError(f"{path}: no TransformGroup (not an ITK transform file)")
        group = handle["TransformGroup"]
        for key in sorted(group.keys(), key=int):
            node = group[key]
            kind = bytes(np.asarray(node["TransformType"]).ravel()[0]).decode()
            if kind.startswith("CompositeTransform"):
                continue
            # ITK wrote "Tranform" for years; both spellings are found in the wild
            prefix = "Transform" if "TransformParameters" in node else "Tranform"
            if kind.startswith(ITK_AFFINE_TYPES):
                params = np.asarray(node[f"{prefix}Parameters"], dtype=np.float64).ravel()
                fixed = np.asarray(node[f"{prefix}FixedParameters"], dtype=np.float64).ravel()
                if params.size != 12:
                    raise ValueError(f"{path}: transform {key} ({kind}) is not a 3D affine")
                matrix = matrix @ itk_affine_to_ras(params, fixed)
                affines += 1
            else:
                dropped.append(kind)
    if not affines:
        raise ValueError(f"{path}: no affine transform in the composite (only {', '.join(dropped)})")
    return matrix, dropped


def read_itk_transform(path: str | Path) -> tuple[np.ndarray, list[str]]:
    """An ITK ``.txt``/``.tfm`` affine or the affine part of an ``.h5`` composite; see
    :func:`read_itk_composite_h5` for the return value."""
    if str(path).endswith(".h5"):
        return read_itk_composite_h5(path)
    return read_itk_affine(path), []
