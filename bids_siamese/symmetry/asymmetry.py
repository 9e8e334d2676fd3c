"""Hemispheric asymmetry on the model grid: mirroring, voxelwise and regional indices, reference z-scores.

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

Regional AI. For every pair of homologous atlas regions (``Left_X``/``Right_X``, ``X_L``/``X_R``,
``ctx-lh-X``/``ctx-rh-X``, ...) the region is symmetrised: its voxel set in the left hemisphere is the left
region united with the mirror of the right region, and the right value is read on exactly the mirrored voxels.
``left`` and ``right`` are mean positive intensities (unsmoothed) and ``asymmetry_index = (left - right) /
(left + right)``; a perfectly symmetric image therefore scores exactly 0 in every region, whatever the
atlas's own left-right differences.

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

import difflib
import gzip
import re
import warnings
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Mapping, Sequence

import nibabel as nib
import numpy as np
import pandas as pd
from scipy import ndimage as ndi

from ..errors import NoInputError
from ..resources import Grid, atlas_paths, model_grid, template_brain_path

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
#: Probability threshold (fraction) of the maximum-probability map of a probabilistic atlas.
PROBABILISTIC_THRESHOLD = 0.25
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
#: Smallest spread (regional AI units) by which regional deviations are divided.
REGION_SD_FLOOR = 0.005
#: Names of the extra rows of the regional table (see :func:`regional_asymmetry`).
UNLABELLED = "Unlabelled"
WHOLE_HEMISPHERE = "Whole_hemisphere"
#: Number of regions reported as the most asymmetric.
TOP_REGIONS = 5

REGION_COLUMNS = ["region", "left", "right", "asymmetry_index", "n_voxels", "reference_index", "z_score"]


# ----------------------------------------------------------------------------------------------------------
# Mirroring, intensities, the voxelwise map
# ----------------------------------------------------------------------------------------------------------


def mirror(volume: np.ndarray) -> np.ndarray:
    """The left-right mirror image of a model-grid volume (a flip of the first, x, axis).

    Args:
        volume: array whose first axis is x on a grid symmetric about x = 0.

    Examples:
        >>> mirror(np.arange(4).reshape(4, 1, 1)).ravel().tolist()
        [3, 2, 1, 0]
    """
    return np.ascontiguousarray(np.flip(np.asarray(volume), axis=0))


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
# Atlases on the model grid, homologous regions, regional indices
# ----------------------------------------------------------------------------------------------------------

_SIDE_PATTERNS = (
    (re.compile(r"^(left|right)[_\- ]+(.+)$", re.I), lambda m: (m.group(1)[0].upper(), m.group(2))),
    (re.compile(r"^(.+?)[_\- ]+(left|right)$", re.I), lambda m: (m.group(2)[0].upper(), m.group(1))),
    (re.compile(r"^ctx[_\-]([lr])h[_\-](.+)$", re.I), lambda m: (m.group(1).upper(), "ctx-" + m.group(2))),
    (re.compile(r"^([lr])h[_\-.](.+)$", re.I), lambda m: (m.group(1).upper(), m.group(2))),
    (re.compile(r"^(.+?)[_\-.]([LR])$"), lambda m: (m.group(2), m.group(1))),
    (re.compile(r"^([LR])[_\-.](.+)$"), lambda m: (m.group(1), m.group(2))),
)


def split_side(name: str) -> tuple[str | None, str]:
    """``(side, base name)`` of an atlas label: side ``L``, ``R`` or ``None`` (midline structure).

    Examples:
        >>> split_side("Left_Frontal_Pole"), split_side("Precentral_R"), split_side("ctx-lh-insula")
        (('L', 'Frontal_Pole'), ('R', 'Precentral'), ('L', 'ctx-insula'))
        >>> split_side("Brain-Stem")
        (None, 'Brain-Stem')
    """
    text = str(name).strip()
    for pattern, parse in _SIDE_PATTERNS:
        match = pattern.match(text)
        if match:
            return parse(match)
    return None, text


@dataclass(frozen=True)
class RegionPair:
    """A homologous pair of atlas labels: the common ``name`` and the left and right label values."""

    name: str
    left: int
    right: int


def _norm(base: str) -> str:
    return re.sub(r"[^a-z0-9]+", "", base.lower())


def homologous_pairs(names: Mapping[int, str], min_similarity: float = 0.9) -> list[RegionPair]:
    """Pair left and right labels by their name without the side (case- and punctuation-insensitive; names
    that still differ, such as Harvard-Oxford's ``Left_Lateral_Ventrical``/``Right_Lateral_Ventricle``, are
    paired when :class:`difflib.SequenceMatcher` finds them at least ``min_similarity`` alike).

    Args:
        names: label value -> label name.
        min_similarity: fuzzy-matching threshold for names left unpaired by the exact match.

    Returns:
        Pairs in the order of the left labels.

    Examples:
        >>> homologous_pairs({1: "Left_Lateral_Ventrical", 2: "Right_Lateral_Ventricle", 3: "Brain-Stem",
        ...                   4: "Precentral_L", 5: "Precentral_R"})
        [RegionPair(name='Lateral_Ventricle', left=1, right=2), RegionPair(name='Precentral', left=4, right=5)]
    """
    left: dict[str, tuple[int, str]] = {}
    right: dict[str, tuple[int, str]] = {}
    for value, name in names.items():
        side, base = split_side(name)
        if side == "L":
            left.setdefault(_norm(base), (int(value), base))
        elif side == "R":
            right.setdefault(_norm(base), (int(value), base))
    pairs: dict[int, RegionPair] = {}
    unmatched_right = dict(right)
    for key, (value, base) in left.items():
        if key in unmatched_right:
            r_value, r_base = unmatched_right.pop(key)
            pairs[value] = RegionPair(r_base if len(r_base) >= len(base) else base, value, r_value)
    for key, (value, base) in left.items():
        if value in pairs or not unmatched_right:
            continue
        best = max(unmatched_right, key=lambda k: difflib.SequenceMatcher(None, key, k).ratio())
        if difflib.SequenceMatcher(None, key, best).ratio() >= min_similarity:
            r_value, r_base = unmatched_right.pop(best)
            # the right-hand spelling wins ties of fuzzy matches (HO misspells the left ventricle)
            pairs[value] = RegionPair(r_base, value, r_value)
    return [pairs[v] for v in sorted(pairs)]


def regional_asymmetry(
    positive: np.ndarray,
    mask: np.ndarray,
    labels: np.ndarray,
    pairs: Sequence[RegionPair],
    min_voxels: int = 1,
    extra_regions: bool = True,
) -> pd.DataFrame:
    """Regional indices of homologous regions (symmetrised, see the module docstring).

    Args:
        positive: positive intensities on the model grid (:func:`positive_intensities`).
        mask: brain mask.
        labels: integer label image on the same grid.
        pairs: homologous label pairs.
        min_voxels: regions with fewer voxels in the symmetric mask get ``NaN`` values.
        extra_regions: add two rows after the pairs: :data:`UNLABELLED` (brain voxels that carry a label on
            neither side, e.g. the white matter of Harvard-Oxford, which has no white-matter label) and
            :data:`WHOLE_HEMISPHERE` (every brain voxel).

    Returns:
        Columns ``region, left, right, asymmetry_index, n_voxels`` (one row per pair, then the extra rows).

    Examples:
        >>> lab = np.array([1, 0, 0, 2]).reshape(4, 1, 1)
        >>> pos = np.array([0.5, 1.0, 1.0, 1.0]).reshape(4, 1, 1)
        >>> t = regional_asymmetry(pos, np.ones((4, 1, 1), bool), lab, [RegionPair("A", 1, 2)])
        >>> t.region.tolist(), t[["left", "right"]].values[0].tolist(), round(float(t.asymmetry_index[0]), 3)
        (['A', 'Unlabelled', 'Whole_hemisphere'], [0.5, 1.0], -0.333)
    """
    sym = symmetric_mask(mask) & left_hemisphere(np.shape(mask))
    labels = np.asarray(labels)
    labels_m = mirror(labels)
    pos = np.asarray(positive, dtype=np.float64)
    pos_m = mirror(pos)
    rows = []
    regions = [(pair.name, sym & ((labels == pair.left) | (labels_m == pair.right))) for pair in pairs]
    if extra_regions:
        regions.append((UNLABELLED, sym & (labels == 0) & (labels_m == 0)))
        regions.append((WHOLE_HEMISPHERE, sym))
    for name, region in regions:
        n = int(region.sum())
        if n < max(1, min_voxels):
            rows.append({"region": name, "left": np.nan, "right": np.nan, "asymmetry_index": np.nan,
                         "n_voxels": n})
            continue
        lv, rv = float(pos[region].mean()), float(pos_m[region].mean())
        ai = (lv - rv) / (lv + rv) if lv + rv > 0 else np.nan
        rows.append({"region": name, "left": lv, "right": rv, "asymmetry_index": ai, "n_voxels": n})
    return pd.DataFrame(rows, columns=["region", "left", "right", "asymmetry_index", "n_voxels"])


def resample_to_grid(data: np.ndarray, affine: np.ndarray, grid: Grid, order: int = 1, cval: float = 0.0) -> np.ndarray:
    """Resample a 3D array with voxel-to-mm ``affine`` onto ``grid`` (both in the same world space).

    Args:
        data: source volume.
        affine: source voxel -> mm.
        grid: target grid.
        order: 0 nearest neighbour (labels), 1 linear.
        cval: value outside the source.

    Examples:
        >>> g = model_grid(8.0)
        >>> out = resample_to_grid(np.ones((4, 4, 4)), np.diag([60.0, 60.0, 60.0, 1.0]), g, order=0)
        >>> out.shape == g.shape
        True
    """
    matrix = np.linalg.inv(np.asarray(affine, dtype=np.float64)) @ np.asarray(grid.affine, dtype=np.float64)
    src = np.asarray(data)
    out_dtype = src.dtype if order == 0 else np.float32
    res = ndi.affine_transform(src.astype(np.float32) if order else src, matrix[:3, :3], offset=matrix[:3, 3],
                               output_shape=tuple(grid.shape), order=order, mode="constant", cval=cval,
                               prefilter=False)
    return res.astype(out_dtype, copy=False)


def _read_label_table(path: Path) -> dict[int, str]:
    sep = "\t" if path.suffix == ".tsv" else ","
    table = pd.read_csv(path, sep=sep)
    cols = {c.lower(): c for c in table.columns}
    index_col = cols.get("index") or table.columns[0]
    name_col = cols.get("name") or table.columns[1]
    return {int(i): str(n) for i, n in zip(table[index_col], table[name_col])}


def _stream_4d_argmax(path: Path, voxel_index: np.ndarray, threshold: float) -> np.ndarray:
    """Maximum-probability label (1-based volume index, 0 below ``threshold``) of a 4D atlas at the given flat
    voxel indices, reading one volume at a time (a 4D 1 mm atlas is ~0.5 GB once decompressed)."""
    img = nib.load(str(path))
    shape = img.shape
    n_vox = int(np.prod(shape[:3]))
    dtype = img.get_data_dtype()
    slope = img.dataobj.slope if np.isfinite(img.dataobj.slope) else 1.0
    inter = img.dataobj.inter if np.isfinite(img.dataobj.inter) else 0.0
    offset = int(img.dataobj.offset)
    best = np.zeros(voxel_index.shape, dtype=np.float32)
    label = np.zeros(voxel_index.shape, dtype=np.int32)
    opener = gzip.open if str(path).endswith(".gz") else open
    max_value = 0.0
    with opener(path, "rb") as fh:
        fh.seek(offset)
        for k in range(shape[3]):
            buf = fh.read(n_vox * dtype.itemsize)
            vol = np.frombuffer(buf, dtype=dtype)  # Fortran order: flat index = i + nx * (j + ny * k)
            values = vol[voxel_index].astype(np.float32) * slope + inter
            max_value = max(max_value, float(values.max()) if values.size else 0.0)
            better = values > best
            best[better] = values[better]
            label[better] = k + 1
    scale = 100.0 if max_value > 1.0 else 1.0  # percent or fraction
    label[best < threshold * scale] = 0
    return label


@lru_cache(maxsize=8)
def atlas_on_grid(atlas: str, resolution: float) -> tuple[np.ndarray, dict[int, str]]:
    """An atlas as an integer label image on ``model_grid(resolution)`` (nearest neighbour), with its names.

    A probabilistic (4D) atlas becomes its maximum-probability map thresholded at
    :data:`PROBABILISTIC_THRESHOLD`; its label values are the 1-based volume indices (the labels file's
    ``index`` + 1). ``atlas`` is a bundled atlas name or a 3D/4D NIfTI with a labels table next to it
    (same name with ``.tsv``, tab separated, or ``.csv``; columns ``index`` and ``name``).

    Raises:
        NoInputError: unknown atlas or missing labels table.
    """
    grid = model_grid(resolution)
    path = Path(atlas)
    if path.name.endswith((".nii", ".nii.gz")):
        if not path.is_file():
            raise NoInputError(f"--atlas {atlas} not found; fix: give a bundled atlas name or an existing NIfTI")
        stem = path.name[: -len(".nii.gz")] if path.name.endswith(".nii.gz") else path.name[: -len(".nii")]
        tables = [path.with_name(stem + ext) for ext in (".tsv", ".csv")]
        table = next((t for t in tables if t.is_file()), None)
        if table is None:
            raise NoInputError(f"--atlas {atlas}: no labels table {tables[0].name}; fix: write one with columns "
                               "index and name")
        image, labels_file = path, table
    else:
        image, labels_file, _ = atlas_paths(atlas)
    names = _read_label_table(Path(labels_file))
    img = nib.load(str(image))
    # nearest atlas voxel of every grid voxel centre
    ijk = np.indices(grid.shape).reshape(3, -1)
    world = grid.affine[:3, :3] @ ijk + grid.affine[:3, 3:4]
    vox = np.linalg.inv(img.affine)[:3, :3] @ world + np.linalg.inv(img.affine)[:3, 3:4]
    vox = np.rint(vox).astype(np.int64)
    shape3 = img.shape[:3]
    inside = np.all((vox >= 0) & (vox < np.array(shape3)[:, None]), axis=0)
    flat = np.zeros(inside.shape, dtype=np.int64)
    flat[inside] = vox[0, inside] + shape3[0] * (vox[1, inside] + shape3[1] * vox[2, inside])
    out = np.zeros(inside.shape, dtype=np.int32)
    if len(img.shape) == 4 and img.shape[3] > 1:
        out[inside] = _stream_4d_argmax(Path(image), flat[inside], PROBABILISTIC_THRESHOLD)
        names = {int(k) + 1: v for k, v in names.items()}
    else:
        data = np.asarray(img.dataobj).reshape(-1, order="F")
        out[inside] = np.rint(data[flat[inside]]).astype(np.int32)
    return out.reshape(grid.shape), names


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


def z_map(ai: np.ndarray, mask: np.ndarray, reference: Reference, voxel_mm: float,
          midline_mm: float = MIDLINE_MM) -> np.ndarray:
    """``(AI - reference mean) / sd`` inside the symmetric mask (0 elsewhere).

    With a voxelwise reference sd it is used (floored at its 5th percentile inside the mask, so that
    near-constant voxels cannot explode); otherwise the sd is the scan's own robust spread of the deviation
    over the left hemisphere away from the midline.

    Examples:
        >>> rng = np.random.default_rng(1)
        >>> ai = rng.normal(0, 0.05, (20, 8, 8)); ai = ai - ai[::-1]
        >>> z = z_map(ai, np.ones(ai.shape, bool), Reference(mean=np.zeros(ai.shape)), 2.0)
        >>> 0.9 < float(robust_sd(z[:10])) < 1.1
        True
    """
    sym = symmetric_mask(mask)
    dev = np.where(sym, np.asarray(ai, np.float64) - np.asarray(reference.mean, np.float64), 0.0)
    stat = sym & left_hemisphere(sym.shape) & (midline_distance_mm(sym.shape, voxel_mm) >= midline_mm)
    if not stat.any():
        stat = sym
    if reference.sd is not None:
        sd = np.asarray(reference.sd, dtype=np.float64)
        floor = float(np.percentile(sd[stat], 5)) if stat.any() else 1e-3
        sd = np.maximum(sd, max(floor, 1e-6))
    else:
        sd = float(robust_sd(dev[stat])) if stat.any() else 1.0
        sd = max(sd, 1e-6)
    return np.where(sym, dev / sd, 0.0).astype(np.float32)


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
    sym = symmetric_mask(mask)
    stat = sym & left_hemisphere(sym.shape) & (midline_distance_mm(sym.shape, voxel_mm) >= midline_mm)
    if not stat.any():
        stat = sym & left_hemisphere(sym.shape)
    if not stat.any():
        return 0.0, (0, 0, 0)
    values = np.abs(np.asarray(z, dtype=np.float64)[stat])
    k = int(max(1, min(values.size, round(top_volume_mm3 / float(voxel_mm) ** 3))))
    top = np.partition(values, values.size - k)[values.size - k:]
    where = np.argwhere(stat)
    peak = tuple(int(v) for v in where[int(np.argmax(values))])
    return float(top.mean()), peak  # type: ignore[return-value]


def regional_z(regions: pd.DataFrame, reference: Reference) -> pd.DataFrame:
    """Add ``reference_index`` and ``z_score`` to a regional table.

    With a regional reference sd (group level) ``z = (AI - mean) / sd``; otherwise the deviations from the
    reference mean are standardised by their robust spread across the scan's regions (at least
    :data:`REGION_SD_FLOOR`).

    Examples:
        >>> t = pd.DataFrame({"region": list("abcd"), "asymmetry_index": [0.0, 0.01, -0.01, 0.2]})
        >>> ref = Reference(mean=np.zeros(1), regions_mean=pd.Series({"a": 0.0, "b": 0.0, "c": 0.0, "d": 0.0}))
        >>> regional_z(t, ref).z_score.round(1).tolist()
        [0.0, 0.7, -0.7, 13.5]
    """
    out = regions.copy()
    ref_mean = reference.regions_mean if reference.regions_mean is not None else pd.Series(dtype=float)
    out["reference_index"] = out["region"].map(ref_mean).astype(float)
    dev = out["asymmetry_index"].astype(float) - out["reference_index"].fillna(0.0)
    if reference.regions_sd is not None:
        sd = out["region"].map(reference.regions_sd).astype(float)
        floor = float(np.nanpercentile(sd, 5)) if np.isfinite(sd).any() else 1e-3
        sd = sd.fillna(np.inf).clip(lower=max(floor, 1e-6))
        out["z_score"] = dev / sd
    else:
        finite = dev[np.isfinite(dev)]
        spread = float(robust_sd(finite)) if len(finite) >= 3 else np.nan
        out["z_score"] = dev / max(spread, REGION_SD_FLOOR) if np.isfinite(spread) else np.nan
    return out


def top_regions(regions: pd.DataFrame, n: int = TOP_REGIONS) -> list[dict]:
    """The ``n`` regions with the largest ``|z_score|``: ``region``, ``asymmetry_index``, ``z_score``.

    Examples:
        >>> t = pd.DataFrame({"region": ["a", "b"], "asymmetry_index": [0.1, -0.3], "z_score": [1.0, -4.0]})
        >>> [r["region"] for r in top_regions(t, 1)]
        ['b']
    """
    valid = regions[np.isfinite(regions["z_score"].astype(float))]
    order = valid["z_score"].astype(float).abs().sort_values(ascending=False).index[:n]
    return [
        {"region": str(valid.at[i, "region"]), "asymmetry_index": round(float(valid.at[i, "asymmetry_index"]), 4),
         "z_score": round(float(valid.at[i, "z_score"]), 2)}
        for i in order
    ]


def format_top_regions(regions: list[dict]) -> str:
    """``region (z)`` entries joined by ``;`` for a table cell (``n/a`` when empty).

    Examples:
        >>> format_top_regions([{"region": "Hippocampus", "asymmetry_index": -0.1, "z_score": -5.04}])
        'Hippocampus (z=-5.04)'
    """
    if not regions:
        return "n/a"
    return ";".join(f"{r['region']} (z={r['z_score']:.2f})" for r in regions)


# ----------------------------------------------------------------------------------------------------------
# The template reference and the per-scan analysis
# ----------------------------------------------------------------------------------------------------------


@lru_cache(maxsize=4)
def template_on_model_grid(resolution: float) -> tuple[np.ndarray, np.ndarray]:
    """The MNI152NLin2009cAsym brain (linear) and its mask on ``model_grid(resolution)``."""
    grid = model_grid(resolution)
    img = nib.load(str(template_brain_path()))
    data = resample_to_grid(np.asanyarray(img.dataobj, dtype=np.float32), img.affine, grid, order=1)
    mask = data > 0.05 * float(np.percentile(data[data > 0], 99))
    return data.astype(np.float32), mask


@lru_cache(maxsize=8)
def _template_reference_cached(resolution: float, fwhm_mm: float, atlas: str) -> Reference:
    data, mask = template_on_model_grid(resolution)
    ai = asymmetry_map(data, mask, resolution, fwhm_mm)
    labels, names = atlas_on_grid(atlas, resolution)
    regions = regional_asymmetry(positive_intensities(data, mask), mask, labels, homologous_pairs(names))
    return Reference(mean=ai, source="template", n_scans=0,
                     regions_mean=regions.set_index("region")["asymmetry_index"].astype(float))


def template_reference(resolution: float, fwhm_mm: float = DEFAULT_FWHM_MM, atlas: str = "harvard_oxford") -> Reference:
    """The template's own asymmetry (voxelwise and regional) as the participant-level reference (cached)."""
    return _template_reference_cached(float(resolution), float(fwhm_mm), str(atlas))


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


