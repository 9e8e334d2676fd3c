"""Tests of the image-based left-right flip check and the header orientation verdict."""
from __future__ import annotations

import math

import nibabel as nib
import numpy as np
import pytest

from bids_siamese.preproc.grid import template_on_grid
from bids_siamese.qc.orientation import (
    LR_FLIP_MARGIN,
    LR_FLIP_SLOPE,
    antisymmetric_correlation,
    failed_header_checks,
    flip_statistic,
    header_orientation_verdict,
    lr_flip_probability,
    lr_flip_verdict,
    mark_informational,
    mirror,
    mirrored_matrix,
    mirrored_scan,
    paired_flip_test,
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


def _displacement_mm(a: np.ndarray, b: np.ndarray, grid, mask: np.ndarray) -> float:
    """Mean distance (mm) between where two template->subject matrices send the template brain's grid voxels."""
    points = np.c_[np.argwhere(mask), np.ones(int(mask.sum()))] @ grid.affine.T
    return float(np.linalg.norm(points @ a.T - points @ b.T, axis=1).mean())


def test_mirrored_matrix_is_an_involution_and_proper() -> None:
    rng = np.random.default_rng(3)
    matrix = np.eye(4)
    matrix[:3, :3] = np.linalg.qr(rng.normal(size=(3, 3)))[0] @ np.diag([1.1, 0.9, 1.05])
    matrix[:3, :3] *= np.sign(np.linalg.det(matrix[:3, :3]))
    matrix[:3, 3] = rng.normal(0, 10, 3)
    affine = np.diag([1.2, 1.0, 0.9, 1.0])
    affine[:3, 3] = [-80.0, -100.0, -70.0]
    shape = (150, 200, 180)
    once = mirrored_matrix(matrix, affine, shape)
    assert np.linalg.det(once[:3, :3]) == pytest.approx(np.linalg.det(matrix[:3, :3]))  # no reflection
    np.testing.assert_allclose(mirrored_matrix(once, affine, shape), matrix, atol=1e-9)
    # a template point x and its mirror land on voxels that are each other's left-right mirror
    x = np.array([23.0, -11.0, 7.0, 1.0])
    voxel = np.linalg.solve(affine, matrix @ x)
    mirrored_voxel = np.linalg.solve(affine, once @ (np.diag([-1.0, 1, 1, 1]) @ x))
    np.testing.assert_allclose(mirrored_voxel[:3], [shape[0] - 1 - voxel[0], voxel[1], voxel[2]], atol=1e-9)


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


def test_flip_statistic_signs_template_and_its_mirror(template_2mm) -> None:
    template, mask = template_2mm
    for seed in (0, 1):
        brain = _noisy(template, mask, seed)
        unflipped = flip_statistic(brain, mask, template)
        flipped = flip_statistic(mirror(brain), mirror(mask), template)
        assert unflipped < 0 < flipped
        assert flipped == pytest.approx(-unflipped, abs=1e-6)  # on the symmetric grid the mirror negates it


@pytest.mark.slow
def test_paired_flip_test_on_a_native_scan_and_its_mirror(template_2mm) -> None:
    """The template brain stored as a native 2 mm scan (shifted): ok as stored, flipped when mirrored."""
    template, mask = template_2mm
    grid = model_grid(2.0)
    affine = grid.affine.copy()
    affine[:3, 3] += [7.0, -5.0, 3.0]
    img = nib.Nifti1Image(_noisy(template, mask, 5), affine)
    stored = paired_flip_test(img, mask, grid, template, resolution=4.0, n_threads=1)
    assert stored["difference"] == pytest.approx(stored["statistic"] - stored["mirrored_statistic"])
    assert stored["difference"] < -LR_FLIP_MARGIN
    assert lr_flip_verdict(stored["difference"])["lr_flip_verdict"] == "ok"
    mirror_img, mirror_mask = mirrored_scan(img, mask)
    np.testing.assert_array_equal(mirror_mask, mask[::-1])
    flipped = paired_flip_test(mirror_img, mirror_mask, grid, template, resolution=4.0, n_threads=1)
    # the test is symmetric: scoring the mirror swaps the two images (the mirror's registration is refined from
    # the stored one's, so the two differences agree to the refinement's precision, not to the last bit)
    assert flipped["difference"] == pytest.approx(-stored["difference"], abs=0.02)
    assert lr_flip_verdict(flipped["difference"])["lr_flip_verdict"] == "flipped"
    # the mirror's registration started from the stored one's: the same answer as registering it from scratch
    cold = paired_flip_test(img, mask, grid, template, resolution=4.0, n_threads=1, warm_start=False)
    np.testing.assert_array_equal(cold["matrix"], stored["matrix"])
    assert _displacement_mm(stored["mirrored_matrix"], cold["mirrored_matrix"], grid, mask) < 1.0
    assert stored["difference"] == pytest.approx(cold["difference"], abs=0.02)
    # from scratch, the test is exactly symmetric: scoring the mirror swaps the two registrations
    cold_flipped = paired_flip_test(mirror_img, mirror_mask, grid, template, resolution=4.0, n_threads=1,
                                    warm_start=False)
    assert cold_flipped["difference"] == pytest.approx(-cold["difference"], abs=1e-9)


@pytest.mark.slow
def test_paired_flip_test_symmetric_brain_is_undetermined(template_2mm) -> None:
    template, mask = template_2mm
    grid = model_grid(2.0)
    symmetric = (template + mirror(template)) / 2
    sym_mask = mask | mirror(mask)
    img = nib.Nifti1Image(np.where(sym_mask, symmetric, 0).astype(np.float32), grid.affine)
    test = paired_flip_test(img, sym_mask, grid, template, resolution=4.0, n_threads=1, warm_start=False)
    assert test["difference"] == pytest.approx(0.0, abs=1e-9)  # identical arrays: identical registrations
    warm = paired_flip_test(img, sym_mask, grid, template, resolution=4.0, n_threads=1)
    assert abs(warm["difference"]) < LR_FLIP_MARGIN / 4  # the refined mirror registration: noise only
    assert lr_flip_verdict(warm["difference"])["lr_flip_verdict"] == "undetermined"
    assert lr_flip_verdict(test["difference"])["lr_flip_verdict"] == "undetermined"


def test_lr_flip_verdict_three_ways_and_unusable() -> None:
    big = 10 * max(LR_FLIP_MARGIN, 0.01)
    ok, flipped = lr_flip_verdict(-big), lr_flip_verdict(big)
    assert ok["lr_flip_verdict"] == "ok" and not ok["lr_flip_suspected"]
    assert flipped["lr_flip_verdict"] == "flipped" and flipped["lr_flip_suspected"]
    assert ok["lr_flip_probability"] == pytest.approx(1 - flipped["lr_flip_probability"])
    assert ok["lr_flip_confidence"] == pytest.approx(flipped["lr_flip_confidence"])
    assert ok["lr_flip_confidence"] > 0
    small = lr_flip_verdict(LR_FLIP_MARGIN / 2)
    assert small["lr_flip_verdict"] == "undetermined" and not small["lr_flip_suspected"]
    unusable = lr_flip_verdict(big, usable=False)
    assert unusable == {"lr_flip_verdict": "undetermined", "lr_flip_probability": None, "lr_flip_confidence": 0.0,
                        "lr_flip_suspected": False}
    assert lr_flip_verdict(float("nan"))["lr_flip_verdict"] == "undetermined"


def test_flip_statistic_is_invariant_to_intensity_scale(template_2mm) -> None:
    template, mask = template_2mm
    brain = _noisy(template, mask, 3)
    assert flip_statistic(brain * 7.5 + 0.0, mask, template) == pytest.approx(flip_statistic(brain, mask, template), abs=1e-5)


def test_flip_statistic_rejects_empty_mask(template_2mm) -> None:
    template, _ = template_2mm
    with pytest.raises(ValueError):
        flip_statistic(template, np.zeros(template.shape, bool), template)


def test_lr_flip_probability_is_a_symmetric_monotone_logistic() -> None:
    assert LR_FLIP_SLOPE > 0 and LR_FLIP_MARGIN > 0
    values = [lr_flip_probability(s) for s in np.linspace(-1, 1, 21)]
    assert all(0.0 <= v <= 1.0 for v in values)
    assert all(b > a for a, b in zip(values, values[1:]))
    assert lr_flip_probability(0.0) == pytest.approx(0.5)
    assert lr_flip_probability(0.3) == pytest.approx(1 - lr_flip_probability(-0.3))
    assert math.isfinite(lr_flip_probability(1e6)) and lr_flip_probability(-1e6) == pytest.approx(0.0)


def test_obliquity_is_information_not_a_failed_check() -> None:
    checks = [{"name": "obliquity", "passed": False, "detail": "largest voxel-axis obliquity 3.00 deg"},
              {"name": "voxel_size", "passed": False, "detail": "voxel size [4, 4, 4] mm"}]
    marked = mark_informational(checks)
    assert marked[0]["informational"] is True and "informational" not in marked[1]
    assert failed_header_checks(marked) == ["voxel_size"] == failed_header_checks(checks)
    assert header_orientation_verdict(marked) == "reliable"


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
