"""The ``bids-siamese-demo`` command line (also ``python -m bids_siamese.synthetic``)."""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Sequence

from ..errors import UsageError, UserError
from .dataset import generate
from .params import GENERATOR_NAME, SIZES, SignalParams

#: Default number of worker processes of the command line (2 where the machine has 2 cores or more).
DEFAULT_JOBS = min(2, os.cpu_count() or 1)


class _Parser(argparse.ArgumentParser):
    """An argument parser whose usage errors become :class:`UsageError` (exit code 64, one line)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        """Turn argparse's usage error into a :class:`UsageError`."""
        raise UsageError(f"{message}; fix: see {self.prog} --help")


def build_parser() -> argparse.ArgumentParser:
    """The ``bids-siamese-demo`` command line."""
    parser = _Parser(
        prog=GENERATOR_NAME,
        description="Write a synthetic BIDS T1w dataset with twins, longitudinal decline, lesions and "
                    "orientation errors, plus its ground truth (default OUTDIR/sourcedata/truth).")
    parser.add_argument("outdir", type=Path, help="output BIDS directory (must be empty unless --overwrite)")
    parser.add_argument("--size", choices=sorted(SIZES, key=lambda k: SIZES[k].n_subjects), default="tiny",
                        help="tiny: 5 subjects / 7 scans (seconds); small: 40 subjects / 56 scans (minutes); "
                             "full: 240 subjects / 336 scans")
    parser.add_argument("--seed", type=int, default=0, help="random seed (same seed, same bytes)")
    parser.add_argument("--truth-dir", type=Path, default=None,
                        help="where to write the ground truth (default OUTDIR/sourcedata/truth)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace a previous demo dataset in OUTDIR (subject folders, top-level files, truth)")
    parser.add_argument("--family-regions", default=",".join(SignalParams().family_regions),
                        help="comma-separated atlas label name parts where the family signal lives "
                             "(default: %(default)s)")
    parser.add_argument("--jobs", type=int, default=DEFAULT_JOBS,
                        help="worker processes, one subject each (default %(default)s)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``bids-siamese-demo``; returns the exit code."""
    try:
        try:
            args = build_parser().parse_args(argv)
        except SystemExit as done:  # --help
            return int(done.code or 0)
        regions = tuple(r.strip() for r in args.family_regions.split(",") if r.strip())
        if not regions:
            raise UsageError("--family-regions is empty; fix: give at least one region, e.g. Thalamus")
        if args.jobs < 1:
            raise UsageError("--jobs must be at least 1; fix: pass --jobs 1 or more")
        started = time.perf_counter()
        table = generate(args.outdir, size=args.size, seed=args.seed, truth_dir=args.truth_dir,
                         overwrite=args.overwrite, jobs=args.jobs, params=SignalParams(family_regions=regions))
    except UserError as err:
        print(f"{GENERATOR_NAME}: error: {err}", file=sys.stderr)
        return err.exit_code
    truth = args.truth_dir or args.outdir / "sourcedata" / "truth"
    print(f"{GENERATOR_NAME}: wrote {len(table)} scans of {table['participant_id'].nunique()} participants to "
          f"{args.outdir} in {time.perf_counter() - started:.1f} s; ground truth in {truth}")
    return 0
