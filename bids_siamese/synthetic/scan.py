"""Scan acquisition: pose and voxel grid, rendering through the subject's field, bias field, noise, storage."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
from scipy import ndimage as ndi

from .fields import apply_affine_grid, upsample_block
from .lesions import Lesion, plant_lesion
from .model import Model
from .params import COARSE_SPACING, FIELD_SPACING

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


def flip_left_right(array: np.ndarray, geometry: ScanGeometry) -> np.ndarray:
    """The orientation error of the demo: ``array`` flipped along the grid's left-right axis (header unchanged).

    Examples:
        >>> g = ScanGeometry(shape=(1, 2, 1), affine=np.eye(4), orientation="ARS", voxel_sizes=(1.0, 1.0, 1.0))
        >>> flip_left_right(np.arange(2).reshape(1, 2, 1), g).ravel().tolist()
        [1, 0]
    """
    return np.ascontiguousarray(np.flip(array, axis=geometry.lr_axis))

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
            coords[a] += upsample_block(disp_head[a], step, start, stop)
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
