"""Tests of the synthetic demo dataset generator (``bids-siamese-demo``).

One tiny dataset is generated per module and shared by the tests; one more is generated to check that the
same seed gives the same bytes.
"""
from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from bids_siamese import synthetic as syn
from bids_siamese.bids.layout import validator_command
from bids_siamese.errors import EXIT_CANT_CREATE, EXIT_USAGE

pytestmark = pytest.mark.slow

PARTICIPANT_COLUMNS = ["participant_id", "family_id", "zygosity", "age", "sex", "group"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, pd.DataFrame]:
    root = tmp_path_factory.mktemp("demo") / "bids"
    table = syn.generate(root, size="tiny", seed=0, jobs=2)
    return root, table


def read_tsv(path: Path) -> pd.DataFrame:
    return pd.read_csv(path, sep="\t", keep_default_na=False, dtype=str)


def truth_table(root: Path) -> pd.DataFrame:
    return pd.read_csv(root / "sourcedata" / "truth" / "scans.tsv", sep="\t", na_values="n/a")


def load(root: Path, relpath: str) -> nib.Nifti1Image:
    return nib.load(str(root / relpath))


def mask_path(root: Path, path: str, kind: str) -> Path:
    stem = Path(path).name.replace(".nii.gz", "")
    return root / "sourcedata" / "truth" / "masks" / f"{stem}_desc-{kind}_mask.nii.gz"


# ------------------------------------------------------------------------------------------------ helpers


def test_smooth_displacement_is_smooth_and_scaled() -> None:
    field = syn.smooth_displacement((24, 24, 24), 4.0, 2.0, np.random.default_rng(1))
    assert field.shape == (3, 24, 24, 24) and field.dtype == np.float32
    assert 1.2 < float(field.std()) < 2.8
    # neighbouring voxels are strongly correlated
    a, b = field[0, :-1].ravel(), field[0, 1:].ravel()
    assert np.corrcoef(a, b)[0, 1] > 0.9
    weighted = syn.smooth_displacement((24, 24, 24), 4.0, 2.0, np.random.default_rng(1),
                                       weight=np.zeros((24, 24, 24)))
    assert not weighted.any()


def test_warp_and_jacobian_of_a_shift() -> None:
    volume = np.random.default_rng(0).random((10, 10, 10)).astype(np.float32)
    shift = np.zeros((3, 10, 10, 10), dtype=np.float32)
    shift[1] = 2.0
    np.testing.assert_allclose(syn.warp(volume, shift)[:, :8], volume[:, 2:], atol=1e-6)
    np.testing.assert_allclose(syn.jacobian_determinant(shift), 1.0, atol=1e-6)


def test_lesion_measures_match_an_ellipsoid() -> None:
    lesion = syn.Lesion(center=(-30.0, 0.0, 20.0), semi_axes=(10.0, 8.0, 6.0),
                        rotation=tuple(map(tuple, np.eye(3))), shape=(0.0,) * 9, edge_mm=0.6, intensity=30.0)
    measures = syn.lesion_measures(lesion, resolution=0.25)
    assert measures["volume_mm3"] == pytest.approx(4 / 3 * np.pi * 10 * 8 * 6, rel=0.02)
    assert measures["cross_section_mm2"] == pytest.approx(np.pi * 10 * 8, rel=0.03)
    assert lesion.hemisphere == "L"


def test_geometry_has_requested_orientation_and_voxels() -> None:
    to_world = syn.template_to_world((5.0, -3.0, 8.0), (4.0, -10.0, 12.0), 1.02)
    box = ((-90.0, 90.0), (-120.0, 90.0), (-100.0, 100.0))
    for code in ("RAS", "LPS", "PIR", "ASL"):
        geometry = syn.make_geometry(box, to_world, code, (1.1, 1.1, 1.4))
        assert "".join(nib.aff2axcodes(geometry.affine)) == code
        np.testing.assert_allclose(nib.affines.voxel_sizes(geometry.affine), (1.1, 1.1, 1.4))
        assert code[geometry.lr_axis] in "LR"


# ------------------------------------------------------------------------------------------------ dataset


