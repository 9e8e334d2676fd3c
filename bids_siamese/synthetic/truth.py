"""The ground truth: per-scan, per-subject, volume and family tables, truth.json and the truth README."""
from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Sequence

import pandas as pd

from .. import __version__
from ..bids.derivatives import write_json, write_text
from .bids_files import write_tsv
from .model import Model
from .params import FIELD_SPACING, GENERATOR_NAME, ORIENTATIONS, SIZES, TEMPLATE_WM
from .plan import SubjectPlan

TRUTH_README = """\
# Ground truth of the bids-siamese synthetic demo dataset

Made by `bids-siamese-demo` {version} (size `{size}`, seed {seed}). Paths in the tables are relative to the BIDS
root (the generator's OUTDIR). Template mm = MNI152NLin2009cAsym RAS mm; "template (affine-normalised) space"
is the frame the true affine maps a scan into (before the subject's non-linear deformation). Missing values
are `n/a`. Volume changes are fractions (-0.07 = 7 % smaller).

## scans.tsv (one row per scan)

| column | meaning |
|---|---|
{scan_rows}

## subjects.tsv (one row per participant)

| column | meaning |
|---|---|
{subject_rows}

## volumes.tsv (one row per scan)

True volumes (native physical mm3) of the hippocampus (both sides), the lateral ventricles and every atlas label
of the family regions, measured on the simulated anatomy (atlas masks warped with the subject's field).

## families.tsv

`family_id`, `zygosity`, `participant_ids` (comma separated).

## masks/

`<scan>_desc-brain_mask.nii.gz`: true brain mask of every scan on the scan's own voxel grid and in the stored
array order (so flipped scans have flipped masks). `<scan>_desc-lesion_mask.nii.gz`: lesion mask (lesion
scans only).

## truth.json

Generator version, seed, size, all signal parameters (amplitudes in mm, volume changes as fractions), the
family regions and their atlas labels, and the calibrated volume slopes of the structure fields.
"""

SCAN_COLUMNS = {
    "participant_id": "participant label",
    "session_id": "session label",
    "path": "image path relative to the BIDS root",
    "family_id": "family label (as in participants.tsv)",
    "zygosity": "MZ, DZ or none",
    "group": "decline, stable or n/a (single session)",
    "sex": "M or F",
    "age": "age at the session (years)",
    "acq_time": "acquisition date and time (as in the scans/sessions tables)",
    "lr_flipped": "true if the voxel array was flipped along its left-right axis after rendering (header "
                  "unchanged): a mislabelled orientation",
    "lesion": "true if a lesion was planted in this scan",
    "lesion_hemisphere": "L or R (template x < 0 is left)",
    "lesion_volume_mm3": "lesion volume in the scan's physical (native) space, mm3",
    "lesion_volume_template_mm3": "lesion volume in template (affine-normalised) space, mm3",
    "lesion_cross_section_mm2": "largest cross-section area in the head's axial planes (template z = const), "
                                "physical mm2",
    "lesion_cross_section_template_mm2": "the same in template (affine-normalised) space, mm2",
    "lesion_center_x": "lesion centre, template mm (x)",
    "lesion_center_y": "lesion centre, template mm (y)",
    "lesion_center_z": "lesion centre, template mm (z)",
    "lesion_voxels": "number of scan voxels in the lesion mask",
    "lesion_intensity": "lesion core intensity in stored units (before bias field and noise)",
    "scale": "global brain size factor of the subject (physical size = template size x scale)",
    "rotation_x_deg": "head rotation about the scanner x axis (degrees; applied x, then y, then z)",
    "rotation_y_deg": "head rotation about y (degrees)",
    "rotation_z_deg": "head rotation about z (degrees)",
    "translation_x_mm": "head translation in the scanner (mm, x)",
    "translation_y_mm": "head translation (mm, y)",
    "translation_z_mm": "head translation (mm, z)",
    "orientation": "storage orientation of the voxel axes (nibabel axis codes, e.g. LPS)",
    "voxel_size_i": "voxel size along array axis 0 (mm)",
    "voxel_size_j": "voxel size along array axis 1 (mm)",
    "voxel_size_k": "voxel size along array axis 2 (mm)",
    "dim_i": "array size along axis 0",
    "dim_j": "array size along axis 1",
    "dim_k": "array size along axis 2",
    "brain_volume_mm3": "true brain mask volume, physical mm3",
    "bias_strength": "peak-to-peak strength of the multiplicative bias field (max/min - 1 over the field of view)",
    "noise_sigma": "Rician noise sigma in stored units",
    "intensity_gain": "stored value = gain x template intensity (template white matter is about 88)",
    "world_to_template_affine": "JSON 4x4 (row-major) mapping scanner world mm (the image header's RAS mm) to "
                                "template mm, the inverse of the simulated pose and scale; for flipped scans it "
                                "holds for the array flipped back",
    "min_jacobian": "minimum Jacobian determinant of the subject's displacement field for this session",
    "hippocampus_volume_mm3": "true hippocampal volume (both sides), physical mm3",
    "ventricle_volume_mm3": "true lateral-ventricle volume, physical mm3",
    "hippocampus_volume_change": "relative change of hippocampal volume from ses-01 (0 for ses-01)",
    "ventricle_volume_change": "relative change of ventricular volume from ses-01 (0 for ses-01)",
}

