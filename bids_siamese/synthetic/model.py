"""The dataset-wide model: anatomy plus calibrated structure-volume fields and region weights."""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Iterable, Sequence

import numpy as np
from scipy import ndimage as ndi

from ..errors import UsageError
from .anatomy import Anatomy, build_anatomy, crop_box
from .fields import upsample_linear
from .params import (CEREBRAL_WM_LABELS, COARSE_SPACING, FIELD_SPACING, HIPPOCAMPUS_LABELS, VENTRICLE_LABELS,
                     SignalParams)


@dataclass(frozen=True)
class Structure:
    """A structure whose volume can be changed by a displacement field and measured.

    ``field`` is a unit field (max magnitude 1) on a crop of the field grid starting at ``field_offset``: the
    gradient of the smoothed structure mask, pointing into the structure. Adding ``beta * field`` (mm) to a
    pull-back displacement grows the structure for ``beta > 0`` and shrinks it for ``beta < 0``; ``slope`` is the
    relative volume change per mm of ``beta`` measured on the template. ``mask`` is the 1 mm structure mask crop
    starting at ``mask_offset`` (padded-grid voxels) with a margin wide enough for the displacements.
    """

    name: str
    labels: tuple[int, ...]
    field: np.ndarray
    field_offset: tuple[int, int, int]
    mask: np.ndarray
    mask_offset: tuple[int, int, int]
    slope: float
    template_volume_mm3: float


def add_crop(total: np.ndarray, crop: np.ndarray, offset: Sequence[int], coef: float = 1.0) -> None:
    """``total[:, box] += coef * crop`` for a field crop placed at ``offset`` (clipped to ``total``)."""
    sl = tuple(slice(o, min(o + n, s)) for o, n, s in zip(offset, crop.shape[1:], total.shape[1:]))
    sub = tuple(slice(0, s.stop - s.start) for s in sl)
    total[(slice(None), *sl)] += np.float32(coef) * crop[(slice(None), *sub)]


