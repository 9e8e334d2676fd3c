"""Template-space anatomy: the padded template, its atlas labels, ventricles, head and look-up maps."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import nibabel as nib
import numpy as np
import pandas as pd
from scipy import ndimage as ndi

from ..resources import atlas_paths, template_brain_path
from .fields import apply_affine_grid
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
