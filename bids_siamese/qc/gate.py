"""Usable-scan gate: can the registration and the input be trusted enough to use the scan?

The gate reads a few measurements that every participant run already has (the native brain mask,
the shear-free template-to-subject matrix, the brain on the model grid) and turns them into
``qc_status`` (``pass | warn | fail``), ``usable`` (``qc_status != "fail"``) and ``qc_reasons``
(one short sentence per failed or borderline measurement).

A scan fails when

* its brain volume (deepbet's mask, CSF included) is outside :data:`BRAIN_VOLUME_CM3` (a cropped field of
  view or a wrong voxel size gives much less or much more),
* its correlation with the template on the model grid is below :data:`TEMPLATE_CORRELATION`,
* the affine's scales or determinant are far from 1 (:data:`AFFINE_SCALE`, :data:`AFFINE_DETERMINANT`;
  a registration that shrank the template onto a partial brain),
* the field of view does not cover the template brain (:data:`FOV_COVERAGE`: fraction of the template
  brain's grid voxels that map inside the image array), or
* the brain mask touches the field-of-view edge on :data:`EDGE_SIDES_FAIL` or more of the six sides
  (one side is normal: a tight field of view often cuts the brainstem).

Each threshold has a warning band inside the failure bound. The figures they come from (demo dataset
and real heads) are in ``docs/benchmarks.md`` ("Usable-scan gate"). Obliquity is information only:
oblique acquisitions are normal and never make a scan fail or warn.
"""
from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np

# orientation_qc_path: train/data.py, train/orientation.py and symmetry/run.py still import it from here; they
# should import it from bids.derivatives, its owner (then drop it from this line)
from ..bids.records import read_qc_record

LOG = logging.getLogger("bids_siamese.qc")

#: (fail below, warn below, warn above, fail above) brain volume in cm^3.
BRAIN_VOLUME_CM3 = (500.0, 800.0, 2400.0, 2800.0)
#: (fail below, warn below) Pearson correlation of the normalised brain with the template on the grid.
TEMPLATE_CORRELATION = (0.40, 0.55)
#: (fail outside [1/x, x], warn outside [1/y, y]) for each singular value of the 3x3 affine part.
AFFINE_SCALE = (1.45, 1.25)
#: (fail outside [1/x, x], warn outside [1/y, y]) for the determinant of the 3x3 affine part.
AFFINE_DETERMINANT = (2.2, 1.6)
#: (fail below, warn below) fraction of the template brain's grid voxels inside the image array.
FOV_COVERAGE = (0.90, 0.98)
#: number of field-of-view sides (of 6) the native brain mask touches: warn at :data:`EDGE_SIDES_WARN`,
#: fail at :data:`EDGE_SIDES_FAIL`. One side is normal (a tight field of view cuts the brainstem).
EDGE_SIDES_WARN = 2
EDGE_SIDES_FAIL = 3


def edge_sides(mask: np.ndarray, margin: int = 1) -> list[str]:
    """The array faces (``i-, i+, j-, j+, k-, k+``) where ``mask`` has a voxel within ``margin`` of the edge."""
    mask = np.asarray(mask, dtype=bool)
    touched = []
    for axis, name in enumerate("ijk"):
        lo = np.take(mask, range(margin), axis=axis)
        hi = np.take(mask, range(mask.shape[axis] - margin, mask.shape[axis]), axis=axis)
        if lo.any():
            touched.append(name + "-")
        if hi.any():
            touched.append(name + "+")
    return touched


def fov_coverage(template_to_subject: np.ndarray, image_affine: np.ndarray, image_shape: tuple[int, ...],
                 template_mask: np.ndarray, grid_affine: np.ndarray) -> float:
    """Fraction of the template brain's grid voxels that the registration maps inside the image array."""
    ijk = np.argwhere(np.asarray(template_mask, dtype=bool))
    if ijk.size == 0:
        raise ValueError("the template mask is empty")
    vox2vox = np.linalg.inv(np.asarray(image_affine, float)) @ np.asarray(template_to_subject, float) @ grid_affine
    points = ijk @ vox2vox[:3, :3].T + vox2vox[:3, 3]
    shape = np.asarray(image_shape[:3], float)
    inside = np.all((points >= -0.5) & (points <= shape - 0.5), axis=1)
    return float(inside.mean())


