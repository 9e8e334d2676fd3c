"""The atlas-region twin model (``--backbone regional``): embedding algebra, exact decomposition, checkpoints,
learning the planted region, the group-level run and its explanations."""
from __future__ import annotations

import json
from functools import partial
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch

from bids_siamese.config import Settings
from bids_siamese.cli.parser import parse_args
from bids_siamese.errors import UsageError
from bids_siamese.models.checkpoint import load_checkpoint
from bids_siamese.models.regional import (RegionalChange, RegionalConvEncoder, RegionalEncoder, part_map_for,
                                          pooled_affine, pooled_shape)
from bids_siamese.models.losses import pairwise_distance
from bids_siamese.train.evaluate import safe_auc
from bids_siamese.train.loop import TwinData, train_twin
from bids_siamese.train.trainer import TrainConfig
from bids_siamese.bids.derivatives import LONGITUDINAL_FILES, REGION_WEIGHTS, TWIN_FILES
from bids_siamese.train.longitudinal import run_longitudinal
from bids_siamese.train.twins import run_twin

from test_train import make_group_inputs, settings_for

SHAPE = (16, 16, 16)


def _quadrants(shape=SHAPE, pool=2) -> np.ndarray:
    """Four parts on the pooled grid: the x/y quadrants (labels 1..4)."""
    ps = pooled_shape(shape, pool)
    i, j, _ = np.indices(ps)
    return 1 + (i >= ps[0] // 2) + 2 * (j >= ps[1] // 2)


def test_embedding_is_the_weighted_mean_of_part_correlations():
    torch.manual_seed(0)
    enc = RegionalEncoder(SHAPE, _quadrants())
    enc.logit.data = torch.tensor([1.0, 0.0, -1.0, 0.5])
    x = torch.randn(2, 1, *SHAPE)
    e = enc(x)
    assert torch.allclose(e.norm(dim=1), torch.ones(2), atol=1e-5)
    # by hand: pool 2x2x2, correlate each quadrant's pattern, weight by softmax
    pooled = torch.nn.functional.avg_pool3d(x, 2)[:, 0].numpy()
    parts = _quadrants()
    w = torch.softmax(enc.logit, 0).detach().numpy()
    expected = sum(w[k] * np.corrcoef(pooled[0][parts == k + 1], pooled[1][parts == k + 1])[0, 1] for k in range(4))
    assert float((e[0] @ e[1]).detach()) == pytest.approx(expected, abs=1e-5)
    assert enc.embedding_dim == int(np.prod(pooled_shape(SHAPE, 2))) and enc.n_parts == 4


def test_contributions_decompose_norm_and_distance_exactly():
    torch.manual_seed(1)
    enc = RegionalEncoder(SHAPE, _quadrants())
    enc.logit.data = torch.randn(4)
    a, b = torch.randn(1, 1, *SHAPE), torch.randn(1, 1, *SHAPE)
    own = enc.contributions(enc(a)[0])
    assert own.shape == SHAPE and own.min() >= 0 and own.sum() == pytest.approx(1.0, abs=1e-5)
    pair = enc.contributions(enc(a)[0], enc(b)[0])
    distance = 1.0 - float((enc(a)[0] @ enc(b)[0]).detach())
    assert pair.sum() == pytest.approx(distance, abs=1e-5)
    # the quadrant with the largest weight holds the largest share of the norm
    share = [own[np.repeat(np.repeat(np.repeat(_quadrants() == k, 2, 0), 2, 1), 2, 2)].sum() for k in (1, 2, 3, 4)]
    assert np.allclose(share, torch.softmax(enc.logit, 0).detach().numpy(), atol=1e-5)


def test_small_parts_are_left_out_and_no_part_is_an_error():
    parts = np.zeros(pooled_shape(SHAPE, 2), int)
    parts[:4] = 1
    parts[7, 7, 7] = 2  # one voxel: too small
    enc = RegionalEncoder(SHAPE, parts)
    assert enc.part_label.tolist() == [1]
    with pytest.raises(ValueError, match="no atlas region"):
        RegionalEncoder(SHAPE, np.zeros(pooled_shape(SHAPE, 2), int))
    with pytest.raises(ValueError, match="does not fit"):
        RegionalEncoder(SHAPE, np.ones((3, 3, 3), int))


def test_reference_standardises_and_floors_the_spread():
    rng = np.random.default_rng(0)
    vols = rng.normal(5.0, 2.0, (20, 1, *SHAPE)).astype(np.float32)
    vols[:, :, 0] = 7.0  # a constant slab: spread 0, floored
    enc = RegionalEncoder(SHAPE, _quadrants())
    enc.set_reference(vols)
    assert enc.reference_mean[0, 0, 0].eq(7.0).all()
    assert float(enc.reference_sd.min()) > 1.0  # the floor is a percentile of the real spreads (~2)
    assert float(enc.reference_sd[0, 0, 5].mean()) == pytest.approx(2.0, rel=0.2)


def test_state_dict_round_trip_rebuilds_the_same_model():
    torch.manual_seed(2)
    enc = RegionalEncoder(SHAPE, _quadrants())
    enc.set_reference(np.random.default_rng(1).normal(size=(6, 1, *SHAPE)).astype(np.float32))
    enc.logit.data = torch.randn(4)
    again = RegionalEncoder.from_state_dict(enc.state_dict(), pool=2)
    again.load_state_dict(enc.state_dict())
    x = torch.randn(3, 1, *SHAPE)
    assert torch.allclose(enc(x), again(x))


def test_part_map_follows_atlas_and_brain():
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    brain = np.zeros(SHAPE, bool)
    brain[:, :8] = True

    def atlas(shape, aff):  # label by x position in mm
        centres = aff[:3, :3] @ np.indices(shape).reshape(3, -1) + aff[:3, 3:4]
        return (1 + (centres[0] > 15)).reshape(shape)

    parts = part_map_for(SHAPE, affine, atlas, brain, pool=2)
    assert parts.shape == (8, 8, 8)
    assert set(np.unique(parts[:, :4])) == {1, 2} and not parts[:, 4:].any()
    assert pooled_affine(affine, 2)[0, 3] == 1.0  # block centre of voxels 0 and 1 (0 and 2 mm)


def _planted_twins(n_families: int, rng: np.random.Generator, strength: float = 0.4, noise: float = 0.92):
    """MZ pairs that share a pattern in quadrant 1 only (weight ``strength``, individual noise ``noise``);
    everything else is individual noise."""
    vols, family = [], []
    for f in range(n_families):
        shared = rng.normal(size=SHAPE)
        for _ in range(2):
            v = rng.normal(size=SHAPE) * 1.0
            q1 = np.zeros(SHAPE, bool)
            q1[:8, :8] = True
            v[q1] = strength * shared[q1] + noise * rng.normal(size=int(q1.sum()))
            vols.append(v)
            family.append(f)
    vols = np.asarray(vols, np.float32)[:, None]
    family = np.asarray(family)
    same = family[:, None] == family[None, :]
    positive = (same & ~np.eye(len(family), dtype=bool)).astype(np.float32)
    return vols, family, positive, ~same


def _held_out_auc(model, vols, positive, unrelated, test) -> float:
    """MZ co-twins vs unrelated pairs among the ``test`` scans: AUC of the negative cosine distance."""
    with torch.no_grad():
        d = pairwise_distance(model(torch.from_numpy(vols[test])), "cosine").numpy()
    iu = np.triu_indices(len(test), 1)
    y = positive[np.ix_(test, test)][iu]
    keep = y.astype(bool) | unrelated[np.ix_(test, test)][iu]
    return safe_auc(y[keep], -d[iu][keep])


def test_training_finds_the_region_that_carries_the_family_signal():
    """Learned weights move to the one quadrant where co-twins resemble each other, and held-out twins are
    found better than with equal weights."""
    rng = np.random.default_rng(0)
    vols, family, positive, unrelated = _planted_twins(16, rng)
    train, val, test = np.arange(0, 20), np.arange(20, 26), np.arange(26, 32)
    enc = RegionalEncoder(SHAPE, _quadrants())
    enc.set_reference(vols[train])

    before = _held_out_auc(enc, vols, positive, unrelated, test)
    config = TrainConfig(epochs=40, batch_size=20, lr=0.05, patience=40, max_shift=0, intensity=0.0, noise_std=0.0,
                         progress=False)
    result = train_twin(enc, TwinData(vols, family, positive, unrelated), train, val, config)
    weights = result.model.region_weights().detach().numpy()
    assert int(np.argmax(weights)) == 0 and weights[0] > 0.5
    after = _held_out_auc(result.model, vols, positive, unrelated, test)
    assert after > before and after >= 0.9


def test_regional_cnn_learns_its_convolutions_and_finds_held_out_twins():
    """The CNN twin recipe (``regional_cnn``): triplet training changes the convolution weights, moves the
    weight to the quadrant with the family signal, and held-out co-twins (8 families never seen) are found
    clearly above chance and better than by the untrained network."""
    rng = np.random.default_rng(2)
    vols, family, positive, unrelated = _planted_twins(24, rng, strength=0.5, noise=0.87)
    train, val, test = np.arange(0, 24), np.arange(24, 32), np.arange(32, 48)
    torch.manual_seed(0)
    enc = RegionalConvEncoder(SHAPE, _quadrants(), channels=4)
    enc.set_reference(vols[train])
    start = [p.detach().clone() for p in enc.features.parameters()]
    before = _held_out_auc(enc, vols, positive, unrelated, test)
    config = TrainConfig(epochs=40, batch_size=24, lr=0.05, patience=40, max_shift=0, intensity=0.0, noise_std=0.0,
                         progress=False)
    result = train_twin(enc, TwinData(vols, family, positive, unrelated), train, val, config)
    model = result.model
    moved = max(float((p.detach() - q).abs().max()) for p, q in zip(model.features.parameters(), start))
    assert moved > 1e-3  # the convolutions were trained, not only the region weights
    weights = model.region_weights().detach().numpy()
    assert int(np.argmax(weights)) == 0 and weights[0] > 2 * weights[1:].max()  # started equal (0.25 each)
    assert model.channel_weights()[1:].sum() > 0.2  # the learned channels carry part of the decision
    after = _held_out_auc(model, vols, positive, unrelated, test)
    assert after >= 0.85 and after > before + 0.05


def test_regional_cnn_state_dict_round_trip_and_exact_decomposition():
    torch.manual_seed(0)
    enc = RegionalConvEncoder(SHAPE, _quadrants(), channels=3)
    enc.set_reference(np.random.default_rng(0).normal(size=(5, 1, *SHAPE)).astype(np.float32))
    with torch.no_grad():
        enc.logit.normal_()
    rebuilt = RegionalConvEncoder.from_state_dict(enc.state_dict())
    rebuilt.load_state_dict(enc.state_dict())
    x = torch.randn(2, 1, *SHAPE)
    with torch.no_grad():
        e = enc(x)
        assert torch.allclose(rebuilt(x), e, atol=1e-6)
    assert rebuilt.channels == 3 and e.shape[1] == enc.embedding_dim == 4 * enc.positions.numel()
    one = enc.contributions(e[0])
    pair = enc.contributions(e[0], e[1])
    assert one.shape == SHAPE and one.sum() == pytest.approx(1.0, abs=1e-5)
    assert pair.sum() == pytest.approx(1.0 - float(e[0] @ e[1]), abs=1e-5)
    groups = enc.param_groups(0.05)
    assert groups[0]["lr"] == 0.05 and groups[1]["lr"] == pytest.approx(0.05 * enc.FEATURE_LR_FACTOR)


def test_cli_defaults_per_task_and_regional_is_twin_only(tmp_path):
    bids, out = tmp_path / "bids", tmp_path / "out"
    bids.mkdir()
    (bids / "dataset_description.json").write_text('{"Name": "x", "BIDSVersion": "1.10.0"}')
    base = [str(bids), str(out), "group", "--skip-bids-validation"]
    twin = parse_args(base + ["--task", "twin"])
    assert (twin.backbone, twin.epochs, twin.lr, twin.batch_size, twin.patience) == ("regional", 100, 0.05, 32, 50)
    assert parse_args(base + ["--task", "twin", "--backbone", "small"]).lr == 1e-3
    assert parse_args(base + ["--task", "twin", "--epochs", "7"]).epochs == 7
    longitudinal = parse_args(base + ["--task", "longitudinal"])
    assert (longitudinal.backbone, longitudinal.epochs) == ("regional", 100)
    assert parse_args(base + ["--task", "longitudinal", "--backbone", "small"]).lr == 1e-3
    assert parse_args(base + ["--task", "symmetry"]).backbone == "small"
    with pytest.raises(UsageError, match="regional has no symmetry model"):
        parse_args(base + ["--task", "symmetry", "--backbone", "regional"])
    cnn = parse_args(base + ["--task", "twin", "--backbone", "regional_cnn"])
    assert (cnn.backbone, cnn.epochs, cnn.lr, cnn.batch_size) == ("regional_cnn", 100, 0.05, 32)
    with pytest.raises(UsageError, match="regional_cnn is a twin model"):
        parse_args(base + ["--task", "longitudinal", "--backbone", "regional_cnn"])


@pytest.fixture(scope="module")
def regional_run(tmp_path_factory):
    bids, out, subjects = make_group_inputs(tmp_path_factory.mktemp("regional"))
    settings = settings_for(bids, out, "twin", backbone="regional", epochs=15, batch_size=32, lr=0.05, patience=15,
                            atlas="harvard_oxford")
    written = run_twin(settings, subjects)
    return bids, out, subjects, written


def test_group_twin_regional_train_then_apply(regional_run):
    bids, out, subjects, written = regional_run
    folder = out / "models" / "twins_regional"
    names = {p.relative_to(out).as_posix() for p in written}
    assert set(TWIN_FILES.values()) <= names and f"models/twins_regional/{REGION_WEIGHTS}" in names
    card = json.loads((folder / "model_card.json").read_text())
    weights = pd.read_csv(folder / REGION_WEIGHTS, sep="\t")
    assert card["backbone"] == "regional" and card["pool"] == 1  # 8 mm grid: no pooling
    assert card["n_regions"] == len(weights) and card["weights"]["parameters"] == len(weights)
    assert list(weights.columns) == ["region", "hemisphere", "structure_class", "label", "voxels", "weight", "rank"]
    assert weights["weight"].sum() == pytest.approx(1.0, abs=1e-4) and weights["weight"].is_monotonic_decreasing
    assert card["hyperparameters"]["max_shift_voxels"] == 0
    assert card["input"]["population_reference"].startswith("voxelwise mean and spread of the ")
    pairs = pd.read_csv(out / TWIN_FILES["pairs"], sep="\t")
    metrics = pd.read_csv(out / TWIN_FILES["metrics"], sep="\t").set_index("metric")
    # the fake family pattern is brain-wide, so the regional model separates the test co-twins
    assert metrics.loc["auc_roc", "mean"] > 0.8
    applied = settings_for(bids, out, "twin", mode="apply", model=folder, backbone="regional")
    run_twin(applied, subjects)
    again = pd.read_csv(out / TWIN_FILES["pairs"], sep="\t")
    assert np.allclose(again["distance"], pairs["distance"], atol=1e-5)


def test_explain_regional_model_ranks_the_weighted_region_first(regional_run, tmp_path):
    """With all weight on the thalamus parts, the relevance maps (exact decomposition, sums of 1 per scan) put
    the thalamus at the top of the atlas ranking."""
    from bids_siamese.explain.run import run_explain
    from bids_siamese.models.checkpoint import load_checkpoint, save_checkpoint

    bids, out, subjects, _ = regional_run
    model, card = load_checkpoint(out / "models" / "twins_regional")
    weights = pd.read_csv(out / "models" / "twins_regional" / REGION_WEIGHTS, sep="\t")
    thalamus = set(weights.loc[weights["region"] == "Thalamus", "label"])
    assert thalamus, "the 8 mm test grid keeps both thalami as parts"
    logit = torch.full_like(model.logit, -20.0)
    logit[[k for k, lab in enumerate(model.part_label.tolist()) if lab in thalamus]] = 0.0
    model.logit.data = logit
    folder = tmp_path / "twins_regional"
    save_checkpoint(folder, model, {k: v for k, v in card.items() if k != "weights"})
    settings = Settings(output_dir=out, bids_dir=bids, analysis_level="group", work_dir=out.parent / "work",
                        resolution=8.0, task="twin", atlas="harvard_oxford", seed=0, backbone="regional",
                        distance="cosine", report_subjects=False, explain_surfaces=False, relevance_fwhm=0.0)
    written = run_explain(settings, subjects[:6], model_path=folder)
    maps = [p for p in written if p.name.endswith("desc-decomposition_relevance.nii.gz") and p.name.startswith("sub-")]
    assert len(maps) >= 6  # one per scan (some subjects have two sessions)
    for path in maps:
        assert float(np.asarray(nib.load(str(path)).dataobj).sum()) == pytest.approx(1.0, abs=1e-3)
        sidecar = json.loads(Path(str(path).replace(".nii.gz", ".json")).read_text())
        assert sidecar["Description"].startswith("Exact per-voxel decomposition") and "LRPRules" not in sidecar
    ranking = pd.read_csv(out / "group_regions_ranking.tsv", sep="\t")
    assert ranking.iloc[0]["region"] == "Thalamus"
    report = (out / "group.html").read_text()  # the report shows the trained model's own region weights
    assert "Learned region weights (regional model)" in report and weights.iloc[0]["region"] in report


def test_participant_embedding_from_a_regional_checkpoint(regional_run, tmp_path, monkeypatch):
    """``participant --model`` with a regional checkpoint writes the same unit embedding the group level uses."""
    from bids_siamese.interfaces.embedding import ComputeEmbedding
    from bids_siamese.models.checkpoint import load_checkpoint

    _, out, _, _ = regional_run
    folder = out / "models" / "twins_regional"
    in_file = next(out.glob("sub-*/ses-1/anat/*_desc-preproc_T1w.nii.gz"))
    monkeypatch.chdir(tmp_path)
    result = ComputeEmbedding(in_file=str(in_file), model=str(folder)).run()
    table = pd.read_csv(result.outputs.out_tsv, sep="\t")
    model, card = load_checkpoint(folder)
    assert table.shape == (1, card["embedding_dim"]) == (1, model.embedding_dim)
    with torch.no_grad():
        expected = model(torch.from_numpy(np.asarray(nib.load(str(in_file)).dataobj, np.float32))[None, None])[0]
    assert np.allclose(table.to_numpy()[0], expected.numpy(), atol=1e-5)
    assert np.linalg.norm(table.to_numpy()[0]) == pytest.approx(1.0, abs=1e-3)


def test_regional_change_features_penalty_and_round_trip():
    torch.manual_seed(3)
    model = RegionalChange(SHAPE, _quadrants())
    x_a = torch.randn(4, 1, *SHAPE)
    x_b = x_a.clone()
    x_b[:, :, :8, :8] -= 1.0  # quadrant 1 darkens by 1
    diff = model.embed(x_b) - model.embed(x_a)
    assert torch.allclose(diff[:, 0], torch.full((4,), -1.0), atol=1e-5) and diff[:, 1:].abs().max() < 1e-5
    model.set_feature_scale(torch.randn(10, 4))
    model.classifier.weight.data = torch.tensor([[1.0, -2.0, 0.0, 0.5]])
    assert float(model.penalty().detach()) == pytest.approx(0.03 * 3.5)
    again = RegionalChange.from_state_dict(model.state_dict(), SHAPE, pool=2)
    again.load_state_dict(model.state_dict())
    assert torch.allclose(again(x_a, x_b), model(x_a, x_b))


def test_group_longitudinal_regional_learns_the_planted_atrophy(tmp_path):
    """The fake decliners lose intensity in a central sphere: the regional change model finds it, ranks central
    regions first and reproduces its predictions with --mode apply."""
    bids, out, subjects = make_group_inputs(tmp_path)
    settings = settings_for(bids, out, "longitudinal", backbone="regional", n_draws=2, epochs=60, batch_size=32,
                            lr=0.05, patience=60, atlas="harvard_oxford")
    written = run_longitudinal(settings, subjects)
    folder = out / "models" / "longitudinal_regional"
    names = {p.relative_to(out).as_posix() for p in written}
    assert f"models/longitudinal_regional/{REGION_WEIGHTS}" in names
    metrics = pd.read_csv(out / LONGITUDINAL_FILES["metrics"], sep="\t").set_index("metric")
    assert metrics.loc["auc_roc", "mean"] >= 0.75
    card = json.loads((folder / "model_card.json").read_text())
    assert card["backbone"] == "regional" and card["embedding_dim"] == card["n_regions"]
    assert card["hyperparameters"]["l1"] in card["hyperparameters"]["l1_choices"]  # chosen on validation AUC
    assert card["hyperparameters"]["refitted_on"] == "training + validation pairs"
    assert metrics.loc["refitted", "mean"] == 1 and metrics.loc["l1_run0", "mean"] == card["hyperparameters"]["l1"]
    assert metrics.loc["l1", "n_runs"] == 2 and metrics.loc["before_refit_auc_roc", "n_runs"] == 2
    assert card["decision"]["threshold_p_decline"] == pytest.approx(metrics.loc["threshold_p_decline", "mean"])
    weights = pd.read_csv(folder / REGION_WEIGHTS, sep="\t")
    assert weights["weight"].abs().is_monotonic_decreasing and (weights["weight"].iloc[0] != 0)
    central = {"Thalamus", "Lateral Ventricle", "Lateral Ventrical", "Caudate", "Putamen", "Pallidum"}
    assert set(weights.head(3)["region"]) <= central and (weights.head(3)["weight"] < 0).all()  # darkening = decline
    history = pd.read_csv(out / LONGITUDINAL_FILES["history"], sep="\t")
    assert history["val_loss"].notna().all()  # the selection fits: validation pairs held out for the L1 choice
    pred = pd.read_csv(out / LONGITUDINAL_FILES["predictions"], sep="\t")
    # in-sample = the final model's training pairs: training + validation after the refit
    seen = pred["split"].isin(["train", "validation"])
    in_sample = ((pred["p_decline"] >= card["decision"]["threshold_p_decline"]) == (pred["label"] == "decline"))
    assert metrics.loc["train_accuracy_run0", "mean"] == pytest.approx(in_sample[seen].mean())
    run_longitudinal(settings_for(bids, out, "longitudinal", mode="apply", model=folder, backbone="regional"),
                     subjects)
    again = pd.read_csv(out / LONGITUDINAL_FILES["predictions"], sep="\t")
    assert np.allclose(again["p_decline"], pred["p_decline"], atol=1e-5)
