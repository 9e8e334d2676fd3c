"""The trainable left-right orientation model: folds, network, group task (train and apply), verdict."""
from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch

from bids_siamese.cli.main import main
from bids_siamese.models.checkpoint import load_checkpoint
from bids_siamese.models.orientation import LatNet, OrientationEnsemble, p_flipped
from bids_siamese.preproc.grid import normalise_intensity, template_on_grid
from bids_siamese.qc.orientation import LR_MODEL_MARGIN, model_verdict, with_model_verdict
from bids_siamese.resources import model_grid
from bids_siamese.train.data import load_volume
from bids_siamese.train.pairs import family_folds

from conftest import write_t1w

RES = 4.0


def test_family_folds_keep_families_together() -> None:
    family = {f"sub-{i:02d}": f"fam{i // 2}" for i in range(12)} | {"sub-20": "solo"}
    folds = family_folds(family, 4, seed=3)
    assert folds == family_folds(family, 4, seed=3)
    assert set(folds.values()) == {0, 1, 2, 3}
    for i in range(0, 12, 2):
        assert folds[f"sub-{i:02d}"] == folds[f"sub-{i + 1:02d}"]
    sizes = np.bincount(list(folds.values()))
    assert sizes.max() - sizes.min() <= 2
    with pytest.raises(ValueError):
        family_folds(family, 8)


def test_latnet_ensemble_averages_softmax() -> None:
    shape = model_grid(RES).shape
    torch.manual_seed(0)
    members = [LatNet(input_shape=shape) for _ in range(3)]
    ensemble = OrientationEnsemble(members).eval()
    x = torch.randn(2, 1, *shape)
    with torch.no_grad():
        expected = torch.stack([torch.softmax(m.eval()(x), 1) for m in members]).mean(0)
        np.testing.assert_allclose(ensemble(x).numpy(), expected.numpy(), rtol=1e-5)
    p = p_flipped(ensemble, x[:, 0].numpy())
    assert p.shape == (2,) and np.all((p >= 0) & (p <= 1))
    card = {"grid": {"shape": list(shape)}, "architecture": {"members": 3, "channels": [8, 16, 32, 32], "input_pool": 2}}
    rebuilt = OrientationEnsemble.from_card(card)
    rebuilt.load_state_dict(ensemble.state_dict())


def test_model_verdict_is_symmetric_and_three_way() -> None:
    ok, flipped = model_verdict(0.02, 0.97), model_verdict(0.97, 0.02)
    assert ok["lr_flip_verdict"] == "ok" and flipped["lr_flip_verdict"] == "flipped"
    assert ok["lr_flip_probability"] == pytest.approx(1 - flipped["lr_flip_probability"])
    same = model_verdict(0.6, 0.6)  # the scan and its mirror look alike to the model
    assert same["lr_flip_verdict"] == "undetermined" and same["lr_flip_confidence"] < LR_MODEL_MARGIN
    assert model_verdict(0.99, 0.01, usable=False)["lr_flip_probability"] is None
    report = {"lr_flip_verdict": "ok", "lr_flip_probability": 0.1, "usable": True, "lr_flip_source": "image"}
    merged = with_model_verdict(report, 0.95, 0.03, "models/orientation_latnet")
    assert merged["lr_flip_verdict"] == "flipped" and merged["image_lr_flip_verdict"] == "ok"
    assert merged["lr_flip_source"] == "model: models/orientation_latnet" and merged["model_p_flipped"] == 0.95


