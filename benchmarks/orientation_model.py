"""Benchmark of the trainable left-right orientation model (``group --task orientation``) on the demo dataset.

Runs ``group --task orientation --mode train`` through the CLI code (family-aware folds: every scan scored by
a member that never saw it), then ``--mode apply --model <checkpoint>`` on the same outputs, and prints the
held-out AUC on mirrored copies, the accuracy, the CPU training time and the per-scan inference time.

With ``--inputs truth`` the model-grid inputs are made without the participant level (as in
``benchmarks/twins.py``): every scan resampled through the generator's true affine and masked with its true
brain mask; a truth-flipped scan becomes a mirrored brain, as after registration. The participant-level
image verdict that the group level reads (``lr_flip_verdict``: which scans are trusted as stored) is then
written from the demo truth, which is what the image test gives on the demo (all 56 small-demo scans right,
``benchmarks/calibrate_orientation.py``). With ``--inputs participant`` the participant outputs are linked.

Usage::

    python benchmarks/orientation_model.py --bids /tmp/demo_small --inputs truth --results /tmp/orient_small
    python benchmarks/orientation_model.py --bids /tmp/demo_full --inputs truth --results /tmp/orient_full
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import pandas as pd
import torch

from bids_siamese.bids.derivatives import GROUP_FILES


def truth_verdicts(bids: Path, results: Path) -> int:
    """Write a ``*_desc-orientation_qc.json`` per scan with the demo truth as the image verdict."""
    truth = pd.read_csv(bids / "sourcedata" / "truth" / "scans.tsv", sep="\t", dtype=str)
    for _, row in truth.iterrows():
        rel = Path(row["path"])
        stem = rel.name.replace("_T1w.nii.gz", "")
        flipped = str(row["lr_flipped"]).lower() == "true"
        qc = results / rel.parent / f"{stem}_desc-orientation_qc.json"
        qc.write_text(json.dumps({"participant_id": row["participant_id"], "session_id": row["session_id"],
                                  "scan": rel.name, "usable": True, "qc_status": "pass",
                                  "lr_flip_verdict": "flipped" if flipped else "ok",
                                  "lr_flip_source": "demo truth (benchmark)"}))
    return len(truth)


def main(argv: list[str] | None = None) -> int:
    from bids_siamese.cli.main import main as cli

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--bids", type=Path, required=True)
    p.add_argument("--outputs", type=Path, default=None, help="participant-level outputs (--inputs participant)")
    p.add_argument("--results", type=Path, required=True)
    p.add_argument("--inputs", choices=("participant", "truth"), default="truth")
    p.add_argument("--resolution", type=float, default=2.0)
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--patience", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"# orientation model benchmark: {args.bids}, {args.resolution:g} mm grid, "
          f"{platform.processor() or platform.machine()}, {args.threads} threads, torch {torch.__version__}, "
          f"load average {os.getloadavg()[0]:.1f}")
    if args.inputs == "truth":
        from twins import truth_outputs

        t0 = time.perf_counter()
        n = truth_outputs(args.bids, args.results, args.resolution)
        truth_verdicts(args.bids, args.results)
        print(f"truth resampling: {n} scans written in {time.perf_counter() - t0:.0f} s")
    else:
        from twins import link_outputs

        link_outputs(args.outputs, args.results)
    common = [str(args.bids), str(args.results), "group", "--task", "orientation", "--skip-bids-validation",
              "--resolution", f"{args.resolution:g}", "--nprocs", str(args.threads), "--omp-nthreads",
              str(args.threads), "--seed", str(args.seed), "-w", str(args.results.with_name(args.results.name + "_work"))]
    t0 = time.perf_counter()
    cpu0 = time.process_time()
    code = cli([*common, "--mode", "train", "--epochs", str(args.epochs), "--patience", str(args.patience),
                "--batch-size", str(args.batch_size), "--lr", str(args.lr)])
    wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    if code:
        return code
    metrics = pd.read_csv(args.results / GROUP_FILES["orientation_model_metrics"], sep="\t").set_index("metric")["value"]
    table = pd.read_csv(args.results / GROUP_FILES["orientation_model"], sep="\t")
    print(f"train: held-out AUC on mirrored copies {float(metrics['auc_mirrored_copies']):.4f}, accuracy "
          f"{float(metrics['accuracy']):.4f} ({int(float(metrics['n_scans_evaluated']))} scans stored + mirrored, "
          f"{int(float(metrics['folds']))} folds)")
    print(f"train: training {float(metrics['training_seconds']):.0f} s wall; whole group run {wall:.0f} s wall, "
          f"{cpu:.0f} s CPU (all threads)")
    print(f"train: ensemble inference {1000 * float(metrics['inference_seconds_per_volume']):.0f} ms per volume "
          f"({int(float(metrics['members']))} members, CPU; the participant check scores 2 volumes per scan)")
    flagged = table.loc[table["lr_flip_suspected"].astype(str).str.lower() == "true"]
    print(f"train: flagged as stored mirrored: {len(flagged)} "
          f"({', '.join(flagged['scan'])}); image verdict flipped: "
          f"{', '.join(table.loc[table['image_verdict'] == 'flipped', 'scan'])}")
    model = args.results / GROUP_FILES["orientation_model_folder"]
    t0 = time.perf_counter()
    code = cli([*common, "--mode", "apply", "--model", str(model)])
    if code:
        return code
    metrics = pd.read_csv(args.results / GROUP_FILES["orientation_model_metrics"], sep="\t").set_index("metric")["value"]
    print(f"apply: AUC on mirrored copies {float(metrics['auc_mirrored_copies']):.4f} (the ensemble saw these scans; "
          f"not a held-out figure), inference {1000 * float(metrics['inference_seconds_per_volume']):.0f} ms per "
          f"volume, whole group run {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
