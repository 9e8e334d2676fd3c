"""Hemispheric asymmetry on the model grid: the voxelwise index, references, z-maps and scores.

Regional indices are in :mod:`bids_siamese.symmetry.regional`, the per-scan analysis (voxelwise and
regional, against the template) in :mod:`bids_siamese.symmetry.analysis`; mirroring is
:func:`bids_siamese.preproc.grid.mirror`.

The model grid (:func:`bids_siamese.resources.model_grid`) is symmetric about the template's mid-sagittal
plane x = 0 and stored in RAS order, so the mirror image of a volume is ``np.flip(volume, axis=0)`` and the
voxel ``i`` along x is the homologue of voxel ``nx - 1 - i``. Voxels with ``i < nx / 2`` are in the left
hemisphere (x < 0).

Intensities. The participant-level ``desc-preproc`` images are normalised to median 0 and inter-quartile
range 1 inside the brain mask, so they can be negative and a ratio of them is meaningless. Before any ratio,
:func:`positive_intensities` maps the in-mask intensities linearly so that their 1st percentile becomes 0.1
and their 99th percentile 1.0 (values below the 1st percentile are set to 0.1; values above the 99th
percentile keep growing linearly, so hyperintensities are not clipped). On a T1w image this puts CSF near
0.1-0.3, grey matter near 0.6 and white matter near 0.9-1.0, close to the ratios of the raw signal, and the
result is independent of the normalisation's offset and scale.

Asymmetry index (AI). Voxelwise ``AI = (I - I_mirror) / (I + I_mirror)`` on the positive intensities after
Gaussian smoothing inside the brain mask (normalised convolution, so the brain edge is not darkened). The map
is antisymmetric (``AI(x) = -AI(-x)``), lies in (-1, 1) and is 0 outside the symmetric mask
``mask & mirror(mask)``. Sign: ``AI < 0`` at a voxel means it is darker than its mirror voxel, so a
hypointense lesion in the left hemisphere gives negative values there (and the same positive values at the
mirrored position in the right hemisphere).

Scores. Normal brains are not symmetric (the MNI152NLin2009cAsym template itself is not), so raw AI
magnitudes are compared with a *reference*: a z-map ``z = (AI - reference mean) / reference sd``. The
reference mean is the template's own AI map (participant level) or the voxelwise median over the template
and every scan of the dataset (group level); the sd is the scan's own robust spread of ``AI - mean`` over the
brain (participant level) or the voxelwise robust spread across the dataset (group level, at least
:data:`MIN_REFERENCE_SCANS` scans). The scan's focal statistic is the mean ``|z|`` of its
``top_volume_mm3`` most deviant left-hemisphere voxels (the map is antisymmetric, so one hemisphere holds
all the information); ``asymmetry_score`` is that statistic, standardised against the same statistic of the
reference scans at group level (from :data:`MIN_FOCAL_SCANS` scans on; see :func:`few_scans_reference`).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field, replace
from typing import Sequence

import numpy as np
import pandas as pd
from scipy import ndimage as ndi

from ..preproc.grid import mirror
from ..train.data import release_pages, stack_array
from .normative import DEFAULT_COMPONENTS, NormativeModel, column_chunks, fit_normative_matrix

#: In-mask percentiles mapped to :data:`POSITIVE_RANGE` by :func:`positive_intensities`.
POSITIVE_PERCENTILES = (1.0, 99.0)
#: Positive intensity range (floor, value of the upper percentile).
POSITIVE_RANGE = (0.1, 1.0)
#: Default smoothing of the intensities before the voxelwise index (mm FWHM).
DEFAULT_FWHM_MM = 6.0
#: Volume of the most deviant voxels averaged into the focal statistic.
TOP_VOLUME_MM3 = 250.0
#: Voxels closer than this to the mid-sagittal plane are left out of the focal statistic (the interhemispheric
#: fissure is where a sub-millimetre left-right shift produces the largest indices).
MIDLINE_MM = 4.0
#: Voxels closer than this to the border of the symmetric brain mask are left out of the focal statistic and of
#: the scan's spread (:func:`statistic_voxels`).
EDGE_MM = 4.0
#: x planes of the group maps whose voxelwise median is taken at once (bounds the reference's memory), at most;
#: fewer when the slab would hold more than :data:`SLAB_VALUES` values (many scans), down to one plane.
REFERENCE_SLAB = 8
#: Values (scans x voxels) of one slab of the group reference: 2**25 float32 values, 128 MB.
SLAB_VALUES = 2 ** 25
#: Smallest per-scan rescaling of a z-map made with a voxelwise sd (:func:`z_map`).
SCAN_SCALE_FLOOR = 0.25
#: Fewer scans than this: the group reference falls back to the template mean and each scan's own spread.
MIN_REFERENCE_SCANS = 8
#: From this many scans (and below :data:`MIN_REFERENCE_SCANS`) the focal statistic is still standardised
#: against the dataset's scans, so that ``asymmetry_score`` stays a robust z on small studies.
MIN_FOCAL_SCANS = 3
#: With few scans the robust sd of their focal statistics is at least this fraction of its median: a MAD of a
#: handful of values can be close to 0 by chance.
FOCAL_SD_FLOOR_FRACTION = 0.1
#: Robust sd of a normal distribution from its median absolute deviation.
MAD_TO_SD = 1.4826
#: ``asymmetry_score`` above which a scan is reported as ``asymmetry_suspected`` (robust z against the
#: dataset's scans at group level).
ASYMMETRY_THRESHOLD = 3.0


# ----------------------------------------------------------------------------------------------------------
# Mirroring, intensities, the voxelwise map
# ----------------------------------------------------------------------------------------------------------

def left_hemisphere(shape: Sequence[int]) -> np.ndarray:
    """Boolean mask of the voxels with x < 0 (``i < nx / 2``) on a grid symmetric about x = 0.

    Examples:
        >>> left_hemisphere((4, 1, 1)).ravel().tolist()
        [True, True, False, False]
    """
    nx = int(shape[0])
    out = np.zeros(tuple(int(s) for s in shape), dtype=bool)
    out[: nx // 2] = True
    return out


def midline_distance_mm(shape: Sequence[int], voxel_mm: float) -> np.ndarray:
    """|x| in mm of every voxel centre along the first axis, shaped ``(nx, 1, 1)`` for broadcasting.

    Examples:
        >>> midline_distance_mm((4, 2, 2), 2.0).ravel().tolist()
        [3.0, 1.0, 1.0, 3.0]
    """
    nx = int(shape[0])
    x = (np.arange(nx) - (nx - 1) / 2.0) * float(voxel_mm)
    return np.abs(x).reshape(nx, 1, 1)


def symmetric_mask(mask: np.ndarray) -> np.ndarray:
    """Voxels inside the mask whose mirror voxel is inside it too.

    Examples:
        >>> symmetric_mask(np.array([1, 1, 1, 0], bool).reshape(4, 1, 1)).ravel().tolist()
        [False, True, True, False]
    """
    mask = np.asarray(mask) > 0
    return mask & mirror(mask)


def positive_intensities(
    data: np.ndarray,
    mask: np.ndarray,
    percentiles: tuple[float, float] = POSITIVE_PERCENTILES,
    out_range: tuple[float, float] = POSITIVE_RANGE,
) -> np.ndarray:
    """Map in-mask intensities to a positive range (see the module docstring); 0 outside the mask.

    Args:
        data: intensities (any offset and scale, e.g. median 0 / IQR 1).
        mask: brain mask.
        percentiles: in-mask percentiles mapped to ``out_range``.
        out_range: ``(floor, top)``: the low percentile (and anything darker) becomes ``floor``, the high
            percentile ``top``; brighter voxels continue linearly above ``top``.

    Examples:
        >>> d = np.linspace(-2, 2, 101).reshape(101, 1, 1)
        >>> p = positive_intensities(d, np.ones_like(d, bool))
        >>> round(float(p.min()), 3), round(float(np.percentile(p, 99)), 3), bool((p > 0).all())
        (0.1, 1.0, True)
    """
    data = np.asarray(data, dtype=np.float64)
    mask = np.asarray(mask) > 0
    out = np.zeros(data.shape, dtype=np.float32)
    if not mask.any():
        return out
    lo, hi = np.percentile(data[mask], percentiles)
    if not hi > lo:
        hi = lo + 1.0
    floor, top = out_range
    scaled = floor + (top - floor) * (data - lo) / (hi - lo)
    out[mask] = np.maximum(scaled[mask], floor)
    return out


def fwhm_to_sigma_vox(fwhm_mm: float, voxel_mm: float) -> float:
    """Gaussian sigma in voxels for a FWHM in mm.

    Examples:
        >>> round(float(fwhm_to_sigma_vox(6.0, 2.0)), 3)
        1.274
    """
    return float(fwhm_mm) / (2.0 * np.sqrt(2.0 * np.log(2.0))) / float(voxel_mm)


def smooth_in_mask(data: np.ndarray, mask: np.ndarray, fwhm_mm: float, voxel_mm: float) -> np.ndarray:
    """Gaussian smoothing restricted to the mask (normalised convolution); 0 outside the mask.

    Args:
        data: volume.
        mask: where the data are valid.
        fwhm_mm: full width at half maximum; 0 returns the masked data.
        voxel_mm: isotropic voxel size.

    Examples:
        >>> m = np.zeros((9, 9, 9), bool); m[2:7, 2:7, 2:7] = True
        >>> s = smooth_in_mask(np.where(m, 5.0, 0.0), m, 4.0, 1.0)
        >>> bool(np.allclose(s[m], 5.0)), float(s[0, 0, 0])
        (True, 0.0)
    """
    mask = np.asarray(mask) > 0
    data = np.where(mask, np.asarray(data, dtype=np.float64), 0.0)
    if fwhm_mm <= 0:
        return data.astype(np.float32)
    sigma = fwhm_to_sigma_vox(fwhm_mm, voxel_mm)
    num = ndi.gaussian_filter(data, sigma, mode="constant")
    den = ndi.gaussian_filter(mask.astype(np.float64), sigma, mode="constant")
    out = np.zeros(data.shape, dtype=np.float32)
    ok = mask & (den > 1e-6)
    out[ok] = num[ok] / den[ok]
    return out


def asymmetry_index(positive: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Voxelwise ``(I - I_mirror) / (I + I_mirror)`` inside the symmetric mask, 0 elsewhere.

    Args:
        positive: strictly positive intensities inside the mask.
        mask: brain mask.

    Examples:
        >>> p = np.array([1.0, 2.0, 2.0, 3.0]).reshape(4, 1, 1)
        >>> asymmetry_index(p, np.ones_like(p, bool)).ravel().tolist()
        [-0.5, 0.0, 0.0, 0.5]
    """
    sym = symmetric_mask(mask)
    pos = np.asarray(positive, dtype=np.float64)
    mir = mirror(pos)
    out = np.zeros(pos.shape, dtype=np.float32)
    den = pos + mir
    ok = sym & (den > 0)
    out[ok] = (pos[ok] - mir[ok]) / den[ok]
    return out


