"""Symmetry: mirroring, asymmetry maps and regional indices, lesion simulation, the Siamese hemisphere model,
its training/checkpoints, the participant interface and the group level (8 mm model grid: 21x26x22)."""
from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch
from scipy import ndimage as ndi

from bids_siamese.bids.layout import run_validator
from bids_siamese.config import Settings
from bids_siamese.resources import model_grid
from bids_siamese.preproc.grid import mirror, template_on_grid
from bids_siamese.symmetry.analysis import analyse_scan, template_reference
from bids_siamese.symmetry.asymmetry import (
    Reference,
    asymmetry_map,
    left_hemisphere,
    positive_intensities,
    score_scan,
    symmetric_mask,
)
from bids_siamese.atlas import atlas_on_grid
from bids_siamese.symmetry.regional import homologous_pairs, regional_asymmetry
from bids_siamese.symmetry.model import FUSIONS, SymmetrySiamese, build_symmetry_model, split_hemispheres
from bids_siamese.symmetry.simulate import (
    LesionConfig,
    curriculum_range,
    insert_lesion,
    render_lesion,
    simulate_lesion,
    sphere_cross_section_mm2,
)

RES = 8.0


def normalise(data: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Median 0 / IQR 1 inside the mask, 0 outside (the participant-level convention)."""
    med = np.median(data[mask])
    q75, q25 = np.percentile(data[mask], [75, 25])
    return np.where(mask, (data - med) / (q75 - q25), 0.0).astype(np.float32)


@pytest.fixture(scope="module")
def template8() -> tuple[np.ndarray, np.ndarray]:
    data, mask = template_on_grid(model_grid(RES))
    return normalise(data, mask), mask


@pytest.fixture(scope="module")
def symmetric8(template8) -> tuple[np.ndarray, np.ndarray]:
    data, mask = template8
    sym_mask = symmetric_mask(mask)
    sym = np.where(sym_mask, (data + mirror(data)) / 2.0, 0.0).astype(np.float32)
    return sym, sym_mask


def ball(shape, centre_vox, radius_vox) -> np.ndarray:
    idx = np.indices(shape)
    return sum((idx[a] - centre_vox[a]) ** 2 for a in range(3)) <= radius_vox ** 2


def world_to_vox(point_mm, resolution=RES) -> tuple[int, int, int]:
    vox = np.linalg.inv(model_grid(resolution).affine) @ np.array([*point_mm, 1.0])
    return tuple(int(round(v)) for v in vox[:3])


# ----------------------------------------------------------------------------------------------------------
# Mirroring
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("resolution", [1.0, 2.0, 4.0, 8.0])
def test_mirror_maps_x_to_minus_x(resolution):
    grid = model_grid(resolution)
    nx = grid.shape[0]
    i = np.arange(nx)
    x = grid.affine[0, 0] * i + grid.affine[0, 3]
    x_mirrored = grid.affine[0, 0] * (nx - 1 - i) + grid.affine[0, 3]
    assert np.allclose(x_mirrored, -x)
    vol = np.random.default_rng(0).normal(size=(nx, 2, 3))
    assert np.array_equal(mirror(vol), vol[::-1])
    assert np.array_equal(mirror(mirror(vol)), vol)
    left = left_hemisphere(grid.shape)
    assert (x[left[:, 0, 0]] < 0).all() and (x[~left[:, 0, 0]] >= 0).all()  # odd nx: x = 0 is on neither side


def test_split_hemispheres_matches_mirror():
    x = torch.randn(2, 1, 10, 4, 3)
    left, right = split_hemispheres(x)
    assert torch.equal(left, x[:, :, :5])
    assert torch.equal(right[0, 0], torch.from_numpy(mirror(x[0, 0].numpy())[:5]))
    sym = torch.cat([x[:, :, :5], torch.flip(x[:, :, :5], dims=[2])], dim=2)
    l_s, r_s = split_hemispheres(sym)
    assert torch.equal(l_s, r_s)


# ----------------------------------------------------------------------------------------------------------
# Voxelwise and regional asymmetry
# ----------------------------------------------------------------------------------------------------------


def test_positive_intensities_are_positive(template8):
    data, mask = template8
    assert data[mask].min() < 0  # the normalised images have negative values
    pos = positive_intensities(data, mask)
    assert (pos[mask] >= 0.1 - 1e-6).all() and (pos[~mask] == 0).all()
    assert np.isclose(np.percentile(pos[mask], 99), 1.0, atol=1e-3)
    # invariant to the normalisation's offset and scale
    assert np.allclose(positive_intensities(3.0 * data + 7.0, mask), pos, atol=1e-5)


def test_symmetric_image_scores_zero(symmetric8):
    sym, mask = symmetric8
    ai = asymmetry_map(sym, mask, RES, fwhm_mm=6.0)
    assert np.abs(ai).max() < 1e-5
    labels, names = atlas_on_grid("harvard_oxford", RES)
    regions = regional_asymmetry(positive_intensities(sym, mask), mask, labels, homologous_pairs(names))
    assert len(regions) == 56 + 2  # the pairs, then "Unlabelled" and "Whole_hemisphere"
    finite = regions["asymmetry_index"].dropna()
    assert len(finite) > 40 and np.abs(finite).max() < 1e-9
    result = analyse_scan(sym, mask, RES, labels, homologous_pairs(names), Reference(mean=np.zeros(sym.shape)))
    assert result.report["raw_magnitude"] < 1e-6


def test_asymmetry_map_is_antisymmetric_and_masked(template8):
    data, mask = template8
    ai = asymmetry_map(data, mask, RES)
    assert np.allclose(ai, -mirror(ai), atol=1e-6)
    assert (ai[~symmetric_mask(mask)] == 0).all()
    assert np.abs(ai).max() < 1.0
    assert ai.dtype == np.float32


@pytest.mark.parametrize("side, sign", [("L", -1.0), ("R", 1.0)])
def test_planted_lesion_raises_its_region_with_the_right_sign(symmetric8, side, sign):
    sym, mask = symmetric8
    labels, names = atlas_on_grid("harvard_oxford", RES)
    pairs = homologous_pairs(names)
    # a hypointense lesion in the putamen of one hemisphere (template mm, x < 0 is left)
    centre_mm = (-26.0 if side == "L" else 26.0, 2.0, 2.0)
    centre = world_to_vox(centre_mm)
    lesion = ball(sym.shape, centre, 1.2) & mask
    img = np.where(lesion, sym.min(), sym).astype(np.float32)
    ref = Reference(mean=np.zeros(sym.shape))
    result = analyse_scan(img, mask, RES, labels, pairs, ref)
    regions = result.regions.set_index("region")
    hit_value = labels[centre]
    hit = next(p.name for p in pairs if hit_value in (p.left, p.right))
    assert np.sign(regions.at[hit, "asymmetry_index"]) == sign
    assert abs(regions.at[hit, "asymmetry_index"]) > 0.05
    assert result.report["top_regions"][0]["region"] == hit
    # the peak is reported on the lesion's (darker) side, within two voxels of the lesion
    assert np.sign(result.report["peak_mm"][0]) == np.sign(centre_mm[0])
    assert np.linalg.norm(np.subtract(result.report["peak_mm"], centre_mm)) <= 2 * RES * np.sqrt(3)
    # voxelwise: darker than the mirror at the lesion, brighter at its mirror position
    assert result.ai[centre] < -0.05
    assert result.ai[(sym.shape[0] - 1 - centre[0], centre[1], centre[2])] > 0.05
    # the symmetric image's score is lower than the lesioned one's
    base = score_scan(sym, mask, RES, ref)["raw_magnitude"]
    assert result.report["raw_magnitude"] > base


def test_homologous_pairs_of_every_bundled_atlas():
    expected = {"harvard_oxford": 56, "aal": 56, "neuromorphometrics": 60, "harvard_oxford_cerebellum": 65}
    for atlas, n_min in expected.items():
        labels, names = atlas_on_grid(atlas, RES)
        pairs = homologous_pairs(names)
        assert len(pairs) >= n_min * 0.9, atlas
        for pair in pairs:
            assert pair.left != pair.right
    _, names = atlas_on_grid("harvard_oxford", RES)
    assert any(p.name == "Lateral_Ventricle" for p in homologous_pairs(names))  # HO's "Ventrical" typo


def test_atlas_on_grid_left_labels_are_left():
    labels, names = atlas_on_grid("harvard_oxford", 4.0)
    left = left_hemisphere(labels.shape)
    for value, name in names.items():
        voxels = labels == value
        if voxels.sum() < 20:
            continue
        if name.startswith("Left_"):
            assert left[voxels].mean() > 0.95, name
        elif name.startswith("Right_"):
            assert left[voxels].mean() < 0.05, name


def test_template_reference_is_small_but_not_zero():
    ref = template_reference(RES)
    assert 0 < np.abs(ref.mean).max() < 0.9
    assert ref.regions_mean is not None and ref.regions_mean.abs().median() < 0.05


# ----------------------------------------------------------------------------------------------------------
# Lesion simulation
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", ["sphere", "ellipsoid", "irregular"])
@pytest.mark.parametrize("volume", [30.0, 1000.0])
def test_render_lesion_volume(shape, volume):
    w, vol, cross = render_lesion((30, 30, 30), 2.0, (15.2, 14.8, 15.1), volume, shape, np.random.default_rng(1))
    assert abs(vol - volume) / volume < 0.08
    assert abs(float(w.sum()) * 8.0 - vol) < 1e-3 * volume + 1e-6
    assert cross >= 0.95 * sphere_cross_section_mm2(volume)  # a sphere has the smallest largest section
    assert 0 <= w.min() and w.max() <= 1


def test_simulated_lesion_stays_in_one_hemisphere(template8):
    data, mask = template8
    rng = np.random.default_rng(0)
    for side in ("L", "R"):
        out, les = simulate_lesion(data, mask, model_grid(RES).affine, rng, LesionConfig(volume_mm3=(2000.0, 4000.0)),
                                   hemisphere=side)
        changed = np.abs(out - data) > 1e-6
        assert changed.any() and not (changed & ~mask).any()
        on_left = left_hemisphere(data.shape)
        assert (changed & (on_left if side == "R" else ~on_left)).sum() == 0
        assert (les.center_mm[0] < 0) == (side == "L")
        assert les.volume_mm3 > 0 and les.cross_section_mm2 > 0


def test_bilateral_lesion_is_symmetric(symmetric8):
    sym, mask = symmetric8
    out, _ = simulate_lesion(sym, mask, model_grid(RES).affine, np.random.default_rng(3),
                             LesionConfig(volume_mm3=(3000.0, 3000.0), texture_sd=0.0), bilateral=True)
    assert np.abs(asymmetry_map(out, mask, RES)).max() < 1e-5


def test_insert_lesion_leaves_input_untouched():
    v = np.ones((4, 4, 4), np.float32)
    w = np.zeros_like(v)
    w[1, 1, 1] = 1.0
    out = insert_lesion(v, v > 0, w, -2.0)
    assert v[1, 1, 1] == 1.0 and out[1, 1, 1] == -2.0


def test_curriculum_starts_medium_and_widens():
    ranges = [curriculum_range(e, 20, (50.0, 8000.0)) for e in range(20)]
    lows = [r[0] for r in ranges]
    assert all(a >= b for a, b in zip(lows, lows[1:]))
    assert np.isclose(lows[0], np.sqrt(50.0 * 8000.0)) and np.isclose(lows[-1], 50.0)
    assert all(r[1] == 8000.0 for r in ranges)
    assert curriculum_range(0, 20, (50.0, 8000.0), ramp_fraction=0.0) == (50.0, 8000.0)


# ----------------------------------------------------------------------------------------------------------
# Siamese model
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fusion", FUSIONS)
def test_model_is_hemisphere_symmetric(fusion, template8):
    torch.manual_seed(0)
    model = build_symmetry_model("small", fusion=fusion, embedding_dim=16).eval()
    data, _ = template8
    x = torch.from_numpy(np.stack([data, data + 0.1 * np.random.default_rng(0).normal(size=data.shape)]))[:, None].float()
    logit, side = model(x)
    logit_f, side_f = model(torch.flip(x, dims=[2]))
    assert logit.shape == (2,) and side.shape == (2,)
    assert torch.allclose(logit, logit_f, atol=1e-4)  # p(abnormal) ignores which side is which
    assert torch.allclose(side, -side_f, atol=1e-4)  # the side flips with the brain


def test_reference_standardises_the_difference_channel(template8):
    data, _ = template8
    rng = np.random.default_rng(0)
    population = torch.from_numpy(np.stack([data + 0.05 * rng.normal(size=data.shape) for _ in range(9)]))
    population = population[:, None].float()
    model = build_symmetry_model("small", difference_channel=True).eval()
    model.set_reference(population)
    left, right = split_hemispheres(population)
    assert model.reference_mean.shape == left.shape[2:]
    # the population's own typical asymmetry (the template's) is removed: the median difference is ~0
    z = (left - right - model.reference_mean) / model.reference_sd
    assert float(z.median(dim=0).values.abs().max()) < 1e-5
    assert float(model.reference_sd.min()) > 0
    state = model.state_dict()
    assert {"reference_mean", "reference_sd"} <= set(state)  # saved with the weights


def test_model_uses_the_backbones_module():
    from bids_siamese.models.backbones import Encoder

    model = build_symmetry_model("small")
    assert isinstance(model.encoder, Encoder) and model.encoder.name == "small"
    assert isinstance(model, SymmetrySiamese)


# ----------------------------------------------------------------------------------------------------------
# Training, checkpoints, evaluation
# ----------------------------------------------------------------------------------------------------------


def _jittered_scans(template8, n, seed=0):
    from bids_siamese.symmetry.scans import prepare_scan

    data, mask = template8
    rng = np.random.default_rng(seed)
    scans = []
    for i in range(n):
        noisy = np.where(mask, data + rng.normal(0, 0.05, data.shape), 0).astype(np.float32)
        scans.append(prepare_scan(noisy, mask, RES, key=f"s{i}"))
    return scans


@pytest.mark.slow
def test_train_save_load_and_evaluate(template8, tmp_path):
    from bids_siamese.symmetry.train import (
        evaluate_detection, load_symmetry_model, save_symmetry_checkpoint, siamese_scorer, train_symmetry_model,
    )
    from bids_siamese.train.trainer import TrainConfig

    scans = _jittered_scans(template8, 5)
    cfg = TrainConfig(epochs=2, batch_size=4, flip_lr=True)
    torch.manual_seed(0)
    model = build_symmetry_model("small", embedding_dim=16, difference_channel=True)
    result, info = train_symmetry_model(model, scans[:3], scans[3:4], cfg, RES, LesionConfig(volume_mm3=(2000.0, 8000.0)),
                                        val_draws=1)
    model, history = result.model, result.history
    assert len(history) == 2 and np.isfinite(history["train_loss"]).all()
    assert history["volume_max_mm3"].iloc[-1] == 8000.0 and 0.0 <= info["threshold"] <= 1.0
    assert 0.0 <= info["threshold_fp5"] <= 1.0  # the one lesion-free validation sample's p (val_draws=1)
    # the one validation scan, unaugmented, scored as any scan is
    p_val_scan = siamese_scorer(result.model, RES, RES)([scans[3].volume], [scans[3].mask])
    assert info["threshold_clean_fp5"] == pytest.approx(float(p_val_scan[0]), abs=1e-6)
    paths = save_symmetry_checkpoint(tmp_path / "symmetry_small", model, cfg, RES, {"fingerprint": "x"},
                                     {"auc": 1.0}, info["threshold"], info["samples"])
    assert {p.name for p in paths} == {"model.pt", "model.pt.sha256", "model_card.json"}
    loaded, card = load_symmetry_model(tmp_path / "symmetry_small")
    assert card["task"] == "symmetry" and card["hyperparameters"]["fusion"] == "difference"
    assert card["hyperparameters"]["epochs"] == 2 and card["hyperparameters"]["val_draws"] == 1
    assert card["grid"]["resolution"] == RES and card["embedding_dim"] == 16
    x = torch.from_numpy(scans[4].volume[None, None])
    assert torch.allclose(model(x)[0], loaded(x)[0])
    samples, per_bin, overall = evaluate_detection(
        scans[4:], RES, {"siamese_probability": siamese_scorer(loaded, RES, RES)}, {"siamese_probability": 0.5},
        LesionConfig(), bins=(500.0, 4000.0, 8000.0), draws=1)
    assert list(samples["label"]) == [0, 1, 1]
    assert set(per_bin["bin_mm3"]) == {"500-4000", "4000-8000"}
    assert overall.loc[0, "n_clean"] == 1


def test_wrong_task_checkpoint_is_refused(tmp_path):
    from bids_siamese.errors import UsageError
    from bids_siamese.models.checkpoint import make_card, save_checkpoint
    from bids_siamese.symmetry.train import load_symmetry_model

    model = build_symmetry_model("small")
    card = make_card("twin", "small", 64, model_grid(4.0), 0, {}, {}, {}, {})
    save_checkpoint(tmp_path / "m", model, card)
    with pytest.raises(UsageError):
        load_symmetry_model(tmp_path / "m")


def test_to_model_resolution_block_average():
    from bids_siamese.symmetry.train import to_model_resolution

    grid2 = model_grid(2.0)
    v = np.random.default_rng(0).normal(size=grid2.shape).astype(np.float32)
    small, m = to_model_resolution(v, np.ones(v.shape, bool), 2.0, 4.0)
    assert small.shape == model_grid(4.0).shape and m.all()
    assert np.isclose(small[0, 0, 0], v[:2, :2, :2].mean(), atol=1e-6)
    # mirroring commutes with the block average (both grids are symmetric about x = 0)
    assert np.allclose(to_model_resolution(mirror(v), m.repeat(2, 0).repeat(2, 1).repeat(2, 2), 2.0, 4.0)[0],
                       mirror(small), atol=1e-6)


# ----------------------------------------------------------------------------------------------------------
# Participant interface and group level
# ----------------------------------------------------------------------------------------------------------


def _save(path: Path, data: np.ndarray, resolution: float = RES) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, model_grid(resolution).affine), path)
    return path


def test_interface_writes_map_regions_report(template8, tmp_path, monkeypatch):
    from bids_siamese.interfaces.symmetry import AsymmetryAnalysis, map_sidecar

    data, mask = template8
    img = _save(tmp_path / "in" / "preproc.nii.gz", data)
    msk = _save(tmp_path / "in" / "mask.nii.gz", mask.astype(np.uint8))
    monkeypatch.chdir(tmp_path)
    res = AsymmetryAnalysis(in_file=str(img), in_mask=str(msk), atlas="harvard_oxford", fwhm=6.0).run()
    out = res.outputs
    ai = nib.load(out.out_map)
    assert ai.shape == data.shape and np.allclose(ai.affine, model_grid(RES).affine)
    assert ai.get_data_dtype() == np.float32 and int(ai.header["sform_code"]) == 4
    regions = pd.read_csv(out.out_regions, sep="\t")
    assert list(regions.columns) == ["region", "left", "right", "asymmetry_index", "n_voxels", "reference_index",
                                     "z_score"]
    report = json.loads(Path(out.out_report).read_text())
    for key in ("asymmetry_score", "raw_magnitude", "focal_z", "top_regions", "peak_mm", "atlas"):
        assert key in report
    assert report["atlas_provenance"]["AtlasSourceSpace"] == "MNI152NLin6Asym"  # moved to 2009c, transform named
    assert report["atlas_provenance"]["AtlasSpace"] == "MNI152NLin2009cAsym"
    # the template compared with itself: no deviation at all
    assert report["focal_z"] == 0.0 or report["raw_magnitude"] > 0
    assert map_sidecar()["Resolution"] == {"2": map_sidecar()["Resolution"]["2"]}


def _fake_outputs(root: Path, template8, n: int, lesion_subjects: dict[int, str], seed=0) -> None:
    from bids_siamese.bids.derivatives import init_output_dir

    init_output_dir(root)
    data, mask = template8
    rng = np.random.default_rng(seed)
    affine = model_grid(RES).affine
    for i in range(n):
        shift = [ndi.gaussian_filter(rng.normal(size=data.shape), 2.0) * 2.0 for _ in range(3)]
        coords = np.indices(data.shape).astype(float)
        img = ndi.map_coordinates(data, [coords[a] + 0.3 * shift[a] for a in range(3)], order=1)
        img = np.where(mask, img + rng.normal(0, 0.05, data.shape), 0).astype(np.float32)
        if i in lesion_subjects:
            img, _ = simulate_lesion(img, mask, affine, rng, LesionConfig(volume_mm3=(6000.0, 8000.0), intensity=(-3.0, -2.5)),
                                     hemisphere=lesion_subjects[i])
        anat = root / f"sub-{i:02d}" / "anat"
        base = f"sub-{i:02d}_space-MNI152NLin2009cAsym"
        _save(anat / f"{base}_desc-preproc_T1w.nii.gz", img)
        _save(anat / f"{base}_desc-brain_mask.nii.gz", mask.astype(np.uint8))


def _settings(root: Path, **kw) -> Settings:
    return Settings(bids_dir=root / "nobids", output_dir=root, analysis_level="group", work_dir=root / "work",
                    resolution=RES, **kw)


def test_group_table_ranks_lesions_first(template8, tmp_path):
    from bids_siamese.symmetry.run import GROUP_COLUMNS, run_symmetry

    root = tmp_path / "out"
    _fake_outputs(root, template8, 10, {0: "L", 1: "R"})
    written = run_symmetry(_settings(root), [f"{i:02d}" for i in range(10)])
    table = pd.read_csv(written[0], sep="\t")
    assert written[0].name == "group_symmetry.tsv" and list(table.columns) == GROUP_COLUMNS
    assert table["session_id"].isna().all()  # "n/a" in the file
    top2 = set(table.sort_values("asymmetry_score", ascending=False)["participant_id"][:2])
    assert top2 == {"sub-00", "sub-01"}
    assert table["siamese_probability"].isna().all()


@pytest.mark.slow
def test_group_train_and_apply(template8, tmp_path):
    from bids_siamese.symmetry.run import run_symmetry

    root = tmp_path / "out"
    _fake_outputs(root, template8, 12, {0: "L"})
    subjects = [f"{i:02d}" for i in range(12)]
    written = run_symmetry(_settings(root, task="symmetry", mode="train", epochs=1, batch_size=4, embedding_dim=16),
                           subjects)
    names = {p.name for p in written}
    assert {"group_symmetry.tsv", "group_symmetry_training.tsv", "group_symmetry_evaluation.tsv",
            "group_symmetry_detection.svg", "model_card.json"} <= names
    table = pd.read_csv(root / "group_symmetry.tsv", sep="\t")
    assert table["siamese_probability"].between(0, 1).all()
    assert set(table["split"]) <= {"train", "validation", "test", "excluded"}
    evaluation = pd.read_csv(root / "group_symmetry_evaluation.tsv", sep="\t")
    assert {"scorer", "bin_mm3", "detection_rate", "auc", "cross_section_mm2"} <= set(evaluation.columns)
    # 12 scans, about 4 not trained on: too few for a group-relative siamese_z; the checkpoint's threshold decides instead
    summary = json.loads((root / "group_symmetry_evaluation.json").read_text())
    n_reference = int((table["split"] != "train").sum())
    assert summary["siamese_reference"]["n_reference"] == n_reference < 10
    assert table["siamese_z"].isna().all()
    threshold = summary["training"]["threshold"]
    assert (table["siamese_suspected"] == (table["siamese_probability"] >= threshold - 1e-4)).all()
    model_dir = root / "models" / "symmetry_small"
    written = run_symmetry(_settings(root, task="symmetry", mode="apply", model=model_dir), subjects)
    again = pd.read_csv(written[0], sep="\t")
    assert np.allclose(again["siamese_probability"], table["siamese_probability"], atol=1e-4)
    # apply to the training dataset: the checkpoint's training and validation scans are recognised by their hash,
    # so the memorised training scans stay out of the siamese_z reference (here too few remain: n/a)
    seen = table["split"].where(table["split"].isin(["train", "validation"]), "n/a")
    assert again["split"].fillna("n/a").tolist() == seen.tolist() and (seen == "train").sum() >= 6
    assert again["siamese_z"].isna().all()
    # apply to 12 other subjects: all of them are the reference
    other = tmp_path / "other"
    _fake_outputs(other, template8, 12, {3: "R"}, seed=5)
    written = run_symmetry(_settings(other, task="symmetry", mode="apply", model=model_dir), subjects)
    new = pd.read_csv(written[0], sep="\t")
    assert (new["split"].isna()).all()  # n/a: never seen
    z = new["siamese_z"].to_numpy()
    assert np.isfinite(z).all() and abs(float(np.median(z))) < 0.05  # z is centred on the group
    # the same order as the probabilities (z is a monotone function of the logit)
    p = new["siamese_probability"].to_numpy()
    assert np.all(np.diff(p[np.argsort(z)]) >= -1e-4)
    assert (new["siamese_suspected"] == (new["siamese_z"] >= 3)).all()


@pytest.mark.slow
def test_output_names_pass_the_validator(template8, tmp_path):
    """The asymmetry outputs under the writer's names, with the app's own .bidsignore and nothing added."""
    from bids_siamese.bids.derivatives import BIDSIGNORE, init_output_dir, write_json, write_nifti, write_tsv
    from bids_siamese.bids.grids import resample_to_templateflow
    from bids_siamese.bids.derivatives import output_names
    from bids_siamese.interfaces.symmetry import map_sidecar

    root = tmp_path / "deriv"
    init_output_dir(root)
    assert (root / ".bidsignore").read_text().split() == BIDSIGNORE
    names = output_names({"subject": "01", "session": "1"})
    data, _ = template8
    write_nifti(root / names["asymmetry_map"], resample_to_templateflow(data, model_grid(RES)))
    write_json(root / names["asymmetry_map"].with_name(names["asymmetry_map"].name.replace(".nii.gz", ".json")),
               map_sidecar())
    write_tsv(root / names["asymmetry_regions"], pd.DataFrame({"region": ["a"], "asymmetry_index": [0.0]}))
    write_json(root / names["asymmetry_report"], {"asymmetry_score": 0.0})
    (root / "group_symmetry.tsv").write_text("participant_id\tasymmetry_score\nsub-01\t0\n")
    errors = [i for i in run_validator(root) if i.severity == "error"]
    assert not errors, errors


def test_precise_batch_norm_matches_training_mode(template8):
    from bids_siamese.train.loop import recompute_batch_norm

    data, _ = template8
    rng = np.random.default_rng(0)
    x = torch.from_numpy(np.stack([data + 0.1 * rng.normal(size=data.shape) for _ in range(4)])[:, None]).float()
    torch.manual_seed(0)
    model = build_symmetry_model("small")
    model.train()
    with torch.no_grad():
        train_features = model.features(x)[0]  # batch statistics
        stale = model.eval().features(x)[0]  # initial running statistics
    # the shared precise batch norm, run through the hemisphere model (not its embedding head)
    assert recompute_batch_norm(model, x.numpy(), np.arange(4), batch_size=4, forward=model) > 0
    model.eval()
    with torch.no_grad():
        eval_features = model.features(x)[0]
    scale = float(train_features.abs().mean())
    assert float((eval_features - train_features).abs().mean()) < 0.05 * scale
    assert float((stale - train_features).abs().mean()) > 0.2 * scale


def test_position_map_points_at_the_lesion_cells():
    from bids_siamese.symmetry.train import hemisphere_weights, position_targets

    w = np.zeros((20, 16, 16), np.float32)
    w[16:18, 2:4, 2:4] = 1.0  # right hemisphere, mirrored to x index 2..3 of the hemisphere grid
    hemi = hemisphere_weights(w)
    assert hemi.shape == (10, 16, 16) and hemi[2:4, 2:4, 2:4].all()
    targets = position_targets(torch.from_numpy(hemi[None]), (2, 4, 4))[0]
    assert targets.sum() == 1 and targets[0, 0, 0] == 1


def test_peak_region_outside_every_label_names_the_nearest_on_its_side():
    from bids_siamese.symmetry.regional import region_at

    labels = np.zeros((10, 3, 3), int)
    labels[0], labels[9] = 1, 2  # left and right labels at the two ends of the x axis
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    affine[0, 3] = -9.0  # voxel i sits at x = 2 i - 9
    names = {1: "Left_A", 2: "Right_B"}
    assert region_at((-9.0, 2.0, 2.0), labels, names, affine) == "Left_A"
    assert region_at((-5.0, 2.0, 2.0), labels, names, affine) == "Left_A (nearest, 4 mm)"
    assert region_at((1.0, 2.0, 2.0), labels, names, affine) == "Right_B (nearest, 8 mm)"  # not the left label
    assert region_at((-1.0, 2.0, 2.0), labels, names, affine, search_mm=5.0) == "Unlabelled (left)"


def test_small_study_scores_are_standardised_against_its_scans():
    """Fewer scans than MIN_REFERENCE_SCANS (the tiny demo has 7): the focal statistic of every real brain is
    large, so it is standardised against the study's scans; lesion-free scans stay below the threshold."""
    from scipy import ndimage as ndi

    from bids_siamese.symmetry.asymmetry import (
        ASYMMETRY_THRESHOLD, MIN_REFERENCE_SCANS, Reference, group_reference, score_map,
    )

    rng = np.random.default_rng(3)
    shape = (24, 16, 16)
    maps = []
    for i in range(7):
        noise = ndi.gaussian_filter(rng.normal(0, 0.05, shape), 1.0)
        ai = noise - noise[::-1]  # normal (antisymmetric) asymmetry
        if i == 0:
            ai[4:7, 6:9, 6:9] -= 0.4  # a focal hypointense lesion in the left hemisphere ...
            ai[17:20, 6:9, 6:9] += 0.4  # ... and its mirror
        maps.append(ai)
    masks = [np.ones(shape, bool)] * len(maps)
    template = Reference(mean=np.zeros(shape))
    assert len(maps) < MIN_REFERENCE_SCANS
    unstandardised = [score_map(a, m, 4.0, template)["asymmetry_score"] for a, m in zip(maps, masks)]
    assert min(unstandardised[1:]) > ASYMMETRY_THRESHOLD  # the old behaviour: every scan "suspected"
    reference = group_reference(maps, masks, [pd.DataFrame({"region": [], "asymmetry_index": []})] * len(maps),
                                template, 4.0)
    scores = [score_map(a, m, 4.0, reference)["asymmetry_score"] for a, m in zip(maps, masks)]
    assert reference.n_scans == 7 and reference.focal_sd > 0
    assert max(scores[1:]) < ASYMMETRY_THRESHOLD < scores[0]
    assert group_reference(maps[:2], masks[:2], [], template, 4.0) is template  # too few to standardise


def _two_head_population(seed: int = 0, n_major: int = 24, n_minor: int = 8, shape=(20, 16, 16)):
    """AI maps of two 'heads' with different large-scale normal asymmetry (unequal counts, per-scan variation
    and noise), and one focal lesion in a scan of the minority head."""
    from scipy import ndimage as ndi

    rng = np.random.default_rng(seed)

    def antisym(v):
        return (v - v[::-1]) / 2.0

    patterns = [antisym(ndi.gaussian_filter(rng.normal(0, 1, shape), 3.0)) for _ in range(2)]
    patterns = [0.06 * p / np.abs(p).max() for p in patterns]
    maps, groups, head = [], [], []
    for h, n in ((0, n_major), (1, n_minor)):
        for k in range(n):
            ai = patterns[h] * rng.uniform(0.8, 1.2) + antisym(ndi.gaussian_filter(rng.normal(0, 0.012, shape), 1.0))
            maps.append(ai.astype(np.float32))
            groups.append(f"h{h}s{k}")
            head.append(h)
    lesion_scan = n_major  # the first scan of the minority head
    blob = np.zeros(shape)
    blob[4:7, 6:9, 6:9] = -0.08
    maps[lesion_scan] = (maps[lesion_scan] + blob - blob[::-1]).astype(np.float32)
    return maps, groups, np.array(head), lesion_scan


def test_normative_reference_keeps_a_minority_heads_lesion_and_its_clean_scans_apart():
    """Heterogeneous population (issue 14): a majority head and a minority head with another normal asymmetry.
    With one voxelwise median and spread for everyone the minority head's lesion is missed; against the default
    group reference (normative modes) it is the top score and flagged, with at most one false positive among the
    31 clean scans; the modes explain the minority head's pattern but not the lesion."""
    from bids_siamese.symmetry.asymmetry import (
        ASYMMETRY_THRESHOLD, Reference, group_reference, score_map, z_map,
    )

    maps, groups, head, lesion_scan = _two_head_population(seed=1)
    shape = maps[0].shape
    masks = [np.ones(shape, bool)] * len(maps)
    empty = [pd.DataFrame({"region": [], "asymmetry_index": []})] * len(maps)
    template = Reference(mean=np.zeros(shape))

    def scores(ref):
        return np.array([score_map(a, m, 4.0, ref.member(i))["asymmetry_score"]
                         for i, (a, m) in enumerate(zip(maps, masks))])

    median_only = group_reference(maps, masks, empty, template, 4.0, components=0)
    assert median_only.normative is None
    assert scores(median_only)[lesion_scan] < ASYMMETRY_THRESHOLD  # the failure the modes fix
    ref = group_reference(maps, masks, empty, template, 4.0, groups=groups)
    assert ref.normative is not None and ref.normative.n_components == 8  # 10 capped at a quarter of 32 scans
    got = scores(ref)
    clean = np.arange(len(maps)) != lesion_scan
    assert got[lesion_scan] > 10 * ASYMMETRY_THRESHOLD and got[lesion_scan] == got.max()
    assert int((got[clean] > ASYMMETRY_THRESHOLD).sum()) <= 1
    # the minority head's pattern is explained by the modes (its clean residual is small) ...
    minority_clean = [i for i in np.flatnonzero(head == 1) if i != lesion_scan]
    median_only = group_reference(maps, masks, empty, template, 4.0, components=0)
    for i in minority_clean:
        with_modes = np.abs(maps[i] - ref.member(i).mean)[:10].mean()
        without = np.abs(maps[i] - median_only.mean)[:10].mean()
        assert with_modes < 0.5 * without
    # ... but not the lesion: its deviation at the lesion keeps most of the planted -0.08
    residual = maps[lesion_scan] - ref.member(lesion_scan).mean
    assert residual[4:7, 6:9, 6:9].mean() < -0.06
    # a scan from outside the dataset is projected on every scan's modes
    outside = z_map(maps[lesion_scan], masks[0], ref, 4.0)
    assert outside[4:7, 6:9, 6:9].mean() < -3


def test_normative_folds_keep_a_participants_sessions_together():
    """A participant's sessions share a fold: one session's map cannot explain the other's (a lesion present at
    both sessions stays a deviation)."""
    from bids_siamese.symmetry.normative import fit_normative, fold_assignment

    groups = ["a", "a", "b", "b", "c", "d", "e", "f", "g", "h"]
    folds = fold_assignment(groups, 4, seed=1)
    assert folds[0] == folds[1] and folds[2] == folds[3] and len(set(folds.tolist())) == 4
    maps, _, _, lesion_scan = _two_head_population(seed=1, n_major=16, n_minor=4)
    maps.append(maps[lesion_scan].copy())  # a second session with the same lesion
    groups = [f"p{i}" for i in range(len(maps) - 1)] + [f"p{lesion_scan}"]
    left = np.zeros(maps[0].shape, bool)
    left[: maps[0].shape[0] // 2] = True
    model = fit_normative(maps, left, groups, components=4, folds=5)
    assert model.folds[lesion_scan] == model.folds[-1]
    for i in (lesion_scan, len(maps) - 1):
        expected = model.member_mean(i, np.zeros(maps[0].shape))
        assert (maps[i] - expected)[4:7, 6:9, 6:9].mean() < -0.06
