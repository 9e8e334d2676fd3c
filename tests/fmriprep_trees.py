"""fMRIPrep 23.x and 24.x anatomical derivatives forged from the tiny demo, with fMRIPrep's file names.

The transforms are the demo's ground truth (``world_to_template_affine`` of sourcedata/truth/scans.tsv), written
as ITK files: ``.txt`` affines with nitransforms, ``.h5`` composites (affine + displacement field, as
antsRegistration writes them) with h5py, since nitransforms writes no ITK ``.h5``; nitransforms reads them back
in tests/test_fmriprep.py. Layouts (see bids_siamese/bids/fmriprep.py):

* 23.x (``23.2.1``), per-session anat: sub-001 (two sessions, ``.h5``), sub-002 (MNI-space images only, no
  transform), sub-003 (its files made from sub-005's scan: a mismatch whose Sources still say sub-003),
  sub-005 (``.txt``).
* 24.x (``24.1.1``), one subject-level reference (the first session's T1w) and a ``from-orig_to-T1w`` transform
  per session: sub-001 (``.h5``) and sub-004 (``.txt``; its ses-02 is stored left-right flipped, and the
  forged rigid transform aligns its mirrored brain, as a rigid registration of a near-symmetric brain does).
"""
from __future__ import annotations

import json
from pathlib import Path

import h5py
import nibabel as nib
import nitransforms as nt
import numpy as np
import pandas as pd

TEMPLATE = "MNI152NLin2009cAsym"
#: TemplateFlow's res-2 grid of MNI152NLin2009cAsym (97 x 115 x 97).
MNI_RES2 = (np.array([[2.0, 0, 0, -96], [0, 2, 0, -132], [0, 0, 2, -78], [0, 0, 0, 1]]), (97, 115, 97))
LPS = np.diag([-1.0, -1.0, 1.0, 1.0])
MIRROR_X = np.diag([-1.0, 1.0, 1.0, 1.0])


def truth_table(demo: Path) -> pd.DataFrame:
    return pd.read_csv(demo / "sourcedata" / "truth" / "scans.tsv", sep="\t")


def _row(truth: pd.DataFrame, sub: str, ses: str) -> pd.Series:
    return truth[(truth.participant_id == sub) & (truth.session_id == ses)].iloc[0]


def world_to_template(row: pd.Series) -> np.ndarray:
    return np.array(json.loads(row.world_to_template_affine))


def flip_reflection(demo: Path, row: pd.Series) -> np.ndarray:
    """World reflection of a flipped scan: the anatomy at unflipped world q is stored at ``F @ q``."""
    img = nib.load(demo / row.path)
    axis = row.orientation.index("L") if "L" in row.orientation else row.orientation.index("R")
    flip = np.eye(4)
    flip[axis, axis], flip[axis, 3] = -1.0, img.shape[axis] - 1
    return img.affine @ flip @ np.linalg.inv(img.affine)


def template_to_stored(demo: Path, row: pd.Series) -> np.ndarray:
    """Template mm -> stored scan world mm of the best rigid-body-free affine without a reflection: the truth,
    or for a flipped scan the truth of its mirrored brain (mirror about the template's midline)."""
    inv = np.linalg.inv(world_to_template(row))
    return flip_reflection(demo, row) @ inv @ MIRROR_X if bool(row.lr_flipped) else inv


def write_txt(matrix: np.ndarray, path: Path) -> None:
    """ITK affine text (template -> subject, RAS matrix) written by nitransforms."""
    nt.linear.Affine(matrix).to_filename(str(path), fmt="itk")


def write_h5(matrix: np.ndarray, path: Path, centre_lps=(3.0, -12.0, 20.0)) -> None:
    """ITK composite ``.h5``: an affine about a non-zero centre, then a small displacement field (applied first)."""
    lps = LPS @ matrix @ LPS
    linear, translation = lps[:3, :3], lps[:3, 3]
    centre = np.asarray(centre_lps)
    offset = translation - centre + linear @ centre  # ITK: y = L (x - c) + c + offset
    shape = (4, 5, 4)
    field = np.zeros((3, *shape), dtype=np.float64)
    field[0] = 0.01  # 0.01 mm: a non-linear part that is present but negligible
    with h5py.File(path, "w") as f:
        group = f.create_group("TransformGroup")
        group.create_group("0").create_dataset("TransformType", data=[b"CompositeTransform_double_3_3"])
        aff = group.create_group("1")
        aff.create_dataset("TransformType", data=[b"AffineTransform_double_3_3"])
        aff.create_dataset("TransformParameters", data=np.r_[linear.ravel(), offset])
        aff.create_dataset("TransformFixedParameters", data=centre)
        warp = group.create_group("2")
        warp.create_dataset("TransformType", data=[b"DisplacementFieldTransform_float_3_3"])
        warp.create_dataset("TransformParameters", data=field.ravel(order="F"))
        warp.create_dataset("TransformFixedParameters",
                            data=np.r_[shape, (-90.0, -120.0, -70.0), (45.0, 60.0, 45.0), np.eye(3).ravel()])


def _description(root: Path, version: str) -> None:
    root.mkdir(parents=True, exist_ok=True)
    (root / "dataset_description.json").write_text(json.dumps({
        "Name": "fMRIPrep - fMRI PREProcessing workflow", "BIDSVersion": "1.9.0", "DatasetType": "derivative",
        "GeneratedBy": [{"Name": "fMRIPrep", "Version": version, "CodeURL": "https://github.com/nipreps/fmriprep"}],
    }))