def asymmetry_map(data: np.ndarray, mask: np.ndarray, voxel_mm: float, fwhm_mm: float = DEFAULT_FWHM_MM) -> np.ndarray:
    """The smoothed, masked voxelwise asymmetry index map of a model-grid image.

    Args:
        data: model-grid intensities (e.g. the ``desc-preproc`` T1w, median 0 / IQR 1).
        mask: model-grid brain mask.
        voxel_mm: grid resolution.
        fwhm_mm: smoothing of the positive intensities before the ratio.

    Returns:
        float32 map in (-1, 1), antisymmetric, 0 outside ``mask & mirror(mask)``.

    Examples:
        >>> rng = np.random.default_rng(0)
        >>> half = rng.normal(size=(5, 6, 6))
        >>> sym = np.concatenate([half, half[::-1]], axis=0)
        >>> float(np.abs(asymmetry_map(sym, np.ones(sym.shape, bool), 2.0)).max()) < 1e-6
        True
    """
    mask = np.asarray(mask) > 0
    positive = positive_intensities(data, mask)
    smooth = smooth_in_mask(positive, mask, fwhm_mm, voxel_mm)
    return asymmetry_index(smooth, mask)


# ----------------------------------------------------------------------------------------------------------
# References, z-maps and scores
# ----------------------------------------------------------------------------------------------------------


