"""The orientation QC and the usable-scan gate on real T1w heads (see ``tests/real_heads.py``).

Every full-field-of-view head and its mirror (array-mirrored, and for two heads also header-mirrored and
re-stored in another voxel order) must get the right verdict; the symmetric ICBM 2009a template must be
``undetermined`` both ways; the cropped nibabel scan must be ``usable: false`` with a reason.

None of these heads was used to fit the calibration (``LR_FLIP_SLOPE``, ``LR_FLIP_MARGIN``: demo dataset
only, ``benchmarks/calibrate_orientation.py``). Each head is processed once per session at a coarse
grid (:data:`RESOLUTION`; ``benchmarks/orientation_real_heads.py`` gives the same verdicts at 2 mm,
docs/benchmarks.md), and deepbet runs once per distinct conformed array.
"""
from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

import real_heads
from bids_siamese.cli.main import main
from bids_siamese.bids.derivatives import output_names
from bids_siamese.preproc.brain import brain_image, extract_brain
from bids_siamese.preproc.conform import conform, header_checks
from bids_siamese.preproc.grid import template_on_grid
from bids_siamese.preproc.register import register_affine
from bids_siamese.qc.orientation import (
    LR_FLIP_MARGIN,
    QC_DOF,
    lr_flip_verdict,
    paired_flip_test,
    scan_orientation_report,
)
from bids_siamese.resources import model_grid, template_brain_path
from bids_siamese.train.data import find_preproc

pytestmark = pytest.mark.slow

#: Registration resolution (mm) of the fixture: coarse, which leaves every verdict unchanged.
RESOLUTION = 4.0

#: (head, variant) pairs the fixture processes.
CASES = (
    [(head, variant) for head in real_heads.ASYMMETRIC for variant in ("stored", "array_mirrored")]
    + [(head, variant) for head in ("colin27", "mni152_fsl") for variant in ("header_mirrored", "restored_PIL")]
    + [("icbm2009a_sym", "stored"), ("icbm2009a_sym", "array_mirrored"), ("cropped", "stored")]
)


#: Cases also scored with every registration made from scratch, as before issue 27 (the mirror's registration
#: now refines the mirror of the scan's, and the workflow's shear-free registration refines the affine one):
#: a head with skull, an oblique mirrored head, and the symmetric template (the closest call).
FROM_SCRATCH_CASES = (("colin27", "stored"), ("pydeface_mean", "array_mirrored"), ("icbm2009a_sym", "stored"))


@pytest.fixture(scope="session")
def real_head_inputs() -> dict[tuple[str, str], tuple]:
    """``(conformed, brain mask, header checks)`` of every case in :data:`CASES` (fails, never skips, when a head
    is missing); deepbet runs once per distinct conformed array."""
    missing = sorted({real_heads.INSTALL[h] for h, _ in CASES if real_heads.head_path(h) is None})
    if missing:
        pytest.fail("real heads missing; install them: " + "; ".join(missing), pytrace=False)
    masks: dict[str, np.ndarray] = {}
    inputs = {}
    for head in dict.fromkeys(h for h, _ in CASES):
        stored = real_heads.load_head(head)
        for variant in [v for h, v in CASES if h == head]:
            build, _ = real_heads.VARIANTS[variant]
            img = build(stored)
            conformed = conform(img)
            key = hashlib.sha1(np.ascontiguousarray(conformed.get_fdata(dtype=np.float32)).tobytes()).hexdigest()
            if key not in masks:
                masks[key] = extract_brain(conformed, n_threads=1)[0]
            inputs[head, variant] = (conformed, masks[key], header_checks(img))
    return inputs


@pytest.fixture(scope="session")
def real_head_reports(real_head_inputs) -> dict[tuple[str, str], dict]:
    """The orientation QC record of every case in :data:`CASES`."""
    return {case: scan_orientation_report(conformed, mask, checks, resolution=RESOLUTION, n_threads=1)
            for case, (conformed, mask, checks) in real_head_inputs.items()}


@pytest.mark.parametrize("head, variant", FROM_SCRATCH_CASES)
def test_refined_registrations_keep_the_verdicts_of_registrations_from_scratch(real_head_inputs, real_head_reports,
                                                                               head, variant) -> None:
    conformed, mask, checks = real_head_inputs[head, variant]
    qc = real_head_reports[head, variant]
    grid = model_grid(RESOLUTION)
    template, _ = template_on_grid(grid)
    scratch = paired_flip_test(conformed, mask, grid, template, resolution=RESOLUTION, n_threads=1, warm_start=False)
    assert lr_flip_verdict(scratch["difference"])["lr_flip_verdict"] == qc["lr_flip_verdict"]
    tolerance = max(0.02, 0.05 * abs(scratch["difference"]))
    assert qc["lr_flip_difference"] == pytest.approx(scratch["difference"], abs=tolerance)
    # the workflow's path: the shear-free registration refines the affine one, the mirror's refines its mirror
    brain, template_img = brain_image(conformed, mask), nib.load(str(template_brain_path()))
    affine = register_affine(brain, mask, template_img, resolution=RESOLUTION, n_threads=1)
    shear_free = register_affine(brain, mask, template_img, resolution=RESOLUTION, n_threads=1, dof=QC_DOF,
                                 initial=affine)
    workflow = scan_orientation_report(conformed, mask, checks, resolution=RESOLUTION, n_threads=1, matrix=shear_free)
    assert workflow["usable"] == qc["usable"] and workflow["lr_flip_verdict"] == qc["lr_flip_verdict"]
    assert workflow["lr_flip_difference"] == pytest.approx(scratch["difference"], abs=tolerance)


