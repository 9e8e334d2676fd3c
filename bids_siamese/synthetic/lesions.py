"""Lesions of the demo: smooth-edged blobs in template space, placed in the white matter, planted in a scan.

The random blob orientation is :func:`bids_siamese.symmetry.simulate.random_rotation`, the one the symmetry
training uses. The rest differs from :mod:`bids_siamese.symmetry.simulate` on purpose: the demo plants a
lesion through an arbitrary voxel -> template affine (posed, anisotropic scan grids) with a linear edge and
records its exact template-space volume for the ground truth, while the training plants partial-volume blobs
on the isotropic model grid.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..symmetry.simulate import random_rotation
from .fields import apply_affine_grid, soft_step
from .model import Model
from .params import COARSE_SPACING


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
        return soft_step((1.0 - self.rho(points_mm)) * np.float32(mean_axis), self.edge_mm)


def lesion_measures(lesion: Lesion, resolution: float = 0.5) -> dict[str, float]:
    """Volume (mm3) and largest axial (template z) cross-section (mm2) of ``rho <= 1`` on a fine grid."""
    r = lesion.extent_mm
    axes = [np.arange(c - r, c + r + resolution, resolution, dtype=np.float32) for c in lesion.center]
    points = np.stack(np.meshgrid(*axes, indexing="ij"))
    inside = lesion.rho(points) <= 1.0
    per_slice = inside.sum(axis=(0, 1))
    return {"volume_mm3": float(inside.sum() * resolution**3),
            "cross_section_mm2": float(per_slice.max() * resolution**2)}


def place_lesion(model: Model, target_volume_mm3: float, hemisphere: str, rng: np.random.Generator) -> Lesion:
    """Draw a lesion of about ``target_volume_mm3`` deep in the white matter of one hemisphere ('L' or 'R')."""
    p = model.params
    ratios = np.array([1.0, rng.uniform(0.6, 1.0), rng.uniform(0.5, 0.9)])
    axes = ratios * (3.0 * target_volume_mm3 / (4.0 * np.pi * ratios.prod())) ** (1.0 / 3.0)
    shape = tuple(float(v) for v in rng.uniform(-0.06, 0.06, size=9))
    rotation = random_rotation(rng)
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
