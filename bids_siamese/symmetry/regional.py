"""Regional hemispheric asymmetry: homologous atlas regions and their asymmetry indices.

For every pair of homologous atlas regions (``Left_X``/``Right_X``, ``X_L``/``X_R``,
``ctx-lh-X``/``ctx-rh-X``, ...) the region is symmetrised: its voxel set in the left hemisphere is the left
region united with the mirror of the right region, and the right value is read on exactly the mirrored voxels.
``left`` and ``right`` are mean positive intensities (unsmoothed) and ``asymmetry_index = (left - right) /
(left + right)``; a perfectly symmetric image therefore scores exactly 0 in every region, whatever the
atlas's own left-right differences.

The atlas comes from :func:`bids_siamese.atlas.atlas_on_grid`.
"""
from __future__ import annotations

import difflib
import re
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np
import pandas as pd

from ..preproc.grid import mirror
from .asymmetry import Reference, left_hemisphere, robust_sd, symmetric_mask

__all__ = ["split_side", "RegionPair", "homologous_pairs", "regional_asymmetry", "regional_z",
           "top_regions", "format_top_regions", "region_at"]

#: Smallest spread (regional AI units) by which regional deviations are divided.
REGION_SD_FLOOR = 0.005
#: Names of the extra rows of the regional table (see :func:`regional_asymmetry`).
UNLABELLED = "Unlabelled"
WHOLE_HEMISPHERE = "Whole_hemisphere"
#: Number of regions reported as the most asymmetric.
TOP_REGIONS = 5

REGION_COLUMNS = ["region", "left", "right", "asymmetry_index", "n_voxels", "reference_index", "z_score"]

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