def structure_volume(anatomy: Anatomy, structure: Structure, displacement: np.ndarray | None) -> float:
    """Volume (template mm3) of ``structure`` in the image ``t -> template(t + displacement(t))``.

    The displacement (on the field grid) is interpolated trilinearly onto the structure's 1 mm crop, exactly
    as the renderer interpolates it, and the structure mask is sampled trilinearly at the displaced points.
    """
    mask = structure.mask.astype(np.float32)
    voxel_volume = abs(np.linalg.det(anatomy.affine[:3, :3]))
    if displacement is None:
        return float(mask.sum() * voxel_volume)
    s = FIELD_SPACING
    f0 = tuple(o // s for o in structure.mask_offset)
    f1 = tuple(min(n, o + (m - 1) // s + 2) for o, m, n in zip(f0, mask.shape, displacement.shape[1:]))
    crop = displacement[(slice(None), *[slice(a, b) for a, b in zip(f0, f1)])]
    mm_to_vox = np.linalg.inv(anatomy.affine)[:3, :3]
    coords = np.indices(mask.shape, dtype=np.float32)
    for a in range(3):
        for b in range(3):
            if mm_to_vox[a, b] != 0.0:
                coords[a] += np.float32(mm_to_vox[a, b]) * upsample_linear(crop[b], s, mask.shape)
    warped = ndi.map_coordinates(mask, coords, order=1, mode="constant", cval=0.0, output=np.float32,
                                 prefilter=False)
    return float(warped.sum() * voxel_volume)


def make_structure(anatomy: Anatomy, name: str, labels: tuple[int, ...], mask: np.ndarray,
                   sigma_mm: float) -> Structure:
    """Unit volume-change field of a structure mask, its template volume and its calibrated slope."""
    margin = 12
    start, stop = crop_box(mask, margin, FIELD_SPACING)
    crop = mask[tuple(slice(a, b) for a, b in zip(start, stop))].astype(np.float32)
    smooth = ndi.gaussian_filter(crop, sigma_mm)[::FIELD_SPACING, ::FIELD_SPACING, ::FIELD_SPACING]
    grad = np.stack(np.gradient(smooth, float(FIELD_SPACING))).astype(np.float32)
    grad /= np.float32(max(float(np.sqrt((grad**2).sum(axis=0)).max()), 1e-12))
    field_offset = tuple(s // FIELD_SPACING for s in start)
    base = Structure(name=name, labels=labels, field=grad, field_offset=field_offset, mask=crop.astype(np.uint8),
                     mask_offset=start, slope=0.0, template_volume_mm3=float(crop.sum()))
    probe = np.zeros((3, *anatomy.field_shape), dtype=np.float32)
    add_crop(probe, grad, field_offset, 1.0)
    slope = structure_volume(anatomy, base, probe) / base.template_volume_mm3 - 1.0
    return Structure(**{**base.__dict__, "slope": float(slope)})


def resolve_regions(names: dict[int, str], regions: Iterable[str]) -> dict[str, tuple[int, ...]]:
    """Atlas labels per requested region (case-insensitive substring of the atlas names, e.g. ``Thalamus``)."""
    out: dict[str, tuple[int, ...]] = {}
    for region in regions:
        hits = tuple(sorted(i for i, n in names.items() if region.lower() in n.lower()))
        if not hits:
            raise UsageError(f"family region '{region}' matches no neuromorphometrics label; fix: use part of a "
                             f"label name such as Thalamus, Hippocampus, Brain_Stem, Caudate, Putamen, Amygdala")
        out[region] = hits
    return out


@dataclass(frozen=True)
class Model:
    """Everything derived once per dataset from the template: anatomy, structures and weights."""

    anatomy: Anatomy
    params: SignalParams
    hippocampus: Structure
    ventricles: Structure
    family_structures: tuple[Structure, ...]  # one per atlas label of the family regions
    family_weight: np.ndarray  # crop of the field grid, 0..1, localises the family displacement field
    family_weight_offset: tuple[int, int, int]
    scalp_weight: np.ndarray  # full field grid, 0 in the brain rising to 1 at 25 mm outside it
    lesion_candidates: dict[str, np.ndarray]  # maps on the coarse grid used to place lesions
    region_labels: dict[str, tuple[int, ...]]


def build_model(params: SignalParams, rng: np.random.Generator) -> Model:
    """Build the dataset-wide model (anatomy, structure fields with calibrated slopes, weights)."""
    anatomy = build_anatomy(rng)
    labels = anatomy.labels
    sigma = params.structure_sigma_mm
    hippocampus = make_structure(anatomy, "hippocampus", HIPPOCAMPUS_LABELS, np.isin(labels, HIPPOCAMPUS_LABELS),
                                 sigma)
    ventricles = make_structure(anatomy, "ventricles", VENTRICLE_LABELS, anatomy.ventricles > 0, sigma)
    region_labels = resolve_regions(anatomy.label_names, params.family_regions)
    family_labels = sorted({lab for labs in region_labels.values() for lab in labs})
    family_structures = tuple(
        make_structure(anatomy, anatomy.label_names[lab], (lab,), labels == lab, sigma) for lab in family_labels
    )
    s = FIELD_SPACING
    region = np.isin(labels, family_labels)
    start, stop = crop_box(region, 20, s)
    crop = ndi.gaussian_filter(region[tuple(slice(a, b) for a, b in zip(start, stop))].astype(np.float32),
                               params.family_region_sigma_mm)[::s, ::s, ::s]
    weight = np.clip(crop / 0.6, 0.0, 1.0).astype(np.float32)
    brain_small = anatomy.brain[::s, ::s, ::s] > 0
    outside = ndi.distance_transform_edt(~brain_small, sampling=s).astype(np.float32)
    c = COARSE_SPACING
    brain_coarse = anatomy.brain[::c, ::c, ::c] > 0
    inside = ndi.distance_transform_edt(brain_coarse, sampling=c).astype(np.float32)
    vent_dist = ndi.distance_transform_edt(anatomy.ventricles[::c, ::c, ::c] == 0, sampling=c).astype(np.float32)
    wm = np.isin(labels[::c, ::c, ::c], CEREBRAL_WM_LABELS)
    return Model(
        anatomy=anatomy, params=params, hippocampus=hippocampus, ventricles=ventricles,
        family_structures=family_structures, family_weight=weight,
        family_weight_offset=tuple(a // s for a in start), scalp_weight=np.clip(outside / 25.0, 0.0, 1.0),
        lesion_candidates={"inside": inside, "ventricle_distance": vent_dist, "wm": wm},
        region_labels=region_labels,
    )


@lru_cache(maxsize=2)
def get_model(params: SignalParams = SignalParams()) -> Model:
    """The dataset-wide model for ``params`` (built once per process; the head uses a fixed random stream)."""
    return build_model(params, np.random.default_rng([20240521, 7]))