def _dataset(root: Path, n_subjects: int = 14) -> tuple[Path, Path]:
    """A BIDS dataset (families of 2) and its participant-level outputs on the 4 mm grid: the template brain with
    smooth random intensity changes and noise; sub-01 is stored mirrored (image verdict ``flipped``)."""
    from scipy import ndimage

    from bids_siamese.bids.derivatives import init_output_dir
    from bids_siamese.bids.records import write_completion_record

    bids, out = root / "bids", root / "out"
    bids.mkdir(parents=True)
    (bids / "dataset_description.json").write_text(json.dumps({"Name": "orient", "BIDSVersion": "1.10.0"}))
    rows = []
    grid = model_grid(RES)
    template, mask = template_on_grid(grid)
    rng = np.random.default_rng(0)
    for i in range(1, n_subjects + 1):
        sub = f"{i:02d}"
        rows.append(f"sub-{sub}\tfam{(i + 1) // 2}")
        write_t1w(bids / f"sub-{sub}" / "anat" / f"sub-{sub}_T1w.nii.gz", seed=i)
        field = ndimage.gaussian_filter(rng.normal(size=grid.shape), 3) * 30
        brain = np.where(mask, template * (1 + 0.1 * rng.normal()) + field + rng.normal(0, 5, grid.shape), 0)
        data = normalise_intensity(brain.astype(np.float32), mask)
        flipped = i == 1
        if flipped:
            data = data[::-1].copy()
        anat = out / f"sub-{sub}" / "anat"
        anat.mkdir(parents=True)
        stem = f"sub-{sub}_space-MNI152NLin2009cAsym"
        nib.save(nib.Nifti1Image(data, grid.affine), anat / f"{stem}_desc-preproc_T1w.nii.gz")
        nib.save(nib.Nifti1Image((mask[::-1] if flipped else mask).astype(np.uint8), grid.affine),
                 anat / f"{stem}_desc-brain_mask.nii.gz")
        (anat / f"sub-{sub}_desc-orientation_qc.json").write_text(json.dumps({
            "participant_id": f"sub-{sub}", "scan": f"sub-{sub}_T1w.nii.gz", "usable": True, "qc_status": "pass",
            "lr_flip_verdict": "flipped" if flipped else "ok", "lr_flip_probability": 0.9 if flipped else 0.1,
            "lr_flip_suspected": flipped, "header_checks": []}))
        # the participant level's completion record: the group level counts only completed scans
        write_completion_record(out, Path(f"sub-{sub}") / "anat" / f"sub-{sub}_desc-status_qc.json", status="ok",
                                scan=f"sub-{sub}_T1w.nii.gz", run_id="fixture",
                                files=[str(p.relative_to(out)) for p in sorted(anat.iterdir())])
    (bids / "participants.tsv").write_text("participant_id\tfamily_id\n" + "\n".join(rows) + "\n")
    init_output_dir(out, bids)
    return bids, out


def _group_args(root: Path, bids: Path, out: Path) -> list[str]:
    return [str(bids), str(out), "group", "--task", "orientation", "--skip-bids-validation", "--resolution", "4",
            "--nprocs", "1", "--omp-nthreads", "1", "-w", str(root / "work")]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, Path, Path]:
    """``group --task orientation --mode train`` on :func:`_dataset`: (root, bids, out)."""
    root = tmp_path_factory.mktemp("orientation")
    bids, out = _dataset(root)
    code = main([*_group_args(root, bids, out), "--mode", "train", "--epochs", "8", "--patience", "8",
                 "--batch-size", "4"])
    assert code == 0
    return root, bids, out