def robust_sd(values: np.ndarray, axis: int | None = None) -> np.ndarray | float:
    """``1.4826 * median(|x - median(x)|)``.

    Examples:
        >>> round(float(robust_sd(np.random.default_rng(0).normal(0, 2, 20001))), 1)
        2.0
    """
    values = np.asarray(values, dtype=np.float64)
    med = np.median(values, axis=axis, keepdims=axis is not None)
    mad = np.median(np.abs(values - med), axis=axis)
    return MAD_TO_SD * mad


@dataclass
class Reference:
    """What a scan's asymmetry is compared with.

    Attributes:
        mean: reference AI map (the template's, or the voxelwise median over template and dataset).
        sd: voxelwise robust sd map, or ``None`` (then each scan's own global spread is used).
        source: ``template`` or ``template+dataset``.
        n_scans: number of dataset scans in the reference (0 for the template alone).
        regions_mean: reference regional AI per region name.
        regions_sd: robust sd of the regional AI per region (``None``: each scan's spread across regions).
        focal_median: median focal statistic of the reference scans (``None`` at participant level).
        focal_sd: robust sd of the focal statistic of the reference scans.
        normative: the dataset's modes of normal asymmetry (:mod:`bids_siamese.symmetry.normative`), or
            ``None``. With it a scan's expected map is ``mean`` plus its projection on the modes:
            :meth:`member` for a scan of the dataset (out of fold), any other scan is projected on every scan's
            modes by :func:`z_map`.
    """

    mean: np.ndarray
    sd: np.ndarray | None = None
    source: str = "template"
    n_scans: int = 0
    regions_mean: pd.Series | None = None
    regions_sd: pd.Series | None = None
    focal_median: float | None = None
    focal_sd: float | None = None
    extra: dict = field(default_factory=dict)
    normative: NormativeModel | None = None

    def member(self, index: int) -> "Reference":
        """The reference of the dataset's scan ``index`` (its out-of-fold expected map as ``mean``)."""
        if self.normative is None:
            return self
        return replace(self, mean=self.normative.member_mean(index, self.mean), normative=None)

    def expected_map(self, ai: np.ndarray) -> np.ndarray:
        """The map a scan outside the dataset is expected to have (``mean`` without normative modes)."""
        if self.normative is None:
            return np.asarray(self.mean)
        return self.normative.expected(ai, self.mean)


