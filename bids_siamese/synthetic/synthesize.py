"""Synthesis of one subject's scans (fields, pose, lesion, acquisition, orientation error) and their truth."""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from .family import draw_family_part, mix_family_parts, subject_displacement
from .fields import jacobian_determinant
from .lesions import lesion_measures, place_lesion
from .longitudinal import session_displacement
from .model import Model, structure_volume
from .params import FIELD_SPACING, ORIENTATIONS, TEMPLATE_WM
from .plan import ScanPlan, SubjectPlan
from .scan import (add_rician_noise, bias_field, flip_left_right, make_geometry, render_scan, template_to_world,
                   to_stored)


@dataclass
class ScanResult:
    """A synthesized scan: stored image, its affine, true masks in the same voxel frame, and its truth row."""

    plan: ScanPlan
    image: np.ndarray
    affine: np.ndarray
    brain: np.ndarray
    lesion: np.ndarray | None
    truth: dict
    volumes: dict


def subject_fields(model: Model, subject: SubjectPlan, seed: int) -> tuple[list[np.ndarray], dict]:
    """The subject's displacement field per session and subject-level draws (scale, decline targets)."""
    p = model.params
    shared = draw_family_part(model, np.random.default_rng([seed, 2, subject.family_index]))
    if subject.zygosity == "DZ":
        own = draw_family_part(model, np.random.default_rng([seed, 5, subject.index]))
        family = mix_family_parts(shared, own, 0.5)
    else:
        family = shared
    rng = np.random.default_rng([seed, 3, subject.index])
    sex_effect = p.scale_sex_effect if subject.sex == "M" else -p.scale_sex_effect
    scale = float(np.clip(1.0 + sex_effect + rng.normal(0.0, p.scale_sd), 1.0 - p.scale_max, 1.0 + p.scale_max))
    decline = (float(rng.uniform(*p.decline_hippocampus)), float(rng.uniform(*p.decline_ventricles)))
    first, info = subject_displacement(model, family, rng)
    fields = [first]
    if len(subject.sessions) > 1:
        later = session_displacement(model, first, decline if subject.group == "decline" else None,
                                     np.random.default_rng([seed, 6, subject.index]))
        fields.append(later)
    info.update(scale=scale, decline_target=decline if subject.group == "decline" else None)
    return fields, info


