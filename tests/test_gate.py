"""Tests of the usable-scan gate (pure functions) and of its use at the group level."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest

from bids_siamese.qc.gate import (
    AFFINE_SCALE,
    BRAIN_VOLUME_CM3,
    EDGE_SIDES_FAIL,
    EDGE_SIDES_WARN,
    FOV_COVERAGE,
    TEMPLATE_CORRELATION,
    edge_sides,
    fov_coverage,
    qc_record_usable,
    qc_summary_line,
    registration_measures,
    scan_gate,
)
from bids_siamese.bids.derivatives import orientation_qc_path
from bids_siamese.workflows.group import orientation_table, unusable_scans

GOOD = {"brain_volume_cm3": 1400.0, "template_correlation": 0.85, "affine_scales": [1.02, 1.0, 0.97],
        "affine_determinant": 0.99, "fov_coverage": 1.0, "mask_edge_sides": []}


def test_a_plausible_scan_passes() -> None:
    assert scan_gate(GOOD) == {"qc_status": "pass", "usable": True, "qc_reasons": []}


@pytest.mark.parametrize("change, words", [
    ({"brain_volume_cm3": BRAIN_VOLUME_CM3[0] - 1}, "brain volume"),
    ({"brain_volume_cm3": BRAIN_VOLUME_CM3[3] + 1}, "brain volume"),
    ({"template_correlation": TEMPLATE_CORRELATION[0] - 0.01}, "template correlation"),
    ({"affine_scales": [1.0, 1.0, 1 / AFFINE_SCALE[0] - 0.01]}, "affine scales"),
    ({"affine_determinant": 0.05}, "determinant"),
    ({"fov_coverage": FOV_COVERAGE[0] - 0.01}, "field of view"),
    ({"mask_edge_sides": ["i-", "i+", "j-", "k-"][:EDGE_SIDES_FAIL]}, "edge"),
    ({"template_correlation": float("nan")}, "not finite"),
])
def test_each_failed_measurement_fails_the_scan_with_a_reason(change, words) -> None:
    gate = scan_gate({**GOOD, **change})
    assert gate["qc_status"] == "fail" and gate["usable"] is False
    assert len(gate["qc_reasons"]) == 1 and words in gate["qc_reasons"][0]


def test_borderline_measurements_warn_but_stay_usable() -> None:
    gate = scan_gate({**GOOD, "template_correlation": (TEMPLATE_CORRELATION[0] + TEMPLATE_CORRELATION[1]) / 2})
    assert gate["qc_status"] == "warn" and gate["usable"] is True and "template correlation" in gate["qc_reasons"][0]


def test_one_touched_side_is_normal_several_warn_or_fail() -> None:
    assert scan_gate({**GOOD, "mask_edge_sides": ["k-"]})["qc_status"] == "pass"  # a tight FOV cuts the brainstem
    sides = ["k-", "j-", "i+", "i-"]
    assert scan_gate({**GOOD, "mask_edge_sides": sides[:EDGE_SIDES_WARN]})["qc_status"] == "warn"
    assert scan_gate({**GOOD, "mask_edge_sides": sides[:EDGE_SIDES_FAIL]})["qc_status"] == "fail"


def test_edge_sides_and_fov_coverage() -> None:
    mask = np.zeros((10, 12, 14), bool)
    mask[3:7, 4:8, 0:5] = True
    assert edge_sides(mask) == ["k-"]
    mask[9, 5, 5] = True
    assert edge_sides(mask) == ["i+", "k-"]
    template_mask = np.ones((4, 4, 4), bool)
    grid_affine = np.eye(4)
    # identity mapping into a 4^3 image: fully covered; shifted by 2 voxels: half the voxels fall outside
    assert fov_coverage(np.eye(4), np.eye(4), (4, 4, 4), template_mask, grid_affine) == 1.0
    shift = np.eye(4)
    shift[0, 3] = 2.0
    assert fov_coverage(shift, np.eye(4), (4, 4, 4), template_mask, grid_affine) == pytest.approx(0.5)


def test_registration_measures() -> None:
    mask = np.zeros((20, 20, 20), bool)
    mask[5:15, 5:15, 5:15] = True
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    matrix = np.diag([1.1, 1.0, 0.9, 1.0])
    measures = registration_measures(mask, affine, matrix, np.ones((3, 3, 3), bool), np.eye(4), 0.81234)
    assert measures["brain_volume_cm3"] == pytest.approx(1000 * 8 / 1000)
    assert measures["affine_scales"] == [1.1, 1.0, 0.9]
    assert measures["affine_determinant"] == pytest.approx(0.99)
    assert measures["mask_edge_sides"] == [] and measures["template_correlation"] == 0.8123
    assert 0.0 < measures["fov_coverage"] <= 1.0


def test_qc_files_and_summary_line(tmp_path: Path) -> None:
    preproc = tmp_path / "sub-01_ses-1_space-MNI152NLin2009cAsym_desc-preproc_T1w.nii.gz"
    qc = orientation_qc_path(preproc)
    assert qc.name == "sub-01_ses-1_desc-orientation_qc.json"
    assert qc_record_usable(qc)  # missing file: not excluded
    qc.write_text(json.dumps({"usable": False}))
    assert not qc_record_usable(qc)
    qc.write_text(json.dumps({"lr_flip_suspected": False}))  # written before the gate existed
    assert qc_record_usable(qc)
    assert qc_summary_line([]) == "usable-scan gate: all scans usable"
    line = qc_summary_line(["sub-01_T1w.nii.gz", "sub-02_T1w.nii.gz"])
    assert "2 scan(s) failed QC" in line and "sub-01_T1w.nii.gz, sub-02_T1w.nii.gz" in line and "\n" not in line


@pytest.mark.parametrize("content", ["{\"usable\": tr", "[1, 2]", None])
def test_an_unreadable_qc_record_is_not_usable_and_named_at_warning(tmp_path: Path, caplog, content) -> None:
    """A QC file that exists but cannot be read is no longer taken for a usable scan (its verdict is unknown)."""
    qc = tmp_path / "sub-01_desc-orientation_qc.json"
    if content is None:  # a folder where the file should be: reading it fails with an OSError
        qc.mkdir()
    else:
        qc.write_text(content)
    with caplog.at_level(logging.WARNING, logger="bids_siamese.qc"):
        assert qc_record_usable(qc) is False
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and str(qc) in warnings[0].getMessage() and "fix:" in warnings[0].getMessage()


def test_group_orientation_table_has_the_gate_and_verdict_columns() -> None:
    records = [
        {"participant_id": "sub-01", "session_id": "ses-1", "scan": "sub-01_ses-1_T1w.nii.gz", "qc_status": "pass",
         "usable": True, "qc_reasons": [], "lr_flip_verdict": "ok", "lr_flip_confidence": 0.9,
         "lr_flip_probability": 0.05, "lr_flip_suspected": False, "lr_flip_source": "image",
         "header_checks": [{"name": "obliquity", "passed": False, "detail": "3 deg"}]},
        {"participant_id": "sub-02", "scan": "sub-02_T1w.nii.gz", "qc_status": "fail", "usable": False,
         "qc_reasons": ["brain volume 93 cm3 outside 700-2300 cm3", "template correlation 0.17 below 0.55"],
         "lr_flip_verdict": "undetermined", "lr_flip_confidence": 0.0, "lr_flip_probability": None,
         "lr_flip_suspected": False, "header_checks": [{"name": "field_of_view", "passed": False}]},
        {"participant_id": "sub-03", "scan": "sub-03_T1w.nii.gz", "lr_flip_probability": 0.97,
         "lr_flip_suspected": True, "header_checks": []},  # a record from before the gate
    ]
    table = orientation_table(records)
    assert list(table.columns)[:8] == ["participant_id", "session_id", "qc_status", "usable", "qc_reasons",
                                       "lr_flip_verdict", "lr_flip_confidence", "lr_flip_probability"]
    first, second, third = (table.iloc[i] for i in range(3))
    assert first["header_checks_failed"] == "n/a"  # obliquity is information
    assert second["lr_flip_probability"] == "n/a" and "brain volume" in second["qc_reasons"]
    assert second["header_checks_failed"] == "field_of_view"
    assert third["lr_flip_verdict"] == "flipped" and third["qc_status"] == "pass" and third["usable"]
    assert unusable_scans(table) == ["sub-02_T1w.nii.gz"]