@pytest.mark.slow
def test_group_orientation_train_and_apply(trained) -> None:
    tmp_path, bids, out = trained
    common = _group_args(tmp_path, bids, out)
    table = pd.read_csv(out / "group_orientation_model.tsv", sep="\t")
    assert list(table.columns)[:4] == ["participant_id", "session_id", "p_flipped", "fold"]
    assert len(table) == 14 and set(table["fold"]) == set(range(5))
    families = table.assign(family=[(int(p[4:]) + 1) // 2 for p in table["participant_id"]])
    assert families.groupby("family")["fold"].nunique().max() == 1  # a family never spans two folds
    metrics = pd.read_csv(out / "group_orientation_model_metrics.tsv", sep="\t").set_index("metric")["value"]
    assert float(metrics["auc_mirrored_copies"]) >= 0.9  # held out: each scan scored by a member that never saw it
    assert int(metrics["n_scans_evaluated"]) == 13  # sub-01 (image verdict flipped) is not trusted as stored
    row = table.set_index("participant_id").loc["sub-01"]
    assert row["image_verdict"] == "flipped" and row["p_flipped"] > 0.5 and bool(row["lr_flip_suspected"])
    report = (out / "group.html").read_text()
    assert "Trained orientation model" in report and "held out" in report and "sub-01" in report
    card = json.loads((out / "models" / "orientation_latnet" / "model_card.json").read_text())
    assert card["task"] == "orientation" and card["architecture"]["members"] == 5
    assert (out / "models" / "orientation_latnet" / "model.pt.sha256").is_file()

    assert main([*common, "--mode", "apply", "--model", str(out / "models" / "orientation_latnet")]) == 0
    applied = pd.read_csv(out / "group_orientation_model.tsv", sep="\t")
    assert set(applied["fold"]) == {"apply"}
    assert float(pd.read_csv(out / "group_orientation_model_metrics.tsv", sep="\t")
                 .set_index("metric").loc["auc_mirrored_copies", "value"]) >= 0.9
    # issue 27: apply streams the files (each read once, stored and mirrored copies in one batch); its p_flipped is
    # the ensemble's averaged softmax, as the participant level's p_flipped (not a softmax of it), on the volumes at
    # the float16 stack's precision
    model, _ = load_checkpoint(out / "models" / "orientation_latnet", task="orientation")
    grid = model_grid(RES)
    for row in applied.itertuples():
        path = next(out.glob(f"{row.participant_id}/**/anat/{row.scan}_space-*_desc-preproc_T1w.nii.gz"))
        volume = load_volume(path, grid).astype(np.float16).astype(np.float32)
        expected = p_flipped(model, np.stack([volume, volume[::-1]]))
        assert abs(row.p_flipped - expected[0]) <= 1e-4 and abs(row.p_flipped_mirrored - expected[1]) <= 1e-4
    assert main([*common, "--mode", "apply", "--model", str(out / "models" / "orientation_latnet"),
                 "--loader-workers", "1"]) == 0  # decoded in a loader worker: the same table
    pd.testing.assert_frame_equal(pd.read_csv(out / "group_orientation_model.tsv", sep="\t"), applied)
    assert main([*common, "--mode", "apply", "--model", str(out / "models" / "orientation_latnet"),
                 "--resolution", "2"]) != 0  # another grid: refused with a message


@pytest.mark.slow
def test_participant_uses_the_orientation_model(trained, tmp_path: Path) -> None:
    """``participant --orientation-model``: the verdict comes from the model, the image test is kept."""
    import shutil

    import real_heads

    model = trained[2] / "models" / "orientation_latnet"
    bids = tmp_path / "bids"
    (bids / "sub-01" / "anat").mkdir(parents=True)
    (bids / "dataset_description.json").write_text(json.dumps({"Name": "colin", "BIDSVersion": "1.10.0"}))
    path = real_heads.head_path("colin27")
    assert path is not None, "Colin27 is missing: " + real_heads.INSTALL["colin27"]
    shutil.copy(path, bids / "sub-01" / "anat" / "sub-01_T1w.nii.gz")
    out = tmp_path / "out"
    code = main([str(bids), str(out), "participant", "-w", str(tmp_path / "work"), "--resolution", "4",
                 "--nprocs", "1", "--skip-bids-validation", "--orientation-model", str(model)])
    assert code == 0
    qc = json.loads((out / "sub-01" / "anat" / "sub-01_desc-orientation_qc.json").read_text())
    assert qc["lr_flip_source"].startswith(f"model: {model}") and "sha256" in qc["lr_flip_source"]
    assert 0 <= qc["model_p_flipped"] <= 1 and 0 <= qc["model_p_flipped_mirrored"] <= 1
    assert qc["lr_flip_probability"] == pytest.approx((qc["model_p_flipped"] + 1 - qc["model_p_flipped_mirrored"]) / 2,
                                                      abs=1e-4)
    assert qc["image_lr_flip_verdict"] == "ok"  # the image test still runs and is right on Colin27
    assert "trained orientation model" in (out / "sub-01.html").read_text()
    bad = main([str(bids), str(tmp_path / "out2"), "participant", "--skip-bids-validation", "--orientation-model",
                str(trained[2] / "models")])
    assert bad == 66  # not a checkpoint folder: one-line error, no traceback
    other_grid = main([str(bids), str(tmp_path / "out3"), "participant", "--skip-bids-validation", "--resolution", "2",
                       "--orientation-model", str(model)])
    assert other_grid == 64  # trained on the 4 mm grid


@pytest.mark.parametrize("resolution, fits", [(4.0, True), (5.0, True), (6.0, False), (8.0, False)])
def test_orientation_training_on_a_grid_too_coarse_for_latnet_is_one_line(tmp_path, resolution, fits):
    """LatNet's pooling needs 32 voxels a side at the default input pooling: a coarser grid (6 mm, 8 mm) used to
    end in a batch-norm or pooling traceback; now the task refuses it in one line before reading any scan."""
    from bids_siamese.config import Settings
    from bids_siamese.errors import UsageError
    from bids_siamese.models.orientation import latnet_fits
    from bids_siamese.train.ddp import DistContext
    from bids_siamese.train.orientation import CHANNELS, INPUT_POOL, OrientationTask

    grid = model_grid(resolution)
    assert latnet_fits(grid.shape, INPUT_POOL, len(CHANNELS)) is fits
    settings = Settings(output_dir=tmp_path / "out", bids_dir=tmp_path, analysis_level="group",
                        work_dir=tmp_path / "work", resolution=resolution, task="orientation", mode="train")
    if fits:  # the network builds and trains on such a grid
        OrientationTask(settings, DistContext(), torch.device("cpu"))
        net = LatNet(input_shape=grid.shape)
        net.train()
        assert net(torch.zeros(2, 1, *grid.shape)).shape == (2, 2)
        return
    with pytest.raises(UsageError, match=r"fix: use --resolution 5 or finer") as err:
        OrientationTask(settings, DistContext(), torch.device("cpu"))
    assert "\n" not in str(err.value) and "x".join(map(str, grid.shape)) in str(err.value)
