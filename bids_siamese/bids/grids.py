"""Grids in output names: ``res-`` means TemplateFlow's grid of that resolution, nothing else; files on the
model grid carry no ``res-`` and describe their grid in the sidecar (:func:`model_grid_sidecar`)."""
from __future__ import annotations

from typing import Any

import nibabel as nib
import numpy as np

from ..preproc.grid import resample_array
from ..resources import GRID_BOX_MM, TEMPLATE, Grid, model_grid
from .derivatives import RESULT_RES

#: TemplateFlow's grids of MNI152NLin2009cAsym by ``res-`` label: shape and voxel size (mm); the affine is
#: diagonal with the first voxel's centre at :data:`TEMPLATEFLOW_ORIGIN_MM`. ``1``: the header of
#: ``tpl-MNI152NLin2009cAsym_res-01_*.nii.gz`` (the bundled copy; tests/test_naming.py compares); ``2``: its 2 mm
#: subsampling from the same first voxel, ``tpl-MNI152NLin2009cAsym_res-02`` and fMRIPrep's ``res-2`` (97x115x97).
TEMPLATEFLOW_GRIDS = {"1": ((193, 229, 193), 1.0), "2": ((97, 115, 97), 2.0)}
TEMPLATEFLOW_ORIGIN_MM = (-96.0, -132.0, -78.0)


def templateflow_grid(label: str) -> Grid:
    """TemplateFlow's MNI152NLin2009cAsym grid ``res-<label>``.

    Examples:
        >>> g = templateflow_grid("2")
        >>> g.shape, g.affine[:3, 3].tolist(), g.resolution
        ((97, 115, 97), [-96.0, -132.0, -78.0], 2.0)
    """
    shape, size = TEMPLATEFLOW_GRIDS[str(label)]
    affine = np.diag([size, size, size, 1.0])
    affine[:3, 3] = TEMPLATEFLOW_ORIGIN_MM
    return Grid(shape=shape, affine=affine)


def model_grid_sidecar(resolution: float) -> dict[str, Any]:
    """Sidecar keys describing the model grid of a file named without ``res-``: ``Resolution`` (in words),
    ``VoxelSizeMM``, ``GridShape``, ``GridAffine`` (voxel -> MNI152NLin2009cAsym mm).

    Examples:
        >>> model_grid_sidecar(2.0)["GridShape"]
        [84, 104, 88]
    """
    grid = model_grid(resolution)
    (x0, x1), (y0, y1), (z0, z1) = GRID_BOX_MM
    return {"Resolution": (f"{resolution:g} mm isotropic bids-siamese model grid: the box x in [{x0:g}, {x1:g}], "
                           f"y in [{y0:g}, {y1:g}], z in [{z0:g}, {z1:g}] mm, symmetric about x = 0 "
                           f"({'x'.join(map(str, grid.shape))} voxels); not a TemplateFlow grid, hence no res-"),
            "VoxelSizeMM": float(resolution), "GridShape": list(grid.shape),
            "GridAffine": np.round(grid.affine, 6).tolist()}


def templateflow_grid_sidecar(label: str) -> dict[str, Any]:
    """``Resolution`` of a file named ``res-<label>`` (BIDS: the meaning of each ``res`` value)."""
    grid = templateflow_grid(label)
    return {"Resolution": {str(label): f"TemplateFlow's {grid.resolution:g} mm grid of {TEMPLATE} "
                                       f"({'x'.join(map(str, grid.shape))} voxels), as tpl-{TEMPLATE}_res-0{label}"}}


def resample_to_templateflow(data: np.ndarray, grid: Grid, label: str = RESULT_RES) -> nib.Nifti1Image:
    """A model-grid float map resampled (linear) onto TemplateFlow's ``res-<label>`` grid, 0 outside the model
    grid's box; float32 with qform and sform set to TemplateFlow's affine."""
    target = templateflow_grid(label)
    img = nib.Nifti1Image(resample_array(np.asarray(data, dtype=np.float32), grid.affine, target, order=1),
                          target.affine)
    img.set_qform(target.affine, 4)
    img.set_sform(target.affine, 4)
    return img
