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

computed over ``mask | mirror(mask)``; gradients are Gaussian-derivative magnitudes
(sigma :data:`GRADIENT_SIGMA_VOXELS`), which emphasise tissue boundaries and are insensitive to
smooth bias fields. A correctly oriented brain shares the template's asymmetry (statistic < 0);
a flipped one has the opposite asymmetry (statistic > 0).

The statistic is turned into ``lr_flip_probability = 1 / (1 + exp(-(LR_FLIP_INTERCEPT +
LR_FLIP_SLOPE * statistic)))``, with the parameters fitted by L2-regularised logistic regression
(``benchmarks/calibrate_orientation.py``; fit and data in ``docs/benchmarks.md``), and
``lr_flip_suspected = lr_flip_probability > LR_FLIP_THRESHOLD``.
"""
from __future__ import annotations

import math

import numpy as np
from scipy import ndimage

from ..preproc.conform import ORIENTATION_CHECKS

#: Logistic calibration of :func:`flip_statistic`: Firth-penalised logistic regression fitted by
#: ``benchmarks/calibrate_orientation.py`` on the synthetic demo dataset (``--size small``, seed 0:
#: 56 scans, each as stored and array-flipped = 112 examples, 9-dof registration, 2 mm grid).
#: The decision boundary (p = 0.5) is at statistic = -0.067. The demo subjects are rendered from
#: the template and share its asymmetry, so on real scans these probabilities are optimistic:
#: refit on real data with the same script when such data are available.
LR_FLIP_INTERCEPT = 0.7491
LR_FLIP_SLOPE = 11.2063

#: ``lr_flip_suspected`` is ``lr_flip_probability > LR_FLIP_THRESHOLD``.
LR_FLIP_THRESHOLD = 0.5

#: Gaussian sigma (in grid voxels) of the gradient-magnitude image.
GRADIENT_SIGMA_VOXELS = 1.0


def mirror(volume: np.ndarray) -> np.ndarray:
    """Left-right mirror of a volume on the model grid (axis 0 is x, symmetric about x = 0)."""
    return volume[::-1]


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


def flip_statistic(brain_on_grid: np.ndarray, mask_on_grid: np.ndarray, template_on_grid: np.ndarray) -> float:
    """Evidence of a left-right flip (> 0: flipped-looking, < 0: template-like); see the module doc."""
    brain = np.where(mask_on_grid, brain_on_grid, 0).astype(np.float32)
    template = np.asarray(template_on_grid, dtype=np.float32)
    mask = np.asarray(mask_on_grid, dtype=bool)
    region = mask | mirror(mask)
    if not region.any():
        raise ValueError("the brain mask on the grid is empty")
    intensity = antisymmetric_correlation(brain, template, region)
    gradient = antisymmetric_correlation(_gradient_magnitude(brain), _gradient_magnitude(template), region)
    return -(intensity + gradient) / 2.0


def lr_flip_probability(statistic: float) -> float:
    """Calibrated probability (0..1) that the scan is left-right flipped, from :func:`flip_statistic`."""
    z = LR_FLIP_INTERCEPT + LR_FLIP_SLOPE * float(statistic)
    if z >= 0:
        return 1.0 / (1.0 + math.exp(-z))
    e = math.exp(z)
    return e / (1.0 + e)


def orientation_check(
    brain_on_grid: np.ndarray, mask_on_grid: np.ndarray, template_on_grid: np.ndarray
) -> dict:
    """Image-based left-right flip check of a registered brain on the model grid.

    Args:
        brain_on_grid: the subject brain resampled to the model grid through a *shear-free*
            registration (``register_affine(..., dof=9)``), before intensity normalisation.
        mask_on_grid: its boolean brain mask on the grid.
        template_on_grid: the template brain on the same grid (:func:`~bids_siamese.preproc.grid.template_on_grid`).

    Returns:
        ``{"statistic": float, "lr_flip_probability": float, "lr_flip_suspected": bool}``.
    """
    statistic = flip_statistic(brain_on_grid, mask_on_grid, template_on_grid)
    probability = lr_flip_probability(statistic)
    return {
        "statistic": statistic,
        "lr_flip_probability": probability,
        "lr_flip_suspected": bool(probability > LR_FLIP_THRESHOLD),
    }


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