@pytest.mark.parametrize("head, variant", [c for c in CASES if c[0] in real_heads.ASYMMETRIC])
def test_full_fov_real_heads_get_the_right_verdict(real_head_reports, head, variant) -> None:
    qc = real_head_reports[head, variant]
    flipped = real_heads.VARIANTS[variant][1]
    assert qc["usable"] is True, qc["qc_reasons"]
    expected = "flipped" if flipped else "ok"
    assert qc["lr_flip_verdict"] == expected, (qc["lr_flip_difference"], qc["lr_flip_probability"])
    assert qc["lr_flip_suspected"] is flipped
    assert (qc["lr_flip_probability"] > 0.5) is flipped
    assert abs(qc["lr_flip_difference"]) > LR_FLIP_MARGIN


def test_mirroring_in_the_array_or_in_the_header_is_the_same_flip(real_head_reports) -> None:
    for head in ("colin27", "mni152_fsl"):
        array, header = real_head_reports[head, "array_mirrored"], real_head_reports[head, "header_mirrored"]
        assert header["lr_flip_difference"] == pytest.approx(array["lr_flip_difference"], abs=0.02)
        stored, restored = real_head_reports[head, "stored"], real_head_reports[head, "restored_PIL"]
        assert restored["lr_flip_difference"] == pytest.approx(stored["lr_flip_difference"], abs=0.02)


def test_symmetric_template_is_undetermined_both_ways(real_head_reports) -> None:
    for variant in ("stored", "array_mirrored"):
        qc = real_head_reports["icbm2009a_sym", variant]
        assert qc["usable"] is True, qc["qc_reasons"]
        assert qc["lr_flip_verdict"] == "undetermined", qc["lr_flip_difference"]
        assert qc["lr_flip_suspected"] is False
        assert qc["lr_flip_confidence"] < 0.5


def test_cropped_scan_is_unusable_with_a_reason(real_head_reports) -> None:
    qc = real_head_reports["cropped", "stored"]
    assert qc["usable"] is False and qc["qc_status"] == "fail"
    assert qc["qc_reasons"] and any("brain volume" in r or "registration" in r for r in qc["qc_reasons"])
    assert qc["lr_flip_verdict"] == "undetermined" and qc["lr_flip_probability"] is None
    assert qc["lr_flip_suspected"] is False and qc["lr_flip_confidence"] == 0.0


def test_oblique_mean_head_is_not_a_failed_check(real_head_reports) -> None:
    qc = real_head_reports["pydeface_mean", "stored"]
    obliquity = next(c for c in qc["header_checks"] if c["name"] == "obliquity")
    assert obliquity["informational"] is True and "deg" in qc["obliquity"]
    assert qc["header_verdict"] == "reliable"
    assert qc["qc_status"] != "fail"


def test_cropped_scan_through_the_cli(tmp_path: Path, caplog) -> None:
    """Participant level on the cropped scan: outputs and report kept, summary line, left out at group level."""
    bids = tmp_path / "bids"
    anat = bids / "sub-01" / "anat"
    anat.mkdir(parents=True)
    (bids / "dataset_description.json").write_text(json.dumps({"Name": "cropped", "BIDSVersion": "1.10.0"}))
    (bids / "README").write_text("nibabel's cropped anatomical.nii as a BIDS dataset.\n")
    shutil.copy(real_heads.head_path("cropped"), anat / "sub-01_T1w.nii")
    out = tmp_path / "out"
    with caplog.at_level(logging.INFO, logger="bids_siamese"):
        code = main([str(bids), str(out), "participant", "-w", str(tmp_path / "work"), "--resolution", "4",
                     "--nprocs", "1", "--skip-bids-validation"])
    assert code == 0
    names = output_names({"subject": "01"}, "4")
    qc = json.loads((out / names["orientation"]).read_text())
    assert qc["usable"] is False and qc["qc_reasons"]
    assert (out / names["preproc"]).is_file() and (out / "sub-01.html").is_file()  # kept for inspection
    assert "not usable" in (out / "sub-01.html").read_text()
    summary = [r.getMessage() for r in caplog.records if r.getMessage().startswith("usable-scan gate")]
    assert summary == ["usable-scan gate: 1 scan(s) failed QC (usable: false; kept for inspection, left out of "
                       "group training and scoring): sub-01_T1w.nii"]
    assert find_preproc(out, ["01"]).empty  # left out of group training and scoring
    assert len(find_preproc(out, ["01"], include_unusable=True)) == 1
    code = main([str(bids), str(out), "group", "-w", str(tmp_path / "work"), "--skip-bids-validation"])
    assert code == 0
    table = pd.read_csv(out / "group_orientation.tsv", sep="\t")
    assert not table.loc[0, "usable"] and table.loc[0, "qc_status"] == "fail"
    assert table.loc[0, "lr_flip_verdict"] == "undetermined"
    assert "sub-01_T1w.nii" in (out / "group.html").read_text()