def statistic_voxels(mask: np.ndarray, voxel_mm: float, midline_mm: float = MIDLINE_MM,
                     edge_mm: float = EDGE_MM) -> np.ndarray:
    """The voxels a scan's spread and focal statistic are read from: left hemisphere of the symmetric mask, at
    least ``midline_mm`` from the mid-sagittal plane and more than ``edge_mm`` inside the symmetric mask's border.

    The border is where two brain masks (or two heads' outlines) differ, so its asymmetry indices are the
    largest in every scan and say nothing about a lesion. Criteria that leave nothing are dropped (edge first,
    then midline).

    Examples:
        >>> m = np.zeros((12, 12, 12), bool); m[1:11, 1:11, 1:11] = True
        >>> int(statistic_voxels(m, 2.0, midline_mm=0.0).sum()), int(statistic_voxels(m, 2.0, 0.0, 0.0).sum())
        (108, 500)
    """
    sym = symmetric_mask(mask)
    left = sym & left_hemisphere(sym.shape)
    stat = left & (midline_distance_mm(sym.shape, voxel_mm) >= midline_mm)
    if edge_mm > 0 and stat.any():
        radius = float(edge_mm) / float(voxel_mm)  # voxels farther than this from the outside (erosion by a ball)
        reach = int(np.floor(radius))
        offsets = np.indices((2 * reach + 1,) * 3) - reach
        inner = stat & ndi.binary_erosion(sym, structure=(offsets ** 2).sum(axis=0) <= radius ** 2, border_value=0)
        stat = inner if inner.any() else stat
    return stat if stat.any() else left


def z_map(ai: np.ndarray, mask: np.ndarray, reference: Reference, voxel_mm: float,
          midline_mm: float = MIDLINE_MM) -> np.ndarray:
    """``(AI - reference mean) / sd`` inside the symmetric mask (0 elsewhere).

    With a voxelwise reference sd it is used (floored at its 5th percentile inside the mask, so that
    near-constant voxels cannot explode) and the result is divided by the scan's own robust spread of it
    (at least :data:`SCAN_SCALE_FLOOR`): the dataset says *where* asymmetry varies, the scan how much it varies
    in this head, so a head whose normal asymmetry is larger everywhere does not look focally abnormal and its
    lesion is not measured against another head's spread. Without a voxelwise sd the sd is the scan's own
    robust spread of the deviation. Spreads are read from :func:`statistic_voxels`.

    Examples:
        >>> rng = np.random.default_rng(1)
        >>> ai = rng.normal(0, 0.05, (20, 8, 8)); ai = ai - ai[::-1]
        >>> z = z_map(ai, np.ones(ai.shape, bool), Reference(mean=np.zeros(ai.shape)), 2.0)
        >>> 0.9 < float(robust_sd(z[:10])) < 1.1
        True
        >>> z2 = z_map(3 * ai, np.ones(ai.shape, bool), Reference(mean=np.zeros(ai.shape), sd=np.full(ai.shape, 0.05)), 2.0)
        >>> 0.9 < float(robust_sd(z2[:10])) < 1.1
        True
    """
    sym = symmetric_mask(mask)
    dev = np.where(sym, np.asarray(ai, np.float64) - np.asarray(reference.expected_map(ai), np.float64), 0.0)
    stat = statistic_voxels(mask, voxel_mm, midline_mm)
    if not stat.any():
        stat = sym
    if reference.sd is not None:
        sd = np.asarray(reference.sd, dtype=np.float64)
        floor = float(np.percentile(sd[stat], 5)) if stat.any() else 1e-3
        sd = np.maximum(sd, max(floor, 1e-6))
        z = dev / sd
        scale = float(robust_sd(z[stat])) if stat.any() else 1.0
        z = z / max(scale, SCAN_SCALE_FLOOR)
    else:
        sd = float(robust_sd(dev[stat])) if stat.any() else 1.0
        z = dev / max(sd, 1e-6)
    return np.where(sym, z, 0.0).astype(np.float32)


