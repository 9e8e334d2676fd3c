"""Longitudinal change: the session-2 field (rescan noise, and hippocampal/ventricular change of decliners)."""
from __future__ import annotations

from typing import Sequence

import numpy as np

from .family import volume_betas
from .fields import apply_affine_grid, compose, index_translation, sample, sample_field, smooth_displacement
from .model import Model, Structure, add_crop, structure_volume
from .params import FIELD_SPACING


def shifted_structure_field(model: Model, structure: Structure, displacement: np.ndarray) -> np.ndarray:
    """A structure's unit field moved with the subject: ``f(t + displacement(t))`` on the full field grid."""
    anatomy = model.anatomy
    margin = 4
    start = [max(0, o - margin) for o in structure.field_offset]
    stop = [min(n, o + sh + margin) for o, sh, n in zip(structure.field_offset, structure.field.shape[1:],
                                                         anatomy.field_shape)]
    block = tuple(b - a for a, b in zip(start, stop))
    points = apply_affine_grid(anatomy.field_affine, block, start)
    points += sample_field(displacement[(slice(None), *[slice(a, b) for a, b in zip(start, stop)])],
                           anatomy.field_affine @ index_translation(start), points)
    crop_affine = anatomy.field_affine @ index_translation(structure.field_offset)
    moved = np.stack([sample(structure.field[c], crop_affine, points, order=1) for c in range(3)])
    out = np.zeros((3, *anatomy.field_shape), dtype=np.float32)
    add_crop(out, moved, start)
    return out


def session_displacement(model: Model, session1: np.ndarray, decline: tuple[float, float] | None,
                         rng: np.random.Generator) -> np.ndarray:
    """Session-2 total field: rescan noise (+ hippocampal shrinkage / ventricular growth) after session 1.

    ``decline`` is the target (hippocampus, ventricles) relative volume change, or None for a stable subject.
    The two structure-field amplitudes are calibrated on this subject (one secant step from the template
    calibration, the rescan noise included), so the achieved changes land close to the targets.
    """
    p = model.params
    affine = model.anatomy.field_affine
    noise = smooth_displacement(model.anatomy.field_shape, p.rescan_sigma_mm / FIELD_SPACING,
                                p.rescan_amplitude_mm, rng)
    if decline is None:
        return compose(session1, noise, affine)
    structures = (model.hippocampus, model.ventricles)
    fields = [shifted_structure_field(model, s, session1) for s in structures]
    base = [structure_volume(model.anatomy, s, session1) for s in structures]

    def field_for(betas: Sequence[float]) -> np.ndarray:
        """Session-2 field for the given structure-field amplitudes."""
        change = noise.copy()
        for f, beta in zip(fields, betas):
            change += np.float32(beta) * f
        return compose(session1, change, affine)

    def achieved(total: np.ndarray) -> list[float]:
        """Relative volume changes of the structures under ``total``."""
        return [structure_volume(model.anatomy, s, total) / b - 1.0 for s, b in zip(structures, base)]

    first = volume_betas(structures, decline)
    at_zero = achieved(compose(session1, noise, affine))
    at_first = achieved(field_for(first))
    betas = []
    for target, beta, a0, a1 in zip(decline, first, at_zero, at_first):
        slope = (a1 - a0) / beta if beta else 0.0
        betas.append((target - a0) / slope if slope * beta * (target - a0) > 0 else beta)
    return field_for(betas)
