"""Orientation QC and the usable-scan gate on the real heads of ``tests/real_heads.py``.

For every head and variant (stored, array-mirrored, header-mirrored, re-stored in PIL voxel order)
it runs what the participant level runs per scan (header checks, conform, deepbet, the gate and the
paired left-right test of :func:`bids_siamese.qc.orientation.scan_orientation_report`) and prints one
line: the gate measurements, the statistics of the scan and of its mirror, the difference, the
verdict and the time. deepbet runs once per distinct conformed array (the re-stored variant conforms
to the stored array; the header-mirrored one to the array-mirrored one).

Usage::

    python benchmarks/orientation_real_heads.py --json /tmp/real_heads.json
    python benchmarks/orientation_real_heads.py --heads colin27 cropped --variants stored
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import real_heads  # noqa: E402


def brain_masks():
    """``extract_brain`` memoised on the conformed array's bytes."""
    from bids_siamese.preproc.brain import extract_brain

    cache: dict[str, object] = {}

    def mask_of(conformed, n_threads: int):
        import numpy as np

        key = hashlib.sha1(np.ascontiguousarray(conformed.get_fdata(dtype=np.float32)).tobytes()).hexdigest()
        if key not in cache:
            cache[key] = extract_brain(conformed, n_threads=n_threads)[0]
        return cache[key]

    return mask_of


def run_head(img, mask_of, resolution: float, n_threads: int) -> dict:
    from bids_siamese.preproc.conform import conform, header_checks
    from bids_siamese.qc.orientation import scan_orientation_report

    conformed = conform(img)
    mask = mask_of(conformed, n_threads)
    return scan_orientation_report(conformed, mask, header_checks(img), resolution=resolution, n_threads=1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--heads", nargs="*", default=[*real_heads.ASYMMETRIC, *real_heads.SYMMETRIC,
                                                       *real_heads.CROPPED])
    parser.add_argument("--variants", nargs="*", default=list(real_heads.VARIANTS))
    parser.add_argument("--resolution", type=float, default=2.0)
    parser.add_argument("--n-threads", type=int, default=1, help="torch threads for deepbet")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.n_threads))
    mask_of = brain_masks()
    rows = []
    for head in args.heads:
        stored = real_heads.load_head(head)
        for variant in args.variants:
            build, flipped = real_heads.VARIANTS[variant]
            t = time.perf_counter()
            qc = run_head(build(stored), mask_of, args.resolution, args.n_threads)
            seconds = time.perf_counter() - t
            row = {"head": head, "variant": variant, "truth_flipped": flipped, "seconds": round(seconds, 1),
                   **{k: v for k, v in qc.items() if k != "header_checks"}}
            rows.append(row)
            p = qc["lr_flip_probability"]
            print(f"{head:14s} {variant:16s} {qc['qc_status']:4s} vol {qc['brain_volume_cm3']:7.1f} "
                  f"corr {qc['template_correlation']:.3f} scales {'/'.join(f'{s:.2f}' for s in qc['affine_scales'])} "
                  f"det {qc['affine_determinant']:.2f} fov {qc['fov_coverage']:.3f} edges {','.join(qc['mask_edge_sides']) or '-'} "
                  f"| stat {qc['lr_flip_statistic']:+.4f} mirror {qc['lr_flip_statistic_mirrored']:+.4f} "
                  f"diff {qc['lr_flip_difference']:+.4f} p {'n/a' if p is None else f'{p:.3f}'} "
                  f"-> {qc['lr_flip_verdict']} (truth {'flipped' if flipped else 'ok'}) {seconds:.1f} s", flush=True)
            for reason in qc["qc_reasons"]:
                print(f"    reason: {reason}")
            if args.json:
                args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
