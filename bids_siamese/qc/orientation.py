"""Left-right orientation QC: image-based flip detection in template space, and the header verdict.

Image-based flip detection
--------------------------
After registration (which cannot reflect, see :mod:`bids_siamese.preproc.register`), a scan whose
voxel array was flipped left-right under an unchanged header shows up in template space as the
*mirror image* of a brain.

**Use a shear-free registration for this check** (``register_affine(..., dof=9)``): the
population's left-right asymmetry is largely a torque (right frontal and left occipital lobes
protruding), which an affine *shear* can imitate. A 12-dof registration of a flipped brain shears
it back towards the template's torque and removes most of the evidence (on the demo data the
statistic of flipped scans drops from about +0.35 with 9 dof to about +0.05 with 12 dof), whereas
rotations and scalings cannot reverse a torque. The MNI152NLin2009cAsym template is asymmetric (frontal/occipital
petalia, sulcal asymmetries) and the model grid is symmetric about x = 0, so mirroring is
``array[::-1]`` along axis 0.

Write ``a(x) = x - mirror(x)`` for the antisymmetric part of an image. Over a left-right symmetric
region, the difference proposed for this check,
``corr(mirror(brain), template) - corr(brain, template)``, equals ``-<a(brain), a(template)>``
divided by the images' total variance; it is dominated by the (large) symmetric variance. The
statistic used here is its scale-free version, averaged over two images that emphasise different
cues::

    statistic = -(corr(a(brain), a(template)) + corr(a(|grad brain|), a(|grad template|))) / 2

computed over ``mask | mirror(mask)`` on the registered head (not skull-stripped, so that the brain
mask's own asymmetry does not enter); gradients are Gaussian-derivative magnitudes
(sigma :data:`GRADIENT_SIGMA_VOXELS`), which emphasise tissue boundaries and are insensitive to
smooth bias fields. A brain with the template's asymmetry has statistic < 0, a flipped one > 0.

Three-way verdict: the scan against its own mirror
--------------------------------------------------
On real heads the *absolute* value of the statistic is biased: the registration aligns any brain's
outline and midline to the template's, which imprints part of the template's asymmetry on every
registered brain (a perfectly symmetric head scores about -0.37). A boundary fitted on heads rendered
from the template does not transfer. What holds on every real head tried is the *ordering* of a scan
and its mirror image. :func:`paired_flip_test` therefore registers both the scan and its array mirror
(each on its own, 9 dof) and uses ``difference = statistic(scan) - statistic(mirror)``. The mirror's
registration starts from the mirror of the scan's (:func:`mirrored_matrix`) and only refines it: what the
first registration found (pose, scale) is not searched for twice, and the refinement is what adapts the
mirror to the asymmetric template (on the real heads of the tests at 2 mm, differences within 0.008 of
registering the mirror from scratch, below the registration's own seed-to-seed spread of up to 0.029 on the
same heads, and the same verdicts; ``docs/benchmarks.md``, issue 27).

* ``lr_flip_verdict`` is ``flipped`` when ``difference >= LR_FLIP_MARGIN``, ``ok`` when
  ``difference <= -LR_FLIP_MARGIN``, and ``undetermined`` in between (a symmetric brain: the scan
  and its mirror look the same to the test) or when the usable-scan gate failed
  (:mod:`bids_siamese.qc.gate`);
* ``lr_flip_probability = 1 / (1 + exp(-LR_FLIP_SLOPE * difference))`` (no intercept: swapping the
  scan and its mirror negates the difference, so p(scan) = 1 - p(mirror)), ``None`` for an unusable
  scan; ``lr_flip_confidence = |2 p - 1|``.

:data:`LR_FLIP_SLOPE` and :data:`LR_FLIP_MARGIN` are fitted by ``benchmarks/calibrate_orientation.py``
on the demo dataset only; the real heads of the tests are never fitted on. Data, fit and the real-head
margins are in ``docs/benchmarks.md``.
"""
from __future__ import annotations

import math

import nibabel as nib
import numpy as np
from scipy import ndimage

from ..preproc.brain import brain_image
from ..preproc.conform import ORIENTATION_CHECKS
from ..preproc.grid import mirror, normalise_intensity, resample_mask_to_grid, resample_to_grid, template_on_grid
from ..preproc.register import register_affine
from ..resources import model_grid, template_brain_path
from . import INFORMATIONAL_CHECKS
from .gate import registration_measures, scan_gate

