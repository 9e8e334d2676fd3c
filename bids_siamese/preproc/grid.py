"""Resampling onto the model grid, robust intensity normalisation, mirroring, and the template on the grid.

The model grid (:func:`bids_siamese.resources.model_grid`) is a RAS grid in template (MNI) mm,
symmetric about x = 0, so a left-right mirror in template space is ``array[::-1]`` along axis 0
(:func:`mirror`).

Brain mask of the template (one definition for every package): the voxels of the skull-stripped 1 mm
MNI152NLin2009cAsym brain that are non-zero, resampled to the grid trilinearly and thresholded at 0.5 -- the
way a subject's brain mask is brought to the grid (:func:`resample_mask_to_grid`). See :func:`template_on_grid`.
"""
from __future__ import annotations

from functools import lru_cache

import nibabel as nib
import numpy as np
from scipy import ndimage

from ..resources import Grid, template_brain_path

#: Robust z-scores are clipped to +/- this value (in robust standard deviations).
CLIP_Z = 5.0

#: IQR of a standard normal distribution: ``IQR / IQR_TO_SIGMA`` estimates the standard deviation.
IQR_TO_SIGMA = 1.3489795


def mirror(volume: np.ndarray) -> np.ndarray:
    """The left-right mirror image of a model-grid volume (a flip of the first, x, axis; a contiguous copy).

    Args:
        volume: array whose first axis is x on a grid symmetric about x = 0.

    Examples:
        >>> mirror(np.arange(4).reshape(4, 1, 1)).ravel().tolist()
        [3, 2, 1, 0]
    """
    return np.ascontiguousarray(np.flip(np.asarray(volume), axis=0))


def resample_array(data: np.ndarray, affine: np.ndarray, grid: Grid, order: int = 1, cval: float = 0.0) -> np.ndarray:
    """Resample a 3D array with voxel-to-mm ``affine`` onto ``grid`` (both in template space).

    Args:
        data: source volume.
        affine: source voxel -> mm.
        grid: target grid.
        order: 0 nearest neighbour (labels; the dtype is kept), 1 linear (float32).
        cval: value outside the source.

    Examples:
        >>> from bids_siamese.resources import model_grid
        >>> g = model_grid(8.0)
        >>> resample_array(np.ones((4, 4, 4)), np.diag([60.0, 60.0, 60.0, 1.0]), g, order=0).shape == g.shape
        True
    """
    matrix = np.linalg.inv(np.asarray(affine, dtype=np.float64)) @ np.asarray(grid.affine, dtype=np.float64)
    src = np.asarray(data)
    out_dtype = src.dtype if order == 0 else np.float32
    res = ndimage.affine_transform(src.astype(np.float32) if order else src, matrix[:3, :3], offset=matrix[:3, 3],
                                   output_shape=tuple(grid.shape), order=order, mode="constant", cval=cval,
                                   prefilter=False)
    return res.astype(out_dtype, copy=False)


def resample_to_grid(
    img: nib.spatialimages.SpatialImage,
    template_to_subject: np.ndarray,
    grid: Grid,
    order: int = 1,
) -> np.ndarray:
    """Resample ``img`` onto ``grid`` (template space) through ``template_to_subject``.

    Each grid voxel ``ijk`` takes the value of ``img`` at the subject world point
    ``template_to_subject @ grid.affine @ ijk``, read at voxel
    ``inv(img.affine) @ template_to_subject @ grid.affine @ ijk``. Outside ``img`` is 0.

    Args:
        img: a 3D image in subject world space (any voxel orientation).
        template_to_subject: 4x4 template (MNI RAS mm) -> subject world (RAS mm) matrix, as
            returned by :func:`bids_siamese.preproc.register.register_affine`.
        grid: the target grid, e.g. ``model_grid(2.0)``.
        order: spline order (0 nearest, 1 trilinear, 3 cubic).

    Returns:
        float32 array of shape ``grid.shape``.
    """
    data = img.get_fdata(dtype=np.float32)
    data = data.reshape(data.shape[:3]) if data.ndim > 3 else data
    vox2vox = np.linalg.inv(np.asarray(img.affine, dtype=np.float64)) @ np.asarray(template_to_subject) @ grid.affine
    out = np.zeros(grid.shape, dtype=np.float32)
    ndimage.affine_transform(
        data,
        vox2vox[:3, :3],
        offset=vox2vox[:3, 3],
        output_shape=grid.shape,
        output=out,
        order=order,
        mode="constant",
        cval=0.0,
        prefilter=order > 1,
    )
    return out