def focal_statistic(z: np.ndarray, mask: np.ndarray, voxel_mm: float, top_volume_mm3: float = TOP_VOLUME_MM3,
                    midline_mm: float = MIDLINE_MM) -> tuple[float, tuple[int, int, int]]:
    """Mean ``|z|`` of the ``top_volume_mm3`` most deviant left-hemisphere voxels, and the peak voxel.

    Args:
        z: z-map (antisymmetric, so only the left hemisphere is read).
        mask: brain mask.
        voxel_mm: grid resolution.
        top_volume_mm3: volume averaged (at least one voxel).
        midline_mm: voxels closer to x = 0 are left out.

    Examples:
        >>> z = np.zeros((10, 4, 4)); z[1, 2, 2] = -6.0
        >>> focal_statistic(z, np.ones(z.shape, bool), 4.0, top_volume_mm3=64.0)
        (6.0, (1, 2, 2))
    """
    stat = statistic_voxels(mask, voxel_mm, midline_mm)
    if not stat.any():
        return 0.0, (0, 0, 0)
    values = np.abs(np.asarray(z, dtype=np.float64)[stat])
    k = int(max(1, min(values.size, round(top_volume_mm3 / float(voxel_mm) ** 3))))
    top = np.partition(values, values.size - k)[values.size - k:]
    where = np.argwhere(stat)
    peak = tuple(int(v) for v in where[int(np.argmax(values))])
    return float(top.mean()), peak  # type: ignore[return-value]


def score_scan(
    data: np.ndarray,
    mask: np.ndarray,
    voxel_mm: float,
    reference: Reference,
    fwhm_mm: float = DEFAULT_FWHM_MM,
    top_volume_mm3: float = TOP_VOLUME_MM3,
) -> dict:
    """The voxelwise part of :func:`analyse_scan`: map, z-map and scores, without the regions.

    Returns:
        ``asymmetry_score``, ``focal_z``, ``raw_magnitude`` (floats), ``ai``, ``z`` (maps) and ``peak``
        (voxel index of the most deviant left-hemisphere voxel).

    Examples:
        >>> rng = np.random.default_rng(0)
        >>> img = np.linspace(-2, 2, 8)[None, None, :] + 0.02 * rng.normal(size=(12, 8, 8)); img[2, 4, 4] = -2
        >>> s = score_scan(img, np.ones(img.shape, bool), 4.0, Reference(mean=np.zeros(img.shape)))
        >>> s["peak"], s["asymmetry_score"] > 3
        ((2, 4, 4), True)
    """
    mask = np.asarray(mask) > 0
    return score_map(asymmetry_map(data, mask, voxel_mm, fwhm_mm), mask, voxel_mm, reference, top_volume_mm3)


def score_map(ai: np.ndarray, mask: np.ndarray, voxel_mm: float, reference: Reference,
              top_volume_mm3: float = TOP_VOLUME_MM3) -> dict:
    """:func:`score_scan` for an existing asymmetry map (same keys).

    Examples:
        >>> ai = np.zeros((12, 8, 8)); ai[2, 4, 4], ai[9, 4, 4] = -0.3, 0.3
        >>> ai += np.random.default_rng(0).normal(0, 0.01, ai.shape) * [[[1]]]
        >>> score_map(ai, np.ones(ai.shape, bool), 4.0, Reference(mean=np.zeros(ai.shape)))["peak"]
        (2, 4, 4)
    """
    mask = np.asarray(mask) > 0
    z = z_map(ai, mask, reference, voxel_mm)
    focal, peak = focal_statistic(z, mask, voxel_mm, top_volume_mm3)
    sym = symmetric_mask(mask) & left_hemisphere(mask.shape)
    raw = float(np.abs(ai[sym]).mean()) if sym.any() else 0.0
    if reference.focal_median is not None and reference.focal_sd:
        score = (focal - reference.focal_median) / reference.focal_sd
    else:
        score = focal
    return {"asymmetry_score": float(score), "focal_z": float(focal), "raw_magnitude": raw, "ai": ai, "z": z,
            "peak": peak}


