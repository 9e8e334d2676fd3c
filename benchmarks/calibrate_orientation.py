"""Fit the calibration of the paired left-right test: the logistic slope and the "undetermined" margin.

Each T1w scan of the given BIDS dataset(s) goes through the participant steps (load, conform, deepbet)
and :func:`bids_siamese.qc.orientation.paired_flip_test`, which registers the scan and its array mirror
(9 dof) and returns ``difference = statistic(scan) - statistic(mirror)``. The scan gives the example
``(difference, flipped)`` and its mirror the example ``(-difference, not flipped)`` (the test is
symmetric), with ``flipped`` from the demo truth (``lr_flipped``).

* Slope: a logistic regression with Firth's penalty (finite when the classes are separated, as they are on
  the demo), fitted on those examples; the intercept comes out at 0 by the symmetry and is not used.
* Margin: for each unflipped scan a *symmetrised* head is built from the demo truth: the head resampled
  to a 1 mm template-space box symmetric about x = 0, averaged with its mirror, and put back in the
  subject's pose (``template_to_subject @ box``). Its difference is noise only (no left-right
  information); the margin is twice the largest ``|difference|`` of these heads.

The calibration data are the demo dataset only: the real heads of ``tests/real_heads.py`` are the
test set (``benchmarks/orientation_real_heads.py``), never fitted on.

Usage::

    python benchmarks/calibrate_orientation.py /tmp/demo_small --limit 20 --json /tmp/flip_calibration.json
    python benchmarks/calibrate_orientation.py --from-json /tmp/flip_calibration.json   # refit only
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from participant import _set_thread_env, find_scans  # noqa: E402 - benchmarks/ is on sys.path when run

#: The symmetrised heads live on this 1 mm template-space box (symmetric about x = 0).
BOX_SHAPE = (192, 228, 200)


def symmetrised_head(img, template_to_subject: np.ndarray):
    """The head resampled to template space, averaged with its left-right mirror, put back in the subject's pose."""
    import nibabel as nib

    from bids_siamese.preproc.grid import resample_to_grid
    from bids_siamese.resources import Grid

    box = np.eye(4)
    box[:3, 3] = [-(BOX_SHAPE[0] - 1) / 2.0, -132.0, -78.0]
    grid = Grid(shape=BOX_SHAPE, affine=box)
    head = resample_to_grid(img, template_to_subject, grid, order=1)
    symmetric = (head + head[::-1]) / 2.0
    out = nib.Nifti1Image(symmetric.astype(np.float32), np.asarray(template_to_subject) @ box)
    out.header.set_xyzt_units("mm")
    return out


def examples_for_scan(scan, resolution: float, n_threads: int, reg_threads: int, symmetrise: bool) -> dict:
    """The paired difference of the scan (and of its symmetrised head when asked)."""
    from bids_siamese.preproc.brain import extract_brain
    from bids_siamese.preproc.conform import conform, load_t1w
    from bids_siamese.preproc.grid import template_on_grid
    from bids_siamese.qc.orientation import paired_flip_test, scan_orientation_report
    from bids_siamese.resources import model_grid

    grid = model_grid(max(resolution, 2.0))
    template, _ = template_on_grid(grid)
    out = {"scan": scan.path.name, "flipped": bool(scan.lr_flipped)}
    conformed = conform(load_t1w(scan.path))
    mask, _ = extract_brain(conformed, n_threads=n_threads)
    qc = scan_orientation_report(conformed, mask, [], resolution=resolution, n_threads=reg_threads)
    out.update(statistic=qc["lr_flip_statistic"], mirrored_statistic=qc["lr_flip_statistic_mirrored"],
               difference=qc["lr_flip_difference"],
               gate={k: qc[k] for k in ("brain_volume_cm3", "template_correlation", "affine_scales",
                                        "affine_determinant", "fov_coverage", "mask_edge_sides", "qc_status")})
    if symmetrise and not scan.lr_flipped and scan.template_to_subject is not None:
        sym = conform(symmetrised_head(load_t1w(scan.path), scan.template_to_subject))
        sym_mask, _ = extract_brain(sym, n_threads=n_threads)
        sym_test = paired_flip_test(sym, sym_mask, grid, template, resolution=resolution, n_threads=reg_threads)
        out["symmetrised_difference"] = sym_test["difference"]
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


