"""Pretrain an encoder on the demo's model-grid inputs with the app's own task (``group --task pretrain``), for
the issue-26 comparison of pretrained and randomly initialised encoders (docs/benchmarks.md, "Pretrained or not").

The inputs are the model-grid files that ``benchmarks/twins.py --inputs truth`` writes (the generator's true affine
and brain mask instead of the participant level); they carry completion records but no orientation QC record, so
the task is run through :func:`bids_siamese.train.task.run_task`, as ``benchmarks/twins.py`` runs the twin task,
instead of through the CLI's QC collection. The encoder goes to ``RESULTS/models/pretrain_<backbone>/`` for
``--init``.

Usage::

    python benchmarks/pretrain_demo.py --bids /tmp/demo_full --outputs /tmp/demo_full_truth4 --results /tmp/pre \
        --backbone unet --resolution 4 --epochs 4
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

from bids_siamese.bids.layout import resolve_participants
from bids_siamese.cli.parser import parse_args
from bids_siamese.train.pretrain import PretrainTask
from bids_siamese.train.task import run_task

from twins import link_outputs  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--bids", type=Path, required=True)
    p.add_argument("--outputs", type=Path, required=True, help="folder with the model-grid inputs (sub-*)")
    p.add_argument("--results", type=Path, required=True, help="group OUTPUT_DIR (links the sub-* folders)")
    p.add_argument("--backbone", default="unet")
    p.add_argument("--resolution", type=float, default=4.0)
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    link_outputs(args.outputs, args.results)
    argv = [str(args.bids), str(args.results), "group", "--task", "pretrain", "--backbone", args.backbone,
            "--resolution", f"{args.resolution:g}", "--epochs", str(args.epochs), "--patience", str(args.epochs),
            "--batch-size", str(args.batch_size), "--seed", str(args.seed), "--skip-bids-validation",
            "--omp-nthreads", str(args.threads), "--nprocs", str(args.threads), "--device", "cpu"]
    t0, c0 = time.perf_counter(), time.process_time()
    run_task(PretrainTask, parse_args(argv), resolve_participants(args.bids, []))
    print(f"pretrain {args.backbone}: {time.perf_counter() - t0:.0f} s wall, {time.process_time() - c0:.0f} s CPU; "
          f"encoder in {args.results / 'models' / f'pretrain_{args.backbone}'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
