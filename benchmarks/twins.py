"""Benchmark of twin identification on the synthetic demo dataset (``bids-siamese-demo --size small``).

Runs the whole group level twice on the participant-level outputs of the demo dataset:

1. ``group --task twin --mode train`` (family-aware split, triplet training with batch-hard negatives,
   threshold on validation, test metrics over ``--n-draws`` draws of unrelated test pairs), and
2. ``group --task twin --mode apply --model <checkpoint>`` (no training; must reproduce the test metrics),

and prints the learned model's metrics next to the model-free baseline (voxel correlation of the two
registered brains, threshold chosen on the same validation pairs), one line per figure. The small demo
dataset has only 10 MZ families, so one split tests 2 MZ pairs: ``--seeds 0,1,2,3,4`` repeats the training
run on other family splits (other ``--seed``) and also prints the mean +- std over splits of the per-split
means. ``--throughput`` also measures training throughput (forward + backward volumes/s) of every backbone on
the 2 mm grid.

The group outputs go to ``--results`` (a folder that links the participant-level ``sub-*`` folders, so the
participant output folder itself is left untouched). With ``--inputs truth`` the model-grid inputs are made
without the participant level: every scan is resampled through the generator's true scan-to-template affine
and masked with its true brain mask (``benchmarks/symmetry.py``: what a registration without error gives), so
that the larger ``full`` demo (60 MZ pairs) can be benchmarked without an hour of preprocessing.

Usage::

    python benchmarks/twins.py --bids /tmp/demo_small --outputs /tmp/demo_small_out --results /tmp/twins_bench \
        --epochs 40 --throughput
    python benchmarks/twins.py --bids /tmp/demo_full --inputs truth --results /tmp/twins_full --seeds 0,1,2
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

import numpy as np
import pandas as pd
import torch

from bids_siamese.bids.layout import resolve_participants
from bids_siamese.cli.parser import MODEL_CHOICES, parse_args
from bids_siamese.resources import model_grid
from bids_siamese.bids.derivatives import TWIN_FILES
from bids_siamese.train.twins import run_twin

METRIC_ORDER = ("accuracy", "precision", "recall", "f1", "auc_roc")


def link_outputs(outputs: Path, results: Path) -> None:
    """Make ``results`` a group-level OUTPUT_DIR whose ``sub-*`` folders link to the participant outputs."""
    results.mkdir(parents=True, exist_ok=True)
    for item in sorted(outputs.iterdir()):
        target = results / item.name
        if item.name.startswith("sub-") and item.is_dir() and not target.exists():
            os.symlink(item.resolve(), target)
    for name in ("dataset_description.json", ".bidsignore"):
        if (outputs / name).is_file() and not (results / name).exists():
            (results / name).write_text((outputs / name).read_text())


def truth_outputs(bids: Path, results: Path, resolution: float) -> int:
    """Write the model-grid ``desc-preproc_T1w`` and brain mask of every demo scan into ``results`` from the
    generator's truth (true affine and mask); existing files are kept. Returns the number written."""
    import nibabel as nib

    from bids_siamese.bids.derivatives import init_output_dir
    from bids_siamese.bids.records import STATUS_OK, write_completion_record
    from symmetry import resample_with_truth

    truth = pd.read_csv(bids / "sourcedata" / "truth" / "scans.tsv", sep="\t", dtype=str)
    grid = model_grid(resolution)
    written = 0
    for _, row in truth.iterrows():
        rel = Path(row["path"])
        stem = rel.name.replace("_T1w.nii.gz", "")
        pre = results / rel.parent / f"{stem}_space-MNI152NLin2009cAsym_desc-preproc_T1w.nii.gz"
        brain = Path(str(pre).replace("desc-preproc_T1w", "desc-brain_mask"))
        if not pre.is_file():
            volume, mask = resample_with_truth(bids, row, resolution)
            pre.parent.mkdir(parents=True, exist_ok=True)
            nib.save(nib.Nifti1Image(volume, grid.affine), str(pre))
            nib.save(nib.Nifti1Image(mask.astype(np.uint8), grid.affine), str(brain))
            written += 1
        record = rel.parent / f"{stem}_desc-status_qc.json"
        if not (results / record).is_file():  # what the group level checks: the scan's results are complete
            write_completion_record(results, record, status=STATUS_OK, scan=rel.name, run_id="benchmark-truth",
                                    files=[p.relative_to(results).as_posix() for p in (pre, brain)])
    init_output_dir(results, bids)
    return written