def report(rows: list[dict]) -> tuple[float, float]:
    """Fit the slope and the margin; print them and how the examples fall."""
    d = np.array([r["difference"] for r in rows], dtype=float)
    y = np.array([r["flipped"] for r in rows], dtype=float)
    x = np.r_[d, -d]
    labels = np.r_[y, 1 - y]
    intercept, slope = firth_logistic(x, labels)
    p = 1.0 / (1.0 + np.exp(-slope * x))
    flipped, unflipped = x[labels == 1], x[labels == 0]
    print(f"scans: {len(d)} ({int(y.sum())} flipped); examples with mirrors: {len(x)}")
    print(f"difference unflipped: min {unflipped.min():+.4f} median {np.median(unflipped):+.4f} max {unflipped.max():+.4f}")
    print(f"difference flipped:   min {flipped.min():+.4f} median {np.median(flipped):+.4f} max {flipped.max():+.4f}")
    print(f"Firth logistic fit: intercept {intercept:+.4f} (0 by symmetry, not used)  LR_FLIP_SLOPE = {slope:.4f}")
    print(f"p(flip) unflipped: max {p[labels == 0].max():.4f}   flipped: min {p[labels == 1].min():.4f}")
    print(f"misclassified (sign): {int(np.sum((x > 0) != (labels == 1)))}/{len(x)}")
    gates = [r["gate"] for r in rows if "gate" in r]
    if gates:
        for key in ("brain_volume_cm3", "template_correlation", "affine_determinant", "fov_coverage"):
            v = np.array([g[key] for g in gates], dtype=float)
            print(f"gate {key}: min {v.min():.4g} 5th pct {np.percentile(v, 5):.4g} median {np.median(v):.4g} "
                  f"95th pct {np.percentile(v, 95):.4g} max {v.max():.4g}")
        scales = np.array([g["affine_scales"] for g in gates], dtype=float)
        print(f"gate affine_scales: min {scales.min():.4g} max {scales.max():.4g}")
        sides = np.array([len(g["mask_edge_sides"]) for g in gates])
        print(f"gate mask_edge_sides: {np.bincount(sides).tolist()} scans touching 0, 1, ... sides")
    sym = np.array([r["symmetrised_difference"] for r in rows if "symmetrised_difference" in r], dtype=float)
    margin = float("nan")
    if sym.size:
        margin = 2.0 * float(np.max(np.abs(sym)))
        print(f"symmetrised heads: {sym.size}, |difference| median {np.median(np.abs(sym)):.4f} "
              f"max {np.max(np.abs(sym)):.4f} -> LR_FLIP_MARGIN = {margin:.4f} (2 x max)")
    return slope, margin


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bids_dirs", type=Path, nargs="*")
    parser.add_argument("--resolution", type=float, default=2.0)
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--n-threads", type=int, default=1, help="torch threads for deepbet")
    parser.add_argument("--reg-threads", type=int, default=1, help="torch threads for registration")
    parser.add_argument("--no-symmetrised", action="store_true", help="skip the symmetrised heads (no margin)")
    parser.add_argument("--json", type=Path, default=None, help="write the examples here")
    parser.add_argument("--from-json", type=Path, default=None, help="refit from examples written before")
    args = parser.parse_args(argv)
    if args.from_json:
        report(json.loads(args.from_json.read_text()))
        return 0
    _set_thread_env(args.n_threads)
    rows = []
    for bids_dir in args.bids_dirs:
        for scan in find_scans(bids_dir, args.limit):
            t = time.perf_counter()
            row = examples_for_scan(scan, args.resolution, args.n_threads, args.reg_threads, not args.no_symmetrised)
            rows.append(row)
            sym = row.get("symmetrised_difference")
            print(f"{row['scan']}: truth flipped={row['flipped']} stat {row['statistic']:+.4f} "
                  f"mirror {row['mirrored_statistic']:+.4f} diff {row['difference']:+.4f}"
                  + ("" if sym is None else f" symmetrised diff {sym:+.4f}")
                  + f" ({time.perf_counter() - t:.1f} s)", flush=True)
            if args.json:
                args.json.write_text(json.dumps(rows, indent=1))
    if not rows:
        print("no scans found", file=sys.stderr)
        return 1
    report(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
