"""The longitudinal validation protocol with the refit of the ``regional`` model (issue 14): the penalty and the
epoch count are chosen on the validation pairs, the final model is refitted on training + validation pairs, its
decision point comes from out-of-fold predictions on those pairs, and the test pairs take part in nothing."""
from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd
import pytest
import torch

from bids_siamese.resources import model_grid
from bids_siamese.train import longitudinal as long_mod
from bids_siamese.train.ddp import DistContext
from bids_siamese.train.longitudinal import (L1_CHOICES, collect_longitudinal, fit_longitudinal_draw,
                                             refit_folds)
from bids_siamese.train.loop import PairData
from bids_siamese.train.run import siamese_options
from bids_siamese.train.trainer import train_config

from test_train import make_group_inputs, settings_for


def _split_table(n_families: int, per_family: int = 1) -> pd.DataFrame:
    rows = []
    for f in range(n_families):
        split = ("train", "train", "validation", "test")[f % 4]
        for m in range(per_family):
            rows.append({"participant_id": f"sub-{f:02d}{m}", "family_id": f"fam{f}", "label": float(f % 2),
                         "split": split})
    rows.append({"participant_id": "sub-unl", "family_id": "famU", "label": np.nan, "split": "unlabelled"})
    return pd.DataFrame(rows)


def test_refit_folds_are_family_aware_stratified_and_leave_out_test_pairs():
    table = _split_table(24, per_family=2)
    folds = refit_folds(table, n_folds=5, seed=3)
    seen = table[table["split"].isin(["train", "validation"])]
    assert set(folds) == set(seen["participant_id"])  # no test or unlabelled participant
    assert sorted(set(folds.values())) == [0, 1, 2, 3, 4]
    fold = seen["participant_id"].map(folds)
    assert (seen.assign(fold=fold).groupby("family_id")["fold"].nunique() == 1).all()  # a family in one fold
    for k in range(5):  # both labels in every fold, so every fold's training part has both too
        assert set(seen.loc[fold == k, "label"]) == {0.0, 1.0}
    # as many folds as the smaller stratum has families; none when it has only one
    few = pd.DataFrame({"participant_id": list("abcde"), "family_id": list("abcde"),
                        "label": [1.0, 0.0, 1.0, 1.0, 0.0], "split": ["train"] * 4 + ["validation"]})
    assert sorted(set(refit_folds(few, 5).values())) == [0, 1]
    assert refit_folds(few.assign(label=[1.0, 0.0, 1.0, 1.0, 1.0]), 5) == {}


@pytest.fixture(scope="module")
def regional_draw_inputs(tmp_path_factory):
    bids, out, subjects = make_group_inputs(tmp_path_factory.mktemp("refit"))
    settings = settings_for(bids, out, "longitudinal", backbone="regional", epochs=25, batch_size=32, lr=0.05,
                            patience=25, atlas="harvard_oxford")
    inputs = collect_longitudinal(settings, subjects, require_labels=True)
    labels = inputs.pairs["label"].to_numpy(dtype=float)
    return settings, inputs, PairData(inputs.volumes, inputs.pair_index, labels)


def _draw(settings, inputs, data, monkeypatch=None, calls=None):
    if monkeypatch is not None:
        real = long_mod.train_longitudinal

        def spy(model, data_, train_idx, val_idx, *args, **kw):
            calls.append((np.array(train_idx), np.array(val_idx)))
            return real(model, data_, train_idx, val_idx, *args, **kw)

        monkeypatch.setattr(long_mod, "train_longitudinal", spy)
    torch.manual_seed(0)
    config = train_config(settings, **siamese_options(settings))
    return fit_longitudinal_draw(settings, model_grid(settings.resolution), inputs, data, config,
                                 0, torch.device("cpu"), DistContext())


@pytest.mark.slow
def test_regional_draw_refits_on_training_and_validation_pairs_without_test_pairs(regional_draw_inputs,
                                                                                  monkeypatch):
    settings, inputs, data = regional_draw_inputs
    calls: list[tuple[np.ndarray, np.ndarray]] = []
    draw = _draw(settings, inputs, data, monkeypatch, calls)
    split = inputs.pairs["participant_id"].map(draw.split_of).to_numpy()
    train, val, test = (np.flatnonzero(split == s) for s in ("train", "validation", "test"))
    assert len(train) and len(val) and len(test)
    # the final model's training set: the training and the validation pairs
    assert np.array_equal(draw.final_train_idx, np.sort(np.concatenate([train, val])))
    assert np.array_equal(np.sort(calls[-1][0]), draw.final_train_idx)
    model = draw.result.model
    scans = np.unique(data.pairs[draw.final_train_idx])
    with torch.no_grad():
        emb = model.embed(torch.from_numpy(data.volumes[scans])).numpy()
    row = {int(s): k for k, s in enumerate(scans)}
    diff = np.array([emb[row[int(b)]] - emb[row[int(a)]] for a, b in data.pairs[draw.final_train_idx]])
    assert np.allclose(model.feature_mean.numpy(), diff.mean(axis=0), atol=1e-5)  # standardised by train + val
    # selection fits: training pairs, early stopping on the validation pairs, one per penalty
    for fit_train, fit_val in calls[:len(L1_CHOICES)]:
        assert np.array_equal(fit_train, train) and np.array_equal(fit_val, val)
    # no fit ever sees a test pair, as training or as monitoring pairs
    for fit_train, fit_val in calls:
        assert not set(fit_train) & set(test) and not set(fit_val) & set(test)
    n_folds = int(draw.row["refit_folds"])
    assert n_folds >= 2 and len(calls) == len(L1_CHOICES) + n_folds + 1  # selection, out-of-fold, refit
    for fit_train, _ in calls[len(L1_CHOICES):-1]:  # out-of-fold fits: a strict part of train + validation
        assert set(fit_train) < set(draw.final_train_idx)
    assert draw.row["l1"] in L1_CHOICES and model.l1 == draw.row["l1"]
    assert draw.row["refit"] == 1 and set(draw.before_refit) >= {"accuracy", "auc_roc"}
    assert 0 < draw.threshold < 1 and draw.threshold == draw.row["threshold_p_decline"]
    assert np.array_equal(draw.test_idx, test)


@pytest.mark.slow
def test_regional_draw_does_not_depend_on_test_pairs(regional_draw_inputs):
    """Flipping the test pairs' labels and replacing their scans by noise changes nothing that was chosen or fitted:
    the penalty, the epoch count, the decision point and the final weights are the same."""
    settings, inputs, data = regional_draw_inputs
    first = _draw(settings, inputs, data)
    test_scans = np.unique(data.pairs[first.test_idx])
    assert not set(test_scans) & set(np.unique(data.pairs[first.final_train_idx]))
    volumes = np.array(data.volumes, dtype=np.float32)  # the float16 cache as a float32 copy
    volumes[test_scans] = np.random.default_rng(1).normal(size=volumes[test_scans].shape).astype(volumes.dtype)
    labels = data.labels.copy()
    labels[first.test_idx] = 1 - labels[first.test_idx]
    changed = PairData(volumes, data.pairs, labels)
    second = _draw(settings, dataclasses.replace(inputs, volumes=volumes), changed)
    assert second.row["l1"] == first.row["l1"] and second.selection.best_epoch == first.selection.best_epoch
    assert second.threshold == first.threshold
    assert second.row["threshold_p_decline_validation"] == first.row["threshold_p_decline_validation"]
    for name, value in first.result.model.state_dict().items():
        assert torch.equal(value, second.result.model.state_dict()[name]), name
    assert not np.allclose(second.test_p, first.test_p)  # the test pairs themselves did change
