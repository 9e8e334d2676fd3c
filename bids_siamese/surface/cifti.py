"""CIFTI-2 dense scalar files (``.dscalar.nii``) in HCP's standard 91k grayordinate space (``den-91k``).

The brain models are exactly HCP's 91,282 grayordinates, as in HCP's and fMRIPrep's ``space-fsLR_den-91k``
files, built from the HCP files bundled in ``bids_siamese/data/hcp`` (:func:`bids_siamese.resources.hcp_file`):

* cortex left and right on the fsLR 32k mesh without HCP's medial wall (``{L,R}.atlasroi.32k_fs_LR``: 29,696
  and 29,716 vertices);
* 19 subcortical structures as voxels of HCP's ``Atlas_ROIs.2`` on FSL's MNI152NLin6Asym 2 mm grid
  (91 x 109 x 91, ``-2,0,0,90;0,2,0,-126;0,0,2,-72``), 31,870 voxels, in Connectome Workbench's order:
  structures by name, voxels with ``i`` varying fastest (what ``wb_command -cifti-create-dense-*`` writes).

Values come from maps in MNI152NLin2009cAsym: the cortex is sampled on the fsLR 32k midthickness surface
(:func:`bids_siamese.surface.gifti.vol_to_surf`); each subcortical voxel, a point of MNI152NLin6Asym, is looked
up in the 2009c map through the bundled MNI152NLin2009cAsym -> MNI152NLin6Asym affine
(:func:`bids_siamese.resources.template_transform`), trilinear. Connectome Workbench and nibabel read the
result, and ``wb_command -cifti-math`` combines it with any other 91k file.
"""
from __future__ import annotations

import re
from functools import lru_cache
from typing import Mapping

import nibabel as nib
import numpy as np
from nibabel.cifti2 import cifti2_axes

from ..resources import hcp_file, template_transform
from .gifti import sample_volume, vol_to_surf

__all__ = ["CIFTI_GRID_SHAPE", "CIFTI_GRID_AFFINE", "N_GRAYORDINATES", "subcortical_masks", "brain_models",
           "dense_scalar", "dscalar_from_volume", "cifti_bytes"]

CIFTI_GRID_SHAPE = (91, 109, 91)
CIFTI_GRID_AFFINE = np.array([[-2.0, 0, 0, 90], [0, 2.0, 0, -126], [0, 0, 2.0, -72], [0, 0, 0, 1]])
#: HCP's standard count (29,696 + 29,716 cortex vertices + 31,870 subcortical voxels).
N_GRAYORDINATES = 91282


def _label_names(img: nib.Nifti1Image) -> dict[int, str]:
    """Key -> name of the label table that Workbench stores in ``Atlas_ROIs.2``'s NIfTI extension."""
    text = next(ext.content for ext in img.header.extensions if ext.get_code() == 30).decode()  # 30: caret
    pairs = re.findall(r'<Label Key="(\d+)"[^>]*><!\[CDATA\[([^\]]+)\]\]></Label>', text)
    return {int(key): name for key, name in pairs if int(key) != 0}


@lru_cache(maxsize=1)
def _subcortical() -> tuple[tuple[str, np.ndarray], ...]:
    img = nib.load(str(hcp_file("subcortical")))
    if img.shape != CIFTI_GRID_SHAPE or not np.allclose(img.affine, CIFTI_GRID_AFFINE):
        raise ValueError(f"{hcp_file('subcortical')} is not on the HCP 2 mm grid")
    labels = np.rint(np.asarray(img.dataobj)).astype(np.int32)
    out = []
    for key, name in sorted(_label_names(img).items(), key=lambda kv: kv[1]):
        # Workbench lists a structure's voxels with i varying fastest (Fortran order)
        voxels = np.argwhere(labels.T == key)[:, ::-1]
        voxels.setflags(write=False)
        out.append((f"CIFTI_STRUCTURE_{name}", voxels))
    return tuple(out)


def subcortical_masks() -> dict[str, np.ndarray]:
    """Boolean masks on the HCP 2 mm grid, one per subcortical structure of ``Atlas_ROIs.2``.

    Examples:
        >>> masks = subcortical_masks()
        >>> len(masks), int(masks["CIFTI_STRUCTURE_THALAMUS_LEFT"].sum())
        (19, 1288)
    """
    masks = {}
    for name, voxels in _subcortical():
        mask = np.zeros(CIFTI_GRID_SHAPE, dtype=bool)
        mask[tuple(voxels.T)] = True
        masks[name] = mask
    return masks


