"""Family (twin) signal: the subject's session-1 displacement with its shared family part.

MZ co-twins share the family part; a DZ twin mixes the family draw with an own draw (correlation 0.5).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from .fields import exponentiate, index_translation, smooth_displacement
from .model import Model, Structure, add_crop
from .params import FIELD_SPACING


@dataclass(frozen=True)
class FamilyPart:
    """One draw of family signal: a localised stationary velocity field (mm, on the family-weight crop of the
    field grid; its flow is the family displacement) and log-volume factors, one per family structure."""

    field: np.ndarray
    log_volume: np.ndarray


def draw_family_part(model: Model, rng: np.random.Generator) -> FamilyPart:
    """One draw of the family signal (used as the shared part, or as a DZ twin's own half)."""
    p = model.params
    crop = smooth_displacement(model.family_weight.shape, p.family_sigma_mm / FIELD_SPACING,
                               p.family_amplitude_mm, rng, weight=model.family_weight)
    log_volume = rng.normal(0.0, p.family_volume_sd, size=len(model.family_structures)).astype(np.float32)
    return FamilyPart(field=crop, log_volume=log_volume)


def mix_family_parts(shared: FamilyPart, own: FamilyPart | None, shared_fraction: float) -> FamilyPart:
    """``sqrt(f) * shared + sqrt(1 - f) * own`` (variance preserving; f=1 for MZ, 0.5 for DZ)."""
    if own is None or shared_fraction >= 1.0:
        return shared
    a, b = np.float32(np.sqrt(shared_fraction)), np.float32(np.sqrt(1.0 - shared_fraction))
    return FamilyPart(field=a * shared.field + b * own.field, log_volume=a * shared.log_volume + b * own.log_volume)


def volume_betas(structures: Sequence[Structure], changes: Sequence[float]) -> list[float]:
    """Field amplitudes (mm) that give the requested relative volume changes (linear calibration)."""
    return [float(c) / s.slope if s.slope != 0 else 0.0 for s, c in zip(structures, changes)]


def subject_displacement(model: Model, family: FamilyPart, rng: np.random.Generator) -> tuple[np.ndarray, dict]:
    """Total session-1 displacement field (mm, full field grid) of a subject and the values drawn for it."""
    p = model.params
    shape = model.anatomy.field_shape
    s = FIELD_SPACING
    total = smooth_displacement(shape, p.individual_sigma_mm / s, p.individual_amplitude_mm, rng)
    total += smooth_displacement(shape, p.scalp_sigma_mm / s, p.scalp_amplitude_mm, rng, weight=model.scalp_weight)
    crop_affine = model.anatomy.field_affine @ index_translation(model.family_weight_offset)
    add_crop(total, exponentiate(family.field, crop_affine), model.family_weight_offset)
    own_log = rng.normal(0.0, p.individual_volume_sd, size=len(model.family_structures))
    changes = np.expm1(family.log_volume + own_log)
    for structure, beta in zip(model.family_structures, volume_betas(model.family_structures, changes)):
        add_crop(total, structure.field, structure.field_offset, beta)
    info = {"family_volume_change_target": {st.name: float(c) for st, c in zip(model.family_structures, changes)}}
    return total, info
