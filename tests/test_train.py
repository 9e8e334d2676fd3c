"""Training, evaluation and the group-level twin/longitudinal runs on small fake participant-level outputs.

The fake outputs are model-grid volumes at 8 mm (21x26x22) with a planted family pattern (MZ co-twins share it,
DZ co-twins half of it) and a planted central atrophy in the second session of decliners.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch
from scipy import ndimage as ndi

from bids_siamese.config import Settings
from bids_siamese.errors import BadDataError, NoInputError, UsageError
from bids_siamese.models import build_model
from bids_siamese.models.checkpoint import make_card, save_checkpoint
from bids_siamese.resources import model_grid
from bids_siamese.train.data import augment, family_batches, find_preproc
from bids_siamese.train.evaluate import binary_metrics, choose_threshold, draw_metrics, voxel_correlation
from bids_siamese.train.loop import TwinData, recompute_batch_norm, train_twin
from bids_siamese.train.trainer import TrainConfig
from bids_siamese.train.relatives import RELATIVE_COLUMNS
from bids_siamese.bids.derivatives import LONGITUDINAL_FILES, TWIN_FILES
from bids_siamese.train.longitudinal import run_longitudinal
from bids_siamese.train.twins import run_twin

RES = 8.0
SPACE = "space-MNI152NLin2009cAsym"


def make_group_inputs(root: Path, n_mz: int = 6, n_dz: int = 3, n_single: int = 4, n_long: int = 12,
                      seed: int = 0) -> tuple[Path, Path, list[str]]:
    """A BIDS folder (participants.tsv, sessions.tsv) and fake participant-level outputs at 8 mm."""
    rng = np.random.default_rng(seed)
    grid = model_grid(RES)
    bids, out = root / "bids", root / "out"
    bids.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    (bids / "dataset_description.json").write_text(json.dumps({"Name": "fake twins", "BIDSVersion": "1.10.0"}))
    (out / "dataset_description.json").write_text(json.dumps({"Name": "out", "BIDSVersion": "1.10.0",
                                                              "DatasetType": "derivative"}))
    shape = np.array(grid.shape)
    idx = np.indices(grid.shape)
    r = np.sqrt((((idx - (shape / 2)[:, None, None, None]) / (shape * 0.4)[:, None, None, None]) ** 2).sum(0))
    mask = r < 1

    def pattern() -> np.ndarray:
        return ndi.gaussian_filter(rng.normal(size=grid.shape), 1.5) * 6

    subjects, k = [], 0
    for f, (zyg, n) in enumerate([("MZ", 2)] * n_mz + [("DZ", 2)] * n_dz + [("", 1)] * n_single):
        shared = pattern()
        mix = {"MZ": 1.0, "DZ": 0.5, "": 0.0}[zyg]
        for _ in range(n):
            k += 1
            subjects.append((f"{k:02d}", f"fam{f}", zyg, np.sqrt(mix) * shared + np.sqrt(1 - mix) * pattern()))
    rows = []
    for i, (sid, fam, zyg, pat) in enumerate(subjects):
        label = ("decline" if i % 2 == 0 else "stable") if i < n_long else "n/a"
        rows.append({"participant_id": f"sub-{sid}", "family_id": fam, "zygosity": zyg or "n/a", "group": label})
        sessions = ["1", "2"] if i < n_long else ["1"]
        for ses in sessions:
            vol = np.cos(6 * r) + 0.4 * pat + 0.1 * rng.normal(size=grid.shape)
            if ses == "2" and label == "decline":
                vol -= 1.0 * (r < 0.35)
            vol = np.where(mask, vol, 0).astype(np.float32)
            anat = out / f"sub-{sid}" / f"ses-{ses}" / "anat"
            anat.mkdir(parents=True, exist_ok=True)
            stem = f"sub-{sid}_ses-{ses}_{SPACE}"
            nib.Nifti1Image(vol, grid.affine).to_filename(anat / f"{stem}_desc-preproc_T1w.nii.gz")
            nib.Nifti1Image(mask.astype(np.uint8), grid.affine).to_filename(anat / f"{stem}_desc-brain_mask.nii.gz")
        if len(sessions) > 1:  # session order from sessions.tsv
            (bids / f"sub-{sid}").mkdir(parents=True, exist_ok=True)
            (bids / f"sub-{sid}" / f"sub-{sid}_sessions.tsv").write_text(
                "session_id\tacq_time\nses-1\t2020-01-01T10:00:00\nses-2\t2022-01-01T10:00:00\n")
    pd.DataFrame(rows).to_csv(bids / "participants.tsv", sep="\t", index=False)
    return bids, out, [s[0] for s in subjects]


def settings_for(bids: Path, out: Path, task: str, mode: str = "train", **kw) -> Settings:
    base = dict(bids_dir=bids, output_dir=out, analysis_level="group", work_dir=out.parent / "work", task=task,
                mode=mode, resolution=RES, epochs=4, batch_size=6, patience=3, n_draws=3, omp_nthreads=2, seed=0)
    base.update(kw)
    return Settings(**base)


@pytest.fixture(scope="module")
def group_data(tmp_path_factory):
    return make_group_inputs(tmp_path_factory.mktemp("group"))


# ---------------------------------------------------------------------------------------------------------------
# Pure pieces
# ---------------------------------------------------------------------------------------------------------------


def test_augmentation_never_flips_left_right_by_default():
    x = torch.zeros(16, 1, 10, 6, 6)
    x[:, :, 1:4, 2:4, 2:4] = 1.0  # a blob on the left only (axis 2 = x, RAS)
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        y = augment(x, g, max_shift=1, intensity=0.0, noise_std=0.0)
        left, right = y[:, :, :5].sum(dim=(1, 2, 3, 4)), y[:, :, 5:].sum(dim=(1, 2, 3, 4))
        assert bool((left > right).all())
    y = augment(x, torch.Generator().manual_seed(1), flip_lr=True, max_shift=0, intensity=0.0, noise_std=0.0)
    flipped = y[:, :, 5:].sum(dim=(1, 2, 3, 4)) > y[:, :, :5].sum(dim=(1, 2, 3, 4))
    assert 0 < int(flipped.sum()) < 16


def test_family_batches_keep_families_together_with_negatives():
    family = np.array([0, 0, 1, 1, 2, 2, 3, 3, 4, 5, 6])
    has_pos = family < 4
    for seed in range(5):
        batches = family_batches(family, has_pos, 6, np.random.default_rng(seed))
        seen = np.concatenate(batches)
        assert set(seen[has_pos[seen]]) == set(np.flatnonzero(has_pos))
        for b in batches:
            fams = family[b]
            twin_fams = set(fams[has_pos[b]])
            assert all((fams == f).sum() == 2 for f in twin_fams)  # both co-twins together
            assert len(set(fams)) >= 2  # a non-relative to mine


def test_threshold_and_metrics_and_draws():
    labels = [1, 1, 1, 0, 0, 0]
    scores = [0.9, 0.8, 0.4, 0.5, 0.2, 0.1]
    thr = choose_threshold(labels, scores)  # Youden's J ties at 0.3 and 0.65
    assert thr in (0.3, 0.65)
    assert choose_threshold([0, 0, 1, 1], [0.1, 0.2, 0.6, 0.8]) == 0.4
    m = binary_metrics([1, 0], [0.9, 0.1], 0.5)
    assert m == {"accuracy": 1.0, "precision": 1.0, "recall": 1.0, "f1": 1.0, "auc_roc": 1.0}
    d1 = draw_metrics([0.9, 0.8], np.linspace(0, 1, 20), 0.5, 10, seed=4)
    d2 = draw_metrics([0.9, 0.8], np.linspace(0, 1, 20), 0.5, 10, seed=4)
    assert len(d1) == 10 and d1.equals(d2) and d1["accuracy"].std() > 0


def test_voxel_correlation_baseline_uses_both_masks():
    rng = np.random.default_rng(0)
    v = rng.normal(size=(2, 6, 6, 6))
    masks = np.ones((2, 6, 6, 6), bool)
    masks[1, :3] = False
    v[1, 3:] = 3 * v[0, 3:] + 2  # identical up to scale inside the common mask
    assert np.isclose(voxel_correlation(v, masks, [(0, 1)])[0], 1.0)


def test_recompute_batch_norm_uses_current_weights():
    torch.manual_seed(0)
    model = build_model("twin", "small", embedding_dim=8)
    vols = np.random.default_rng(0).normal(size=(6, 1, 21, 26, 22)).astype(np.float32)
    assert recompute_batch_norm(model, vols, np.arange(6), batch_size=3) > 0
    bn = next(m for m in model.modules() if isinstance(m, torch.nn.BatchNorm3d))
    assert not torch.allclose(bn.running_var, torch.ones_like(bn.running_var))
    assert bn.momentum == 0.1


# ---------------------------------------------------------------------------------------------------------------
# Group level, end to end
# ---------------------------------------------------------------------------------------------------------------


def test_twin_train_then_apply(group_data, tmp_path):
    bids, out, subjects = group_data
    written = run_twin(settings_for(bids, out, "twin"), subjects)
    names = {p.relative_to(out).as_posix() for p in written}
    assert set(TWIN_FILES.values()) <= names
    assert {"models/twins_small/model.pt", "models/twins_small/model_card.json",
            "models/twins_small/model.pt.sha256"} <= names

    pairs = pd.read_csv(out / TWIN_FILES["pairs"], sep="\t")
    assert list(pairs.columns) == ["subject_a", "subject_b", "relation", "split", "distance", "twin_probability",
                                   "predicted_twin"]
    assert set(pairs["relation"]) == {"MZ", "DZ", "unrelated"}
    assert set(pairs["split"]) == {"train", "validation", "test"}
    metrics = pd.read_csv(out / TWIN_FILES["metrics"], sep="\t")
    assert list(metrics.columns) == ["metric", "mean", "std", "n_runs"]
    m = metrics.set_index("metric")
    for name in ("accuracy", "precision", "recall", "f1", "auc_roc", "dz_auc_roc", "baseline_auc_roc"):
        assert name in m.index
    assert m.loc["auc_roc", "n_runs"] == 3
    # the decision threshold comes from the validation pairs only
    thr = m.loc["threshold_distance", "mean"]
    val = pairs[(pairs["split"] == "validation") & pairs["relation"].isin(["MZ", "unrelated"])]
    expected = -choose_threshold((val["relation"] == "MZ").astype(float), -val["distance"])
    assert np.isclose(thr, expected, atol=2e-6)
    assert (pairs["predicted_twin"] == (pairs["distance"] <= thr + 1e-6)).mean() > 0.99
    assert ((pairs["twin_probability"] >= 0.5) == pairs["predicted_twin"]).mean() > 0.99
    splits = pd.read_csv(out / TWIN_FILES["splits"], sep="\t")
    assert splits.groupby("family_id")["split"].nunique().max() == 1
    history = pd.read_csv(out / TWIN_FILES["history"], sep="\t")
    for col in ("epoch", "train_loss", "val_loss", "val_twin_distance", "val_nontwin_distance"):
        assert col in history
    assert (out / TWIN_FILES["loss_figure"]).read_text().lstrip().startswith("<?xml")
    card = json.loads((out / "models/twins_small/model_card.json").read_text())
    assert card["task"] == "twin" and card["decision"]["threshold_distance"] == pytest.approx(thr, abs=1e-6)
    assert len(card["training_data"]["fingerprint"]) == 64

    # apply: no training, the same scores; subjects the model was trained on are recognised
    applied = settings_for(bids, out, "twin", mode="apply", model=out / "models" / "twins_small")
    run_twin(applied, subjects)
    again = pd.read_csv(out / TWIN_FILES["pairs"], sep="\t")
    assert again[["subject_a", "subject_b", "relation", "split"]].equals(pairs[["subject_a", "subject_b", "relation",
                                                                                 "split"]])
    assert np.allclose(again["distance"], pairs["distance"], atol=1e-5)
    m2 = pd.read_csv(out / TWIN_FILES["metrics"], sep="\t").set_index("metric")
    assert np.isclose(m2.loc["auc_roc", "mean"], m.loc["auc_roc", "mean"], atol=1e-3)
    # closest relatives: top 5 per scan, nearest first, the same distances and relations as the pair table
    rel = pd.read_csv(out / TWIN_FILES["relatives"], sep="\t")
    assert list(rel.columns) == RELATIVE_COLUMNS and len(rel) == 5 * len(subjects)
    assert (rel.groupby("participant_id")["rank"].apply(list) == [[1, 2, 3, 4, 5]] * len(subjects)).all()
    assert (rel.groupby("participant_id")["distance"].apply(lambda d: d.is_monotonic_increasing)).all()
    both = rel.merge(again, left_on=["participant_id", "relative_id"], right_on=["subject_a", "subject_b"])
    assert len(both) > 0 and np.allclose(both["distance_x"], both["distance_y"], atol=2e-6)
    assert (both["relation_x"] == both["relation_y"]).all()
    assert ((rel["distance"] <= thr + 1e-6) == rel["predicted_twin"]).mean() > 0.99


def test_twin_apply_without_family_data_writes_only_the_closest_relatives(group_data, tmp_path):
    bids, out, subjects = group_data
    folder = out / "models" / "twins_small"
    if not folder.exists():  # run on its own: train the checkpoint test_twin_train_then_apply writes
        run_twin(settings_for(bids, out, "twin"), subjects)
    new_bids, new_out = tmp_path / "bids", tmp_path / "out"
    shutil.copytree(bids, new_bids)
    shutil.copytree(out, new_out, ignore=shutil.ignore_patterns("group_*", "models", "figures"))
    table = pd.read_csv(new_bids / "participants.tsv", sep="\t")
    table[["participant_id"]].to_csv(new_bids / "participants.tsv", sep="\t", index=False)
    written = run_twin(settings_for(new_bids, new_out, "twin", mode="apply", model=folder, top_k=3), subjects)
    assert [p.relative_to(new_out).as_posix() for p in written] == [TWIN_FILES["relatives"]]
    assert not (new_out / TWIN_FILES["pairs"]).exists()
    rel = pd.read_csv(new_out / TWIN_FILES["relatives"], sep="\t")
    assert len(rel) == 3 * len(subjects) and rel["relation"].isna().all()  # "n/a" in the file
    # the same embeddings as the labelled run: distances agree with its pair table
    pairs = pd.read_csv(out / TWIN_FILES["pairs"], sep="\t")
    both = rel.merge(pairs, left_on=["participant_id", "relative_id"], right_on=["subject_a", "subject_b"])
    assert len(both) > 0 and np.allclose(both["distance_x"], both["distance_y"], atol=2e-6)


def test_longitudinal_train_then_apply(group_data):
    bids, out, subjects = group_data
    written = run_longitudinal(settings_for(bids, out, "longitudinal", n_draws=2, epochs=3), subjects)
    names = {p.relative_to(out).as_posix() for p in written}
    assert {LONGITUDINAL_FILES[k] for k in ("predictions", "metrics", "splits", "history", "loss_figure")} <= names
    pred = pd.read_csv(out / LONGITUDINAL_FILES["predictions"], sep="\t")
    assert list(pred.columns) == ["participant_id", "session_a", "session_b", "label", "split", "p_decline",
                                  "predicted", "p_decline_heldout", "heldout_draws"]
    assert len(pred) == 12 and set(pred["label"]) == {"decline", "stable"}
    assert pred["p_decline"].between(0, 1).all() and set(pred["predicted"]) <= {"decline", "stable"}
    metrics = pd.read_csv(out / LONGITUDINAL_FILES["metrics"], sep="\t").set_index("metric")
    assert metrics.loc["accuracy", "n_runs"] == 2  # one per random sub-sampling
    threshold = metrics.loc["threshold_p_decline", "mean"]  # chosen on the first draw's validation pairs
    card = json.loads((out / "models" / "longitudinal_small" / "model_card.json").read_text())
    assert card["decision"]["threshold_p_decline"] == pytest.approx(threshold)
    assert card["decision"]["chosen_on"].startswith("validation pairs")
    assert (pred["predicted"] == np.where(pred["p_decline"] >= threshold, "decline", "stable")).all()
    splits = pd.read_csv(out / LONGITUDINAL_FILES["splits"], sep="\t")
    assert sorted(splits["run"].unique()) == [0, 1]
    # held-out predictions: a pair has one exactly when it was a test pair in some draw
    test_draws = splits[splits["split"] == "test"].groupby("participant_id")["run"].nunique()
    expected = pred["participant_id"].map(test_draws).fillna(0).astype(int)
    assert (pred["heldout_draws"] == expected).all() and (expected > 0).any()
    assert pred.loc[expected > 0, "p_decline_heldout"].between(0, 1).all()
    assert pred.loc[expected == 0, "p_decline_heldout"].isna().all()
    first_test = pred["split"] == "test"
    assert (pred.loc[first_test, "participant_id"].map(test_draws) >= 1).all()
    run_longitudinal(settings_for(bids, out, "longitudinal", mode="apply",
                                  model=out / "models" / "longitudinal_small"), subjects)
    again = pd.read_csv(out / LONGITUDINAL_FILES["predictions"], sep="\t")
    # training held the float16 cache; both modes predict from the float32 volumes as stored
    assert (again["p_decline"] == pred["p_decline"]).all()


@pytest.fixture
def longitudinal_checkpoint(tmp_path) -> Path:
    """A longitudinal checkpoint on the test grid (untrained: only its card matters here)."""
    model = build_model("longitudinal", "small", embedding_dim=8)
    card = make_card("longitudinal", "small", 8, model_grid(RES), 0, {}, {"threshold_p_decline": 0.5}, {}, {})
    folder = tmp_path / "longitudinal_small"
    save_checkpoint(folder, model, card)
    return folder


def test_apply_refuses_a_checkpoint_of_another_task(group_data, longitudinal_checkpoint):
    bids, out, subjects = group_data
    folder = longitudinal_checkpoint
    with pytest.raises(UsageError, match="trained for --task longitudinal, not twin"):
        run_twin(settings_for(bids, out, "twin", mode="apply", model=folder), subjects)


def test_missing_participant_output_names_the_file_and_the_fix(group_data, tmp_path):
    bids, out, subjects = group_data
    with pytest.raises(NoInputError, match=r"sub-77.*MNI152NLin2009cAsym_desc-preproc_T1w.nii.gz not found.*run the "
                                           r"participant level first"):
        find_preproc(out, ["01", "77"])
    with pytest.raises(BadDataError, match=r"not on the 4 mm model grid.*same --resolution"):
        run_twin(settings_for(bids, out, "twin", resolution=4.0), subjects)
    legacy = tmp_path / "legacy" / "sub-05" / "anat" / f"sub-05_{SPACE}_res-2_desc-preproc_T1w.nii.gz"
    legacy.parent.mkdir(parents=True)
    legacy.write_bytes(b"")
    with pytest.raises(NoInputError, match=r"found sub-05_.*_res-2_desc-preproc_T1w.nii.gz, named by an earlier "
                                           r"bids-siamese: rerun the participant level"):
        find_preproc(tmp_path / "legacy", ["05"])


# ---------------------------------------------------------------------------------------------------------------
# Distributed: two CPU processes with the gloo backend under torchrun
# ---------------------------------------------------------------------------------------------------------------

DDP_SCRIPT = textwrap.dedent("""
    import hashlib, io, json, sys
    from pathlib import Path
    import numpy as np, torch
    sys.path.insert(0, {tests!r})
    from bids_siamese.models import build_model
    from bids_siamese.train.ddp import init_distributed
    from bids_siamese.train.loop import TwinData, train_twin
    from bids_siamese.train.trainer import TrainConfig
    from bids_siamese.train.twins import run_twin
    from test_train import settings_for

    torch.set_num_threads(1)
    ctx, device = init_distributed("cpu")
    rng = np.random.default_rng(0)  # same data on every rank
    vols = rng.normal(size=(12, 1, 21, 26, 22)).astype(np.float32)
    family = np.repeat(np.arange(8), [2, 2, 2, 1, 1, 1, 1, 2])
    positive = np.zeros((12, 12), np.float32)
    for a in (0, 2, 4, 10):
        positive[a, a + 1] = positive[a + 1, a] = 1.0
    data = TwinData(vols, family, positive, family[:, None] != family[None, :])
    result = train_twin(build_model("twin", "small", embedding_dim=8), data, np.arange(10), np.arange(10, 12),
                        TrainConfig(epochs=2, batch_size=4, patience=5), device, ctx)
    buf = io.BytesIO()
    torch.save({{k: v for k, v in result.model.state_dict().items()}}, buf)
    written = run_twin(settings_for(Path({bids!r}), Path({out!r}), "twin", epochs=1, n_draws=2, omp_nthreads=1),
                       {subjects!r})
    Path({report!r}).joinpath(f"rank{{ctx.rank}}.json").write_text(json.dumps({{
        "world_size": ctx.world_size, "backend": ctx.backend, "epochs": len(result.history),
        "weights": hashlib.sha256(buf.getvalue()).hexdigest(), "written": len(written)}}))