@lru_cache(maxsize=1)
def brain_models() -> cifti2_axes.BrainModelAxis:
    """HCP's 91k brain-model axis: cortex left, cortex right, then the subcortical structures by name.

    Examples:
        >>> axis = brain_models()
        >>> len(axis), [len(m) for n, _, m in axis.iter_structures()][:2]
        (91282, [29696, 29716])
    """
    axis = None
    for hemi, name in (("L", "CortexLeft"), ("R", "CortexRight")):
        roi = np.asarray(nib.load(str(hcp_file(f"atlasroi_{hemi}"))).agg_data())
        part = cifti2_axes.BrainModelAxis.from_surface(np.flatnonzero(roi > 0), len(roi), name)
        axis = part if axis is None else axis + part
    for name, voxels in _subcortical():
        axis = axis + cifti2_axes.BrainModelAxis(name, voxel=voxels, affine=CIFTI_GRID_AFFINE,
                                                 volume_shape=CIFTI_GRID_SHAPE)
    if len(axis) != N_GRAYORDINATES:
        raise ValueError(f"the bundled HCP files give {len(axis)} grayordinates, not {N_GRAYORDINATES}")
    return axis


def dense_scalar(maps: Mapping[str, tuple[np.ndarray, np.ndarray, np.ndarray]]) -> nib.Cifti2Image:
    """A CIFTI-2 dense scalar image on the 91k grayordinates.

    Args:
        maps: name -> ``(left fsLR-32k values (32492,), right values (32492,), volume on the HCP 2 mm
            MNI152NLin6Asym grid (91, 109, 91))``.

    Returns:
        A ``Cifti2Image`` (rows: the maps; columns: the 91,282 grayordinates).
    """
    axis = brain_models()
    rows = []
    for left, right, volume in maps.values():
        row = []
        for name, _, model in axis.iter_structures():
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


def nlin6_grid_points(voxels: np.ndarray) -> np.ndarray:
    """Voxels ``(N, 3)`` of the HCP 2 mm MNI152NLin6Asym grid as MNI152NLin2009cAsym points (mm), ``(N, 3)``.

    Examples:
        >>> origin = nlin6_grid_points(np.array([[45, 63, 36]]))[0]  # MNI152NLin6Asym (0, 0, 0)
        >>> bool(np.allclose(origin, template_transform().nlin6_to_2009c[:3, 3]))
        True
    """
    matrix = template_transform().nlin6_to_2009c @ CIFTI_GRID_AFFINE
    return (matrix[:3, :3] @ np.asarray(voxels, dtype=np.float64).T + matrix[:3, 3:4]).T


def dscalar_from_volume(maps: Mapping[str, tuple[np.ndarray, np.ndarray]]) -> nib.Cifti2Image:
    """A 91k dense scalar image from MNI152NLin2009cAsym volumes: cortex sampled on fsLR 32k, the subcortical
    voxels looked up through the MNI152NLin2009cAsym -> MNI152NLin6Asym transform.

    Args:
        maps: name -> ``(volume, affine)`` in MNI152NLin2009cAsym space.
    """
    voxels = np.concatenate([v for _, v in _subcortical()])
    xyz = nlin6_grid_points(voxels)
    out = {}
    for name, (volume, affine) in maps.items():
        left = vol_to_surf(volume, affine, "fsLR", "L")
        right = vol_to_surf(volume, affine, "fsLR", "R")
        grid = np.zeros(CIFTI_GRID_SHAPE, dtype=np.float32)  # only the grayordinate voxels are read
        grid[tuple(voxels.T)] = sample_volume(volume, affine, xyz)
        out[name] = (left, right, grid)
    img = dense_scalar(out)
    xfm = template_transform()
    img.header.matrix.metadata = nib.cifti2.Cifti2MetaData({
        "Grayordinates": "HCP 91282: fsLR 32k atlasroi cortex + Atlas_ROIs.2 on MNI152NLin6Asym 2 mm",
        "SourceSpace": "MNI152NLin2009cAsym",
        "SubcorticalTransform": f"{xfm.path.name} (sha256 {xfm.sha256})",
    })
    return img


def cifti_bytes(img: nib.Cifti2Image) -> bytes:
    """The ``.dscalar.nii`` bytes (written with :func:`bids_siamese.bids.derivatives.write_bytes`)."""
    return img.to_bytes()