def synthesize_scan(model: Model, subject: SubjectPlan, scan: ScanPlan, displacement: np.ndarray, scale: float,
                    seed: int, apply_flip: bool = True) -> ScanResult:
    """Render one scan of a subject: pose, grid, lesion, bias, noise, optional left-right array flip."""
    p = model.params
    rng = np.random.default_rng([seed, 4, subject.index, scan.session_index])
    rotation = rng.uniform(-p.max_rotation_deg, p.max_rotation_deg, size=3)
    translation = rng.uniform(-p.max_translation_mm, p.max_translation_mm, size=3)
    orientation = str(rng.choice(ORIENTATIONS))
    in_plane = float(rng.choice([1.0, 1.1, 1.2, 1.25]))
    thickness = float(np.round(rng.uniform(1.0, 1.6), 1))
    voxel_sizes = (in_plane, in_plane, thickness)
    bias_strength = float(rng.uniform(*p.bias_range))
    noise_sigma = float(rng.uniform(*p.noise_fraction)) * TEMPLATE_WM
    gain = float(rng.uniform(*p.gain))
    to_world = template_to_world(rotation, translation, scale)
    world_to_template = np.linalg.inv(to_world)
    box = [(lo - 5.0, hi + 5.0) for lo, hi in model.anatomy.head_box_mm]
    box[2] = (max(box[2][0], model.anatomy.brain_box_mm[2][0] - 28.0), box[2][1])
    geometry = make_geometry(box, to_world, orientation, voxel_sizes)
    lesion = None
    if scan.lesion_volume_target_mm3 is not None:
        lesion = place_lesion(model, scan.lesion_volume_target_mm3, scan.lesion_hemisphere or "L", rng)
    image, brain, lesion_mask = render_scan(model, displacement, geometry, world_to_template, lesion)
    image *= bias_field(geometry.shape, bias_strength, rng)
    image = add_rician_noise(image, noise_sigma, rng)
    stored = to_stored(image, gain)
    del image
    flip = scan.lr_flipped and apply_flip
    if flip:
        stored, brain = flip_left_right(stored, geometry), flip_left_right(brain, geometry)
    voxel_volume = float(np.prod(voxel_sizes))
    truth = {
        "participant_id": subject.participant_id, "session_id": scan.session_id, "path": scan.path,
        "family_id": subject.family_id, "zygosity": subject.zygosity, "group": subject.group, "sex": subject.sex,
        "age": scan.age, "acq_time": scan.acq_time, "lr_flipped": bool(scan.lr_flipped), "lesion": lesion is not None,
        "lesion_hemisphere": lesion.hemisphere if lesion else None,
    }
    if lesion is not None:
        measures = lesion_measures(lesion)
        truth.update(
            lesion_volume_mm3=measures["volume_mm3"] * scale**3,
            lesion_volume_template_mm3=measures["volume_mm3"],
            lesion_cross_section_mm2=measures["cross_section_mm2"] * scale**2,
            lesion_cross_section_template_mm2=measures["cross_section_mm2"],
            lesion_center_x=lesion.center[0], lesion_center_y=lesion.center[1], lesion_center_z=lesion.center[2],
            lesion_voxels=int(lesion_mask.sum()) if lesion_mask is not None else 0,
            lesion_intensity=lesion.intensity * gain)
    else:
        truth.update({k: None for k in ("lesion_volume_mm3", "lesion_volume_template_mm3",
                                         "lesion_cross_section_mm2", "lesion_cross_section_template_mm2",
                                         "lesion_center_x", "lesion_center_y", "lesion_center_z", "lesion_voxels",
                                         "lesion_intensity")})
    truth.update(
        scale=scale, rotation_x_deg=rotation[0], rotation_y_deg=rotation[1], rotation_z_deg=rotation[2],
        translation_x_mm=translation[0], translation_y_mm=translation[1], translation_z_mm=translation[2],
        orientation=orientation, voxel_size_i=voxel_sizes[0], voxel_size_j=voxel_sizes[1],
        voxel_size_k=voxel_sizes[2], dim_i=geometry.shape[0], dim_j=geometry.shape[1], dim_k=geometry.shape[2],
        brain_volume_mm3=float(brain.sum()) * voxel_volume, bias_strength=bias_strength,
        noise_sigma=noise_sigma * gain, intensity_gain=gain,
        world_to_template_affine=json.dumps(np.round(world_to_template, 8).tolist()),
    )
    volumes = {"participant_id": subject.participant_id, "session_id": scan.session_id}
    for structure in (model.hippocampus, model.ventricles, *model.family_structures):
        volumes[structure.name] = structure_volume(model.anatomy, structure, displacement) * scale**3
    return ScanResult(plan=scan, image=stored, affine=geometry.affine, brain=brain.astype(np.uint8),
                      lesion=None if lesion_mask is None else lesion_mask.astype(np.uint8), truth=truth,
                      volumes=volumes)


def synthesize_subject(model: Model, subject: SubjectPlan, scans: Sequence[ScanPlan], seed: int,
                       apply_flip: bool = True) -> tuple[list[ScanResult], dict]:
    """All scans of one subject (with volume changes and Jacobians in their truth) and the subject's draws.

    ``apply_flip=False`` renders planned left-right flipped scans unflipped (everything else identical).
    """
    fields, info = subject_fields(model, subject, seed)
    results = []
    for scan in sorted(scans, key=lambda s: s.session_index):
        displacement = fields[scan.session_index]
        result = synthesize_scan(model, subject, scan, displacement, info["scale"], seed, apply_flip)
        result.truth["min_jacobian"] = float(jacobian_determinant(displacement, float(FIELD_SPACING)).min())
        results.append(result)
    base = results[0].volumes
    for result in results:
        for key, name in (("hippocampus_volume", "hippocampus"), ("ventricle_volume", "ventricles")):
            result.truth[f"{key}_mm3"] = result.volumes[name]
            result.truth[f"{key}_change"] = result.volumes[name] / base[name] - 1.0
    return results, info
