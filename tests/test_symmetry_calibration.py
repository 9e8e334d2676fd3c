"""The group-relative Siamese score (bids_siamese/symmetry/calibration.py) and how the group table uses it."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from bids_siamese.symmetry import calibration
from bids_siamese.symmetry.calibration import (
    MIN_REFERENCE_SCANS,
    SIAMESE_Z_THRESHOLD,
    reference_statistics,
    siamese_z,
    suspected,
)


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-np.asarray(x, dtype=float)))


def logit(p):
    p = np.asarray(p, dtype=float)
    return np.log(p / (1.0 - p))


def test_a_minority_of_abnormal_scans_barely_moves_the_reference():
    rng = np.random.default_rng(0)
    clean = rng.normal(-0.3, 0.4, 90)
    abnormal = rng.normal(4.0, 0.5, 10)  # 10 % of the group far out
    stats = reference_statistics(np.concatenate([clean, abnormal]))
    assert stats["n_reference"] == 100
    assert abs(stats["median_logit"] - np.median(clean)) < 0.1
    assert 0.3 < stats["sd_logit"] < 0.6
    z = siamese_z(abnormal, stats)
    assert (z >= SIAMESE_Z_THRESHOLD).all()
    assert (siamese_z(clean, stats) >= SIAMESE_Z_THRESHOLD).mean() < 0.05


def test_a_dataset_wide_shift_does_not_change_the_decisions():
    rng = np.random.default_rng(1)
    logits = np.concatenate([rng.normal(0.0, 0.5, 40), [3.5, 4.0]])
    flagged = siamese_z(logits, reference_statistics(logits)) >= SIAMESE_Z_THRESHOLD
    shifted = logits + 2.0  # e.g. another scanner: every probability higher; a fixed p threshold would flag all
    assert (_sigmoid(shifted) >= 0.8).mean() > 0.8
    again = siamese_z(shifted, reference_statistics(shifted)) >= SIAMESE_Z_THRESHOLD
    assert flagged[-2:].all() and flagged[:40].sum() <= 1
    assert np.array_equal(flagged, again)


def test_saturated_probabilities_keep_their_ranking_as_logits():
    # a model applied to data unlike its training data: most logits far above the float32 saturation of sigmoid
    rng = np.random.default_rng(3)
    logits = np.concatenate([rng.normal(25.0, 1.0, 30), [32.0]])
    p32 = 1.0 / (1.0 + np.exp(-logits.astype(np.float32)))
    assert (p32 == 1.0).all()  # as probabilities every scan ties
    z = siamese_z(logits, reference_statistics(logits))
    assert z.argmax() == len(z) - 1 and z[-1] >= 2 * SIAMESE_Z_THRESHOLD
    assert (z[:-1] >= SIAMESE_Z_THRESHOLD).mean() <= 0.1


def test_too_few_reference_scans_fall_back_to_the_probability_threshold():
    p = np.array([0.2, 0.7, 0.9, 0.4] * 2)
    stats = reference_statistics(logit(p))
    assert stats["n_reference"] == 8 < MIN_REFERENCE_SCANS and np.isnan(stats["median_logit"])
    z = siamese_z(logit(p), stats)
    assert np.isnan(z).all()
    assert suspected(p, z, 0.65).tolist() == [False, True, True, False] * 2


def test_constant_model_output_does_not_explode():
    stats = reference_statistics(np.full(20, -0.4))
    assert stats["sd_logit"] == calibration.MIN_LOGIT_SD
    assert siamese_z([-0.4], stats)[0] == pytest.approx(0.0)


def test_apply_model_scores_against_the_scans_not_trained_on(monkeypatch):
    from bids_siamese.symmetry import run as symmetry_run

    n = 30
    rng = np.random.default_rng(2)
    logits = rng.normal(0.0, 0.3, n)
    logits[:12] = -4.0  # the training scans: memorised, far lower
    logits[-1] = 3.0  # one abnormal held-out scan
    p = _sigmoid(logits)
    monkeypatch.setattr(symmetry_run, "siamese_logits", lambda model, vols, masks, r, mr: (logits, np.full(n, -0.8)))
    table = pd.DataFrame({"split": ["train"] * 12 + ["validation"] * 8 + ["test"] * 8 + ["excluded"] * 2,
                          "siamese_probability": np.nan, "siamese_z": np.nan, "siamese_suspected": np.nan,
                          "siamese_p_left": np.nan})
    data = symmetry_run.ScoredDataset([], [None] * n, [None] * n, None, table)
    stats = symmetry_run.apply_model(data, model=None, model_res=4.0, resolution=4.0, fallback_threshold=0.99)
    assert stats["n_reference"] == n - 12
    assert abs(stats["median_logit"] - np.median(logits[12:])) < 1e-9
    assert bool(table["siamese_suspected"].iloc[-1]) and table["siamese_suspected"].sum() == 1
    assert table["siamese_z"].iloc[:12].max() < -5  # training scans far below their own (unused) distribution
    assert np.allclose(table["siamese_probability"], np.round(p, 4))
    assert np.allclose(table["siamese_p_left"], round(float(_sigmoid(-0.8)), 4))


def test_probability_and_z_scorers_share_one_forward_pass(monkeypatch):
    from bids_siamese.symmetry import train as symmetry_train

    calls = []

    def fake_logits(model, volumes, masks, in_res, model_res, batch_size):
        calls.append(len(volumes))
        return np.arange(len(volumes), dtype=float), np.zeros(len(volumes))

    monkeypatch.setattr(symmetry_train, "siamese_logits", fake_logits)
    stats = {"n_reference": 20, "median_logit": 1.0, "sd_logit": 0.5}
    scorers = symmetry_train.siamese_scorers(None, 4.0, 4.0, stats)
    images = [None] * 3
    p, z = scorers["siamese_probability"](images, images), scorers["siamese_z"](images, images)
    assert calls == [3]  # one forward for both scores of the same images
    assert np.allclose(p, _sigmoid([0.0, 1.0, 2.0])) and np.allclose(z, [-2.0, 0.0, 2.0])
    scorers["siamese_z"]([None] * 2, [None] * 2)
    assert calls == [3, 2]  # new images: a new forward
    assert "siamese_z" not in symmetry_train.siamese_scorers(None, 4.0, 4.0, reference_statistics([0.0]))