#: Degrees of freedom of the registration the flip test runs on (shear-free, see above).
QC_DOF = 9

#: Calibration of the paired difference (:func:`paired_flip_test`):
#: ``lr_flip_probability = 1 / (1 + exp(-LR_FLIP_SLOPE * difference))``. No intercept: the test is
#: symmetric in stored vs mirrored. Fitted by ``benchmarks/calibrate_orientation.py`` (Firth-penalised
#: logistic regression) on 24 scans of the small demo dataset (seed 0; 4 flipped) and their mirrors; the
#: data and the real-head margins are in ``docs/benchmarks.md``.
LR_FLIP_SLOPE = 4.7496

#: ``|difference|`` below this is ``undetermined`` (the test cannot tell the scan from its mirror): twice
#: the largest ``|difference|`` of 20 symmetrised demo heads (0.0175), whose differences are noise only.
LR_FLIP_MARGIN = 0.035

#: ``lr_flip_suspected`` (kept for older readers) is ``lr_flip_verdict == "flipped"``, i.e. p > 0.5
#: and ``|difference| >= LR_FLIP_MARGIN``.
LR_FLIP_THRESHOLD = 0.5

#: Gaussian sigma (in grid voxels) of the gradient-magnitude image.
GRADIENT_SIGMA_VOXELS = 1.0


def antisymmetric_correlation(image: np.ndarray, template: np.ndarray, region: np.ndarray) -> float:
    """Pearson correlation of ``image - mirror(image)`` and ``template - mirror(template)`` in ``region``.

    Returns 0.0 when either antisymmetric part is constant in the region.
    """
    a = (image - mirror(image))[region].astype(np.float64)
    b = (template - mirror(template))[region].astype(np.float64)
    a -= a.mean()
    b -= b.mean()
    denominator = math.sqrt(float((a * a).sum()) * float((b * b).sum()))
    return float((a * b).sum() / denominator) if denominator > 0 else 0.0


def _gradient_magnitude(volume: np.ndarray) -> np.ndarray:
    """Gaussian gradient magnitude (sigma :data:`GRADIENT_SIGMA_VOXELS`) as float32."""
    return ndimage.gaussian_gradient_magnitude(np.asarray(volume, dtype=np.float32), GRADIENT_SIGMA_VOXELS)


def flip_statistic(image_on_grid: np.ndarray, mask_on_grid: np.ndarray, template_on_grid: np.ndarray,
                   template_gradient: np.ndarray | None = None) -> float:
    """Evidence of a left-right flip (> 0: flipped-looking, < 0: template-like); see the module doc.

    ``image_on_grid`` is the registered head *without* skull stripping: only the voxels in
    ``mask | mirror(mask)`` count, and leaving the image unmasked keeps the brain mask's own left-right
    asymmetry (deepbet's mask is not mirror-symmetric) out of the statistic. ``template_gradient``: the
    template's gradient magnitude when already computed (:func:`paired_flip_test` scores two images).
    """
    brain = np.asarray(image_on_grid, dtype=np.float32)
    template = np.asarray(template_on_grid, dtype=np.float32)
    mask = np.asarray(mask_on_grid, dtype=bool)
    region = mask | mirror(mask)
    if not region.any():
        raise ValueError("the brain mask on the grid is empty")
    intensity = antisymmetric_correlation(brain, template, region)
    if template_gradient is None:
        template_gradient = _gradient_magnitude(template)
    gradient = antisymmetric_correlation(_gradient_magnitude(brain), template_gradient, region)
    return -(intensity + gradient) / 2.0


def _logistic(z: float) -> float:
    if z >= 0:
        return 1.0 / (1.0 + math.exp(-z))
    e = math.exp(z)
    return e / (1.0 + e)


def lr_flip_probability(difference: float) -> float:
    """Calibrated probability (0..1) that the scan is left-right flipped, from the paired difference."""
    return _logistic(LR_FLIP_SLOPE * float(difference))