""")


@pytest.mark.slow
def test_ddp_two_cpu_processes_gloo(group_data, tmp_path):
    bids, out, subjects = group_data
    ddp_out = tmp_path / "out"
    ddp_out.mkdir()
    (ddp_out / "dataset_description.json").write_text((out / "dataset_description.json").read_text())
    for sub in out.glob("sub-*"):
        os.symlink(sub, ddp_out / sub.name)
    report = tmp_path / "report"
    report.mkdir()
    script = tmp_path / "ddp_job.py"
    script.write_text(DDP_SCRIPT.format(tests=str(Path(__file__).parent), bids=str(bids), out=str(ddp_out),
                                        subjects=subjects, report=str(report)))
    # the job imports this checkout's package (not an older installed copy)
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(script)], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((report / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert all(r["world_size"] == 2 and r["backend"] == "gloo" for r in ranks)
    assert ranks[0]["weights"] == ranks[1]["weights"]  # DDP kept the replicas identical
    assert ranks[0]["written"] > 0 and ranks[1]["written"] == 0  # only rank 0 writes
    assert (ddp_out / TWIN_FILES["metrics"]).is_file()


def test_group_level_explains_and_writes_tables_in_the_first_process_only(tmp_path, monkeypatch):
    """Under torchrun every process runs the group level: processes other than RANK 0 only train."""
    from bids_siamese.workflows import group

    calls = []
    monkeypatch.setattr(group, "run_task", lambda task, settings, subjects: calls.append(task.name) or [])
    monkeypatch.setattr(group, "run_explain", lambda settings, subjects: calls.append("explain") or [])
    monkeypatch.setattr(group, "find_orientation_records", lambda out, subjects: calls.append("tables") or [])
    settings = settings_for(tmp_path, tmp_path, "twin", explain=True)
    monkeypatch.setenv("RANK", "1")
    assert group.run_group(settings, ["01"]) == [] and calls == ["twin"]
    calls.clear()
    monkeypatch.setenv("RANK", "0")
    group.run_group(settings, ["01"])
    assert calls == ["tables", "twin", "explain"] and not (tmp_path / "group.html").exists()
    settings.explain = False  # without explanations the report is still written, from the tables present
    assert group.run_group(settings, ["01"]) == [tmp_path / "group.html"]


def test_pair_scores_in_chunks_equal_the_scores_at_once(monkeypatch):
    """Scoring pairs in bounded chunks (large embeddings: regional_cnn on the full demo) gives the same
    distances as gathering all pairs at once."""
    from bids_siamese.models.losses import pair_distance
    from bids_siamese.train import twins

    rng = np.random.default_rng(0)
    emb = torch.from_numpy(rng.normal(size=(30, 40)).astype(np.float32))
    i, j = np.triu_indices(30, 1)
    vols = rng.random((30, 1, 4, 4, 4)).astype(np.float32)
    masks = np.ones((30, 4, 4, 4), bool)
    monkeypatch.setattr(twins, "PAIR_CHUNK_VALUES", 40 * 7)  # 7 pairs per chunk
    scored = twins.score_twin_pairs(pd.DataFrame({"i": i, "j": j}), emb, vols, masks, "euclidean")
    at_once = pair_distance(emb[torch.from_numpy(i)], emb[torch.from_numpy(j)], "euclidean").numpy()
    assert len(scored) == len(i) and np.array_equal(scored["distance"].to_numpy(), at_once)
    assert np.array_equal(scored["score"].to_numpy(), -at_once)
