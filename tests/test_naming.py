"""Output names: ``res-`` means TemplateFlow's grid, the model grid has none, .bidsignore is the documented one."""
from __future__ import annotations

import re
from pathlib import Path

import nibabel as nib
import numpy as np

from bids_siamese.bids.derivatives import BIDSIGNORE, BIDSIGNORE_REASONS, RESULT_RES, output_names, path_patterns
from bids_siamese.bids.grids import TEMPLATEFLOW_GRIDS, model_grid_sidecar, resample_to_templateflow, templateflow_grid
from bids_siamese.resources import TEMPLATE, model_grid, template_brain_path

DOCS = Path(__file__).parents[1] / "docs" / "outputs.md"


def test_templateflow_grids_are_templateflows_headers():
    """res-1 is the header of TemplateFlow's tpl-MNI152NLin2009cAsym_res-01 file (bundled or from the cache);
    res-2 is its 2 mm subsampling with the same first voxel (97x115x97, as tpl-..._res-02 and fMRIPrep's res-2)."""
    tf1 = nib.load(template_brain_path())
    one, two = templateflow_grid("1"), templateflow_grid("2")
    assert tf1.shape == one.shape == (193, 229, 193) and np.allclose(tf1.affine, one.affine)
    assert two.shape == (97, 115, 97) == tuple((n - 1) // 2 + 1 for n in tf1.shape)
    assert np.allclose(two.affine[:3, 3], tf1.affine[:3, 3]) and np.allclose(two.affine[:3, :3], 2 * np.eye(3))
    assert RESULT_RES in TEMPLATEFLOW_GRIDS


def test_model_grid_files_have_no_res_and_the_map_is_on_res_2():
    names = output_names({"subject": "01", "session": "1", "run": "2"}, "4")
    for key in ("preproc", "grid_mask"):
        assert f"_space-{TEMPLATE}_desc-" in names[key].name and "_res-" not in names[key].name
    assert names["asymmetry_map"].name == f"sub-01_ses-1_run-2_space-{TEMPLATE}_res-2_desc-asymmetry_statmap.nii.gz"
    assert all("_res-" not in str(p) for k, p in names.items() if k != "asymmetry_map")
    assert all(re.search(r"_res-(?!\{)", p) is None for p in path_patterns())  # no fixed res- in a pattern


def test_resampled_map_is_on_templateflows_grid_and_keeps_values():
    grid = model_grid(4.0)
    ijk = np.indices(grid.shape).reshape(3, -1)
    x_mm = (grid.affine[:3, :3] @ ijk + grid.affine[:3, 3:4])[0].reshape(grid.shape)
    img = resample_to_templateflow(x_mm.astype(np.float32), grid)
    target = templateflow_grid("2")
    assert img.shape == target.shape and np.allclose(img.affine, target.affine)
    assert int(img.header["sform_code"]) == 4 and int(img.header["qform_code"]) == 4
    data = np.asanyarray(img.dataobj)
    # a linear field is reproduced where the model grid covers the voxel: value = x in mm
    i, j, k = 48, 57, 48  # x = 0, y = -18, z = 18 mm
    assert abs(data[i + 10, j, k] - 20.0) < 1e-3 and abs(data[i - 10, j, k] + 20.0) < 1e-3
    assert data[0, 0, 0] == 0  # (-96, -132, -78) mm is outside the model box


def test_model_grid_sidecar_describes_the_grid():
    keys = model_grid_sidecar(2.0)
    assert keys["GridShape"] == [84, 104, 88] and keys["VoxelSizeMM"] == 2.0
    assert np.allclose(keys["GridAffine"], model_grid(2.0).affine)
    assert "not a TemplateFlow grid" in keys["Resolution"]


def test_bidsignore_is_the_handful_documented():
    text = DOCS.read_text()
    table = text[text.index("| pattern | why |"):].split("\n\n")[0].splitlines()[2:]
    documented = [re.findall(r"`([^`]+)`", line.split(" | ")[0])[0] for line in table]
    assert documented == BIDSIGNORE == list(BIDSIGNORE_REASONS)
    assert all(BIDSIGNORE_REASONS.values())
    # no suffix named after our own analysis where BIDS has a standard one; T1w only for T1w images and figures
    suffixes = {s for p in path_patterns() for group in re.findall(r"\{suffix<([^>]+)>", p) for s in group.split("|")}
    assert suffixes.isdisjoint({"asymmetry", "symmetry"}) and {"mask", "T1w", "statmap"} <= suffixes


def test_reused_output_dir_keeps_user_lines_and_drops_earlier_patterns(tmp_path):
    from bids_siamese.bids.derivatives import LEGACY_BIDSIGNORE, init_output_dir

    out = tmp_path / "out"
    out.mkdir()
    (out / ".bidsignore").write_text("my_notes/\n" + "\n".join(LEGACY_BIDSIGNORE) + "\nfigures\n")
    init_output_dir(out)
    assert (out / ".bidsignore").read_text().split() == ["my_notes/", "figures"] + [p for p in BIDSIGNORE
                                                                                   if p != "figures"]
