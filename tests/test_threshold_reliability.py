"""The twin and longitudinal decision points are checked (issue 26): too few positive validation pairs to place one,
or one that calls most held-out negative pairs positive, is said in one warning line and recorded in the metrics."""
from __future__ import annotations

import logging

import numpy as np
import pandas as pd
import pytest

from bids_siamese.train.evaluate import MAX_NEGATIVE_POSITIVE_RATE, MIN_THRESHOLD_POSITIVES
from bids_siamese.train.longitudinal import decision_support
from bids_siamese.train.twins import choose_twin_decision


def pairs_table(n_val_mz: int, n_val_unrelated: int = 40, n_test_mz: int = 5, n_test_unrelated: int = 40,
                test_unrelated_score: float | None = None, seed: int = 0) -> pd.DataFrame:
    """Scored pairs: twins score about 1, unrelated pairs about 0 (with overlap), baselines alike."""
    rng = np.random.default_rng(seed)
    rows = []
    for split, n_mz, n_un in (("validation", n_val_mz, n_val_unrelated), ("test", n_test_mz, n_test_unrelated)):
        rows += [(split, "MZ", 1.0 + 0.5 * rng.normal()) for _ in range(n_mz)]
        rows += [(split, "unrelated", (test_unrelated_score if split == "test" and test_unrelated_score is not None
                                       else 0.5 * rng.normal())) for _ in range(n_un)]
    table = pd.DataFrame(rows, columns=["split", "relation", "score"])
    return table.assign(baseline=table["score"] + 0.1 * rng.normal(size=len(table)))


def warnings_of(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


def test_too_few_validation_twins_make_an_unreliable_threshold(caplog):
    n = MIN_THRESHOLD_POSITIVES - 7
    with caplog.at_level(logging.WARNING, logger="bids_siamese"):
        decision = choose_twin_decision(pairs_table(n), ["MZ"])
    lines = warnings_of(caplog)
    assert len(lines) == 1
    assert f"rests on {n} validation MZ pair(s), fewer than {MIN_THRESHOLD_POSITIVES}" in lines[0]
    assert "fix: select more twin families" in lines[0] and "\n" not in lines[0]
    assert decision.validation["threshold_reliable"] == 0 and decision.validation["validation_positive_pairs"] == n
    assert decision.validation["validation_unrelated_pairs"] == 40
    assert decision.card["threshold_reliable"] is False and decision.card["validation_positive_pairs"] == n


def test_enough_validation_twins_make_a_reliable_threshold(caplog):
    with caplog.at_level(logging.WARNING, logger="bids_siamese"):
        decision = choose_twin_decision(pairs_table(MIN_THRESHOLD_POSITIVES + 2), ["MZ"])
    assert warnings_of(caplog) == []
    assert decision.validation["threshold_reliable"] == 1
    assert decision.validation["validation_positive_pairs"] == MIN_THRESHOLD_POSITIVES + 2
    # the held-out share of pairs it calls twins, measured at the validation threshold
    table = pairs_table(MIN_THRESHOLD_POSITIVES + 2)
    test = table[table["split"] == "test"]
    called = test["score"] >= decision.threshold
    assert decision.validation["test_predicted_twin_rate"] == pytest.approx(called.mean(), abs=1e-4)
    assert decision.validation["test_unrelated_predicted_twin_rate"] == pytest.approx(
        called[test["relation"] == "unrelated"].mean(), abs=1e-4)
    assert decision.validation["test_unrelated_predicted_twin_rate"] <= MAX_NEGATIVE_POSITIVE_RATE


def test_a_threshold_that_calls_most_unrelated_test_pairs_twins_is_reported(caplog):
    with caplog.at_level(logging.WARNING, logger="bids_siamese"):
        decision = choose_twin_decision(pairs_table(MIN_THRESHOLD_POSITIVES + 2, test_unrelated_score=5.0), ["MZ"])
    lines = warnings_of(caplog)
    assert len(lines) == 1 and "calls 100% of the 40 unrelated test pairs twins" in lines[0]
    assert decision.validation["test_unrelated_predicted_twin_rate"] == 1.0
    assert decision.validation["threshold_reliable"] == 1  # enough validation pairs: the test data disagree


def longitudinal_runs(declines: list[int], stable_rates: list[float]) -> pd.DataFrame:
    return pd.DataFrame({"threshold_decline_pairs": declines, "test_predicted_decline_rate": [0.5] * len(declines),
                         "test_stable_predicted_decline_rate": stable_rates})


def test_longitudinal_decision_points_on_few_declines_are_unreliable(caplog):
    with caplog.at_level(logging.WARNING, logger="bids_siamese"):
        rows = decision_support(longitudinal_runs([12, 4, 15], [0.2, 0.3, 0.1])).set_index("metric")
    lines = warnings_of(caplog)
    assert len(lines) == 1 and "rests on 4 decline pair(s), fewer than 10" in lines[0] and "fix:" in lines[0]
    assert rows.loc["threshold_reliable", "mean"] == 0 and rows.loc["threshold_decline_pairs_min", "mean"] == 4
    assert rows.loc["test_stable_predicted_decline_rate", "mean"] == pytest.approx(0.2)
    assert rows.loc["test_stable_predicted_decline_rate", "n_runs"] == 3


def test_longitudinal_decision_points_on_enough_declines_are_reliable(caplog):
    with caplog.at_level(logging.WARNING, logger="bids_siamese"):
        rows = decision_support(longitudinal_runs([12, 10], [0.2, 0.3])).set_index("metric")
    assert warnings_of(caplog) == [] and rows.loc["threshold_reliable", "mean"] == 1
    with caplog.at_level(logging.WARNING, logger="bids_siamese"):
        decision_support(longitudinal_runs([12, 10], [0.8, 0.9]))
    assert len(warnings_of(caplog)) == 1 and "call 85% of the stable test pairs decline" in warnings_of(caplog)[0]
