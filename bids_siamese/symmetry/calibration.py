"""The Siamese symmetry score relative to the group it is applied to: ``siamese_z``.

The network is trained on balanced simulated samples, so its probability is not calibrated on real scans: the
Youden threshold chosen on the validation samples let 0-43 % of the held-out lesion-free scans of the full demo
through, and the 95th percentile of 40 validation scans 19-35 % (docs/benchmarks.md). What does carry over is the
ranking. ``siamese_z`` therefore places each scan's logit in the distribution of the logits of the group being
scored, as ``asymmetry_score`` does with the asymmetry maps: a robust z of the logit (median and 1.4826 x MAD) over the
*reference scans*, every scan the model was not trained on (after ``--mode train``: the validation, test and
excluded scans; after ``--mode apply``: all but those the checkpoint was trained on, recognised by their file's
sha256). A dataset-wide shift of the logits (another scanner, another
population than the training data) moves the median with it instead of turning every scan into a detection. Most
scans of a study are lesion-free, and the median and MAD do not move much with a minority of abnormal ones. No
label enters: the threshold, ``siamese_z >= 3``, is fixed in advance (that of ``asymmetry_score``).

With fewer than :data:`MIN_REFERENCE_SCANS` reference scans the median and MAD are too uncertain: ``siamese_z``
is then ``n/a`` and ``siamese_suspected`` falls back to the checkpoint's threshold on the probability.
"""
from __future__ import annotations

import numpy as np

#: Decision point on ``siamese_z`` (as ``asymmetry_score > 3``).
SIAMESE_Z_THRESHOLD = 3.0
#: Fewest reference scans for a group-relative score.
MIN_REFERENCE_SCANS = 10
#: Floor of the robust sd of the reference logits, in logit units (a model that gives every scan nearly the same
#: logit, e.g. one barely trained, must not turn a tiny difference into a large z: with the floor, z >= 3 needs a
#: logit 0.75 above the median, p 0.5 -> 0.68). The four trained demo models had robust sds of 0.28-1.10.
MIN_LOGIT_SD = 0.25
def reference_statistics(reference_logits) -> dict:
    """``{"n_reference", "median_logit", "sd_logit"}`` of the reference scans' logits (NaN ignored); the median
    and sd are NaN with fewer than :data:`MIN_REFERENCE_SCANS` scans. Logits, not probabilities: a float32
    probability saturates at 1 for logits above ~17, and a model applied to data unlike its training data can put
    most scans there (docs/benchmarks.md, real heads).

    Examples:
        >>> stats = reference_statistics(np.zeros(12))
        >>> stats["n_reference"], stats["median_logit"], stats["sd_logit"]
        (12, 0.0, 0.25)
        >>> bool(np.isnan(reference_statistics([0.0, 0.4])["median_logit"]))
        True
    """
    values = np.asarray(reference_logits, dtype=float)
    values = values[np.isfinite(values)]
    if values.size < MIN_REFERENCE_SCANS:
        return {"n_reference": int(values.size), "median_logit": float("nan"), "sd_logit": float("nan")}
    median = float(np.median(values))
    sd = max(1.4826 * float(np.median(np.abs(values - median))), MIN_LOGIT_SD)
    return {"n_reference": int(values.size), "median_logit": median, "sd_logit": sd}


def siamese_z(logits, stats: dict) -> np.ndarray:
    """The robust z of ``logits`` against :func:`reference_statistics` (NaN without a reference).

    Examples:
        >>> siamese_z([0.0, 1.5], {"n_reference": 20, "median_logit": 0.0, "sd_logit": 0.5}).tolist()
        [0.0, 3.0]
    """
    return (np.asarray(logits, dtype=float) - float(stats["median_logit"])) / float(stats["sd_logit"])


def suspected(p, z, fallback_threshold: float) -> np.ndarray:
    """``z >= SIAMESE_Z_THRESHOLD`` where ``z`` is finite, else ``p >= fallback_threshold``.

    Examples:
        >>> suspected([0.9, 0.9], [1.0, np.nan], 0.5).tolist()
        [False, True]
    """
    p, z = np.asarray(p, dtype=float), np.asarray(z, dtype=float)
    return np.where(np.isfinite(z), z >= SIAMESE_Z_THRESHOLD, p >= float(fallback_threshold))