def registration_measures(
    native_mask: np.ndarray,
    native_affine: np.ndarray,
    template_to_subject: np.ndarray,
    template_mask_on_grid: np.ndarray,
    grid_affine: np.ndarray,
    template_correlation: float,
) -> dict:
    """The gate's measurements of one scan (pure; see the module doc).

    Args:
        native_mask: boolean brain mask on the conformed T1w's voxel grid.
        native_affine: that image's affine.
        template_to_subject: the (shear-free) template-to-subject matrix of the registration.
        template_mask_on_grid: the template brain mask on the model grid.
        grid_affine: the model grid's affine.
        template_correlation: Pearson correlation of the registered brain with the template.

    Returns:
        ``brain_volume_cm3``, ``template_correlation``, ``affine_scales`` (3 singular values,
        descending), ``affine_determinant``, ``fov_coverage``, ``mask_edge_sides`` (list of faces).
    """
    mask = np.asarray(native_mask, dtype=bool)
    voxel_ml = abs(float(np.linalg.det(np.asarray(native_affine, float)[:3, :3]))) / 1000.0
    linear = np.asarray(template_to_subject, float)[:3, :3]
    return {
        "brain_volume_cm3": round(float(mask.sum()) * voxel_ml, 1),
        "template_correlation": round(float(template_correlation), 4),
        "affine_scales": [round(float(s), 4) for s in np.linalg.svd(linear, compute_uv=False)],
        "affine_determinant": round(float(np.linalg.det(linear)), 4),
        "fov_coverage": round(fov_coverage(template_to_subject, native_affine, mask.shape,
                                           template_mask_on_grid, grid_affine), 4),
        "mask_edge_sides": edge_sides(mask),
    }


def _outside_ratio(value: float, bound: float) -> bool:
    return not (1.0 / bound <= value <= bound)