def peak_location(peak: Sequence[int], z: np.ndarray, affine: np.ndarray) -> tuple[float, float, float]:
    """Template mm of the most deviant voxel pair, on the side that is darker than the reference expects.

    The z-map is antisymmetric, so the peak found in the left hemisphere stands for a pair of mirrored voxels.
    With ``z < 0`` the left voxel is darker than expected and its position is returned; with ``z > 0`` the
    right one is, and the mirrored position (x -> -x) is returned. T1w lesions are mostly hypointense, so this
    is usually where the lesion is; a hyperintense lesion is reported at its mirror position.

    Examples:
        >>> z = np.zeros((4, 1, 1)); z[0] = 5.0
        >>> peak_location((0, 0, 0), z, np.diag([2.0, 2.0, 2.0, 1.0]) + np.array([[0, 0, 0, -3.0]] + [[0] * 4] * 3))
        (3.0, 0.0, 0.0)
    """
    xyz = (np.asarray(affine, dtype=float) @ np.array([*peak, 1.0]))[:3]
    if float(z[tuple(peak)]) > 0:
        xyz[0] = -xyz[0]
    return tuple(round(float(v), 1) for v in xyz)  # type: ignore[return-value]



def few_scans_reference(ai_maps: Sequence[np.ndarray], masks: Sequence[np.ndarray], template: Reference,
                        voxel_mm: float, top_volume_mm3: float = TOP_VOLUME_MM3) -> Reference:
    """The reference of a small study (fewer than :data:`MIN_REFERENCE_SCANS` scans).

    Too few scans for a voxelwise spread: each scan's z-map keeps the template's mean and the scan's own spread
    (as at participant level), but the focal statistic -- the mean ``|z|`` of the most deviant voxels, which is
    large for every real brain (8-19 on the tiny demo) -- is standardised against the same statistic of the
    dataset's scans (median, robust sd floored at :data:`FOCAL_SD_FLOOR_FRACTION` of the median). With fewer
    than :data:`MIN_FOCAL_SCANS` scans the template reference is returned unchanged.

    Examples:
        >>> rng = np.random.default_rng(0)
        >>> maps = [rng.normal(0, 0.02, (16, 8, 8)) for _ in range(5)]
        >>> maps = [a - a[::-1] for a in maps]
        >>> masks = [np.ones(a.shape, bool) for a in maps]
        >>> ref = few_scans_reference(maps, masks, Reference(mean=np.zeros((16, 8, 8))), 4.0)
        >>> ref.n_scans, ref.focal_median > 1, ref.focal_sd > 0
        (5, True, True)
    """
    n = len(ai_maps)
    if n < MIN_FOCAL_SCANS:
        return template
    focal = np.array([focal_statistic(z_map(a, m, template, voxel_mm), m, voxel_mm, top_volume_mm3)[0]
                      for a, m in zip(ai_maps, masks)])
    median = float(np.median(focal))
    ref = Reference(mean=template.mean, sd=template.sd, source="template+dataset focal", n_scans=n,
                    regions_mean=template.regions_mean, regions_sd=template.regions_sd, focal_median=median,
                    focal_sd=float(max(robust_sd(focal), FOCAL_SD_FLOOR_FRACTION * abs(median), 1e-6)))
    ref.extra["focal"] = focal
    return ref