def test_bids_validator_reports_no_errors(tiny: tuple[Path, pd.DataFrame]) -> None:
    root, _ = tiny
    run = subprocess.run(validator_command() + [str(root), "--format", "json"], capture_output=True, text=True,
                         timeout=300)
    report = json.loads(run.stdout)
    errors = [i for i in report["issues"]["issues"] if i.get("severity") == "error"]
    assert not errors, errors[:5]
    assert run.returncode != 16
    assert sorted(report["summary"]["subjects"]) == sorted(p.name[4:] for p in root.glob("sub-*"))


def test_participants_table(tiny: tuple[Path, pd.DataFrame]) -> None:
    root, _ = tiny
    participants = read_tsv(root / "participants.tsv")
    assert list(participants.columns) == PARTICIPANT_COLUMNS
    assert set(participants["zygosity"]) <= {"MZ", "DZ", "none"}
    assert set(participants["sex"]) <= {"M", "F"}
    assert set(participants["group"]) <= {"decline", "stable", "n/a"}
    assert all(re.fullmatch(r"sub-[A-Za-z0-9]+", p) for p in participants["participant_id"])
    description = json.loads((root / "participants.json").read_text())
    assert set(PARTICIPANT_COLUMNS) <= set(description)
    assert set(description["zygosity"]["Levels"]) == {"MZ", "DZ", "none"}
    for row in participants.itertuples():
        sessions = sorted(p.name for p in (root / row.participant_id).glob("ses-*"))
        assert sessions[0] == "ses-01"
        assert (row.group == "n/a") == (sessions == ["ses-01"])


def test_families(tiny: tuple[Path, pd.DataFrame]) -> None:
    root, _ = tiny
    participants = read_tsv(root / "participants.tsv")
    sizes = participants.groupby("family_id").agg(n=("participant_id", "size"), zyg=("zygosity", "first"),
                                                   kinds=("zygosity", "nunique"))
    assert (sizes["kinds"] == 1).all()
    assert (sizes.loc[sizes["zyg"].isin(["MZ", "DZ"]), "n"] == 2).all()
    assert (sizes.loc[sizes["zyg"] == "none", "n"] == 1).all()
    assert {"MZ", "DZ", "none"} <= set(sizes["zyg"])
    mz = participants[participants["zygosity"] == "MZ"].groupby("family_id")
    assert all(group["sex"].nunique() == 1 and group["age"].nunique() == 1 for _, group in mz)


def test_tiny_design(tiny: tuple[Path, pd.DataFrame]) -> None:
    root, table = tiny
    truth = truth_table(root)
    assert 6 <= len(truth) <= 8 and len(table) == len(truth)
    assert {"decline", "stable"} <= set(truth["group"].dropna())
    assert truth["lr_flipped"].sum() >= 1 and truth["lesion"].sum() >= 1
    assert not (truth["lr_flipped"] & truth["lesion"]).any()
    for row in truth.itertuples():
        assert (root / row.path).is_file()
        assert mask_path(root, row.path, "brain").is_file()
    # session order follows acq_time
    for sub in truth["participant_id"].unique():
        sessions = read_tsv(root / sub / f"{sub}_sessions.tsv")
        assert list(sessions["session_id"]) == sorted(sessions["session_id"])
        assert list(sessions["acq_time"]) == sorted(sessions["acq_time"])
        for ses in sessions["session_id"]:
            scans = read_tsv(root / sub / ses / f"{sub}_{ses}_scans.tsv")
            assert list(scans.columns) == ["filename", "acq_time"]


