"""CIFTI-2 dense scalar files (``.dscalar.nii``): cortex on fsLR 32k plus subcortical volume structures.

The grayordinates follow the HCP layout: the left and right cortex on the fsLR 32k mesh (medial wall
excluded), then the subcortical structures as voxels of the standard 2 mm MNI grid (91 x 109 x 91,
``-2,0,0,90;0,2,0,-126;0,0,2,-72``). The subcortical structures come from the bundled
neuromorphometrics atlas (nearest neighbour on that grid): accumbens, amygdala, caudate, hippocampus,
pallidum, putamen, thalamus, ventral diencephalon, cerebellum (left/right; vermis split at x = 0) and
brainstem. Connectome Workbench and nibabel read the result (``wb_command -file-information``).
"""
from __future__ import annotations

from functools import lru_cache
from typing import Mapping

import nibabel as nib
import numpy as np
from nibabel.cifti2 import cifti2_axes

from .gifti import cortex_mask, sample_volume, vol_to_surf

__all__ = ["CIFTI_GRID_SHAPE", "CIFTI_GRID_AFFINE", "SUBCORTICAL_STRUCTURES", "subcortical_masks",
           "dense_scalar", "dscalar_from_volume", "cifti_bytes"]

CIFTI_GRID_SHAPE = (91, 109, 91)
CIFTI_GRID_AFFINE = np.array([[-2.0, 0, 0, 90], [0, 2.0, 0, -126], [0, 0, 2.0, -72], [0, 0, 0, 1]])

#: CIFTI structure -> neuromorphometrics label names (the vermis goes to the cerebellum on its side of x=0).
SUBCORTICAL_STRUCTURES: dict[str, tuple[str, ...]] = {
    "CIFTI_STRUCTURE_ACCUMBENS_LEFT": ("Left_Accumbens_Area",),
    "CIFTI_STRUCTURE_ACCUMBENS_RIGHT": ("Right_Accumbens_Area",),
    "CIFTI_STRUCTURE_AMYGDALA_LEFT": ("Left_Amygdala",),
    "CIFTI_STRUCTURE_AMYGDALA_RIGHT": ("Right_Amygdala",),
    "CIFTI_STRUCTURE_BRAIN_STEM": ("Brain_Stem",),
    "CIFTI_STRUCTURE_CAUDATE_LEFT": ("Left_Caudate",),
    "CIFTI_STRUCTURE_CAUDATE_RIGHT": ("Right_Caudate",),
    "CIFTI_STRUCTURE_CEREBELLUM_LEFT": ("Left_Cerebellum_Exterior", "Left_Cerebellum_White_Matter", "VERMIS<0"),
    "CIFTI_STRUCTURE_CEREBELLUM_RIGHT": ("Right_Cerebellum_Exterior", "Right_Cerebellum_White_Matter", "VERMIS>0"),
    "CIFTI_STRUCTURE_DIENCEPHALON_VENTRAL_LEFT": ("Left_Ventral_DC",),
    "CIFTI_STRUCTURE_DIENCEPHALON_VENTRAL_RIGHT": ("Right_Ventral_DC",),
    "CIFTI_STRUCTURE_HIPPOCAMPUS_LEFT": ("Left_Hippocampus",),
    "CIFTI_STRUCTURE_HIPPOCAMPUS_RIGHT": ("Right_Hippocampus",),
    "CIFTI_STRUCTURE_PALLIDUM_LEFT": ("Left_Pallidum",),
    "CIFTI_STRUCTURE_PALLIDUM_RIGHT": ("Right_Pallidum",),
    "CIFTI_STRUCTURE_PUTAMEN_LEFT": ("Left_Putamen",),
    "CIFTI_STRUCTURE_PUTAMEN_RIGHT": ("Right_Putamen",),
    "CIFTI_STRUCTURE_THALAMUS_LEFT": ("Left_Thalamus_Proper",),
    "CIFTI_STRUCTURE_THALAMUS_RIGHT": ("Right_Thalamus_Proper",),
}