SUBJECT_COLUMNS = {
    "participant_id": "participant label",
    "family_id": "family label",
    "zygosity": "MZ, DZ or none",
    "sex": "M or F",
    "age": "age at ses-01",
    "group": "decline, stable or n/a",
    "n_sessions": "number of sessions",
    "scale": "global brain size factor",
    "decline_hippocampus_target": "target relative hippocampal volume change at ses-02 (decliners)",
    "decline_ventricles_target": "target relative ventricular volume change at ses-02 (decliners)",
    "family_volume_change_<label>": "target relative volume change of a family-region label versus the "
                                    "template (family part + individual part)",
}


def truth_tables(subjects: Sequence[SubjectPlan], outputs: Sequence[tuple[list[dict], list[dict], dict]],
                 model: Model) -> dict[str, pd.DataFrame]:
    """The truth tables (scans, subjects, volumes, families) from the per-subject outputs."""
    scan_rows = [row for out in outputs for row in out[0]]
    scans = pd.DataFrame(scan_rows).sort_values(["participant_id", "session_id"]).reset_index(drop=True)
    scans = scans[[c for c in SCAN_COLUMNS if c in scans.columns]]
    volumes = pd.DataFrame([v for out in outputs for v in out[1]]).sort_values(
        ["participant_id", "session_id"]).reset_index(drop=True)
    subject_rows = []
    for subject, (_, _, info) in zip(subjects, outputs):
        decline = info.get("decline_target")
        row = {"participant_id": subject.participant_id, "family_id": subject.family_id,
               "zygosity": subject.zygosity, "sex": subject.sex, "age": subject.age, "group": subject.group,
               "n_sessions": len(subject.sessions), "scale": info["scale"],
               "decline_hippocampus_target": decline[0] if decline else None,
               "decline_ventricles_target": decline[1] if decline else None}
        for name, change in info["family_volume_change_target"].items():
            row[f"family_volume_change_{name}"] = change
        subject_rows.append(row)
    subjects_df = pd.DataFrame(subject_rows).sort_values("participant_id").reset_index(drop=True)
    families = (subjects_df.groupby("family_id", sort=True)
                .agg(zygosity=("zygosity", "first"), participant_ids=("participant_id", ",".join)).reset_index())
    return {"scans": scans, "subjects": subjects_df, "volumes": volumes, "families": families}


def truth_parameters(model: Model, size: str, seed: int) -> dict:
    """Generator parameters for truth.json."""
    params = asdict(model.params)
    return {
        "generator": GENERATOR_NAME, "version": __version__, "seed": seed, "size": size,
        "size_spec": asdict(SIZES[size]), "signal": params,
        "family_regions": {region: {str(lab): model.anatomy.label_names[lab] for lab in labels}
                           for region, labels in model.region_labels.items()},
        "structures": {s.name: {"labels": list(s.labels), "template_volume_mm3": s.template_volume_mm3,
                                "relative_volume_change_per_mm": s.slope}
                       for s in (model.hippocampus, model.ventricles, *model.family_structures)},
        "template": "MNI152NLin2009cAsym (skull-stripped, 1 mm) with a simulated head",
        "template_intensity": {"white_matter": TEMPLATE_WM, "range": [0, 98],
                               "head_layers": "CSF 18, skull tables 5, diploe 38, galea 42, fat 100, skin 55"},
        "field_spacing_mm": FIELD_SPACING,
        "orientations": list(ORIENTATIONS),
        "displacement_convention": "pull-back: the subject image at template-space point t shows the template at "
                                   "t + U(t)",
    }


def write_truth(truth_dir: Path, root: Path, tables: dict[str, pd.DataFrame], parameters: dict) -> None:
    """Write the truth tables, truth.json and the truth README."""
    for name, table in tables.items():
        write_tsv(truth_dir / f"{name}.tsv", table)
    write_json(truth_dir / "truth.json", parameters)
    rows = lambda d: "\n".join(f"| `{k}` | {v} |" for k, v in d.items())  # noqa: E731
    write_text(truth_dir / "README.md", TRUTH_README.format(
        version=__version__, size=parameters["size"], seed=parameters["seed"],
        scan_rows=rows(SCAN_COLUMNS), subject_rows=rows(SUBJECT_COLUMNS)))