def test_images_headers_and_true_affine(tiny: tuple[Path, pd.DataFrame]) -> None:
    root, _ = tiny
    truth = truth_table(root)
    template = nib.load(str(syn.template_brain_path()))
    tdata = np.asarray(template.dataobj) > 0
    template_centroid = nib.affines.apply_affine(template.affine, np.argwhere(tdata).mean(axis=0))
    for row in truth.itertuples():
        img = load(root, row.path)
        assert img.get_data_dtype() == np.int16
        assert int(img.header["qform_code"]) == 1 and int(img.header["sform_code"]) == 1
        np.testing.assert_allclose(img.get_qform(), img.get_sform(), atol=1e-4)
        assert img.header.get_xyzt_units() == ("mm", "sec")
        assert "".join(nib.aff2axcodes(img.affine)) == row.orientation
        np.testing.assert_allclose(img.header.get_zooms()[:3],
                                   (row.voxel_size_i, row.voxel_size_j, row.voxel_size_k), atol=1e-5)
        data = np.asarray(img.dataobj)
        assert data.min() >= 0 and 500 < np.percentile(data, 99.5) < 2000
        brain = np.asarray(nib.load(str(mask_path(root, row.path, "brain"))).dataobj) > 0
        assert brain.shape == data.shape
        assert 1.2e6 < brain.sum() * np.prod(img.header.get_zooms()[:3]) < 2.4e6
        if not row.lr_flipped:
            # the true affine takes the brain back to the template's brain
            world = nib.affines.apply_affine(img.affine, np.argwhere(brain).mean(axis=0))
            to_template = np.array(json.loads(row.world_to_template_affine))
            assert np.linalg.norm(nib.affines.apply_affine(to_template, world) - template_centroid) < 6.0
            # the head lies inside the field of view except where the neck leaves it
            axis_si = [i for i, c in enumerate(row.orientation) if c in "SI"][0]
            inferior = 0 if row.orientation[axis_si] == "S" else -1
            for axis in range(3):
                for end in (0, -1):
                    if axis == axis_si and end == inferior:
                        continue
                    face = np.take(data, end, axis=axis)
                    assert np.percentile(face, 99) < 0.15 * np.percentile(data, 99), (row.path, axis, end)


def test_flipped_scan_is_the_unflipped_rendering_flipped(tiny: tuple[Path, pd.DataFrame]) -> None:
    root, _ = tiny
    truth = truth_table(root)
    row = truth[truth["lr_flipped"]].iloc[0]
    subjects, scans = syn.plan_dataset("tiny", 0)
    subject = next(s for s in subjects if s.participant_id == row.participant_id)
    plan = next(s for s in scans if s.participant_id == subject.participant_id and s.session_id == row.session_id)
    results, _ = syn.synthesize_subject(syn.get_model(), subject, [plan], seed=0, apply_flip=False)
    unflipped = results[0]
    stored = np.asarray(load(root, row.path).dataobj)
    lr_axis = row.orientation.index("L") if "L" in row.orientation else row.orientation.index("R")
    np.testing.assert_array_equal(stored, np.flip(unflipped.image, axis=lr_axis))
    assert not np.array_equal(stored, unflipped.image)
    np.testing.assert_allclose(load(root, row.path).affine, unflipped.affine)


def test_lesion_volume_location_and_contrast(tiny: tuple[Path, pd.DataFrame]) -> None:
    root, _ = tiny
    truth = truth_table(root)
    for row in truth[truth["lesion"]].itertuples():
        img = load(root, row.path)
        lesion = np.asarray(nib.load(str(mask_path(root, row.path, "lesion"))).dataobj) > 0
        brain = np.asarray(nib.load(str(mask_path(root, row.path, "brain"))).dataobj) > 0
        voxel_volume = float(np.prod(img.header.get_zooms()[:3]))
        assert lesion.sum() * voxel_volume == pytest.approx(row.lesion_volume_mm3, rel=0.10)
        assert row.lesion_volume_mm3 == pytest.approx(row.lesion_volume_template_mm3 * row.scale**3, rel=1e-6)
        assert 100 <= row.lesion_volume_template_mm3 <= 9000
        assert row.lesion_cross_section_mm2 > 0
        assert not (lesion & ~brain).any()
        world = nib.affines.apply_affine(img.affine, np.argwhere(lesion).mean(axis=0))
        center = nib.affines.apply_affine(np.array(json.loads(row.world_to_template_affine)), world)
        np.testing.assert_allclose(center, (row.lesion_center_x, row.lesion_center_y, row.lesion_center_z),
                                   atol=2.5)
        assert row.lesion_hemisphere == ("L" if row.lesion_center_x < 0 else "R")
        # hypointense: darker than the brain tissue around it
        data = np.asarray(img.dataobj).astype(float)
        from scipy import ndimage as ndi

        shell = ndi.binary_dilation(lesion, iterations=4) & ~ndi.binary_dilation(lesion, iterations=1) & brain
        assert np.median(data[lesion]) < 0.7 * np.median(data[shell])