def resample_mask_to_grid(
    mask: np.ndarray, affine: np.ndarray, template_to_subject: np.ndarray, grid: Grid
) -> np.ndarray:
    """Boolean mask on ``grid``: trilinear resampling of the 0/1 mask, thresholded at 0.5."""
    mask_img = nib.Nifti1Image(np.asarray(mask, dtype=np.float32), np.asarray(affine, dtype=np.float64))
    return resample_to_grid(mask_img, template_to_subject, grid, order=1) > 0.5


def normalise_intensity(data: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Robust z-score within ``mask``: ``(x - median) / (IQR / 1.349)``, clipped to +/-5, 0 outside.

    The median and inter-quartile range are taken over the voxels inside ``mask``; dividing the
    IQR by 1.349 makes the scale a standard deviation for Gaussian data, so values are comparable
    to z-scores but insensitive to lesions, vessels and residual skull. Values are clipped to
    ``[-CLIP_Z, CLIP_Z]``. When the IQR is 0 the standard deviation (or 1) is used instead.

    Returns:
        float32 array of ``data``'s shape, 0 outside ``mask``.

    Raises:
        ValueError: ``mask`` is empty or its shape differs from ``data``'s.
    """
    mask = np.asarray(mask, dtype=bool)
    if mask.shape != data.shape:
        raise ValueError(f"mask shape {mask.shape} differs from data shape {data.shape}")
    if not mask.any():
        raise ValueError("cannot normalise intensities: the mask is empty")
    values = np.asarray(data[mask], dtype=np.float64)
    q25, median, q75 = np.percentile(values, [25, 50, 75])
    scale = (q75 - q25) / IQR_TO_SIGMA
    if not scale > 0:
        scale = float(values.std()) or 1.0
    out = np.zeros(data.shape, dtype=np.float32)
    out[mask] = np.clip((values - median) / scale, -CLIP_Z, CLIP_Z)
    return out


@lru_cache(maxsize=4)
def _template_on_grid_cached(shape: tuple[int, int, int], affine_bytes: bytes) -> tuple[np.ndarray, np.ndarray]:
    """Template brain and mask resampled to a grid (keyed by the grid's shape and affine bytes)."""
    grid = Grid(shape=shape, affine=np.frombuffer(affine_bytes, dtype=np.float64).reshape(4, 4).copy())
    template = nib.load(template_brain_path())
    identity = np.eye(4)
    array = resample_to_grid(template, identity, grid, order=1)
    brain = nib.Nifti1Image((template.get_fdata(dtype=np.float32) > 0).astype(np.float32), template.affine)
    mask = resample_to_grid(brain, identity, grid, order=1) > 0.5
    array[~mask] = 0.0
    array.flags.writeable = False
    mask.flags.writeable = False
    return array, mask


def template_on_grid(grid: Grid) -> tuple[np.ndarray, np.ndarray]:
    """The MNI152NLin2009cAsym brain (float32) and its mask (bool) on ``grid`` (cached, read-only).

    Both are resampled trilinearly from the 1 mm template; the mask is the template's non-zero voxels
    resampled and thresholded at 0.5 (the brain mask definition of the whole package, see the module
    docstring), the same way the subject brain is resampled by :func:`resample_to_grid`; template voxels
    outside the mask are 0.
    """
    affine = np.ascontiguousarray(grid.affine, dtype=np.float64)
    return _template_on_grid_cached(tuple(int(s) for s in grid.shape), affine.tobytes())