def scan_gate(measures: dict) -> dict:
    """``{"qc_status", "usable", "qc_reasons"}`` from :func:`registration_measures`' output.

    Missing or non-finite measurements fail the scan (a reason names them).
    """
    reasons_fail: list[str] = []
    reasons_warn: list[str] = []
    volume = float(measures.get("brain_volume_cm3", math.nan))
    corr = float(measures.get("template_correlation", math.nan))
    scales = [float(s) for s in measures.get("affine_scales", [])]
    det = float(measures.get("affine_determinant", math.nan))
    coverage = float(measures.get("fov_coverage", math.nan))
    sides = list(measures.get("mask_edge_sides", []))
    if not all(math.isfinite(v) for v in (volume, corr, det, coverage, *scales)) or len(scales) != 3:
        return {"qc_status": "fail", "usable": False, "qc_reasons": ["QC measurements missing or not finite"]}

    lo_fail, lo_warn, hi_warn, hi_fail = BRAIN_VOLUME_CM3
    if volume < lo_fail or volume > hi_fail:
        reasons_fail.append(f"brain volume {volume:.0f} cm3 outside {lo_fail:.0f}-{hi_fail:.0f} cm3 "
                            "(brain extraction or field of view failed)")
    elif volume < lo_warn or volume > hi_warn:
        reasons_warn.append(f"brain volume {volume:.0f} cm3 outside the usual {lo_warn:.0f}-{hi_warn:.0f} cm3")
    if corr < TEMPLATE_CORRELATION[0]:
        reasons_fail.append(f"template correlation {corr:.2f} below {TEMPLATE_CORRELATION[0]:.2f} (registration failed)")
    elif corr < TEMPLATE_CORRELATION[1]:
        reasons_warn.append(f"template correlation {corr:.2f} below {TEMPLATE_CORRELATION[1]:.2f}")
    scale_text = "/".join(f"{s:.2f}" for s in scales)
    if any(_outside_ratio(s, AFFINE_SCALE[0]) for s in scales):
        reasons_fail.append(f"affine scales {scale_text} outside 1/{AFFINE_SCALE[0]:g}-{AFFINE_SCALE[0]:g} "
                            "(registration failed)")
    elif any(_outside_ratio(s, AFFINE_SCALE[1]) for s in scales):
        reasons_warn.append(f"affine scales {scale_text} outside 1/{AFFINE_SCALE[1]:g}-{AFFINE_SCALE[1]:g}")
    if _outside_ratio(det, AFFINE_DETERMINANT[0]):
        reasons_fail.append(f"affine determinant {det:.2f} outside 1/{AFFINE_DETERMINANT[0]:g}-{AFFINE_DETERMINANT[0]:g}")
    elif _outside_ratio(det, AFFINE_DETERMINANT[1]):
        reasons_warn.append(f"affine determinant {det:.2f} outside 1/{AFFINE_DETERMINANT[1]:g}-{AFFINE_DETERMINANT[1]:g}")
    if coverage < FOV_COVERAGE[0]:
        reasons_fail.append(f"field of view covers {100 * coverage:.0f} % of the template brain "
                            f"(< {100 * FOV_COVERAGE[0]:.0f} %)")
    elif coverage < FOV_COVERAGE[1]:
        reasons_warn.append(f"field of view covers {100 * coverage:.0f} % of the template brain")
    if len(sides) >= EDGE_SIDES_FAIL:
        reasons_fail.append(f"brain mask touches the field-of-view edge on {len(sides)} sides ({', '.join(sides)})")
    elif len(sides) >= EDGE_SIDES_WARN:
        reasons_warn.append(f"brain mask touches the field-of-view edge ({', '.join(sides)})")
    status = "fail" if reasons_fail else "warn" if reasons_warn else "pass"
    return {"qc_status": status, "usable": status != "fail", "qc_reasons": reasons_fail + reasons_warn}


def record_usable(record: dict | None) -> bool:
    """Whether a scan's QC record (the JSON of ``*_desc-orientation_qc.json``) says it is usable.

    A missing record (None) or one written before the gate existed (no ``usable`` key) does not exclude the scan.

    Examples:
        >>> record_usable({"usable": False}), record_usable({"lr_flip_suspected": False}), record_usable(None)
        (False, True, True)
    """
    return True if record is None else bool(record.get("usable", True))


def qc_record_usable(qc_path: Path | str) -> bool:
    """Whether the ``*_desc-orientation_qc.json`` at ``qc_path`` says the scan is usable (:func:`record_usable`;
    the file is read by :func:`~bids_siamese.bids.derivatives.read_qc_record`).

    A file that exists but cannot be read (permissions, truncated or foreign JSON) makes the scan NOT usable:
    its gate verdict is unknown. That is logged at WARNING with the file and the fix.
    """
    try:
        return record_usable(read_qc_record(qc_path))
    except (OSError, ValueError) as err:
        LOG.warning("%s cannot be read (%s): the scan's usable-scan verdict is unknown, so it counts as not usable; "
                    "fix: rerun the participant level for it", qc_path, err)
        return False


def qc_summary_line(failed: list[str], checked: int | None = None) -> str:
    """The one line a run ends with about the usable-scan gate; ``checked``: the scans that reached it.

    Examples:
        >>> qc_summary_line([], checked=0)
        'usable-scan gate: no scan reached it (every scan failed before; see the FAILED lines)'
        >>> qc_summary_line([], checked=2)
        'usable-scan gate: all 2 scan(s) that reached it usable'
    """
    if checked == 0:
        return "usable-scan gate: no scan reached it (every scan failed before; see the FAILED lines)"
    if not failed:
        return "usable-scan gate: all scans usable" if checked is None else \
            f"usable-scan gate: all {checked} scan(s) that reached it usable"
    return (f"usable-scan gate: {len(failed)} scan(s) failed QC (usable: false; kept for inspection, left out of "
            f"group training and scoring): {', '.join(failed)}")
