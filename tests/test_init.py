"""``--init PATH``: twin, longitudinal and symmetry training start from a pretrained encoder (issue 26).

The pretrained folder is written here as ``group --task pretrain`` writes it (a ``small`` encoder's state dict with
a ``task: pretrain`` card, :func:`bids_siamese.models.init.save_pretrained_encoder`), on the 8 mm grid of the fake
participant outputs of ``tests/test_train.py``.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import pandas as pd
import pytest
import torch

from bids_siamese.bids.derivatives import LONGITUDINAL_FILES, TWIN_FILES
from bids_siamese.errors import EXIT_DATA, EXIT_NO_INPUT, EXIT_USAGE, BadDataError
from bids_siamese.models.backbones import BACKBONES, Encoder, build_backbone, small_encoder
from bids_siamese.models.checkpoint import make_card, read_card, save_checkpoint
from bids_siamese.models.init import init_encoder, load_pretrained_encoder, save_pretrained_encoder, widened
from bids_siamese.resources import model_grid
from bids_siamese.train.evaluate import MIN_THRESHOLD_POSITIVES
from bids_siamese.train.trainer import Trainer
from bids_siamese.workflows.group import run_group
from test_train import RES, make_group_inputs, settings_for


def pretrained_small(seed: int = 123) -> Encoder:
    """A ``small`` encoder with weights and batch-norm statistics unlike a fresh one's."""
    torch.manual_seed(seed)
    encoder = small_encoder()
    with torch.no_grad():
        for name, tensor in encoder.state_dict().items():
            if tensor.is_floating_point():
                tensor.copy_(torch.rand_like(tensor) + (0.5 if "running_var" in name else -0.5))
    return encoder


@pytest.fixture(scope="module")
def group_data(tmp_path_factory):
    return make_group_inputs(tmp_path_factory.mktemp("init"))


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("pre") / "models" / "pretrain_small"
    save_pretrained_encoder(folder, pretrained_small(), model_grid(RES), training_data={"fingerprint": "test"})
    return folder


# ---------------------------------------------------------------------------------------------------------------
# The copy
# ---------------------------------------------------------------------------------------------------------------


