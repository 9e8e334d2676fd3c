"""Siamese models: backbones, heads, the triplet loss and its negative mining, checkpoints."""
from __future__ import annotations

import gc
import json
from itertools import product

import numpy as np
import pytest
import torch

from bids_siamese.errors import BadDataError, NoInputError, UsageError
from bids_siamese.models import (
    BACKBONES,
    batch_hard_triplet_loss,
    build_backbone,
    build_model,
    pairwise_distance,
    relation_matrices,
)
from bids_siamese.models.checkpoint import load_checkpoint, make_card, read_card, save_checkpoint
from bids_siamese.resources import model_grid


@pytest.mark.parametrize("name", BACKBONES)
def test_backbones_build_with_one_input_channel(name):
    encoder = build_backbone(name)
    first = next(m for m in encoder.modules() if isinstance(m, torch.nn.Conv3d))
    assert first.in_channels == 1
    assert encoder.out_channels > 0 and encoder.name == name


def test_unknown_backbone():
    with pytest.raises(ValueError, match="unknown backbone"):
        build_backbone("vgg")


@pytest.mark.slow
@pytest.mark.parametrize("name", BACKBONES)
def test_backbone_forward_backward_at_2mm_grid(name):
    """Every backbone trains on the default 2 mm grid (84x104x88), batch 1 to keep memory modest."""
    torch.manual_seed(0)
    shape = model_grid(2.0).shape
    assert shape == (84, 104, 88)
    model = build_model("twin", name, embedding_dim=128).train()
    x = torch.randn(1, 1, *shape)
    emb = model(x)
    assert emb.shape == (1, 128)
    assert torch.allclose(emb.norm(dim=1), torch.ones(1), atol=1e-5)
    emb.sum().backward()
    grads = [p.grad for p in model.backbone.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(float(g.abs().sum()) > 0 for g in grads)
    del model, x, emb, grads
    gc.collect()


def test_twin_model_embeddings_are_unit_length_and_differ_between_subjects():
    torch.manual_seed(0)
    model = build_model("twin", "small", embedding_dim=32).train()  # batch statistics (untrained running stats)
    x = torch.randn(4, 1, 42, 52, 44)
    with torch.no_grad():
        e = model(x)
    assert e.shape == (4, 32)
    assert torch.allclose(e.norm(dim=1), torch.ones(4), atol=1e-5)
    assert float(pairwise_distance(e).triu(1).max()) > 1e-3


def test_longitudinal_model_is_order_aware_and_shares_its_encoder():
    torch.manual_seed(0)
    model = build_model("longitudinal", "small", embedding_dim=16).eval()
    a, b = torch.randn(2, 1, 42, 52, 44), torch.randn(2, 1, 42, 52, 44)
    logits = model(a, b)
    assert logits.shape == (2,)
    assert not torch.allclose(logits, model(b, a))  # the signed difference keeps the direction of change
    # one encoder for both sessions: its parameters appear once
    names = [n for n, _ in model.named_parameters()]
    assert len(names) == len(set(names)) and all(n.startswith(("encoder.", "classifier.")) for n in names)
    with torch.no_grad():
        fused = model.fuse(model.embed(a), model.embed(b))
    assert torch.allclose(fused, logits, atol=1e-5)


def _brute_force_negative(dist: torch.Tensor, related: torch.Tensor, i: int) -> int:
    best, arg = float("inf"), -1
    for j in range(dist.shape[0]):
        if not related[i, j] and float(dist[i, j]) < best:
            best, arg = float(dist[i, j]), j
    return arg


@pytest.mark.parametrize("distance", ["cosine", "euclidean"])
def test_negative_is_the_closest_non_relative(distance):
    """The mined negative is the hardest (closest) subject that is not a relative, for every anchor."""
    g = torch.Generator().manual_seed(3)
    emb = torch.randn(10, 8, generator=g)
    family = torch.tensor([0, 0, 1, 1, 1, 2, 3, 3, 4, 5])  # family 1 = MZ pair + sibling
    pos, related = relation_matrices(family, {(0, 1): 1.0, (2, 3): 1.0, (6, 7): 0.5})
    # make the sibling (4) the closest subject to anchor 2: it must still never be chosen
    emb[4] = emb[2] + 0.01
    out = batch_hard_triplet_loss(emb, pos, related, margin=0.3, distance=distance)
    dist = pairwise_distance(emb, distance)
    for i in range(10):
        if (pos[i] > 0).any():
            assert int(out.negative_index[i]) == _brute_force_negative(dist, related, i)
            assert not related[i, out.negative_index[i]]
        else:
            assert int(out.negative_index[i]) == -1
    assert int(out.negative_index[2]) != 4
    assert out.n_anchors == 6


def test_triplet_loss_value_matches_definition():
    emb = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.8, 0.6], [0.0, 1.0], [-1.0, 0.0]])
    family = torch.tensor([0, 0, 1, 2, 3])
    pos, related = relation_matrices(family, {(0, 1): 1.0})
    out = batch_hard_triplet_loss(emb, pos, related, margin=0.2, distance="cosine")
    d = pairwise_distance(emb, "cosine")
    # anchor 0: positive 1 (d=0.4), closest non-relative 2 (d=0.2) -> 0.4 - 0.2 + 0.2
    # anchor 1: positive 0 (d=0.4), closest non-relative 2 (d=0.04) -> 0.4 - 0.04 + 0.2
    expected = ((d[0, 1] - d[0, 2] + 0.2) + (d[1, 0] - d[1, 2] + 0.2)) / 2
    assert torch.isclose(out.loss, expected)
    assert out.negative_index.tolist() == [2, 2, -1, -1, -1]