def _anat_files(demo: Path, row: pd.Series, folder: Path, prefix: str, sources: list[str]) -> nib.Nifti1Image:
    """desc-preproc_T1w, desc-brain_mask, dseg and probseg of one raw scan (RAS), named ``prefix``."""
    folder.mkdir(parents=True, exist_ok=True)
    raw = nib.as_closest_canonical(nib.load(demo / row.path))
    mask_name = Path(row.path).name.replace("_T1w.nii.gz", "_T1w_desc-brain_mask.nii.gz")
    mask = np.asanyarray(nib.as_closest_canonical(nib.load(demo / "sourcedata/truth/masks" / mask_name)).dataobj) > 0
    data = raw.get_fdata(dtype=np.float32) * np.float32(0.95)  # not byte-identical to the raw scan
    preproc = nib.Nifti1Image(data, raw.affine)
    nib.save(preproc, folder / f"{prefix}_desc-preproc_T1w.nii.gz")
    (folder / f"{prefix}_desc-preproc_T1w.json").write_text(json.dumps({"SkullStripped": False, "Sources": sources}))
    nib.save(nib.Nifti1Image(mask.astype(np.uint8), raw.affine), folder / f"{prefix}_desc-brain_mask.nii.gz")
    low, high = np.percentile(data[mask], [25, 60])
    dseg = np.where(mask, np.where(data < low, 3, np.where(data < high, 1, 2)), 0).astype(np.uint8)
    nib.save(nib.Nifti1Image(dseg, raw.affine), folder / f"{prefix}_dseg.nii.gz")
    for label, tissue in (("GM", 1), ("WM", 2), ("CSF", 3)):
        nib.save(nib.Nifti1Image((dseg == tissue).astype(np.float32), raw.affine),
                 folder / f"{prefix}_label-{label}_probseg.nii.gz")
    return preproc


def _mni_images(preproc: nib.Nifti1Image, mask_path: Path, template_to_world: np.ndarray, folder: Path,
                prefix: str) -> None:
    from scipy import ndimage

    affine, shape = MNI_RES2
    for src, suffix, order in ((preproc, "desc-preproc_T1w", 1), (nib.load(mask_path), "desc-brain_mask", 0)):
        vox = np.linalg.inv(src.affine) @ template_to_world @ affine
        data = ndimage.affine_transform(np.asanyarray(src.dataobj, dtype=np.float32), vox[:3, :3], vox[:3, 3],
                                        output_shape=shape, order=order)
        nib.save(nib.Nifti1Image(data.astype(np.uint8 if order == 0 else np.float32), affine),
                 folder / f"{prefix}_space-{TEMPLATE}_{suffix}.nii.gz")


def forge_fmriprep23(demo: Path, root: Path) -> Path:
    """fMRIPrep 23.2.1, per-session anatomical outputs (see the module docstring)."""
    truth = truth_table(demo)
    _description(root, "23.2.1")
    plan = [("sub-001", "ses-01", "h5"), ("sub-001", "ses-02", "h5"), ("sub-002", "ses-01", "mni"),
            ("sub-003", "ses-01", "txt"), ("sub-005", "ses-01", "txt")]
    for sub, ses, kind in plan:
        made_from = _row(truth, "sub-005", "ses-01") if sub == "sub-003" else _row(truth, sub, ses)
        folder, prefix = root / sub / ses / "anat", f"{sub}_{ses}"
        claimed = f"bids:raw:{sub}/{ses}/anat/{sub}_{ses}_T1w.nii.gz"  # sub-003's Sources lie: the check must see it
        preproc = _anat_files(demo, made_from, folder, prefix, [claimed])
        matrix = template_to_stored(demo, made_from)
        stem = folder / f"{prefix}_from-T1w_to-{TEMPLATE}_mode-image_xfm"
        if kind == "h5":
            write_h5(matrix, stem.with_suffix(".h5"))
        elif kind == "txt":
            write_txt(matrix, stem.with_suffix(".txt"))
        else:
            _mni_images(preproc, folder / f"{prefix}_desc-brain_mask.nii.gz", matrix, folder, prefix)
    return root


def forge_fmriprep24(demo: Path, root: Path) -> Path:
    """fMRIPrep 24.1.1, one subject-level reference per subject (see the module docstring)."""
    truth = truth_table(demo)
    _description(root, "24.1.1")
    for sub, kind in (("sub-001", "h5"), ("sub-004", "txt")):
        rows = truth[truth.participant_id == sub].sort_values("session_id")
        first = rows.iloc[0]
        folder = root / sub / "anat"
        _anat_files(demo, first, folder, sub, [f"bids:raw:{r.path}" for r in rows.itertuples()])
        ref_from_template = template_to_stored(demo, first)
        stem = folder / f"{sub}_from-T1w_to-{TEMPLATE}_mode-image_xfm"
        (write_h5 if kind == "h5" else write_txt)(ref_from_template, stem.with_suffix(f".{kind}"))
        for _, row in rows.iterrows():
            # reference world -> template -> this session's stored world
            orig_from_ref = template_to_stored(demo, row) @ np.linalg.inv(ref_from_template)
            write_txt(orig_from_ref, folder / f"{sub}_{row.session_id}_from-orig_to-T1w_mode-image_xfm.txt")
    return root
