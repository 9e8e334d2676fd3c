"""Fit the logistic calibration of the image-based left-right flip statistic.

Each T1w scan of the given BIDS dataset(s) yields two examples: the scan as stored and the scan with
its voxel array flipped along the left-right axis under the unchanged header. Both go through the
participant steps (load, conform, deepbet, affine registration, model grid) and
:func:`bids_siamese.qc.orientation.flip_statistic`; the label is "flipped" when exactly one of
(the demo truth's ``lr_flipped``, our extra flip) holds. The flipped example re-uses the deepbet mask
flipped the same way (deepbet is run once per scan) and is registered from scratch, with the
shear-free (9-dof) registration the orientation check is specified for.

The fit is a logistic regression ``p = 1 / (1 + exp(-(a + b * statistic)))`` with Firth's penalty
(Jeffreys prior), which stays finite when the two classes are perfectly separated, as they are on
synthetic data; it prints the parameters to paste into ``bids_siamese/qc/orientation.py``.

Usage::

    python benchmarks/calibrate_orientation.py /tmp/demo_small --resolution 2 --json /tmp/flip_calibration.json
    python benchmarks/calibrate_orientation.py --from-json /tmp/flip_calibration.json   # refit only
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from participant import QC_DOF, _set_thread_env, find_scans  # noqa: E402 - benchmarks/ is on sys.path when run


def examples_for_scan(path: Path, stored_flipped: bool, resolution: float, n_threads: int, reg_threads: int) -> list[dict]:
    """The stored and the array-flipped example of one scan: statistic and label for each."""
    import nibabel as nib

    from bids_siamese.preproc.brain import brain_image, extract_brain
    from bids_siamese.preproc.conform import conform, load_t1w
    from bids_siamese.preproc.grid import resample_mask_to_grid, resample_to_grid, template_on_grid
    from bids_siamese.preproc.register import register_affine
    from bids_siamese.qc.orientation import flip_statistic
    from bids_siamese.resources import model_grid, template_brain_path

    grid = model_grid(resolution)
    template, _ = template_on_grid(grid)
    fixed = nib.load(str(template_brain_path()))
    conformed = conform(load_t1w(path))
    mask, _ = extract_brain(conformed, n_threads=n_threads)
    out = []
    for extra_flip in (False, True):
        # conformed axis 0 is the scan's left-right voxel axis: flipping it flips the stored array
        img = nib.Nifti1Image(np.ascontiguousarray(conformed.get_fdata(dtype=np.float32)[::-1]), conformed.affine) if extra_flip else conformed
        m = np.ascontiguousarray(mask[::-1]) if extra_flip else mask
        brain = brain_image(img, m)
        matrix = register_affine(brain, m, fixed, resolution=resolution, seed=0, n_threads=reg_threads, dof=QC_DOF)
        on_grid = resample_to_grid(brain, matrix, grid)
        mask_on_grid = resample_mask_to_grid(m, brain.affine, matrix, grid)
        out.append({
            "scan": path.name,
            "extra_flip": extra_flip,
            "label": int(stored_flipped != extra_flip),
            "statistic": flip_statistic(on_grid, mask_on_grid, template),
        })
    return out


def firth_logistic(x: np.ndarray, y: np.ndarray, iterations: int = 200, tol: float = 1e-10) -> tuple[float, float]:
    """Intercept and slope of a one-feature logistic regression with Firth's bias-reducing penalty.

    Newton iterations on the penalised score ``X^T (y - p + h (1/2 - p))`` with ``h`` the diagonal of
    the weighted hat matrix (Firth 1993; Heinze & Schemper 2002), with step halving.
    """
    design = np.c_[np.ones_like(x), x]
    beta = np.zeros(2)

    def penalised_loglik(b: np.ndarray) -> float:
        eta = design @ b
        p = 1.0 / (1.0 + np.exp(-eta))
        w = p * (1 - p)
        info = design.T @ (design * w[:, None])
        loglik = np.sum(y * eta - np.logaddexp(0, eta))
        return float(loglik + 0.5 * np.linalg.slogdet(info)[1])

    current = penalised_loglik(beta)
    for _ in range(iterations):
        p = 1.0 / (1.0 + np.exp(-(design @ beta)))
        w = p * (1 - p)
        info = design.T @ (design * w[:, None])
        info_inv = np.linalg.inv(info)
        h = w * np.einsum("ij,jk,ik->i", design, info_inv, design)
        score = design.T @ (y - p + h * (0.5 - p))
        step = info_inv @ score
        scale = 1.0
        while scale > 1e-6:
            candidate = beta + scale * step
            value = penalised_loglik(candidate)
            if value >= current - 1e-12:
                break
            scale /= 2.0
        beta, previous, current = candidate, current, value
        if np.max(np.abs(scale * step)) < tol or abs(current - previous) < tol:
            break
    return float(beta[0]), float(beta[1])


def report(examples: list[dict]) -> tuple[float, float]:
    """Fit, and print the fit and how well it separates the examples."""
    x = np.array([e["statistic"] for e in examples], dtype=float)
    y = np.array([e["label"] for e in examples], dtype=float)
    intercept, slope = firth_logistic(x, y)
    p = 1.0 / (1.0 + np.exp(-(intercept + slope * x)))
    flipped, unflipped = x[y == 1], x[y == 0]
    print(f"examples: {len(x)} ({int(y.sum())} flipped, {int((1 - y).sum())} unflipped)")
    print(f"statistic unflipped: min {unflipped.min():+.4f} median {np.median(unflipped):+.4f} max {unflipped.max():+.4f}")
    print(f"statistic flipped:   min {flipped.min():+.4f} median {np.median(flipped):+.4f} max {flipped.max():+.4f}")
    print(f"Firth logistic fit: LR_FLIP_INTERCEPT = {intercept:.4f}  LR_FLIP_SLOPE = {slope:.4f}")
    print(f"decision boundary (p = 0.5): statistic = {-intercept / slope:+.4f}")
    print(f"p(flip) unflipped: max {p[y == 0].max():.4f}   flipped: min {p[y == 1].min():.4f}")
    errors = int(np.sum((p > 0.5) != (y == 1)))
    print(f"misclassified at 0.5: {errors}/{len(x)}")
    return intercept, slope


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bids_dirs", type=Path, nargs="*")
    parser.add_argument("--resolution", type=float, default=2.0)
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--n-threads", type=int, default=2, help="torch threads for deepbet")
    parser.add_argument("--reg-threads", type=int, default=1, help="torch threads for registration")
    parser.add_argument("--json", type=Path, default=None, help="write the examples here")
    parser.add_argument("--from-json", type=Path, default=None, help="refit from examples written before")
    args = parser.parse_args(argv)
    if args.from_json:
        report(json.loads(args.from_json.read_text()))
        return 0
    _set_thread_env(args.n_threads)
    examples = []
    for bids_dir in args.bids_dirs:
        for scan in find_scans(bids_dir, args.limit):
            t = time.perf_counter()
            pair = examples_for_scan(scan.path, bool(scan.lr_flipped), args.resolution, args.n_threads, args.reg_threads)
            examples.extend(pair)
            print(f"{scan.path.name}: truth flipped={scan.lr_flipped} stored {pair[0]['statistic']:+.4f} "
                  f"array-flipped {pair[1]['statistic']:+.4f} ({time.perf_counter() - t:.1f} s)", flush=True)
            if args.json:
                args.json.write_text(json.dumps(examples, indent=1))
    if not examples:
        print("no scans found", file=sys.stderr)
        return 1
    report(examples)
    return 0


if __name__ == "__main__":
    sys.exit(main())