def test_dz_positives_use_a_smaller_margin_and_loss_is_zero_when_separated():
    emb = torch.tensor([[1.0, 0.0], [0.99, 0.141], [0.0, 1.0], [-1.0, 0.0]])
    family = torch.tensor([0, 0, 1, 2])
    strong, related = relation_matrices(family, {(0, 1): 1.0})
    weak, _ = relation_matrices(family, {(0, 1): 0.5})
    assert float(batch_hard_triplet_loss(emb, strong, related, margin=0.2).loss) == 0.0
    big = batch_hard_triplet_loss(emb, strong, related, margin=1.5).loss
    small = batch_hard_triplet_loss(emb, weak, related, margin=1.5).loss
    assert float(small) < float(big)


def test_triplet_loss_without_anchors_is_zero_with_gradient():
    emb = torch.randn(3, 4, requires_grad=True)
    pos, related = relation_matrices(torch.tensor([0, 1, 2]), {})
    out = batch_hard_triplet_loss(emb, pos, related)
    out.loss.backward()
    assert out.n_anchors == 0 and float(out.loss) == 0.0 and emb.grad is not None


def test_triplet_training_step_separates_twins():
    """A few optimiser steps on embeddings pull co-twins together and push the closest non-relative away."""
    torch.manual_seed(0)
    emb = torch.nn.Parameter(torch.randn(6, 4))
    pos, related = relation_matrices(torch.tensor([0, 0, 1, 1, 2, 3]), {(0, 1): 1.0, (2, 3): 1.0})
    opt = torch.optim.SGD([emb], lr=0.5)
    first = None
    for _ in range(50):
        out = batch_hard_triplet_loss(emb, pos, related, margin=0.3)
        first = float(out.loss) if first is None else first
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    assert float(out.loss) < first
    assert out.positive_distance < out.negative_distance


# ---------------------------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------------------------


def _save(tmp_path, task="twin", resolution=8.0):
    torch.manual_seed(0)
    model = build_model(task, "small", embedding_dim=16).eval()
    card = make_card(task, "small", 16, model_grid(resolution), seed=3, training_data={"fingerprint": "abc"},
                     decision={"threshold_distance": 0.3, "probability_scale": 0.1}, metrics={"auc_roc": 0.9},
                     hyperparameters={"distance": "cosine", "margin": 0.2})
    folder = tmp_path / "models" / f"{task}_small"
    paths = save_checkpoint(folder, model, card)
    return model, folder, paths


def test_checkpoint_roundtrip_and_card(tmp_path):
    model, folder, paths = _save(tmp_path)
    assert sorted(p.name for p in paths) == ["model.pt", "model.pt.sha256", "model_card.json"]
    card = json.loads((folder / "model_card.json").read_text())
    for key in ("task", "backbone", "grid", "template", "input", "training_data", "seed", "metrics",
                "library_versions", "weights", "decision", "hyperparameters"):
        assert key in card
    assert card["grid"]["shape"] == [21, 26, 22] and card["template"] == "MNI152NLin2009cAsym"
    assert card["input"]["left_right_flip_augmentation"] is False
    assert {"torch", "monai", "numpy", "bids_siamese"} <= set(card["library_versions"])
    assert (folder / "model.pt.sha256").read_text().split() == [card["weights"]["sha256"], "model.pt"]
    x = torch.randn(2, 1, 21, 26, 22)
    for path in (folder, folder / "model.pt", folder / "model_card.json"):
        loaded, loaded_card = load_checkpoint(path, task="twin", grid=model_grid(8.0))
        assert torch.allclose(loaded(x), model(x), atol=1e-6)
        assert loaded_card["seed"] == 3


