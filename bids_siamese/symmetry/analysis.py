"""The per-scan asymmetry analysis: voxelwise map, z-map, regional table and scores against the template's
own asymmetry (participant level) or a group reference."""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Mapping, Sequence

import numpy as np
import pandas as pd

from ..atlas import DEFAULT_ATLAS, atlas_on_grid
from ..preproc.grid import template_on_grid
from ..resources import model_grid
from .asymmetry import DEFAULT_FWHM_MM, TOP_VOLUME_MM3, Reference, asymmetry_map, positive_intensities, score_scan, peak_location
from .regional import (
    REGION_COLUMNS,
    RegionPair,
    homologous_pairs,
    region_at,
    regional_asymmetry,
    regional_z,
    top_regions,
)


@lru_cache(maxsize=8)
def _template_reference_cached(resolution: float, fwhm_mm: float, atlas: str) -> Reference:
    data, mask = template_on_grid(model_grid(resolution))
    ai = asymmetry_map(data, mask, resolution, fwhm_mm)
    labels, names = atlas_on_grid(atlas, resolution)
    regions = regional_asymmetry(positive_intensities(data, mask), mask, labels, homologous_pairs(names))
    return Reference(mean=ai, source="template", n_scans=0,
                     regions_mean=regions.set_index("region")["asymmetry_index"].astype(float))


def template_reference(resolution: float, fwhm_mm: float = DEFAULT_FWHM_MM, atlas: str = DEFAULT_ATLAS) -> Reference:
    """The template's own asymmetry (voxelwise and regional) as the participant-level reference (cached)."""
    return _template_reference_cached(float(resolution), float(fwhm_mm), str(atlas))



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

