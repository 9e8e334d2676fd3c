"""Surfaces and Workbench files: sampling, GIFTI/CIFTI structure, spec files, and wb_command reading them."""
from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from bids_siamese.resources import model_grid
from bids_siamese.surface.cifti import CIFTI_GRID_AFFINE, dscalar_from_volume, subcortical_masks
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