def test_a_one_channel_encoder_maps_onto_a_two_channel_one():
    one = pretrained_small()
    two = small_encoder(in_channels=2)
    names = init_encoder(two, one.state_dict())
    assert set(names) == set(two.state_dict())
    first = "body.1.0.weight"  # the first convolution (after the average-pooling stem)
    assert two.state_dict()[first].shape[1] == 2
    assert torch.equal(two.state_dict()[first][:, :1], one.state_dict()[first])
    assert not two.state_dict()[first][:, 1].any()  # the difference channel starts at zero
    for name, value in one.state_dict().items():
        if name != first:
            assert torch.equal(two.state_dict()[name], value), name
    # so the widened encoder computes the pretrained function of channel 0, whatever channel 1 holds
    one.eval(), two.eval()
    x = torch.randn(2, 1, 16, 20, 16)
    with torch.no_grad():
        assert torch.allclose(two(torch.cat([x, 5 * torch.randn_like(x)], dim=1)), one(x), atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("backbone", [b for b in BACKBONES if b != "small"])
def test_every_backbone_widens_to_the_pretrained_function(backbone):
    """MONAI's U-Net reads the input with two convolutions (its first residual unit's and the residual path's):
    every input-reading layer is widened, and the 2-channel encoder computes the 1-channel one's function."""
    torch.manual_seed(0)
    one, two = build_backbone(backbone, in_channels=1), build_backbone(backbone, in_channels=2)
    assert set(init_encoder(two, one.state_dict())) == set(one.state_dict())
    one.eval(), two.eval()
    x = torch.randn(1, 1, 32, 32, 32)
    with torch.no_grad():
        assert torch.allclose(two(torch.cat([x, torch.randn_like(x)], dim=1)), one(x), atol=1e-4)


def test_the_copy_is_strict():
    state = pretrained_small().state_dict()
    with pytest.raises(BadDataError, match="missing 1: body.1.0.weight"):
        init_encoder(small_encoder(), {k: v for k, v in state.items() if k != "body.1.0.weight"})
    with pytest.raises(BadDataError, match="unexpected 1: head.weight"):
        init_encoder(small_encoder(), {**state, "head.weight": torch.zeros(3)})
    with pytest.raises(BadDataError, match="has shape"):
        init_encoder(small_encoder(channels=(16, 32, 32)), state)
    assert widened(torch.zeros(8, 2, 3, 3, 3), torch.zeros(8, 1, 3, 3, 3)) is not None
    assert widened(torch.zeros(8, 2, 3, 3, 3), torch.zeros(8, 1, 5, 3, 3)) is None  # another kernel: no
    assert widened(torch.zeros(8, 1, 3, 3, 3), torch.zeros(8, 2, 3, 3, 3)) is None  # narrowing: no


def test_load_checks_the_card(pretrained):
    state = load_pretrained_encoder(pretrained / "model_card.json", backbone="small", grid=model_grid(RES))
    assert set(state) == set(small_encoder().state_dict())
    assert read_card(pretrained)["task"] == "pretrain" and read_card(pretrained)["in_channels"] == 1


# ---------------------------------------------------------------------------------------------------------------
# The three tasks, end to end
# ---------------------------------------------------------------------------------------------------------------


def starts_of_training(monkeypatch) -> list[dict[str, torch.Tensor]]:
    """Record the encoder's weights at the start of every ``Trainer.fit`` (before its first optimiser step)."""
    starts: list[dict[str, torch.Tensor]] = []
    original = Trainer.fit

    def fit(self):
        encoder = next(m for m in self.net.modules() if isinstance(m, Encoder))
        starts.append({k: v.detach().clone() for k, v in encoder.state_dict().items()})
        return original(self)

    monkeypatch.setattr(Trainer, "fit", fit)
    return starts


@pytest.mark.slow
@pytest.mark.parametrize("task, folder, kw", [
    ("twin", "twins_small", dict(explain=False)),
    ("longitudinal", "longitudinal_small", dict(n_draws=1)),
    ("symmetry", "symmetry_small", dict(batch_size=4, embedding_dim=16)),
])
def test_training_starts_from_the_pretrained_encoder(group_data, pretrained, tmp_path, monkeypatch, caplog, task,
                                                     folder, kw):
    bids, _, subjects = group_data
    out = tmp_path / "out"
    for item in group_data[1].iterdir():  # a fresh output folder with the same participant-level results
        (out / item.name).parent.mkdir(parents=True, exist_ok=True)
        (out / item.name).symlink_to(item)
    starts = starts_of_training(monkeypatch)
    settings = settings_for(bids, out, task, backbone="small", epochs=1, patience=1, init=pretrained, **kw)
    with caplog.at_level(logging.INFO, logger="bids_siamese"):
        run_group(settings, subjects)
    want = pretrained_small().state_dict()
    assert starts, "no training ran"
    for start in starts:
        assert set(start) == set(want)
        for name, value in want.items():
            got = start[name]
            if got.shape != value.shape:  # symmetry: the first convolution reads the difference channel too
                assert task == "symmetry" and got.shape[1] == 2
                assert torch.equal(got[:, :1], value) and not got[:, 1:].any()
            else:
                assert torch.equal(got, value), name
    assert any("pretrained tensors copied into the small encoder" in r.getMessage() for r in caplog.records)
    if task == "twin":  # the threshold check (issue 26) in the written metrics: the fake study has 6 MZ families
        metrics = pd.read_csv(out / TWIN_FILES["metrics"], sep="\t").set_index("metric")["mean"]
        assert metrics["threshold_reliable"] == 0 and metrics["validation_positive_pairs"] < MIN_THRESHOLD_POSITIVES
        assert 0 <= metrics["test_unrelated_predicted_twin_rate"] <= 1
        assert sum("rests on" in r.getMessage() for r in caplog.records if r.levelno == logging.WARNING) == 1
    if task == "longitudinal":  # and its decision point: 12 labelled participants, a few decline pairs in validation
        metrics = pd.read_csv(out / LONGITUDINAL_FILES["metrics"], sep="\t").set_index("metric")["mean"]
        assert metrics["threshold_reliable"] == 0 and metrics["threshold_decline_pairs_min"] < MIN_THRESHOLD_POSITIVES
        assert 0 <= metrics["test_stable_predicted_decline_rate"] <= 1
        assert sum("rests on" in r.getMessage() for r in caplog.records if r.levelno == logging.WARNING) == 1
    card = json.loads((out / "models" / folder / "model_card.json").read_text())
    assert card["init"] == {"path": str(pretrained.resolve()), "sha256": read_card(pretrained)["weights"]["sha256"],
                            "backbone": "small"}


# ---------------------------------------------------------------------------------------------------------------
# One-line refusals (the CLI, before any scan is read)
# ---------------------------------------------------------------------------------------------------------------


def refused(run_cli, bids: Path, out: Path, *args: object) -> tuple[int, str]:
    code, stdout, stderr = run_cli(bids, out, "group", *args)
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    assert "fix:" in lines[0]
    return code, lines[0]


def test_mismatches_are_one_line_errors(group_data, pretrained, tmp_path, run_cli):
    bids, _, _ = group_data
    out = tmp_path / "out"
    base = ("--task", "twin", "--backbone", "small", "--resolution", RES, "--init")
    code, line = refused(run_cli, bids, out, "--task", "twin", "--backbone", "unet", "--resolution", RES,
                         "--init", pretrained)
    assert code == EXIT_USAGE and "pretrained for backbone small, this run uses unet" in line
    assert "--backbone small or pretrain with --backbone unet" in line
    code, line = refused(run_cli, bids, out, "--task", "symmetry", "--backbone", "small", "--resolution", 4,
                         "--init", pretrained / "model.pt")
    assert code == EXIT_USAGE and "8 mm model grid" in line and "--resolution 8" in line

    twin = tmp_path / "models" / "twins_small"  # a fine-tuned model is not a pretrained encoder
    save_checkpoint(twin, small_encoder(), make_card("twin", "small", 64, model_grid(RES), 0, {}, {}, {}, {}))
    code, line = refused(run_cli, bids, out, *base, twin)
    assert code == EXIT_USAGE and "is a --task twin checkpoint, not a pretrained encoder" in line

    tampered = tmp_path / "tampered"
    save_pretrained_encoder(tampered, pretrained_small(), model_grid(RES))
    data = bytearray((tampered / "model.pt").read_bytes())
    data[-100] ^= 0xFF
    (tampered / "model.pt").write_bytes(bytes(data))
    code, line = refused(run_cli, bids, out, *base, tampered)
    assert code == EXIT_DATA and "does not match its sha256" in line

    code, line = refused(run_cli, bids, out, *base, tmp_path / "nowhere")
    assert code == EXIT_NO_INPUT
    (tmp_path / "empty").mkdir()
    code, line = refused(run_cli, bids, out, *base, tmp_path / "empty")
    assert code == EXIT_NO_INPUT and "model_card.json is missing" in line


def test_init_is_refused_where_it_cannot_apply(group_data, pretrained, tmp_path, run_cli):
    bids, _, _ = group_data
    out = tmp_path / "out"
    code, line = refused(run_cli, bids, out, "--task", "twin", "--resolution", RES, "--init", pretrained)
    assert code == EXIT_USAGE and "--backbone regional is an atlas-region model" in line  # twin's default
    code, line = refused(run_cli, bids, out, "--task", "twin", "--backbone", "regional_cnn", "--resolution", RES,
                         "--init", pretrained)
    assert code == EXIT_USAGE and "regional_cnn" in line
    code, line = refused(run_cli, bids, out, "--task", "twin", "--backbone", "small", "--mode", "apply", "--model",
                         pretrained, "--resolution", RES, "--init", pretrained)
    assert code == EXIT_USAGE and "--mode apply" in line
    code, line = refused(run_cli, bids, out, "--task", "orientation", "--resolution", RES, "--init", pretrained)
    assert code == EXIT_USAGE and "not orientation" in line
