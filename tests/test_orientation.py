"""Tests of the image-based left-right flip check and the header orientation verdict."""
from __future__ import annotations

import math

import numpy as np
import pytest

from bids_siamese.preproc.grid import template_on_grid
from bids_siamese.qc.orientation import (
    LR_FLIP_THRESHOLD,
    antisymmetric_correlation,
    flip_statistic,
    header_orientation_verdict,
    lr_flip_probability,
    mirror,
    orientation_check,
)
from bids_siamese.resources import model_grid


@pytest.fixture(scope="module")
def template_2mm() -> tuple[np.ndarray, np.ndarray]:
    return template_on_grid(model_grid(2.0))


def _noisy(template: np.ndarray, mask: np.ndarray, seed: int, sigma: float = 3.0) -> np.ndarray:
    """The template brain with Gaussian noise inside the mask (a perfectly registered 'subject')."""
    rng = np.random.default_rng(seed)
    noisy = template + rng.normal(0.0, sigma, template.shape).astype(np.float32)
    return np.where(mask, noisy, 0).astype(np.float32)


def test_mirror_is_the_left_right_flip_of_the_symmetric_grid() -> None:
    grid = model_grid(2.0)
    x_first = grid.affine[0, 3]
    x_last = grid.affine[0, 3] + grid.affine[0, 0] * (grid.shape[0] - 1)
    assert x_first == pytest.approx(-x_last)
    volume = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    np.testing.assert_array_equal(mirror(volume), volume[::-1])


def test_antisymmetric_correlation_signs() -> None:
    rng = np.random.default_rng(0)
    image = rng.normal(size=(8, 6, 5)).astype(np.float32)
    region = np.ones(image.shape, bool)
    assert antisymmetric_correlation(image, image, region) == pytest.approx(1.0)
    assert antisymmetric_correlation(mirror(image), image, region) == pytest.approx(-1.0)
    symmetric = image + mirror(image)
    assert antisymmetric_correlation(symmetric, image, region) == 0.0


def test_orientation_check_passes_template_and_flags_its_mirror(template_2mm) -> None:
    template, mask = template_2mm
    for seed in (0, 1):
        brain = _noisy(template, mask, seed)
        unflipped = orientation_check(brain, mask, template)
        flipped = orientation_check(mirror(brain), mirror(mask), template)
        assert set(unflipped) >= {"lr_flip_probability", "lr_flip_suspected", "statistic"}
        assert unflipped["statistic"] < 0 < flipped["statistic"]
        assert not unflipped["lr_flip_suspected"] and unflipped["lr_flip_probability"] < 0.1
        assert flipped["lr_flip_suspected"] and flipped["lr_flip_probability"] > 0.9
        assert isinstance(flipped["lr_flip_suspected"], bool)


def test_orientation_check_is_invariant_to_intensity_scale(template_2mm) -> None:
    template, mask = template_2mm
    brain = _noisy(template, mask, 3)
    assert flip_statistic(brain * 7.5 + 0.0, mask, template) == pytest.approx(flip_statistic(brain, mask, template), abs=1e-5)


def test_flip_statistic_rejects_empty_mask(template_2mm) -> None:
    template, _ = template_2mm
    with pytest.raises(ValueError):
        flip_statistic(template, np.zeros(template.shape, bool), template)


def test_lr_flip_probability_is_a_monotone_logistic() -> None:
    values = [lr_flip_probability(s) for s in np.linspace(-1, 1, 21)]
    assert all(0.0 <= v <= 1.0 for v in values)
    assert all(b >= a for a, b in zip(values, values[1:]))
    assert values[0] < LR_FLIP_THRESHOLD < values[-1]
    assert math.isfinite(lr_flip_probability(1e6)) and lr_flip_probability(-1e6) == pytest.approx(0.0)


def test_header_orientation_verdict() -> None:
    good = [
        {"name": "xform_codes", "passed": True, "detail": "codes ok"},
        {"name": "qform_sform_match", "passed": True, "detail": "agree"},
        {"name": "obliquity", "passed": False, "detail": "oblique 12 deg"},
        {"name": "determinant", "passed": True, "detail": "radiological"},
    ]
    assert header_orientation_verdict(good) == "reliable"
    bad = [*good[:1], {"name": "qform_sform_match", "passed": False, "detail": "corners differ by 5 mm"}]
    verdict = header_orientation_verdict(bad)
    assert verdict.startswith("unreliable") and "qform_sform_match" in verdict and "5 mm" in verdict