@lru_cache(maxsize=1)
def subcortical_masks() -> dict[str, np.ndarray]:
    """Boolean masks on the CIFTI 2 mm grid, one per structure of :data:`SUBCORTICAL_STRUCTURES`.

    Examples:
        >>> masks = subcortical_masks()
        >>> masks["CIFTI_STRUCTURE_THALAMUS_LEFT"].shape, int(masks["CIFTI_STRUCTURE_THALAMUS_LEFT"].sum()) > 500
        ((91, 109, 91), True)
    """
    from ..explain.regions import labels_on_grid, load_atlas

    atlas = load_atlas("neuromorphometrics")
    labels = labels_on_grid(atlas, CIFTI_GRID_SHAPE, CIFTI_GRID_AFFINE)
    index = dict(zip(atlas.table["name"], atlas.table["index"]))
    ijk = np.indices(CIFTI_GRID_SHAPE).reshape(3, -1)
    x_mm = (CIFTI_GRID_AFFINE[0, 0] * ijk[0] + CIFTI_GRID_AFFINE[0, 3]).reshape(CIFTI_GRID_SHAPE)
    vermis = np.isin(labels, [i for n, i in index.items() if "Vermal" in n])
    masks = {}
    for structure, names in SUBCORTICAL_STRUCTURES.items():
        mask = np.isin(labels, [index[n] for n in names if n in index])
        if "VERMIS<0" in names:
            mask |= vermis & (x_mm < 0)
        if "VERMIS>0" in names:
            mask |= vermis & (x_mm >= 0)
        mask.setflags(write=False)
        masks[structure] = mask
    return masks


def _brain_models() -> cifti2_axes.BrainModelAxis:
    axis = None
    for hemi, name in (("L", "CortexLeft"), ("R", "CortexRight")):
        mask = cortex_mask("fsLR", hemi)
        part = cifti2_axes.BrainModelAxis.from_surface(np.flatnonzero(mask), len(mask), name)
        axis = part if axis is None else axis + part
    for structure, mask in subcortical_masks().items():
        if mask.any():
            axis = axis + cifti2_axes.BrainModelAxis.from_mask(mask, affine=CIFTI_GRID_AFFINE, name=structure)
    return axis


def dense_scalar(maps: Mapping[str, tuple[np.ndarray, np.ndarray, np.ndarray]]) -> nib.Cifti2Image:
    """A CIFTI-2 dense scalar image.

    Args:
        maps: name -> ``(left fsLR-32k values (32492,), right values (32492,), volume on the CIFTI 2 mm grid
            (91, 109, 91))``.

    Returns:
        A ``Cifti2Image`` (rows: the maps; columns: cortex left, cortex right, subcortical voxels).
    """
    axis = _brain_models()
    rows = []
    for left, right, volume in maps.values():
        row = []
        for name, start, model in axis.iter_structures():
            if name == "CIFTI_STRUCTURE_CORTEX_LEFT":
                row.append(np.asarray(left, dtype=np.float32)[model.vertex])
            elif name == "CIFTI_STRUCTURE_CORTEX_RIGHT":
                row.append(np.asarray(right, dtype=np.float32)[model.vertex])
            else:
                vox = model.voxel
                row.append(np.asarray(volume, dtype=np.float32)[vox[:, 0], vox[:, 1], vox[:, 2]])
        rows.append(np.concatenate(row))
    data = np.vstack(rows).astype(np.float32)
    img = nib.Cifti2Image(data, header=(cifti2_axes.ScalarAxis(list(maps)), axis))
    img.nifti_header.set_intent("ConnDenseScalar")
    return img


def dscalar_from_volume(maps: Mapping[str, tuple[np.ndarray, np.ndarray]]) -> nib.Cifti2Image:
    """A dense scalar image from template-space volumes: cortex sampled on fsLR, structures on the 2 mm grid.

    Args:
        maps: name -> ``(volume, affine)`` in MNI152NLin2009cAsym space.
    """
    ijk = np.indices(CIFTI_GRID_SHAPE).reshape(3, -1)
    xyz = (CIFTI_GRID_AFFINE[:3, :3] @ ijk + CIFTI_GRID_AFFINE[:3, 3:4]).T
    out = {}
    for name, (volume, affine) in maps.items():
        left = vol_to_surf(volume, affine, "fsLR", "L")
        right = vol_to_surf(volume, affine, "fsLR", "R")
        grid = sample_volume(volume, affine, xyz).reshape(CIFTI_GRID_SHAPE)
        out[name] = (left, right, grid)
    return dense_scalar(out)


def cifti_bytes(img: nib.Cifti2Image) -> bytes:
    """The ``.dscalar.nii`` bytes (written with :func:`bids_siamese.bids.derivatives.write_bytes`)."""
    return img.to_bytes()