def test_checkpoint_records_pooling_and_loads_cards_without_it(tmp_path):
    torch.manual_seed(0)
    model = build_model("twin", "small", embedding_dim=16, pooling="avg").eval()
    card = make_card("twin", "small", 16, model_grid(8.0), seed=0, training_data={}, decision={}, metrics={},
                     hyperparameters={})  # card default avgmax: the saved card must say what the model has
    folder = tmp_path / "twins_small"
    save_checkpoint(folder, model, card)
    card_path = folder / "model_card.json"
    saved = json.loads(card_path.read_text())
    assert saved["pooling"] == "avg"
    x = torch.randn(2, 1, 21, 26, 22)
    assert torch.allclose(load_checkpoint(folder)[0](x), model(x), atol=1e-6)
    del saved["pooling"]  # a card written before the pooling option existed: average pooling
    card_path.write_text(json.dumps(saved))
    assert torch.allclose(load_checkpoint(folder)[0](x), model(x), atol=1e-6)
    assert _save(tmp_path / "b")[0].head.pooling == "avgmax"  # the default architecture


def test_checkpoint_refuses_other_task_and_grid(tmp_path):
    _, folder, _ = _save(tmp_path)
    with pytest.raises(UsageError, match="trained for --task twin, not longitudinal.*fix"):
        load_checkpoint(folder, task="longitudinal")
    with pytest.raises(UsageError, match=r"8 mm model grid.*--resolution 8"):
        load_checkpoint(folder, task="twin", grid=model_grid(4.0))


def test_checkpoint_detects_corruption_and_missing_files(tmp_path):
    _, folder, _ = _save(tmp_path)
    weights = folder / "model.pt"
    data = bytearray(weights.read_bytes())
    data[-10] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(BadDataError, match="sha256"):
        read_card(folder)
    weights.unlink()
    with pytest.raises(NoInputError, match="model.pt is missing"):
        read_card(folder)


def test_checkpoint_of_other_architecture_is_refused(tmp_path):
    _, folder, _ = _save(tmp_path)
    card_path = folder / "model_card.json"
    card = json.loads(card_path.read_text())
    card["embedding_dim"] = 8  # the weights are for 16
    card_path.write_text(json.dumps(card))
    with pytest.raises(BadDataError, match="does not fit"):
        load_checkpoint(folder)


@pytest.mark.parametrize("task,backbone", list(product(["twin", "longitudinal"], ["small"])))
def test_build_model_tasks(task, backbone):
    model = build_model(task, backbone, embedding_dim=8)
    assert sum(p.numel() for p in model.parameters()) > 0
    with pytest.raises(ValueError):
        build_model("symmetry-unknown", backbone)


def test_embedding_interface(tmp_path):
    import nibabel as nib

    from bids_siamese.interfaces.embedding import ComputeEmbedding, embedding_table

    model, folder, _ = _save(tmp_path)
    grid = model_grid(8.0)
    vol = np.random.default_rng(0).normal(size=grid.shape).astype(np.float32)
    in_file = tmp_path / "sub-01_space-MNI152NLin2009cAsym_desc-preproc_T1w.nii.gz"
    nib.Nifti1Image(vol, grid.affine).to_filename(in_file)
    node_dir = tmp_path / "node"
    node_dir.mkdir()
    import os

    cwd = os.getcwd()
    try:
        os.chdir(node_dir)
        result = ComputeEmbedding(in_file=str(in_file), model=str(folder)).run()
    finally:
        os.chdir(cwd)
    import pandas as pd

    table = pd.read_csv(result.outputs.out_tsv, sep="\t")
    assert list(table.columns) == [f"embedding_{i}" for i in range(16)] and len(table) == 1
    assert result.outputs.out_task == "twin"
    with torch.no_grad():
        expected = model(torch.from_numpy(vol)[None, None])[0].numpy()
    assert np.allclose(table.to_numpy()[0], expected, atol=1e-5)
    assert list(embedding_table(np.zeros(3)).columns) == ["embedding_0", "embedding_1", "embedding_2"]