def region_at(point_mm: Sequence[float], labels: np.ndarray, names: Mapping[int, str], affine: np.ndarray,
              search_mm: float = 10.0) -> str:
    """The atlas label name at a template-mm point (nearest voxel).

    A point outside every label (often white matter, which cortical/subcortical atlases leave out) gets the
    nearest label on the same side within ``search_mm``, as ``<name> (nearest, <d> mm)``; else
    ``Unlabelled (left|right)``.

    Examples:
        >>> lab = np.zeros((4, 1, 1), int); lab[3] = 7
        >>> aff = np.diag([2.0, 2.0, 2.0, 1.0]); aff[0, 3] = -3.0
        >>> region_at((3.0, 0, 0), lab, {7: "Right_X"}, aff), region_at((1.0, 0, 0), lab, {7: "Right_X"}, aff)
        ('Right_X', 'Right_X (nearest, 2 mm)')
        >>> region_at((-3.0, 0, 0), lab, {7: "Right_X"}, aff)
        'Unlabelled (left)'
    """
    affine = np.asarray(affine, dtype=float)
    vox = np.rint(np.linalg.inv(affine) @ np.array([*point_mm, 1.0]))[:3].astype(int)
    vox = np.clip(vox, 0, np.array(labels.shape) - 1)
    value = int(labels[tuple(vox)])
    if value and value in names:
        return str(names[value])
    side = "left" if point_mm[0] < 0 else "right"
    step = np.abs(affine[:3, :3]).max(axis=0)
    reach = np.ceil(search_mm / step).astype(int)
    lo, hi = np.maximum(vox - reach, 0), np.minimum(vox + reach + 1, labels.shape)
    window = labels[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
    found = np.argwhere(np.isin(window, [k for k in names if k]))
    if len(found):
        world = (affine @ np.c_[found + lo, np.ones(len(found))].T)[:3].T
        same_side = (world[:, 0] < 0) == (point_mm[0] < 0)
        dist = np.linalg.norm(world - np.asarray(point_mm, dtype=float), axis=1)
        dist[~same_side] = np.inf
        best = int(np.argmin(dist))
        if np.isfinite(dist[best]) and dist[best] <= search_mm:
            name = names[int(window[tuple(found[best])])]
            return f"{name} (nearest, {dist[best]:.0f} mm)"
    return f"{UNLABELLED} ({side})"


@dataclass
class AsymmetryResult:
    """Everything :func:`analyse_scan` computes for one scan."""

    ai: np.ndarray
    z: np.ndarray
    regions: pd.DataFrame
    report: dict


def analyse_scan(
    data: np.ndarray,
    mask: np.ndarray,
    voxel_mm: float,
    labels: np.ndarray,
    pairs: Sequence[RegionPair],
    reference: Reference,
    fwhm_mm: float = DEFAULT_FWHM_MM,
    top_volume_mm3: float = TOP_VOLUME_MM3,
    affine: np.ndarray | None = None,
    names: Mapping[int, str] | None = None,
) -> AsymmetryResult:
    """Voxelwise map, z-map, regional table and score of one model-grid scan.

    Args:
        data: model-grid intensities.
        mask: model-grid brain mask.
        voxel_mm: grid resolution.
        labels: atlas labels on the grid.
        pairs: homologous label pairs.
        reference: :func:`template_reference` or a group :class:`Reference`.
        fwhm_mm: smoothing.
        top_volume_mm3: volume of the focal statistic.
        affine: grid affine (for the peak in mm); default ``model_grid(voxel_mm).affine``.
        names: atlas label names (for ``peak_region``; omitted when not given).

    Returns:
        :class:`AsymmetryResult`; its ``report`` holds ``asymmetry_score`` (the focal statistic standardised
        against the reference scans when the reference has them, else the focal statistic itself),
        ``focal_z`` (mean |z| of the most deviant ``top_volume_mm3``), ``raw_magnitude`` (mean |AI| over
        the left hemisphere, no reference), ``peak_mm`` (:func:`peak_location`), ``peak_asymmetry_index``,
        ``peak_z`` (both at the left-hemisphere member of the peak pair), ``peak_region`` (:func:`region_at`),
        ``top_regions``.

    Examples:
        >>> rng = np.random.default_rng(0)
        >>> half = rng.normal(size=(6, 8, 8)); img = np.concatenate([half, half[::-1]], 0)
        >>> m = np.ones(img.shape, bool); lab = np.zeros(img.shape, int); lab[:6] = 1; lab[6:] = 2
        >>> ref = Reference(mean=np.zeros(img.shape))
        >>> r = analyse_scan(img, m, 4.0, lab, [RegionPair("A", 1, 2)], ref)
        >>> r.report["raw_magnitude"] < 1e-6, abs(float(r.regions.asymmetry_index[0])) < 1e-9
        (True, True)
    """
    mask = np.asarray(mask) > 0
    affine = model_grid(voxel_mm).affine if affine is None else np.asarray(affine)
    score = score_scan(data, mask, voxel_mm, reference, fwhm_mm, top_volume_mm3)
    ai, z, peak = score.pop("ai"), score.pop("z"), score.pop("peak")
    regions = regional_z(regional_asymmetry(positive_intensities(data, mask), mask, labels, pairs), reference)
    peak_mm = peak_location(peak, z, affine)
    report = {
        "asymmetry_score": round(float(score["asymmetry_score"]), 4),
        "focal_z": round(float(score["focal_z"]), 4),
        "raw_magnitude": round(float(score["raw_magnitude"]), 6),
        "peak_mm": list(peak_mm),
        "peak_region": region_at(peak_mm, labels, names, affine) if names is not None else None,
        "peak_asymmetry_index": round(float(ai[peak]), 4),
        "peak_z": round(float(z[peak]), 3),
        "top_regions": top_regions(regions),
        "reference": reference.source,
        "reference_scans": int(reference.n_scans),
        "fwhm_mm": float(fwhm_mm),
        "top_volume_mm3": float(top_volume_mm3),
        "resolution_mm": float(voxel_mm),
    }
    return AsymmetryResult(ai=ai, z=z, regions=regions[REGION_COLUMNS], report=report)


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
) -> Reference:
    """The dataset reference: voxelwise median and robust sd over the template and the scans' AI maps, the
    same for the regional indices, and the distribution of the scans' focal statistics under it.

    With fewer than :data:`MIN_REFERENCE_SCANS` scans see :func:`few_scans_reference` (the template's voxelwise
    reference, each scan standardised by its own spread, the focal statistic by the dataset's).

    Args:
        ai_maps: the scans' :func:`asymmetry_map` results.
        masks: their brain masks.
        regions: their regional tables (``region``, ``asymmetry_index``).
        template: :func:`template_reference` at the same resolution/smoothing.
        voxel_mm: grid resolution.
        fwhm_mm: the smoothing the maps were made with (the sd map is smoothed with it too).
        top_volume_mm3: volume of the focal statistic.
    """
    n = len(ai_maps)
    if n < MIN_REFERENCE_SCANS:
        return few_scans_reference(ai_maps, masks, template, voxel_mm, top_volume_mm3)
    stack = np.stack([np.asarray(template.mean, np.float32)] + [np.asarray(a, np.float32) for a in ai_maps])
    valid = np.stack([np.asarray(template.mean) != 0] + [symmetric_mask(m) for m in masks])
    data = np.where(valid, stack, np.nan)
    # voxels seen in fewer than half of the maps keep the template's value and the global spread
    enough = valid.sum(axis=0) >= max(2, (n + 1) // 2)
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN voxels (outside every mask)
        med = np.nanmedian(data, axis=0)
        sd = MAD_TO_SD * np.nanmedian(np.abs(data - med), axis=0)
    mean = np.where(enough, med, template.mean).astype(np.float32)
    base = np.nanmedian(sd[enough]) if enough.any() else 0.05
    sd = np.where(enough & np.isfinite(sd), sd, base)
    sd = smooth_in_mask(sd, enough, fwhm_mm, voxel_mm)
    sd = np.where(enough, sd, base).astype(np.float32)
    sd = (sd + mirror(sd)) / 2.0  # the spread of an antisymmetric quantity is symmetric
    mean = (mean - mirror(mean)) / 2.0  # and its centre antisymmetric
    reg = pd.concat([template.regions_mean.rename("template")] +
                    [r.set_index("region")["asymmetry_index"].astype(float).rename(i) for i, r in enumerate(regions)],
                    axis=1) if template.regions_mean is not None else None
    ref = Reference(mean=mean, sd=sd, source="template+dataset", n_scans=n)
    if reg is not None:
        values = reg.to_numpy(dtype=float)
        with np.errstate(all="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # regions absent from every scan
            r_med = np.nanmedian(values, axis=1)
            r_sd = MAD_TO_SD * np.nanmedian(np.abs(values - r_med[:, None]), axis=1)
        ref.regions_mean = pd.Series(r_med, index=reg.index)
        ref.regions_sd = pd.Series(r_sd, index=reg.index)
    focal = np.array([focal_statistic(z_map(a, m, ref, voxel_mm), m, voxel_mm, top_volume_mm3)[0]
                      for a, m in zip(ai_maps, masks)])
    ref.focal_median = float(np.median(focal))
    ref.focal_sd = float(max(robust_sd(focal), 1e-6))
    ref.extra["focal"] = focal
    return ref
