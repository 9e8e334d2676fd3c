"""The left-right flip verdict's ``undetermined`` band sits at the noise level, not wider.

``LR_FLIP_MARGIN`` is defined (qc/orientation.py, docs/benchmarks.md "Calibration") as twice the largest
|difference| that noise alone gives a head with no left-right asymmetry. Here, on the 2 mm model grid (no
registration), a head is the symmetric part of the template plus a fraction of its antisymmetric part plus
voxel noise, so both the noise floor and the asymmetry are known:

* the symmetric head plus noise is ``undetermined`` for every noise draw (the band is not too narrow);
* a head that keeps 1 % of the template's asymmetry under the same noise has a difference several times the
  largest noise-only one: the test can tell it from its mirror, so the verdict must be decided (``ok`` as
  stored, ``flipped`` mirrored). A band widened a few times over its definition makes these ``undetermined``.
"""
from __future__ import annotations

import numpy as np
import pytest

from bids_siamese.preproc.grid import mirror, template_on_grid
from bids_siamese.qc.orientation import flip_statistic, lr_flip_verdict
from bids_siamese.resources import model_grid

#: Voxel noise, as a fraction of the template's intensity spread inside the brain.
NOISE = 0.3
#: Fraction of the template's antisymmetric part kept in the weakly asymmetric head.
WEAK_ASYMMETRY = 0.01
SEEDS = (0, 1, 2)


@pytest.fixture(scope="module")
def template_2mm() -> tuple[np.ndarray, np.ndarray]:
    template, mask = template_on_grid(model_grid(2.0))
    return np.asarray(template, dtype=np.float32), np.asarray(mask, dtype=bool)


def _difference(head: np.ndarray, mask: np.ndarray, template: np.ndarray) -> float:
    """``statistic(head) - statistic(mirror(head))``, as paired_flip_test computes it after registration."""
    return flip_statistic(head, mask, template) - flip_statistic(mirror(head), mirror(mask), template)


def _head(template: np.ndarray, mask: np.ndarray, asymmetry: float, seed: int) -> np.ndarray:
    symmetric = (template + mirror(template)) / 2
    antisymmetric = (template - mirror(template)) / 2
    noise = np.random.default_rng(seed).normal(0.0, NOISE * float(template[mask].std()), template.shape)
    return (symmetric + asymmetry * antisymmetric + noise * mask).astype(np.float32)


def test_flip_verdict_is_decided_just_above_the_noise_floor(template_2mm) -> None:
    template, mask = template_2mm
    noise_only = [_difference(_head(template, mask, 0.0, seed), mask, template) for seed in SEEDS]
    for difference in noise_only:
        assert lr_flip_verdict(difference)["lr_flip_verdict"] == "undetermined", noise_only
    noise_floor = max(abs(d) for d in noise_only)

    for seed in SEEDS:
        head = _head(template, mask, WEAK_ASYMMETRY, seed)
        difference = _difference(head, mask, template)
        # decisive data by the margin's own rule: beyond twice the largest noise-only difference
        assert difference < -2 * noise_floor, (difference, noise_only)
        stored = lr_flip_verdict(difference)
        mirrored = lr_flip_verdict(-difference)  # the mirror's difference is exactly the negative (_difference)
        assert stored["lr_flip_verdict"] == "ok", (difference, noise_floor, stored)
        assert mirrored["lr_flip_verdict"] == "flipped", (difference, noise_floor, mirrored)
        assert stored["lr_flip_probability"] < 0.5 < mirrored["lr_flip_probability"]