def signal_check(bids: Path, results: Path, subjects: list[str], resolution: float) -> str:
    """Is the family signal in the inputs? Model-free AUC (MZ co-twins vs unrelated pairs, all subjects) of the
    Pearson correlation of the two brains' residuals (image minus the mean of all subjects) over the whole
    brain and over the generator's family regions only (``sourcedata/truth/truth.json``; neuromorphometrics
    labels): an upper reference that uses the truth of where the signal is, which no model is given."""
    from nilearn.image import resample_to_img
    import nibabel as nib
    from sklearn.metrics import roc_auc_score

    from bids_siamese.resources import atlas_paths
    from bids_siamese.train.data import find_preproc, first_scan_per_subject, load_volumes
    from bids_siamese.train.pairs import read_participants

    grid = model_grid(resolution)
    scans = first_scan_per_subject(find_preproc(results, subjects))
    volumes = load_volumes(list(scans["path"]), grid)[:, 0]
    regions = json.loads((bids / "sourcedata" / "truth" / "truth.json").read_text())["signal"]["family_regions"]
    image, labels, _ = atlas_paths("neuromorphometrics")
    names = pd.read_csv(labels).set_index("index")["name"]
    atlas = resample_to_img(nib.load(str(image)), nib.Nifti1Image(np.zeros(grid.shape, np.float32), grid.affine),
                            interpolation="nearest", force_resample=True, copy_header=True).get_fdata().astype(int)
    roi = np.isin(atlas, [i for i, n in names.items() if any(r in str(n) for r in regions)])
    brain = (volumes != 0).mean(axis=0) > 0.5
    table = read_participants(bids).set_index("participant_id")
    ids = scans["participant_id"].tolist()
    residual = volumes - volumes.mean(axis=0)
    out = []
    for name, mask in (("whole brain", brain), (f"family regions ({', '.join(regions)})", roi)):
        x = residual[:, mask]
        x = (x - x.mean(axis=1, keepdims=True)) / x.std(axis=1, keepdims=True)
        corr = x @ x.T / x.shape[1]
        y, score = [], []
        for i in range(len(ids)):
            for j in range(i + 1, len(ids)):
                fam_i, fam_j = table.at[ids[i], "family_id"], table.at[ids[j], "family_id"]
                related = isinstance(fam_i, str) and fam_i == fam_j
                if related and table.at[ids[i], "zygosity"] == "MZ":
                    y.append(1)
                elif related:
                    continue
                else:
                    y.append(0)
                score.append(corr[i, j])
        out.append(f"{name} {roc_auc_score(y, score):.3f}")
    return (f"signal check (residual correlation AUC, MZ vs unrelated, all {len(ids)} subjects, "
            f"{int(np.sum(y))} MZ pairs): " + ", ".join(out))


TRAINING_OPTIONS = ("epochs", "batch_size", "lr", "patience")


def add_training_options(p: argparse.ArgumentParser, backbone: str) -> None:
    """``--backbone`` and the training options, unset by default so that the app's defaults for the model apply."""
    p.add_argument("--backbone", default=backbone, choices=MODEL_CHOICES)
    p.add_argument("--epochs", type=int, default=None, help="default: the app's default for the backbone")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--patience", type=int, default=None)


def training_argv(args: argparse.Namespace) -> list[str]:
    """The CLI options for the training options that were given (see :func:`add_training_options`)."""
    return [x for name in TRAINING_OPTIONS if getattr(args, name, None) is not None
            for x in (f"--{name.replace('_', '-')}", str(getattr(args, name)))]