def test_decline_and_stable_volume_changes(tiny: tuple[Path, pd.DataFrame]) -> None:
    root, _ = tiny
    truth = truth_table(root)
    second = truth[truth["session_id"] == "ses-02"]
    decline = second[second["group"] == "decline"]
    stable = second[second["group"] == "stable"]
    assert len(decline) >= 1 and len(stable) >= 1
    assert (decline["hippocampus_volume_change"] < -0.03).all()
    assert (decline["ventricle_volume_change"] > 0.05).all()
    assert (stable["hippocampus_volume_change"].abs() < 0.03).all()
    assert (stable["ventricle_volume_change"].abs() < 0.03).all()
    first = truth[truth["session_id"] == "ses-01"]
    assert (first["hippocampus_volume_change"] == 0).all()
    for row in decline.itertuples():
        base = first[first["participant_id"] == row.participant_id].iloc[0]
        assert row.hippocampus_volume_mm3 < base.hippocampus_volume_mm3
        assert row.ventricle_volume_mm3 > base.ventricle_volume_mm3
    assert (truth["min_jacobian"] > 0).all()


def test_truth_files(tiny: tuple[Path, pd.DataFrame]) -> None:
    root, table = tiny
    truth_dir = root / "sourcedata" / "truth"
    params = json.loads((truth_dir / "truth.json").read_text())
    assert params["seed"] == 0 and params["size"] == "tiny"
    assert set(params["family_regions"]) == {"Thalamus", "Brain_Stem", "Hippocampus"}
    assert params["signal"]["family_amplitude_mm"] > 0
    readme = (truth_dir / "README.md").read_text()
    for column in table.columns:
        assert f"`{column}`" in readme
    families = read_tsv(truth_dir / "families.tsv")
    assert set(families["family_id"]) == set(read_tsv(root / "participants.tsv")["family_id"])
    description = json.loads((root / "dataset_description.json").read_text())
    assert description["GeneratedBy"][0]["Name"] == "bids-siamese-demo"
    assert description["DatasetType"] == "raw" and description["BIDSVersion"] == "1.10.0"


def test_same_seed_same_bytes(tiny: tuple[Path, pd.DataFrame], tmp_path: Path) -> None:
    root, _ = tiny
    again = tmp_path / "again"
    syn.generate(again, size="tiny", seed=0, jobs=2)
    files = sorted(p.relative_to(root) for p in root.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(again) for p in again.rglob("*") if p.is_file())
    for rel in files:
        assert (root / rel).read_bytes() == (again / rel).read_bytes(), rel


def test_cli_refuses_non_empty_outdir(tiny: tuple[Path, pd.DataFrame], tmp_path: Path,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    root, _ = tiny
    assert syn.main([str(root)]) == EXIT_CANT_CREATE
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err and "--overwrite" in err
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "dataset_description.json").write_text('{"Name": "real data", "BIDSVersion": "1.10.0"}')
    assert syn.main([str(foreign), "--overwrite"]) == EXIT_CANT_CREATE
    assert (foreign / "dataset_description.json").is_file()
    assert syn.main([str(tmp_path / "new"), "--size", "huge"]) == EXIT_USAGE
    assert syn.main(["--help"]) == 0


def test_cli_reports_an_unwritable_place_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # a file where the first subject's folder must go: the atomic writer's error becomes the demo's own message
    root = tmp_path / "bids"
    root.mkdir()
    (root / "sub-001").write_text("not a folder")
    assert syn.main([str(root), "--overwrite", "--jobs", "1"]) == EXIT_CANT_CREATE
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert "cannot write the demo dataset" in err and "sub-001" in err and "OUTPUT_DIR" not in err
