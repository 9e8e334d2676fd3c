"""Benchmark of longitudinal change (decline vs stable) on the synthetic demo dataset.

Runs ``group --task longitudinal --mode train`` on the participant-level outputs of the demo dataset:
``--n-draws`` random family-aware, label-stratified sub-samplings (train/validation/test), one model per
sub-sampling, test metrics as mean +- std over them (the protocol of the published 3D-SiameseNet: 10 random
sub-samplings), then ``--mode apply`` with the saved model (it rewrites the metrics and predictions tables; the
training run's are kept as ``train_<name>`` in ``--results``). Prints one line per figure, next to a model-free
baseline: the change of the mean intensity of the difference image inside the brain, thresholded at the
validation-optimal value of each sub-sampling (same splits).

Usage::

    python benchmarks/longitudinal.py --bids /tmp/demo_small --outputs /tmp/demo_small_out \
        --results /tmp/longitudinal_bench --backbone regional --n-draws 10
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from bids_siamese.bids.layout import resolve_participants
from bids_siamese.cli.parser import parse_args
from bids_siamese.resources import model_grid
from bids_siamese.train.data import find_preproc, load_masks, load_volumes
from bids_siamese.train.evaluate import binary_metrics, choose_threshold, summarise
from bids_siamese.bids.derivatives import LONGITUDINAL_FILES
from bids_siamese.train.longitudinal import run_longitudinal

sys.path.insert(0, str(Path(__file__).parent))
from twins import add_training_options, link_outputs, metric_line, training_argv  # noqa: E402


def group_args(bids: Path, results: Path, args: argparse.Namespace, mode: str) -> list[str]:
    argv = [str(bids), str(results), "group", "--task", "longitudinal", "--mode", mode, "--backbone", args.backbone,
            "--resolution", f"{args.resolution:g}", *training_argv(args), "--n-draws",
            str(args.n_draws), "--seed", str(args.seed), "--device", "cpu", "--skip-bids-validation",
            "--omp-nthreads", str(args.threads), "--nprocs", str(args.threads)]
    if mode == "apply":
        argv += ["--model", str(results / "models" / f"longitudinal_{args.backbone}")]
    elif getattr(args, "init", None):
        argv += ["--init", str(args.init)]
    return argv


def baseline(results: Path, resolution: float, splits: pd.DataFrame, predictions: pd.DataFrame) -> pd.DataFrame:
    """Model-free baseline per sub-sampling: brain-mean of (later - earlier) session; more negative = decline
    (tissue loss darkens the T1w where CSF grows). Threshold chosen on each sub-sampling's validation pairs."""
    grid = model_grid(resolution)
    subjects = sorted(predictions["participant_id"].str.removeprefix("sub-").unique())
    scans = find_preproc(results, subjects)
    path = {(r.participant_id, str(r.session)): r.path for r in scans.itertuples()}
    scores = []
    for r in predictions.itertuples():
        a, b = path[(r.participant_id, str(r.session_a))], path[(r.participant_id, str(r.session_b))]
        va, vb = load_volumes([a, b], grid)[:, 0]
        mask = load_masks([a, b], grid).all(axis=0)
        scores.append(-float((vb - va)[mask].mean()))
    pred = predictions.assign(score=scores, y=(predictions["label"] == "decline").astype(float))
    rows = []
    for run, table in splits.groupby("run"):
        split = dict(zip(table["participant_id"], table["split"]))
        s = pred["participant_id"].map(split)
        val, test = pred[s == "validation"], pred[s == "test"]
        thr = choose_threshold(val["y"], val["score"]) if val["y"].nunique() == 2 else float(np.median(pred["score"]))
        rows.append({"run": run, **binary_metrics(test["y"], test["score"], thr)})
    return summarise(pd.DataFrame(rows), "baseline_")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--bids", type=Path, default=Path("/tmp/demo_small"))
    p.add_argument("--outputs", type=Path, default=Path("/tmp/demo_small_out"), help="participant-level outputs")
    p.add_argument("--results", type=Path, default=Path("/tmp/longitudinal_benchmark"))
    add_training_options(p, "regional")
    p.add_argument("--resolution", type=float, default=2.0)
    p.add_argument("--n-draws", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--init", type=Path, help="train from this pretrained encoder (group --task pretrain's folder)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    link_outputs(args.outputs, args.results)
    subjects = resolve_participants(args.bids, [])
    print(f"# longitudinal benchmark: backbone {args.backbone}, {args.resolution:g} mm grid, {args.n_draws} random "
          f"sub-samplings, {torch.get_num_threads()} threads, torch {torch.__version__}")
    t0 = time.perf_counter()
    run_longitudinal(parse_args(group_args(args.bids, args.results, args, "train")), subjects)
    train_s = time.perf_counter() - t0
    metrics = pd.read_csv(args.results / LONGITUDINAL_FILES["metrics"], sep="\t")
    sessions = {"session_a": str, "session_b": str}  # labels such as 01 stay strings
    predictions = pd.read_csv(args.results / LONGITUDINAL_FILES["predictions"], sep="\t", dtype=sessions)
    splits = pd.read_csv(args.results / LONGITUDINAL_FILES["splits"], sep="\t")
    history = pd.read_csv(args.results / LONGITUDINAL_FILES["history"], sep="\t")
    m = metrics.set_index("metric")["mean"]
    print(f"pairs: {len(predictions)} ({(predictions['label'] == 'decline').sum()} decline, "
          f"{(predictions['label'] == 'stable').sum()} stable); test pairs per sub-sampling: {int(m['n_test_pairs'])}")
    print(metric_line(metrics, "", f"learned {args.backbone}, decline vs stable (held-out test pairs)"))
    refitted = "refitted" in m.index
    if refitted:
        print(metric_line(metrics, "before_refit_", "before the refit (trained on the training pairs only, "
                                                    "validation decision point)"))
        penalties = ", ".join("%g" % m["l1_run%d" % r] for r in range(args.n_draws))
        folds = ", ".join("%g" % m["refit_folds_run%d" % r] for r in range(args.n_draws))
        sd = metrics.set_index("metric")["std"]
        print(f"refitted on training + validation pairs: chosen L1 per draw {penalties}; decision point from "
              f"out-of-fold predictions (folds per draw: {folds}), mean {m['threshold_p_decline_mean']:.3f}; "
              f"refitted model at the validation decision point (mean {m['threshold_p_decline_validation']:.3f}): "
              f"accuracy {100 * m['accuracy_validation_threshold']:.1f} +- "
              f"{100 * sd['accuracy_validation_threshold']:.1f}")
    labelled = predictions[predictions["label"].isin(["decline", "stable"])]
    y = (labelled["label"] == "decline").to_numpy()
    seen = labelled["split"].isin(["train", "validation"] if refitted else ["train"])
    in_sample = float(((labelled["predicted"] == "decline").to_numpy() == y)[seen.to_numpy()].mean())
    held = labelled["heldout_draws"] > 0
    thr = float(m["threshold_p_decline_mean"])
    oof = float(((labelled.loc[held, "p_decline_heldout"] >= thr).to_numpy() == y[held.to_numpy()]).mean())
    print(f"in-sample accuracy (saved model, its {int(seen.sum())} training pairs"
          f"{' incl. validation' if refitted else ''}): {in_sample:.3f}; held-out "
          f"accuracy of the out-of-sample p(decline) ({int(held.sum())} pairs, mean decision point {thr:.3f}): "
          f"{oof:.3f}")
    print(metric_line(baseline(args.results, args.resolution, splits, predictions), "baseline_",
                      "baseline mean difference image, decline vs stable"))
    epochs = history.groupby("run")["epoch"].max()
    card = json.loads((args.results / "models" / f"longitudinal_{args.backbone}" / "model_card.json").read_text())
    print(f"training: {len(epochs)} models, {epochs.mean():.1f} epochs each on average, "
          f"{history['volumes_per_second'].median():.1f} volumes/s (median over epochs), whole train run "
          f"{train_s:.0f} s; saved model: run 0 ({card['hyperparameters']['epochs_run']} epochs)")
    for role in ("metrics", "predictions"):  # --mode apply rewrites both: keep the training run's as train_<name>
        name = LONGITUDINAL_FILES[role]
        (args.results / f"train_{Path(name).name}").write_bytes((args.results / name).read_bytes())
    t1 = time.perf_counter()
    run_longitudinal(parse_args(group_args(args.bids, args.results, args, "apply")), subjects)
    applied = pd.read_csv(args.results / LONGITUDINAL_FILES["predictions"], sep="\t", dtype=sessions)
    same = np.allclose(applied["p_decline"], predictions["p_decline"], atol=1e-3)
    print(f"apply (--model, no training): {time.perf_counter() - t1:.0f} s, predictions "
          f"{'reproduce' if same else 'DIFFER FROM'} the training run")
    return 0


if __name__ == "__main__":
    sys.exit(main())
