"""Brain extraction with deepbet (in memory), or reuse of an external (e.g. fMRIPrep) brain mask.

deepbet's networks are TorchScript files shipped inside the ``deepbet`` wheel, so nothing is
downloaded. The model is loaded once per device (:func:`bet_model`) and run without writing files.
"""
from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from functools import lru_cache

import nibabel as nib
import numpy as np
import torch
from scipy import ndimage

from ..errors import BadDataError

#: deepbet's default probability threshold for the brain mask.
DEFAULT_THRESHOLD = 0.5


@contextlib.contextmanager
def torch_threads(n_threads: int | None) -> Iterator[None]:
    """Run the block with ``torch.set_num_threads(n_threads)``, restoring the previous value after.

    ``None`` or a value < 1 leaves torch's setting unchanged.
    """
    previous = torch.get_num_threads()
    if n_threads is not None and n_threads >= 1:
        torch.set_num_threads(int(n_threads))
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@lru_cache(maxsize=4)
def bet_model(device: str = "cpu"):
    """deepbet's :class:`~deepbet.bet.BrainExtraction` with both networks on ``device`` (cached)."""
    from deepbet.bet import BrainExtraction  # deferred: heavy, imported only when a brain is extracted

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit.load is deprecated in torch 2.9+
        bet = BrainExtraction(no_gpu=True)
    target = torch.device(device)
    bet.model = bet.model.to(target).eval()
    bet.bbox_model = bet.bbox_model.to(target).eval()
    return bet


def _canonical_data(img: nib.spatialimages.SpatialImage) -> tuple[np.ndarray, np.ndarray]:
    """The float32 voxel array reordered to closest RAS, and the orientation used (``ornt``)."""
    ornt = nib.orientations.io_orientation(np.asarray(img.affine))
    data = img.get_fdata(dtype=np.float32)
    data = data.reshape(data.shape[:3]) if data.ndim > 3 else data
    return np.ascontiguousarray(nib.orientations.apply_orientation(data, ornt)), ornt


def _deepbet_mask(bet, data_ras: np.ndarray, threshold: float) -> np.ndarray:
    """deepbet's mask (largest component, holes filled) of a RAS-ordered array."""
    probabilities = bet.run_model(np.nan_to_num(data_ras).copy())
    mask = probabilities > threshold
    if not mask.any():
        raise ValueError("empty brain mask")
    return np.asarray(bet.postprocess(mask, 0), dtype=bool)


def extract_brain(
    img: nib.spatialimages.SpatialImage,
    device: str = "cpu",
    threshold: float = DEFAULT_THRESHOLD,
    n_threads: int | None = None,
) -> tuple[np.ndarray, nib.Nifti1Image]:
    """Brain mask and skull-stripped image with deepbet, computed in memory.

    deepbet expects RAS-ordered input; the image is reordered internally (no resampling) and the
    mask is mapped back, so both outputs are on ``img``'s own voxel grid whatever its orientation.
    The result is deterministic on CPU for a given ``n_threads``.

    Args:
        img: a 3D T1w image (typically the output of :func:`~bids_siamese.preproc.conform.conform`).
        device: torch device for the networks (``"cpu"``, ``"cuda"``, ``"cuda:1"``, ...).
        threshold: probability threshold for the mask (deepbet's default 0.5).
        n_threads: torch CPU threads to use for this call (``None``: leave torch's setting).

    Returns:
        ``(mask, brain_img)``: a boolean array of ``img``'s shape, and a float32 image (``img``'s
        affine) whose voxels outside the mask are 0.

    Raises:
        BadDataError: deepbet found no brain in the image.
    """
    mask = brain_mask(img, device, threshold, n_threads)
    return mask, brain_image(img, mask)


def brain_mask(
    img: nib.spatialimages.SpatialImage,
    device: str = "cpu",
    threshold: float = DEFAULT_THRESHOLD,
    n_threads: int | None = None,
) -> np.ndarray:
    """:func:`extract_brain`'s mask alone (a boolean array of ``img``'s shape), without the skull-stripped copy.

    Raises:
        BadDataError: deepbet found no brain in the image.
    """
    data_ras, ornt = _canonical_data(img)
    bet = bet_model(str(device))
    try:
        with torch_threads(n_threads), torch.inference_mode():
            mask_ras = _deepbet_mask(bet, data_ras, float(threshold))
    except (AssertionError, ValueError) as err:
        raise BadDataError(
            "brain extraction found no brain in the image (deepbet); "
            "fix: check that the scan is a T1w head image, or provide a brain mask"
        ) from err
    back = nib.orientations.ornt_transform(nib.orientations.axcodes2ornt("RAS"), ornt)
    return np.ascontiguousarray(nib.orientations.apply_orientation(mask_ras, back), dtype=bool)


def brain_image(img: nib.spatialimages.SpatialImage, mask: np.ndarray) -> nib.Nifti1Image:
    """A float32 copy of ``img`` with the voxels outside ``mask`` set to 0."""
    data = img.get_fdata(dtype=np.float32)
    data = data.reshape(data.shape[:3]) if data.ndim > 3 else data
    brain = np.where(mask, data, np.float32(0)).astype(np.float32, copy=False)
    out = nib.Nifti1Image(brain, np.asarray(img.affine))
    out.header.set_xyzt_units("mm")
    return out


def mask_from_image(
    mask_img: nib.spatialimages.SpatialImage, reference_img: nib.spatialimages.SpatialImage
) -> np.ndarray:
    """Boolean mask on ``reference_img``'s voxel grid from an external mask image (e.g. fMRIPrep's).

    Voxels > 0.5 are brain. When the grids differ (shape or affine), the mask is resampled with
    nearest-neighbour interpolation through world coordinates; outside its field of view is
    background.
    """
    mask_data = np.asanyarray(mask_img.dataobj)
    mask_data = mask_data.reshape(mask_data.shape[:3]) if mask_data.ndim > 3 else mask_data
    mask = np.asarray(mask_data, dtype=np.float32) > 0.5
    ref_shape = tuple(int(s) for s in reference_img.shape[:3])
    ref_affine = np.asarray(reference_img.affine, dtype=np.float64)
    mask_affine = np.asarray(mask_img.affine, dtype=np.float64)
    if mask.shape == ref_shape and np.allclose(mask_affine, ref_affine, atol=1e-4):
        return mask
    # reference voxel -> world -> mask voxel
    vox2vox = np.linalg.inv(mask_affine) @ ref_affine
    resampled = ndimage.affine_transform(
        mask.astype(np.uint8),
        vox2vox[:3, :3],
        offset=vox2vox[:3, 3],
        output_shape=ref_shape,
        order=0,
        mode="constant",
        cval=0,
    )
    return resampled.astype(bool)
