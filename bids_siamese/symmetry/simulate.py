"""Synthetic unilateral lesions on the model grid and the lesion-size curriculum.

A lesion is a blob (sphere, ellipsoid or irregular) of a chosen volume, rendered at sub-voxel resolution
(a fine grid of about ``radius / 8`` mm, 0.25-1 mm) and block-averaged onto the model grid, so a lesion
smaller than a voxel still changes the image by its partial volume. Inside the brain mask the image becomes
``(1 - w) * I + w * (intensity + texture)`` where ``w`` is the partial-volume weight, ``intensity`` is drawn
from a range in the units of the ``desc-preproc`` images (median 0, inter-quartile range 1 inside the brain;
the default ``(-2.5, -1.0)`` is a hypointense, CSF-like lesion; a positive range gives hyperintense lesions)
and ``texture`` is a little Gaussian noise. Sizes are 3D volumes in mm^3; :class:`Lesion` also records the
largest axis-aligned in-plane cross-section in mm^2 (computed on the fine grid), for comparison with 2D
studies (the neonatal symmetry study used 1-20 mm^2 lesions on 2D slices).

Curriculum (:func:`curriculum_range`): lesion volumes are drawn log-uniformly from a range whose lower bound
starts at the geometric middle of the full range (medium and large lesions, which the neonatal study found to
generalise best) and falls log-linearly to the smallest volume at epoch ``ramp_fraction * n_epochs`` (0.5 by
default); the upper bound stays at the largest volume. With the default 50-8000 mm^3 and 30 epochs:

==========  ====================
epoch       volume range (mm^3)
==========  ====================
1           632 - 8000
5           321 - 8000
10          138 - 8000
15          59 - 8000
16 - 30     50 - 8000
==========  ====================
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Sequence

import numpy as np
from scipy import ndimage as ndi

from ..preproc.grid import mirror
from .asymmetry import midline_distance_mm

LESION_SHAPES = ("sphere", "ellipsoid", "irregular")


@dataclass(frozen=True)
class LesionConfig:
    """How synthetic lesions are drawn.

    Attributes:
        volume_mm3: range of volumes (log-uniform).
        shapes: shapes to draw from (:data:`LESION_SHAPES`).
        intensity: lesion intensity range in normalised units (median 0 / IQR 1 inside the brain).
        texture_sd: sd of the Gaussian noise added inside the lesion (normalised units).
        min_midline_mm: gap between the lesion's equivalent sphere and the mid-sagittal plane.
        max_elongation: largest ratio of the longest to the shortest ellipsoid axis.
        irregularity: relative amplitude of the radius modulation of ``irregular`` blobs.
        min_depth_fraction: the centre lies at least this fraction of the equivalent radius inside the mask.
    """

    volume_mm3: tuple[float, float] = (50.0, 8000.0)
    shapes: tuple[str, ...] = LESION_SHAPES
    intensity: tuple[float, float] = (-2.5, -1.0)
    texture_sd: float = 0.1
    min_midline_mm: float = 4.0
    max_elongation: float = 2.0
    irregularity: float = 0.3
    min_depth_fraction: float = 0.75

    def __post_init__(self) -> None:
        lo, hi = self.volume_mm3
        if not 0 < lo <= hi:
            raise ValueError(f"volume_mm3 must satisfy 0 < min <= max, got {self.volume_mm3}")
        unknown = set(self.shapes) - set(LESION_SHAPES)
        if unknown or not self.shapes:
            raise ValueError(f"shapes must be among {LESION_SHAPES}, got {self.shapes}")


@dataclass(frozen=True)
class Lesion:
    """One rendered lesion.

    Attributes:
        hemisphere: ``L`` or ``R``.
        shape: blob shape.
        center_mm: centre in template mm.
        nominal_volume_mm3: the volume asked for.
        volume_mm3: the volume actually inside the brain mask (partial volumes summed).
        cross_section_mm2: largest axis-aligned in-plane cross-section inside the mask.
        intensity: lesion intensity (normalised units).
    """

    hemisphere: str
    shape: str
    center_mm: tuple[float, float, float]
    nominal_volume_mm3: float
    volume_mm3: float
    cross_section_mm2: float
    intensity: float

    def as_dict(self) -> dict:
        return asdict(self)


def equivalent_radius_mm(volume_mm3: float) -> float:
    """Radius of the sphere of ``volume_mm3``.

    Examples:
        >>> round(equivalent_radius_mm(4 / 3 * np.pi * 8), 6)
        2.0
    """
    return float((3.0 * float(volume_mm3) / (4.0 * np.pi)) ** (1.0 / 3.0))


def sphere_cross_section_mm2(volume_mm3: float) -> float:
    """Largest cross-section (mm^2) of a sphere of ``volume_mm3``; 7 mm^2 ~ 13 mm^3, 13.5 mm^2 ~ 37 mm^3.

    Examples:
        >>> round(sphere_cross_section_mm2(1000.0), 1)
        120.9
    """
    return float(np.pi * equivalent_radius_mm(volume_mm3) ** 2)


def random_rotation(rng: np.random.Generator) -> np.ndarray:
    """A uniformly random 3x3 rotation matrix.

    Examples:
        >>> r = random_rotation(np.random.default_rng(0))
        >>> bool(np.allclose(r @ r.T, np.eye(3))), round(float(np.linalg.det(r)), 6)
        (True, 1.0)
    """
    q, r = np.linalg.qr(rng.standard_normal((3, 3)))
    q = q * np.sign(np.diag(r))
    if np.linalg.det(q) < 0:
        q[:, 0] = -q[:, 0]
    return q


def _blob_inside(points: np.ndarray, axes: np.ndarray, rotation: np.ndarray, waves: np.ndarray,
                 phases: np.ndarray, amplitude: float) -> np.ndarray:
    """Points (N, 3, relative mm) inside the (modulated) ellipsoid.

    Small products are written out instead of ``@``: a multi-threaded BLAS on a busy machine made the
    matrix products of this function ten times slower than the arithmetic itself.
    """
    p = points.astype(np.float32, copy=False)
    rot = rotation.astype(np.float32)
    u = [(p[:, 0] * rot[0, j] + p[:, 1] * rot[1, j] + p[:, 2] * rot[2, j]) / np.float32(axes[j]) for j in range(3)]
    r2 = u[0] ** 2 + u[1] ** 2 + u[2] ** 2
    if amplitude > 0 and len(waves):
        mod = np.zeros(len(p), dtype=np.float32)
        for w, phase in zip(waves.astype(np.float32), phases.astype(np.float32)):
            mod += np.cos(u[0] * w[0] + u[1] * w[1] + u[2] * w[2] + phase)
        mod /= np.float32(np.sqrt(len(waves) / 2.0))
        return r2 < (1.0 + amplitude * np.tanh(mod)) ** 2
    return r2 < 1.0


def render_lesion(
    grid_shape: Sequence[int],
    voxel_mm: float,
    center_vox: Sequence[float],
    volume_mm3: float,
    shape: str,
    rng: np.random.Generator,
    mask: np.ndarray | None = None,
    max_elongation: float = 2.0,
    irregularity: float = 0.3,
) -> tuple[np.ndarray, float, float]:
    """Partial-volume weights of a blob on the grid, its in-mask volume and largest cross-section.

    Args:
        grid_shape: model grid shape.
        voxel_mm: grid resolution.
        center_vox: centre in (fractional) voxel coordinates.
        volume_mm3: volume of the blob (before masking).
        shape: ``sphere``, ``ellipsoid`` or ``irregular``.
        rng: random generator (orientation, elongation, irregularity).
        mask: brain mask; the blob is cut to it (``None``: no cut).
        max_elongation: ellipsoid axis ratio limit.
        irregularity: radius modulation of ``irregular`` blobs.

    Returns:
        ``(weights, volume_mm3, cross_section_mm2)``: float32 weights in [0, 1] on the grid, the in-mask
        volume and the largest axis-aligned in-plane cross-section of the in-mask blob.

    Examples:
        >>> w, v, cs = render_lesion((20, 20, 20), 2.0, (10.0, 10.0, 10.0), 1000.0, "sphere",
        ...                          np.random.default_rng(0))
        >>> abs(v - 1000.0) / 1000.0 < 0.03, abs(cs - 120.9) / 120.9 < 0.05, float(w.max()) == 1.0
        (True, True, True)
    """
    if shape not in LESION_SHAPES:
        raise ValueError(f"unknown lesion shape '{shape}'; choose one of {LESION_SHAPES}")
    grid_shape = tuple(int(s) for s in grid_shape)
    voxel_mm = float(voxel_mm)
    radius = equivalent_radius_mm(volume_mm3)
    rotation = random_rotation(rng)
    if shape == "sphere":
        factors = np.ones(3)
    else:
        e = rng.uniform(1.0, max(1.0, max_elongation))
        f = rng.uniform(1.0, np.sqrt(e))  # middle axis between the shortest and longest
        factors = np.array([e, f, 1.0])
        factors = factors / np.cbrt(factors.prod())  # same volume as the sphere
    if shape == "irregular":
        n_waves = 6
        directions = rng.standard_normal((n_waves, 3))
        directions /= np.linalg.norm(directions, axis=1, keepdims=True)
        waves = directions * rng.uniform(1.5, 3.0, size=(n_waves, 1))
        phases = rng.uniform(0, 2 * np.pi, size=n_waves)
        amplitude = float(irregularity)
    else:
        waves, phases, amplitude = np.zeros((0, 3)), np.zeros(0), 0.0
    step = float(np.clip(radius / 8.0, 0.25, 1.0))
    k = max(1, int(np.ceil(voxel_mm / step)))
    fine = voxel_mm / k
    center = np.asarray(center_vox, dtype=np.float64)

    def render(axes: np.ndarray) -> tuple[np.ndarray, tuple[slice, ...], np.ndarray]:
        reach = float(axes.max()) * (1.0 + amplitude) + voxel_mm
        lo = np.maximum(np.floor(center - reach / voxel_mm).astype(int), 0)
        hi = np.minimum(np.ceil(center + reach / voxel_mm).astype(int) + 1, grid_shape)
        box = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))
        n = hi - lo
        if (n <= 0).any():
            return np.zeros((0, 0, 0), bool), box, n
        coords = [((lo[a] + (np.arange(n[a] * k) + 0.5) / k - 0.5) - center[a]) * voxel_mm for a in range(3)]
        pts = np.stack(np.meshgrid(*coords, indexing="ij"), axis=-1).reshape(-1, 3).astype(np.float32)
        inside = _blob_inside(pts, axes, rotation, waves, phases, amplitude).reshape(tuple(n * k))
        return inside, box, n

    axes = radius * factors
    inside, box, n = render(axes)
    if shape == "irregular" and inside.any():  # one rescaling pass to hit the volume
        actual = inside.sum() * fine ** 3
        axes = axes * float(np.cbrt(volume_mm3 / actual))
        inside, box, n = render(axes)
    weights = np.zeros(grid_shape, dtype=np.float32)
    if inside.size == 0:
        return weights, 0.0, 0.0
    if mask is not None:
        mask_box = np.asarray(mask)[box] > 0
        inside = inside & np.repeat(np.repeat(np.repeat(mask_box, k, 0), k, 1), k, 2)
    coarse = inside.reshape(n[0], k, n[1], k, n[2], k).mean(axis=(1, 3, 5))
    weights[box] = coarse
    volume = float(inside.sum()) * fine ** 3
    cross = max(float(inside.sum(axis=(b, c)).max()) for b, c in ((1, 2), (0, 2), (0, 1))) * fine ** 2
    return weights, volume, cross


def sample_center(
    mask: np.ndarray,
    voxel_mm: float,
    radius_mm: float,
    hemisphere: str,
    rng: np.random.Generator,
    min_midline_mm: float = 4.0,
    min_depth_fraction: float = 0.75,
    depth_mm: np.ndarray | None = None,
) -> np.ndarray:
    """A random lesion centre (voxel coordinates) in one hemisphere of the mask.

    Candidates are mask voxels at least ``radius + min_midline_mm`` from x = 0 on the requested side and at
    least ``min_depth_fraction * radius`` from the mask border; the conditions are relaxed (depth first) when no
    voxel meets them. The centre is jittered within its voxel.

    Args:
        mask: brain mask.
        voxel_mm: grid resolution.
        radius_mm: equivalent radius of the lesion.
        hemisphere: ``L`` (x < 0, low indices) or ``R``.
        rng: random generator.
        min_midline_mm: gap to the midline.
        min_depth_fraction: depth requirement.
        depth_mm: precomputed distance (mm) of every mask voxel to the border (saves time on repeated calls).

    Examples:
        >>> m = np.zeros((20, 10, 10), bool); m[2:18, 2:8, 2:8] = True
        >>> c = sample_center(m, 2.0, 2.0, "L", np.random.default_rng(0))
        >>> bool(c[0] < 9.5)
        True
    """
    mask = np.asarray(mask) > 0
    if depth_mm is None:
        depth_mm = ndi.distance_transform_edt(mask) * float(voxel_mm)
    nx = mask.shape[0]
    side = np.zeros(mask.shape, bool)
    if hemisphere == "L":
        side[: nx // 2] = True
    elif hemisphere == "R":
        side[nx - nx // 2:] = True
    else:
        raise ValueError(f"hemisphere must be L or R, got {hemisphere}")
    far = midline_distance_mm(mask.shape, voxel_mm) >= radius_mm + min_midline_mm
    base = mask & side
    for cond in (far & (depth_mm >= min_depth_fraction * radius_mm), far & (depth_mm >= voxel_mm), far, base):
        candidates = np.argwhere(base & cond)
        if len(candidates):
            break
    else:
        raise ValueError("the mask has no voxel in the requested hemisphere")
    centre = candidates[rng.integers(len(candidates))].astype(np.float64)
    return centre + rng.uniform(-0.5, 0.5, size=3)


def insert_lesion(
    volume: np.ndarray,
    mask: np.ndarray,
    weights: np.ndarray,
    intensity: float,
    rng: np.random.Generator | None = None,
    texture_sd: float = 0.0,
) -> np.ndarray:
    """``(1 - w) * I + w * (intensity + texture)`` inside the mask; the input is not modified.

    Examples:
        >>> v = np.ones((4, 1, 1), np.float32); w = np.array([0, 1, 0.5, 0], np.float32).reshape(4, 1, 1)
        >>> insert_lesion(v, np.ones_like(v, bool), w, -1.0).ravel().tolist()
        [1.0, -1.0, 0.0, 1.0]
    """
    w = np.where(np.asarray(mask) > 0, np.asarray(weights, np.float32), 0.0).astype(np.float32)
    out = np.asarray(volume, dtype=np.float32).copy()
    sel = w > 0
    target = np.full(int(sel.sum()), float(intensity), dtype=np.float32)
    if texture_sd > 0 and rng is not None:
        target += rng.normal(0.0, texture_sd, size=target.shape).astype(np.float32)
    out[sel] = (1.0 - w[sel]) * out[sel] + w[sel] * target
    return out


def center_mm(center_vox: Sequence[float], affine: np.ndarray) -> tuple[float, float, float]:
    """Voxel coordinates -> template mm.

    Examples:
        >>> center_mm((0, 0, 0), np.diag([2.0, 2.0, 2.0, 1.0]))
        (0.0, 0.0, 0.0)
    """
    p = np.asarray(affine, dtype=np.float64) @ np.array([*center_vox, 1.0])
    return tuple(round(float(v), 2) for v in p[:3])  # type: ignore[return-value]


def simulate_lesion(
    volume: np.ndarray,
    mask: np.ndarray,
    affine: np.ndarray,
    rng: np.random.Generator,
    config: LesionConfig = LesionConfig(),
    volume_range: tuple[float, float] | None = None,
    hemisphere: str | None = None,
    bilateral: bool = False,
    depth_mm: np.ndarray | None = None,
    return_weights: bool = False,
) -> tuple[np.ndarray, Lesion] | tuple[np.ndarray, Lesion, np.ndarray]:
    """Plant one random lesion (or a mirrored pair when ``bilateral``) in a model-grid image.

    Args:
        volume: normalised model-grid image.
        mask: its brain mask.
        affine: grid affine (isotropic voxels).
        rng: random generator.
        config: lesion distribution.
        volume_range: overrides ``config.volume_mm3`` (the curriculum's current range).
        hemisphere: ``L``/``R`` or ``None`` (random).
        bilateral: also plant the mirror image of the lesion in the other hemisphere (a *symmetric*
            abnormality: a negative example for the symmetry model).
        depth_mm: precomputed distance to the mask border (see :func:`sample_center`).
        return_weights: also return the partial-volume lesion weights (the training target of the model's
            position head).

    Returns:
        ``(image, lesion)`` or ``(image, lesion, weights)``.

    Examples:
        >>> m = np.zeros((24, 24, 24), bool); m[3:21, 3:21, 3:21] = True
        >>> img = np.where(m, 1.0, 0.0).astype(np.float32)
        >>> out, les = simulate_lesion(img, m, np.diag([2.0, 2.0, 2.0, 1.0]), np.random.default_rng(0),
        ...                            volume_range=(500.0, 500.0), hemisphere="R")
        >>> les.hemisphere, bool(out[12:].min() < 0), bool((out[:12] == img[:12]).all())
        ('R', True, True)
    """
    voxel_mm = float(abs(affine[0, 0]))
    lo, hi = volume_range if volume_range is not None else config.volume_mm3
    target = float(np.exp(rng.uniform(np.log(lo), np.log(hi)))) if hi > lo else float(lo)
    side = hemisphere or ("L" if rng.random() < 0.5 else "R")
    shape = str(rng.choice(list(config.shapes)))
    radius = equivalent_radius_mm(target)
    centre = sample_center(mask, voxel_mm, radius, side, rng, config.min_midline_mm, config.min_depth_fraction,
                           depth_mm)
    weights, vol, cross = render_lesion(volume.shape, voxel_mm, centre, target, shape, rng, mask=mask,
                                        max_elongation=config.max_elongation, irregularity=config.irregularity)
    if bilateral:
        weights = np.maximum(weights, mirror(weights))
    intensity = float(rng.uniform(*config.intensity))
    out = insert_lesion(volume, mask, weights, intensity, rng, config.texture_sd)
    lesion = Lesion(hemisphere=side, shape=shape, center_mm=center_mm(centre, affine), nominal_volume_mm3=target,
                    volume_mm3=vol, cross_section_mm2=cross, intensity=intensity)
    if return_weights:
        return out, lesion, weights
    return out, lesion


def curriculum_range(epoch: int, n_epochs: int, volume_range: tuple[float, float],
                     ramp_fraction: float = 0.5) -> tuple[float, float]:
    """The lesion-volume range of ``epoch`` (0-based) of ``n_epochs`` (see the module docstring).

    Args:
        epoch: current epoch, 0-based.
        n_epochs: planned epochs.
        volume_range: the full ``(min, max)`` range.
        ramp_fraction: fraction of the epochs after which the full range is used (0: no curriculum).

    Examples:
        >>> [tuple(round(v) for v in curriculum_range(e, 30, (50.0, 8000.0))) for e in (0, 4, 9, 14, 15)]
        [(632, 8000), (321, 8000), (138, 8000), (59, 8000), (50, 8000)]
    """
    lo, hi = (float(v) for v in volume_range)
    if ramp_fraction <= 0 or n_epochs <= 1 or hi <= lo:
        return lo, hi
    t = min(1.0, epoch / max(1.0, ramp_fraction * n_epochs))
    start = np.sqrt(lo * hi)
    return float(np.exp(np.log(start) + t * (np.log(lo) - np.log(start)))), hi


#: Lesion-volume bins (mm^3) of the evaluation tables.
VOLUME_BINS = (25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2000.0, 4000.0, 8000.0)


def bin_label(lo: float, hi: float) -> str:
    """``"100-250"``.

    Examples:
        >>> bin_label(100.0, 250.0)
        '100-250'
    """
    return f"{lo:g}-{hi:g}"
