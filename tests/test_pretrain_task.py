"""``group --task pretrain``: self-supervised pretraining of an encoder on every usable scan (issue 26).

The whole-run test uses the fake participant outputs of tests/test_train.py at 8 mm (7 scans, the ``small``
encoder); the learning check there is the inpainting loss, the objective that learns within a few steps at this
scale (training and validation fell by 10-18 % over 6 epochs with seeds 0, 1 and 2; the rotation loss needs some
hundred steps, docs/benchmarks.md).
"""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from bids_siamese.bids.derivatives import PRETRAIN_FILES, model_folder, read_group_record
from bids_siamese.cli.parser import parse_args
from bids_siamese.errors import UsageError
from bids_siamese.models.backbones import build_backbone, small_encoder
from bids_siamese.models.checkpoint import grid_record, load_checkpoint, load_weights, sha256_file
from bids_siamese.models.pretrain import LOSSES, PretrainHeads
from bids_siamese.resources import model_grid
from bids_siamese.train.data import volume_cache
from bids_siamese.train.ddp import DistContext
from bids_siamese.train.pretrain import (
    LOSS_COLUMNS,
    PretrainNet,
    PretrainTask,
    PretrainTrainer,
    scan_batches,
    validation_participants,
)
from bids_siamese.train.trainer import TrainConfig, optimiser_step
from bids_siamese.workflows import group
from test_train import RES, make_group_inputs, settings_for


def test_validation_holds_out_whole_participants_about_a_tenth_and_by_seed():
    counts = {f"sub-{i:02d}": 1 + i % 3 for i in range(40)}  # 79 scans
    held = validation_participants(counts, seed=0)
    n_held = sum(counts[p] for p in held)
    assert 8 <= n_held <= 8 + 2  # ceil(10 % of 79) = 8, overshooting by at most one participant's scans
    assert held == validation_participants(counts, seed=0) != validation_participants(counts, seed=1)
    assert validation_participants({"sub-1": 1, "sub-2": 1, "sub-3": 1}, seed=0) == set()  # would leave 1 to train
    assert len(validation_participants({f"sub-{i}": 1 for i in range(4)}, seed=3)) == 2


def test_batches_never_hold_a_single_scan():
    rng = np.random.default_rng(0)
    for n in range(2, 12):
        for size in (1, 2, 3, 8):
            batches = scan_batches(n, size, rng)
            assert sorted(np.concatenate(batches).tolist()) == list(range(n)) and min(map(len, batches)) >= 2


def test_the_cli_refuses_what_cannot_be_pretrained(mini_bids, tmp_path):
    out = str(tmp_path / "out")
    for backbone in ("regional", "regional_cnn"):
        with pytest.raises(UsageError, match=rf"--backbone {backbone} has no .* encoder to pretrain; fix: choose"):
            parse_args([str(mini_bids), out, "group", "--task", "pretrain", "--backbone", backbone])
    with pytest.raises(UsageError, match=r"--task pretrain has no --mode apply .*; fix: use --mode train"):
        parse_args([str(mini_bids), out, "group", "--task", "pretrain", "--mode", "apply"])
    settings = parse_args([str(mini_bids), out, "group", "--task", "pretrain"])
    assert (settings.task, settings.backbone, settings.mode) == ("pretrain", "small", "train")


def test_a_grid_too_coarse_for_the_encoder_is_refused_before_any_scan_is_read(tmp_path):
    settings = settings_for(tmp_path / "bids", tmp_path / "out", "pretrain", backbone="densenet121", resolution=8.0)
    with pytest.raises(UsageError, match=r"--backbone densenet121 cannot encode the 8 mm model grid \(21x26x22\): .*"
                                         r"fix: use --resolution 5 or finer"):
        PretrainTask(settings, DistContext(), torch.device("cpu"))
    assert PretrainTask(settings_for(tmp_path / "bids", tmp_path / "out", "pretrain", backbone="resnet18"),
                        DistContext(), torch.device("cpu")).encoder.out_channels == 512  # 8 mm fits resnet18


def test_one_usable_scan_is_refused_in_one_line(tmp_path):
    bids, out, subjects = make_group_inputs(tmp_path, n_mz=0, n_dz=0, n_single=1, n_long=0)
    with pytest.raises(UsageError, match=r"needs at least 2 usable participant-level scans .* found 1 .*; fix:"):
        group.run_group(settings_for(bids, out, "pretrain", backbone="small"), subjects)
    assert not (out / PRETRAIN_FILES["losses"]).exists()


def test_every_session_of_the_selection_is_collected(tmp_path):
    bids, out, subjects = make_group_inputs(tmp_path, n_mz=1, n_dz=0, n_single=2, n_long=2)  # 2 with 2 sessions
    task = PretrainTask(settings_for(bids, out, "pretrain", backbone="small"), DistContext(), torch.device("cpu"))
    task.collect(subjects)
    assert len(task.scans) == len(subjects) + 2 and task.scans["participant_id"].nunique() == len(subjects)
    task = PretrainTask(settings_for(bids, out, "pretrain", backbone="small", session_label=["2"]), DistContext(),
                        torch.device("cpu"))
    task.collect(subjects[:2])
    assert task.scans["session"].tolist() == ["2", "2"]