def group_args(bids: Path, results: Path, args: argparse.Namespace, mode: str, seed: int = 0) -> list[str]:
    argv = [str(bids), str(results), "group", "--task", "twin", "--mode", mode, "--backbone", args.backbone,
            "--resolution", f"{args.resolution:g}", "--n-draws", str(args.n_draws), "--seed", str(seed),
            "--device", "cpu", "--skip-bids-validation", "--omp-nthreads", str(args.threads),
            "--nprocs", str(args.threads), *training_argv(args)]
    if mode == "apply":
        argv += ["--model", str(results / "models" / f"twins_{args.backbone}")]
    elif getattr(args, "init", None):
        argv += ["--init", str(args.init)]
    if getattr(args, "no_explain", False):
        argv += ["--no-explain"]
    return argv


def metric_line(metrics: pd.DataFrame, prefix: str, label: str) -> str:
    m = metrics.set_index("metric")
    parts = []
    for name in METRIC_ORDER:
        key = f"{prefix}{name}"
        if key in m.index and pd.notna(m.loc[key, "mean"]):
            parts.append(f"{name} {100 * m.loc[key, 'mean']:.1f} +- {100 * m.loc[key, 'std']:.1f}")
    runs = int(m.loc[f"{prefix}auc_roc", "n_runs"]) if f"{prefix}auc_roc" in m.index else 0
    return f"{label}: " + ", ".join(parts) + f" (% , mean +- std over {runs} draws)"


def throughput(backbone: str, resolution: float, batch_size: int, steps: int = 3) -> float:
    """Training volumes/s (forward + backward + AdamW step) of a twin model on random inputs, on the CPU
    (``benchmarks/train_throughput.py``, which also counts FLOPs and runs on CUDA)."""
    from train_throughput import measure_training_step

    return measure_training_step(backbone, resolution, batch=batch_size, steps=steps, warmup=1).volumes_per_second