def group_reference(
    ai_maps: Sequence[np.ndarray],
    masks: Sequence[np.ndarray],
    regions: Sequence[pd.DataFrame],
    template: Reference,
    voxel_mm: float,
    fwhm_mm: float = DEFAULT_FWHM_MM,
    top_volume_mm3: float = TOP_VOLUME_MM3,
    groups: Sequence[str] | None = None,
    components: int = DEFAULT_COMPONENTS,
) -> Reference:
    """The dataset reference: voxelwise median and robust sd over the template and the scans' AI maps, the
    same for the regional indices, and the distribution of the scans' focal statistics under it.

    With ``components > 0`` each scan's expected map is the median plus its projection on the dataset's first
    ``components`` modes of normal asymmetry, fitted out of fold (:mod:`bids_siamese.symmetry.normative`), and
    the voxelwise sd is the robust spread of the scans' residuals: a heterogeneous population's large-scale
    head-to-head differences no longer widen the spread that a focal lesion is measured against. Score the
    dataset's own scans with :meth:`Reference.member`.

    With fewer than :data:`MIN_REFERENCE_SCANS` scans see :func:`few_scans_reference` (the template's voxelwise
    reference, each scan standardised by its own spread, the focal statistic by the dataset's).

    Memory: the maps and masks are read a slab of x planes (all scans) or a scan at a time, so they may be
    memory-mapped stacks (:func:`~bids_siamese.train.data.stack_array`, e.g. float16 maps: the results are then
    those of the float32 maps within float16 rounding); the normative matrices are stacks too.

    Args:
        ai_maps: the scans' :func:`asymmetry_map` results (a list, or an ``(n, X, Y, Z)`` stack).
        masks: their brain masks (or symmetric masks: only ``mask & mirror(mask)`` is used), likewise.
        regions: their regional tables (``region``, ``asymmetry_index``).
        template: :func:`template_reference` at the same resolution/smoothing.
        voxel_mm: grid resolution.
        fwhm_mm: the smoothing the maps were made with (the sd map is smoothed with it too).
        top_volume_mm3: volume of the focal statistic.
        groups: participant of each scan (its sessions share a fold of the normative modes).
        components: modes of normal asymmetry (0: the voxelwise median and spread alone).
    """
    n = len(ai_maps)
    if n < MIN_REFERENCE_SCANS:
        return few_scans_reference(ai_maps, masks, template, voxel_mm, top_volume_mm3)
    shape = np.shape(template.mean)
    template_map = np.asarray(template.mean, np.float32)
    template_seen = np.asarray(template.mean) != 0
    # voxels seen in fewer than half of the maps keep the template's value and the global spread
    enough = np.empty(shape, bool)
    med = np.empty(shape, np.float32)
    sd = np.empty(shape, np.float32)
    planes = int(np.clip(SLAB_VALUES // ((n + 1) * int(np.prod(shape[1:]))), 1, REFERENCE_SLAB))
    for start in range(0, shape[0], planes):  # a slab of x planes at a time: memory of one slab
        slab = slice(start, start + planes)
        valid = np.stack([template_seen[slab]] + [symmetric_slab(m, slab) for m in masks])
        enough[slab] = valid.sum(axis=0) >= max(2, (n + 1) // 2)
        data = np.where(valid, np.stack([template_map[slab]] + [np.asarray(a[slab], np.float32) for a in ai_maps]),
                        np.float32(np.nan))
        release_pages(ai_maps)
        release_pages(masks)
        with np.errstate(all="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN voxels (outside every mask)
            med[slab] = column_nanmedian(data)
            sd[slab] = MAD_TO_SD * column_nanmedian(np.abs(data - med[slab]))
        del data, valid
    mean = np.where(enough, med, template.mean).astype(np.float32)
    mean = (mean - mirror(mean)) / 2.0  # the centre of an antisymmetric quantity is antisymmetric
    base = np.nanmedian(sd[enough]) if enough.any() else 0.05
    sd = np.where(enough & np.isfinite(sd), sd, base)
    normative = None
    if components > 0:
        normative, residual_sd = _normative_spread(ai_maps, masks, mean, enough, groups, components)
        sd = np.where(np.isfinite(residual_sd), residual_sd, sd)
    sd = smooth_in_mask(sd, enough, fwhm_mm, voxel_mm)
    sd = np.where(enough, sd, base).astype(np.float32)
    sd = (sd + mirror(sd)) / 2.0  # the spread of an antisymmetric quantity is symmetric
    reg = pd.concat([template.regions_mean.rename("template")] +
                    [r.set_index("region")["asymmetry_index"].astype(float).rename(i) for i, r in enumerate(regions)],
                    axis=1) if template.regions_mean is not None else None
    ref = Reference(mean=mean.astype(np.float32), sd=sd, source="template+dataset", n_scans=n, normative=normative)
    if normative is not None:
        ref.source = f"template+dataset, {normative.n_components} normative modes"
    if reg is not None:
        values = reg.to_numpy(dtype=float)
        with np.errstate(all="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # regions absent from every scan
            r_med = np.nanmedian(values, axis=1)
            r_sd = MAD_TO_SD * np.nanmedian(np.abs(values - r_med[:, None]), axis=1)
        ref.regions_mean = pd.Series(r_med, index=reg.index)
        ref.regions_sd = pd.Series(r_sd, index=reg.index)
    focal = np.empty(n)
    for i in range(n):  # a scan at a time: the stacks may be memory-mapped
        a, m = np.asarray(ai_maps[i]), np.asarray(masks[i])
        focal[i] = focal_statistic(z_map(a, m, ref.member(i), voxel_mm), m, voxel_mm, top_volume_mm3)[0]
        if i % 64 == 63:
            release_pages(ai_maps)
            release_pages(masks)
    ref.focal_median, ref.focal_sd = lower_half_spread(focal)
    ref.extra["focal"] = focal
    return ref


def column_nanmedian(values: np.ndarray) -> np.ndarray:
    """``np.nanmedian(values, axis=0)`` of a float array, the same values (NaN where a column has none), by one
    sort along axis 0 (NaNs sort last) and the middle of each column's valid values. numpy's own nanmedian along
    an axis goes through a masked-array sort below 600 rows and a Python call per column above: this is 5-50 times
    faster on the group reference's slabs (issue 27).

    Examples:
        >>> v = np.array([[1.0, np.nan, np.nan], [3.0, 2.0, np.nan], [2.0, 4.0, np.nan], [9.0, np.nan, np.nan]])
        >>> column_nanmedian(v).tolist()[:2], bool(np.isnan(column_nanmedian(v)[2]))
        ([2.5, 3.0], True)
    """
    values = np.asarray(values)
    ordered = np.sort(values, axis=0)
    count = np.count_nonzero(~np.isnan(values), axis=0)[None]
    low = np.take_along_axis(ordered, np.maximum(count - 1, 0) // 2, axis=0)[0]
    high = np.take_along_axis(ordered, count // 2 - (count == 0), axis=0)[0]
    with np.errstate(invalid="ignore"):
        middle = (low + high) / np.asarray(2, values.dtype)
    return np.where(count[0] > 0, middle, np.asarray(np.nan, values.dtype))


def lower_half_spread(values: np.ndarray) -> tuple[float, float]:
    """Median and a robust sd from the lower half of the distribution: ``(median - q25) / 0.6745``.

    A lesion only ever raises a scan's focal statistic, so the scans with lesions stretch the upper tail; the
    lower half is what lesion-free scans look like, up to half the dataset being abnormal.

    Examples:
        >>> clean = np.random.default_rng(0).normal(10, 1, 600)
        >>> m, sd = lower_half_spread(np.r_[clean, np.full(300, 40.0)])
        >>> round(sd, 1), round(float(robust_sd(np.r_[clean, np.full(300, 40.0)])), 1)
        (1.5, 2.1)
    """
    values = np.asarray(values, dtype=np.float64)
    median = float(np.median(values))
    return median, float(max((median - float(np.percentile(values, 25))) / 0.6745, 1e-6))


def symmetric_slab(mask: np.ndarray, slab: slice) -> np.ndarray:
    """``symmetric_mask(mask)[slab]`` for a slab of x planes (``slab.start`` to ``slab.stop``, step 1), reading
    only the slab and its mirror planes (a mask in a memory-mapped stack stays on disk).

    Examples:
        >>> m = np.array([1, 1, 1, 0], bool).reshape(4, 1, 1)
        >>> symmetric_slab(m, slice(0, 2)).ravel().tolist(), symmetric_mask(m)[:2].ravel().tolist()
        ([False, True], [False, True])
    """
    nx = np.shape(mask)[0]
    start, stop, _ = slab.indices(nx)
    here = np.asarray(mask[start:stop]) > 0
    there = np.asarray(mask[nx - stop:nx - start]) > 0
    return here & there[::-1]


def _normative_spread(ai_maps: Sequence[np.ndarray], masks: Sequence[np.ndarray], mean: np.ndarray,
                      enough: np.ndarray, groups: Sequence[str] | None,
                      components: int) -> tuple[NormativeModel, np.ndarray]:
    """The normative modes of the dataset and the voxelwise robust sd of the scans' out-of-fold residuals
    (NaN outside the modelled voxels; the right hemisphere mirrors the left). The ``(scans, voxels)`` matrices
    are :func:`~bids_siamese.train.data.stack_array` stacks (memory-mapped for a large cohort), filled a scan at a
    time and reduced a column chunk at a time."""
    voxels = np.flatnonzero((enough & left_hemisphere(enough.shape)).ravel())
    n, fallback = len(ai_maps), np.asarray(mean, np.float32).ravel()[voxels]
    seen = stack_array((n, voxels.size), bool)
    # each scan's values at the modelled voxels, the median where the scan has no brain
    x = stack_array((n, voxels.size), np.float32)
    for i in range(n):
        seen[i] = symmetric_mask(masks[i]).ravel()[voxels]
        x[i] = np.where(seen[i], np.asarray(ai_maps[i], np.float32).ravel()[voxels], fallback)
        if i % 64 == 63:
            for stack in (seen, x, ai_maps, masks):
                release_pages(stack)
    model = fit_normative_matrix(x, voxels, enough.shape, groups, components)
    spread = np.empty(voxels.size, np.float32)
    for cols in column_chunks(n, voxels.size):
        residual = np.where(seen[:, cols], np.asarray(x[:, cols]) - np.asarray(model.member_expected[:, cols]),
                            np.nan)
        for stack in (seen, x, model.member_expected):
            release_pages(stack)
        with np.errstate(all="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            centre = column_nanmedian(residual)
            spread[cols] = MAD_TO_SD * column_nanmedian(np.abs(residual - centre))
    out = np.full(enough.size, np.nan, dtype=np.float32)
    out[voxels] = spread
    out = out.reshape(enough.shape)
    nx = enough.shape[0]
    out[nx - nx // 2:] = out[: nx // 2][::-1]
    return model, out