@pytest.mark.slow
def test_pretrain_writes_the_encoder_its_card_and_loss_curves_and_learns(tmp_path, one_torch_thread):
    bids, out, subjects = make_group_inputs(tmp_path, n_mz=2, n_dz=1, n_single=2, n_long=0)
    epochs = 6
    settings = settings_for(bids, out, "pretrain", backbone="small", epochs=epochs, batch_size=3, lr=3e-3,
                            patience=epochs + 1)
    written = group.run_group(settings, subjects)

    folder = model_folder(out, "pretrain", "small")
    assert folder == out / "models" / "pretrain_small"
    card = json.loads((folder / "model_card.json").read_text())
    assert (card["task"], card["backbone"], card["in_channels"]) == ("pretrain", "small", 1)
    assert card["grid"] == grid_record(model_grid(RES))
    assert len(card["training_data"]["fingerprint"]) == 64
    assert sum(card["training_data"]["n_scans"].values()) == len(subjects) == len(card["training_data"]["scans"])
    assert card["training_data"]["n_scans"]["validation"] >= 2
    assert card["hyperparameters"]["epochs_run"] == epochs and card["seed"] == 0
    assert set(card["metrics"]["last"]["validation"]) == {"total", *LOSSES} and card["library_versions"]["torch"]
    digest = sha256_file(folder / "model.pt")
    assert card["weights"]["sha256"] == digest == (folder / "model.pt.sha256").read_text().split()[0]
    # model.pt is the encoder alone: it loads strictly into a fresh encoder of the backbone
    build_backbone("small", in_channels=1).load_state_dict(load_weights(folder / "model.pt"), strict=True)
    encoder, loaded_card = load_checkpoint(folder, task="pretrain", grid=model_grid(RES))
    assert type(encoder).__name__ == "Encoder" and loaded_card["weights"]["sha256"] == digest

    table = pd.read_csv(out / PRETRAIN_FILES["losses"], sep="\t")
    assert table["epoch"].tolist() == list(range(1, epochs + 1))
    assert np.isfinite(table[LOSS_COLUMNS].to_numpy()).all() and table["kept"].sum() == 1
    for split in ("train", "val"):  # the inpainting objective learns within these few steps
        first, last = table[f"{split}_inpainting"].iloc[0], table[f"{split}_inpainting"].iloc[-2:].mean()
        assert last < 0.95 * first, table[f"{split}_inpainting"].tolist()
    assert (out / PRETRAIN_FILES["losses_figure"]).read_text().lstrip().startswith("<?xml")

    entry = read_group_record(out)["steps"]["pretrain"]
    assert entry["files"] == PRETRAIN_FILES and entry["report"]["title"] == "Self-supervised pretraining"
    html = (out / "group.html").read_text()
    assert '<section class="card" id="task-pretrain">' in html and "<h2>Self-supervised pretraining</h2>" in html
    assert out / "group.html" in written and folder / "model.pt" in written


def _tiny_trainer(device: str, loader_workers: int = 0) -> PretrainTrainer:
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    volumes = volume_cache([rng.normal(size=(16, 20, 16)).astype(np.float32) for _ in range(4)])
    encoder = small_encoder(channels=(4, 8), stem_pool=1)
    model = PretrainNet(encoder, PretrainHeads(encoder.out_channels, projection_dim=8, hidden=16, decoder_channels=8))
    config = TrainConfig(epochs=1, batch_size=2, progress=False, loader_workers=loader_workers, max_shift=1)
    return PretrainTrainer(model, volumes, np.arange(3), np.arange(3, 4), config, cube=4, device=device)


def test_a_trainer_step_gives_every_objective_and_moves_the_encoder(one_torch_thread):
    trainer = _tiny_trainer("cpu")
    before = {k: v.clone() for k, v in trainer.net.encoder.state_dict().items()}
    batch = trainer.assemble(np.arange(3), torch.Generator().manual_seed(0), 1)
    loss, extra = trainer.train_step(batch)
    assert set(extra) == set(LOSSES) and np.isfinite(float(loss.detach()))
    assert float(loss.detach()) == pytest.approx(sum(extra.values()), rel=1e-5)
    optimiser_step(loss, trainer.optimizer, trainer.scaler)
    assert any(not torch.equal(before[k], v) for k, v in trainer.net.encoder.state_dict().items())
    assert np.isnan(trainer.validation_step()["val_loss"])  # one validation scan: nothing to contrast


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (CI has none)")
def test_pretrain_step_on_cuda_under_bf16_autocast_with_loader_workers():
    trainer = _tiny_trainer("cuda", loader_workers=2)
    batch = tuple(t.to("cuda") for t in trainer.assemble(np.arange(3), torch.Generator().manual_seed(0), 1))
    conv = next(m for m in trainer.net.encoder.modules() if isinstance(m, torch.nn.Conv3d))
    dtypes = []
    hook = conv.register_forward_hook(lambda module, args, output: dtypes.append(output.dtype))
    loss, extra = trainer.train_step(batch)
    hook.remove()
    assert dtypes == [torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16]  # under autocast
    assert loss.dtype == torch.float32 and np.isfinite(float(loss.detach())) and set(extra) == set(LOSSES)
    optimiser_step(loss, trainer.optimizer, trainer.scaler)
    result = trainer.fit()  # one epoch through the DataLoader workers from the float16 cache
    assert next(result.model.parameters()).device.type == "cuda"
    assert np.isfinite(result.history[["train_loss", *LOSSES]].to_numpy()).all()