def train_and_report(args: argparse.Namespace, results: Path, subjects: list[str], seed: int, apply: bool
                     ) -> dict[str, float]:
    """Train (and with ``apply``, apply) on one family split; print its lines; return its metric means."""
    t0 = time.perf_counter()
    run_twin(parse_args(group_args(args.bids, results, args, "train", seed)), subjects)
    train_s = time.perf_counter() - t0
    trained = pd.read_csv(results / TWIN_FILES["metrics"], sep="\t")
    card = json.loads((results / "models" / f"twins_{args.backbone}" / "model_card.json").read_text())
    hyper = card["hyperparameters"]
    m = trained.set_index("metric")["mean"]
    print(f"test pairs: {int(m['n_test_mz_pairs'])} MZ, {int(m['n_test_dz_pairs'])} DZ, "
          f"{int(m['n_test_unrelated_pairs'])} unrelated; threshold (validation) distance {m['threshold_distance']:.4f}, "
          f"correlation {m['baseline_threshold_correlation']:.4f}")
    print(metric_line(trained, "", f"learned {args.backbone}, MZ vs unrelated"))
    print(metric_line(trained, "baseline_", "baseline voxel correlation, MZ vs unrelated"))
    print(metric_line(trained, "dz_", f"learned {args.backbone}, DZ vs unrelated"))
    print(metric_line(trained, "baseline_dz_", "baseline voxel correlation, DZ vs unrelated"))
    print(f"validation AUC: learned {m['validation_auc_roc']:.3f}, baseline {m['baseline_validation_auc_roc']:.3f}")
    print(f"training: {hyper['epochs_run']} epochs (best {hyper['best_epoch']}), {hyper['training_seconds']:.0f} s, "
          f"{hyper['volumes_per_second']:.1f} volumes/s; whole train run {train_s:.0f} s")
    if apply:
        t1 = time.perf_counter()
        run_twin(parse_args(group_args(args.bids, results, args, "apply", seed)), subjects)
        applied = pd.read_csv(results / TWIN_FILES["metrics"], sep="\t").set_index("metric")
        same = abs(applied.loc["auc_roc", "mean"] - m["auc_roc"]) < 1e-3
        print(f"apply (--model, no training): {time.perf_counter() - t1:.0f} s, test AUC "
              f"{applied.loc['auc_roc', 'mean']:.3f} ({'reproduces' if same else 'DIFFERS FROM'} the training run)")
    return {**m.to_dict(), "seconds": train_s}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--bids", type=Path, default=Path("/tmp/demo_small"))
    p.add_argument("--outputs", type=Path, default=Path("/tmp/demo_small_out"), help="participant-level outputs")
    p.add_argument("--results", type=Path, default=Path("/tmp/twins_benchmark"))
    p.add_argument("--inputs", choices=("participant", "truth"), default="participant",
                   help="model-grid inputs: the participant-level outputs (--outputs) or truth resampling")
    add_training_options(p, "regional")
    p.add_argument("--resolution", type=float, default=2.0)
    p.add_argument("--n-draws", type=int, default=10)
    p.add_argument("--seeds", default="0", help="comma-separated seeds: one family split and training run each")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--throughput", action="store_true", help="also measure volumes/s of every backbone")
    p.add_argument("--init", type=Path, help="train from this pretrained encoder (group --task pretrain's folder)")
    p.add_argument("--no-explain", action="store_true", help="skip the explanations (group --no-explain)")
    p.add_argument("--json", type=Path, help="write every split's metric means here")
    p.add_argument("--signal-check", action="store_true",
                   help="also print the model-free AUC with the truth of where the family signal is")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    subjects = resolve_participants(args.bids, [])
    print(f"# twins benchmark: {len(subjects)} subjects, backbone {args.backbone}, {args.resolution:g} mm grid, "
          f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}")

    seeds = [int(x) for x in args.seeds.split(",")]
    per_seed = []
    for k, seed in enumerate(seeds):
        results = args.results if k == 0 else args.results.with_name(f"{args.results.name}_seed{seed}")
        if args.inputs == "truth" and k > 0:  # the same inputs as the first split's folder
            link_outputs(args.results, results)
        elif args.inputs == "truth":
            t0 = time.perf_counter()
            n = truth_outputs(args.bids, results, args.resolution)
            print(f"truth resampling: {n} scans written in {time.perf_counter() - t0:.0f} s")
        else:
            link_outputs(args.outputs, results)
        print(f"## split seed {seed}")
        per_seed.append(train_and_report(args, results, subjects, seed, apply=k == 0))
    if args.json:
        args.json.write_text(json.dumps({"seeds": seeds, "backbone": args.backbone, "init": str(args.init or ""),
                                         "resolution": args.resolution, "splits": per_seed}, indent=1, default=float))
    if len(seeds) > 1:
        table = pd.DataFrame(per_seed)
        for prefix, label in (("", f"learned {args.backbone}, MZ vs unrelated"),
                              ("baseline_", "baseline voxel correlation, MZ vs unrelated"),
                              ("dz_", f"learned {args.backbone}, DZ vs unrelated"),
                              ("baseline_dz_", "baseline voxel correlation, DZ vs unrelated")):
            parts = [f"{name} {100 * table[prefix + name].mean():.1f} +- {100 * table[prefix + name].std():.1f}"
                     for name in METRIC_ORDER]
            print(f"over {len(seeds)} splits, {label}: " + ", ".join(parts) + " (%, mean +- std of the split means)")
        print(f"over {len(seeds)} splits: {int(table['n_test_mz_pairs'].sum())} MZ and "
              f"{int(table['n_test_dz_pairs'].sum())} DZ test pairs in all; training {table['seconds'].mean():.0f} s "
              f"per split on average")
    if args.signal_check:
        print(signal_check(args.bids, args.results, subjects, args.resolution))
    if args.throughput:
        for backbone in MODEL_CHOICES:
            vps = throughput(backbone, args.resolution, batch_size=2)
            print(f"throughput {backbone}: {vps:.2f} volumes/s (train step, batch 2, {args.resolution:g} mm, CPU, "
                  f"{torch.get_num_threads()} threads)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
