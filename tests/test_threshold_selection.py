"""The longitudinal decision point is chosen on the validation pairs, never on the test pairs (CNN path, fast).

``tests/test_longitudinal_refit.py`` (slow) checks the ``regional`` path inside one draw. Here a whole
``group --task longitudinal`` run with the ``small`` CNN (1 draw, 2 epochs, 8 mm fake participant outputs of
``tests/test_train.py``) writes its tables, and the outputs alone show where the threshold came from: the model written is the
first draw's model, so the predictions table's ``p_decline`` of that draw's validation pairs (``split``) must give
back the written threshold by Youden's J, and those of its test pairs must not.
"""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from bids_siamese.bids.derivatives import LONGITUDINAL_FILES
from bids_siamese.train.evaluate import choose_threshold
from bids_siamese.train.longitudinal import run_longitudinal

from test_train import make_group_inputs, settings_for


@pytest.fixture(scope="module")
def cnn_longitudinal_run(tmp_path_factory):
    bids, out, subjects = make_group_inputs(tmp_path_factory.mktemp("threshold"))
    # float32 training stack: the threshold is chosen on exactly the p(decline) the predictions table holds
    run_longitudinal(settings_for(bids, out, "longitudinal", backbone="small", n_draws=1, epochs=2, patience=2,
                                  volume_cache="float32"), subjects)
    pred = pd.read_csv(out / LONGITUDINAL_FILES["predictions"], sep="\t")
    metrics = pd.read_csv(out / LONGITUDINAL_FILES["metrics"], sep="\t").set_index("metric")
    card = json.loads((out / "models" / "longitudinal_small" / "model_card.json").read_text())
    return pred, metrics, card


def _youden(pred: pd.DataFrame, split: str) -> float:
    part = pred[pred["split"] == split]
    assert set(part["label"]) == {"decline", "stable"}, part  # both labels, or Youden's J is undefined
    return choose_threshold((part["label"] == "decline").astype(float), part["p_decline"])


def test_cnn_longitudinal_threshold_is_chosen_on_validation_pairs(cnn_longitudinal_run) -> None:
    pred, metrics, card = cnn_longitudinal_run
    threshold = float(card["decision"]["threshold_p_decline"])
    assert threshold == pytest.approx(float(metrics.loc["threshold_p_decline", "mean"]))
    on_validation, on_test = _youden(pred, "validation"), _youden(pred, "test")
    # the tables round p_decline; a threshold from the test pairs would sit elsewhere
    assert abs(on_validation - on_test) > 1e-3, (on_validation, on_test)
    assert threshold == pytest.approx(on_validation, abs=1e-4), (threshold, on_validation, on_test)
    assert (pred["predicted"] == np.where(pred["p_decline"] >= threshold, "decline", "stable")).all()
