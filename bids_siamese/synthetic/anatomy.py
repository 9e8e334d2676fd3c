"""Template-space anatomy: the padded template, its atlas labels, ventricles, head and look-up maps."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import nibabel as nib
import numpy as np
from scipy import ndimage as ndi

from ..atlas import atlas_on_grid
from ..resources import Grid, template_brain_path
from .head import make_head
from .params import COARSE_SPACING, FIELD_SPACING, PAD, VENTRICLE_CSF_MAX, VENTRICLE_LABELS


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


def load_atlas(shape: Sequence[int], affine: np.ndarray) -> tuple[np.ndarray, dict[int, str]]:
    """Neuromorphometrics labels resampled (nearest neighbour) to a template grid, and the label names."""
    labels, names = atlas_on_grid("neuromorphometrics", Grid(tuple(int(s) for s in shape), np.asarray(affine)))
    return np.asarray(labels, dtype=np.uint8), {int(k): str(v) for k, v in names.items()}


def ventricle_mask(labels: np.ndarray, brain: np.ndarray) -> np.ndarray:
    """Ventricular CSF: atlas lateral/inferior-lateral ventricles dilated 1 voxel, where the template is dark."""
    atlas = np.isin(labels, VENTRICLE_LABELS)
    atlas = ndi.binary_dilation(atlas, iterations=1)
    return (atlas & (brain > 0) & (brain < VENTRICLE_CSF_MAX)).astype(np.uint8)


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
    start, stop = crop_box(mask, 0, 1)
    box = []
    for ax in range(3):
        lo = affine[ax, 3] + affine[ax, ax] * start[ax]
        hi = affine[ax, 3] + affine[ax, ax] * (stop[ax] - 1)
        box.append((float(min(lo, hi)), float(max(lo, hi))))
    return tuple(box)


def crop_box(mask: np.ndarray, margin: int, multiple: int) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
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