def mirrored_scan(img, mask: np.ndarray):
    """The scan and its brain mask with the voxel array mirrored along array axis 0, header unchanged.

    On a conformed (closest-RAS) image axis 0 is the left-right voxel axis, so this is the image a
    left-right flip under an unchanged header would have produced.
    """
    data = np.asarray(img.get_fdata(dtype=np.float32))
    out = nib.Nifti1Image(np.ascontiguousarray(data[::-1]), np.asarray(img.affine))
    out.header.set_xyzt_units("mm")
    return out, np.ascontiguousarray(np.asarray(mask, dtype=bool)[::-1])


def mirrored_matrix(matrix: np.ndarray, affine: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """The mirror of a template-to-subject matrix: where :func:`mirrored_scan`'s image meets the mirrored template.

    With ``F = affine @ V @ inv(affine)`` (``V`` reverses voxel axis 0 of an image of ``shape``: the world map
    of :func:`mirrored_scan`) and ``S = diag(-1, 1, 1)`` (the template's mirror about x = 0, as the model grid
    is), this is ``F @ matrix @ S``: the mirrored scan registered to a mirrored template. Both reflections
    cancel in the determinant, so the result is a proper registration. The template is only nearly symmetric,
    so this is the start of the mirror's registration (``register_affine(initial=...)``), not its result.

    Examples:
        >>> affine = np.diag([1.0, 1.0, 1.0, 1.0]); affine[0, 3] = -90.0
        >>> shift = np.eye(4); shift[0, 3] = 5.0  # the template sits 5 mm to the right in the scan
        >>> mirrored_matrix(shift, affine, (181, 217, 181))[0].tolist()  # so its mirror sits 5 mm to the left
        [1.0, 0.0, 0.0, -5.0]
    """
    flip = np.eye(4)
    flip[0, 0], flip[0, 3] = -1.0, float(shape[0] - 1)
    affine = np.asarray(affine, dtype=np.float64)
    world_flip = affine @ flip @ np.linalg.inv(affine)
    return world_flip @ np.asarray(matrix, dtype=np.float64) @ np.diag([-1.0, 1.0, 1.0, 1.0])


def registered_statistic(img, mask: np.ndarray, grid, template_on_grid: np.ndarray, *, resolution: float = 2.0,
                         seed: int = 0, n_threads: int | None = 1, device: str = "cpu",
                         matrix: np.ndarray | None = None, initial: np.ndarray | None = None,
                         template_gradient: np.ndarray | None = None) -> tuple[float, np.ndarray, np.ndarray]:
    """:func:`flip_statistic` of a native scan after its own shear-free (9-dof) registration.

    Args:
        img: the conformed T1w (any voxel grid), ``mask`` its boolean brain mask.
        grid, template_on_grid: the model grid and the template brain on it.
        matrix: an existing 9-dof template-to-subject matrix for ``img`` (skips the registration).
        initial: a start for the registration (``register_affine(initial=...)``; ignored with ``matrix``).
        template_gradient: passed on to :func:`flip_statistic`.

    Returns:
        ``(statistic, template_to_subject, mask_on_grid)``.
    """
    brain = brain_image(img, mask)
    if matrix is None:
        matrix = register_affine(brain, mask, nib.load(str(template_brain_path())), resolution=max(resolution, 2.0),
                                 seed=seed, device=device, n_threads=n_threads, dof=QC_DOF, initial=initial)
    head_on_grid = resample_to_grid(img, matrix, grid)  # registered through the brain, scored on the head
    mask_on_grid = resample_mask_to_grid(mask, brain.affine, matrix, grid)
    statistic = flip_statistic(head_on_grid, mask_on_grid, template_on_grid, template_gradient)
    return float(statistic), np.asarray(matrix), mask_on_grid


def paired_flip_test(img, mask: np.ndarray, grid, template_on_grid: np.ndarray, *, warm_start: bool = True,
                     **kwargs) -> dict:
    """The left-right test that compares a scan with its own mirror (see "Three-way verdict" in the module doc).

    Both the scan and its array mirror (:func:`mirrored_scan`) are registered (9 dof) and scored with
    :func:`flip_statistic`; ``difference = statistic(stored) - statistic(mirrored)`` is > 0 when the
    stored scan looks more flipped than its mirror. Swapping the scan and its mirror negates the
    difference exactly in expectation, and a left-right symmetric brain gives about 0.

    The mirror's registration starts from the mirror of the stored scan's (:func:`mirrored_matrix`) and only
    refines it (``register_affine(initial=...)``), instead of searching from scratch; ``warm_start=False``
    registers it from scratch (the reference the tests compare with).

    Keyword arguments go to :func:`registered_statistic` (``matrix`` applies to the stored scan only).

    Returns:
        ``{"statistic", "mirrored_statistic", "difference", "matrix", "mirrored_matrix", "mask_on_grid"}``
        (``matrix`` and ``mask_on_grid``: the stored scan's).
    """
    kwargs.setdefault("template_gradient", _gradient_magnitude(template_on_grid))
    stored, matrix, mask_on_grid = registered_statistic(img, mask, grid, template_on_grid, **kwargs)
    kwargs.pop("matrix", None)
    mirror_img, mirror_mask = mirrored_scan(img, mask)
    initial = mirrored_matrix(matrix, img.affine, img.shape) if warm_start else None
    mirrored, mirror_matrix, _ = registered_statistic(mirror_img, mirror_mask, grid, template_on_grid,
                                                      initial=initial, **kwargs)
    return {"statistic": stored, "mirrored_statistic": mirrored, "difference": stored - mirrored, "matrix": matrix,
            "mirrored_matrix": mirror_matrix, "mask_on_grid": mask_on_grid}


def lr_flip_verdict(difference: float, usable: bool = True) -> dict:
    """Three-way verdict from :func:`paired_flip_test`'s ``difference`` (and the usable-scan gate).

    Returns:
        ``lr_flip_verdict`` (``ok | flipped | undetermined``), ``lr_flip_probability`` (None for an
        unusable scan), ``lr_flip_confidence`` (``|2 p - 1|``: 0 no information, 1 certain; 0 for an
        unusable scan) and ``lr_flip_suspected`` (verdict is ``flipped``).
    """
    if not usable or not math.isfinite(difference):
        return {"lr_flip_verdict": "undetermined", "lr_flip_probability": None, "lr_flip_confidence": 0.0,
                "lr_flip_suspected": False}
    probability = _logistic(LR_FLIP_SLOPE * float(difference))
    if abs(difference) < LR_FLIP_MARGIN:
        verdict = "undetermined"
    else:
        verdict = "flipped" if difference > 0 else "ok"
    return {"lr_flip_verdict": verdict, "lr_flip_probability": probability,
            "lr_flip_confidence": abs(2.0 * probability - 1.0), "lr_flip_suspected": verdict == "flipped"}


def mark_informational(checks: list[dict]) -> list[dict]:
    """Copies of the header-check records with ``informational: true`` on :data:`INFORMATIONAL_CHECKS`."""
    return [{**c, "informational": True} if c.get("name") in INFORMATIONAL_CHECKS else dict(c) for c in checks]


def failed_header_checks(checks: list[dict]) -> list[str]:
    """Names of the header checks that failed, leaving out informational ones (obliquity)."""
    return [c["name"] for c in checks
            if not c.get("passed", True) and not c.get("informational") and c.get("name") not in INFORMATIONAL_CHECKS]


def scan_orientation_report(img, mask: np.ndarray, checks: list[dict], *, resolution: float = 2.0, seed: int = 0,
                            n_threads: int | None = 1, device: str = "cpu", matrix: np.ndarray | None = None) -> dict:
    """The per-scan orientation QC record (``*_desc-orientation_qc.json``) of a conformed T1w.

    Runs the usable-scan gate (:mod:`bids_siamese.qc.gate`) and the paired left-right test
    (:func:`paired_flip_test`) and combines them into the three-way verdict.

    Args:
        img: the conformed T1w, ``mask`` its boolean brain mask (same grid).
        checks: the raw file's header checks (:func:`~bids_siamese.preproc.conform.header_checks`).
        resolution, seed, n_threads, device: of the 9-dof registrations.
        matrix: the stored scan's 9-dof template-to-subject matrix when already computed.
    """
    grid = model_grid(max(float(resolution), 2.0))
    template, template_mask = template_on_grid(grid)
    mask = np.asarray(mask, dtype=bool)
    test = paired_flip_test(img, mask, grid, template, resolution=resolution, seed=seed, n_threads=n_threads,
                            device=device, matrix=matrix)
    brain = brain_image(img, mask)
    mask_on_grid = test["mask_on_grid"]
    correlation = 0.0
    if mask_on_grid.sum() > 1:
        on_grid = normalise_intensity(resample_to_grid(brain, test["matrix"], grid), mask_on_grid)
        x, y = on_grid[mask_on_grid].astype(np.float64), template[mask_on_grid].astype(np.float64)
        if x.std() > 0 and y.std() > 0:
            correlation = float(np.corrcoef(x, y)[0, 1])
    measures = registration_measures(mask, img.affine, test["matrix"], template_mask, grid.affine, correlation)
    gate = scan_gate(measures)
    verdict = lr_flip_verdict(test["difference"], usable=gate["usable"])
    checks = mark_informational(checks)
    obliquity = next((c.get("detail", "") for c in checks if c.get("name") == "obliquity"), "")
    return {
        **gate,
        **verdict,
        "lr_flip_source": "image",
        "lr_flip_threshold": float(LR_FLIP_THRESHOLD),
        "lr_flip_margin": float(LR_FLIP_MARGIN),
        "lr_flip_statistic": round(test["statistic"], 5),
        "lr_flip_statistic_mirrored": round(test["mirrored_statistic"], 5),
        "lr_flip_difference": round(test["difference"], 5),
        "header_verdict": header_orientation_verdict(checks),
        "header_checks": checks,
        "obliquity": obliquity,
        **measures,
    }


#: With a trained orientation model (``participant --orientation-model``) the verdict is
#: ``undetermined`` when its symmetrised confidence ``|2 p - 1|`` is below this (p between 0.25 and 0.75):
#: a design choice, not fitted (the model's held-out probabilities on the demo are near 0 or 1).
LR_MODEL_MARGIN = 0.5


def model_verdict(p_stored: float, p_mirrored: float, usable: bool = True) -> dict:
    """Three-way verdict from a trained orientation model's p(flipped) of the scan and of its mirror.

    ``lr_flip_probability = (p_stored + 1 - p_mirrored) / 2`` is symmetric in the scan and its mirror (a
    symmetric brain gives 0.5); an unusable scan gets no probability and ``undetermined``.
    """
    if not usable:
        return {"lr_flip_verdict": "undetermined", "lr_flip_probability": None, "lr_flip_confidence": 0.0,
                "lr_flip_suspected": False}
    probability = (float(p_stored) + 1.0 - float(p_mirrored)) / 2.0
    confidence = abs(2.0 * probability - 1.0)
    verdict = "undetermined" if confidence < LR_MODEL_MARGIN else "flipped" if probability > 0.5 else "ok"
    return {"lr_flip_verdict": verdict, "lr_flip_probability": probability, "lr_flip_confidence": confidence,
            "lr_flip_suspected": verdict == "flipped"}


def with_model_verdict(report: dict, p_stored: float, p_mirrored: float, model_source: str) -> dict:
    """The orientation QC record with the verdict taken from a trained model; the image test's verdict is kept
    under ``image_lr_flip_verdict`` / ``image_lr_flip_probability``."""
    out = dict(report)
    out["image_lr_flip_verdict"] = report["lr_flip_verdict"]
    out["image_lr_flip_probability"] = report["lr_flip_probability"]
    out.update(model_verdict(p_stored, p_mirrored, usable=bool(report.get("usable", True))))
    out.update(lr_flip_source=f"model: {model_source}", model_p_flipped=round(float(p_stored), 5),
               model_p_flipped_mirrored=round(float(p_mirrored), 5))
    return out


def header_orientation_verdict(checks: list[dict]) -> str:
    """One-line verdict on whether the header's orientation (and so left/right) can be trusted.

    Uses the records of :func:`bids_siamese.preproc.conform.header_checks`. Returns ``"reliable"``
    when every orientation-relevant check passed (``xform_codes``, ``qform_sform_match``, ``qfac``,
    ``zooms_match_affine``, ``axis_codes``), else ``"unreliable: <check>: <detail>; ..."``. Storage
    handedness and obliquity never make it unreliable (they are legitimate).
    """
    failed = [c for c in checks if c.get("name") in ORIENTATION_CHECKS and not c.get("passed", False)]
    if not failed:
        return "reliable"
    return "unreliable: " + "; ".join(f"{c['name']}: {c.get('detail', '')}" for c in failed)
