"""Benchmark of the symmetry task on the synthetic demo dataset (``bids-siamese-demo``).

Ranks the scans with planted lesions against the lesion-free scans by

* the group-level ``asymmetry_score`` (dataset reference: template + all scans), and
* the Siamese hemisphere model (``small`` backbone, trained on the lesion-free scans of a training split with
  simulated lesions, applied to held-out lesion-free scans and to every planted-lesion scan),

and reports AUC overall and per lesion-volume bin, detection rate and false-positive rate at the default
thresholds (asymmetry_score > 3; p >= the threshold chosen on the validation samples; the group-relative
``siamese_z >= 3`` against every scan not trained on, as the app scores a group), plus the simulated-lesion
evaluation of the held-out scans.

Inputs: the participant-level outputs (``--outputs``, the model-grid ``desc-preproc`` T1w and mask); scans
without them are resampled from the raw data with the generator's true scan-to-template affine
(``sourcedata/truth/scans.tsv``) and its true brain mask, which is what the registration would give without
error (left-right flipped scans are mirrored after resampling, as the registration of a flipped image would
leave them).

Usage::

    python benchmarks/symmetry.py --bids /tmp/demo_small --outputs /tmp/demo_small_out --resolution 2 \
        --epochs 30 --results /tmp/symmetry_benchmark
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import torch
from scipy import ndimage as ndi

from bids_siamese.resources import TEMPLATE, model_grid
from bids_siamese.symmetry.analysis import template_reference
from bids_siamese.symmetry.asymmetry import (
    ASYMMETRY_THRESHOLD,
    DEFAULT_FWHM_MM,
    asymmetry_map,
    group_reference,
    positive_intensities,
    score_map,
    score_scan,
)
from bids_siamese.symmetry.calibration import SIAMESE_Z_THRESHOLD, reference_statistics, siamese_z
from bids_siamese.symmetry.model import build_symmetry_model
from bids_siamese.symmetry.normative import DEFAULT_COMPONENTS
from bids_siamese.atlas import atlas_on_grid
from bids_siamese.symmetry.regional import homologous_pairs, regional_asymmetry
from bids_siamese.symmetry.run import SPLIT_FRACTIONS
from bids_siamese.symmetry.simulate import LesionConfig, sphere_cross_section_mm2
from bids_siamese.symmetry.scans import prepare_scan
from bids_siamese.symmetry.train import (
    detection_figure,
    evaluate_detection,
    save_symmetry_checkpoint,
    siamese_logits,
    siamese_scorers,
    to_model_resolution,
    train_symmetry_model,
)
from bids_siamese.train.evaluate import safe_auc
from bids_siamese.train.loop import TrainConfig
from bids_siamese.train.pairs import subject_split

#: Volume bins (mm^3) for the planted demo lesions (the small demo set has two lesions in each: 98-8101 mm^3).
REAL_BINS = (50.0, 250.0, 1000.0, 3000.0, 10000.0)
#: Lesions at least this large (mm^3) must all be detected (issue 14's target).
LARGE_LESION_MM3 = 1500.0


def normalise(data: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Median 0 / IQR 1 inside the mask, 0 outside (the participant-level convention)."""
    med = float(np.median(data[mask]))
    q75, q25 = np.percentile(data[mask], [75, 25])
    return np.where(mask, (data - med) / max(q75 - q25, 1e-6), 0.0).astype(np.float32)


def resample_with_truth(bids_dir: Path, row: pd.Series, resolution: float) -> tuple[np.ndarray, np.ndarray]:
    """A raw scan on the model grid through the true scan-world -> template affine and the true brain mask."""
    grid = model_grid(resolution)
    img = nib.load(str(bids_dir / row["path"]))
    data = np.asanyarray(img.dataobj, dtype=np.float32)
    flipped = str(row["lr_flipped"]).lower() == "true"
    affine = img.affine.copy()
    if flipped:  # the true affine holds for the array flipped back along its left-right axis
        axis = int(np.argmax(np.abs(img.affine[0, :3])))
        data = np.flip(data, axis=axis)
    w2t = np.asarray(json.loads(row["world_to_template_affine"]), dtype=float)
    vox = np.linalg.inv(affine) @ np.linalg.inv(w2t) @ grid.affine  # grid voxel -> scan voxel
    mask_path = bids_dir / "sourcedata" / "truth" / "masks" / (Path(row["path"]).name.replace(".nii.gz", "") +
                                                                 "_desc-brain_mask.nii.gz")
    mask_img = np.asanyarray(nib.load(str(mask_path)).dataobj, dtype=np.float32)
    if flipped:
        mask_img = np.flip(mask_img, axis=int(np.argmax(np.abs(img.affine[0, :3]))))
    out = ndi.affine_transform(data, vox[:3, :3], vox[:3, 3], output_shape=grid.shape, order=1)
    mask = ndi.affine_transform(mask_img, vox[:3, :3], vox[:3, 3], output_shape=grid.shape, order=1) > 0.5
    if flipped:  # what the affine registration of the flipped image leaves: a mirrored brain
        out, mask = out[::-1], mask[::-1]
    return normalise(out, mask), mask


def load_from_outputs(out_dir: Path, row: pd.Series) -> tuple[np.ndarray, np.ndarray] | None:
    """The participant-level model-grid image and mask of a scan, or ``None``."""
    stem = Path(row["path"]).name.replace("_T1w.nii.gz", "")
    anat = out_dir / Path(row["path"]).parent
    pre = anat / f"{stem}_space-{TEMPLATE}_desc-preproc_T1w.nii.gz"
    msk = anat / f"{stem}_space-{TEMPLATE}_desc-brain_mask.nii.gz"
    if not (pre.is_file() and msk.is_file()):
        return None
    return (np.asanyarray(nib.load(str(pre)).dataobj, dtype=np.float32),
            np.asanyarray(nib.load(str(msk)).dataobj) > 0)


def load_dataset(bids_dir: Path, out_dir: Path | None, resolution: float, cache: Path | None) -> tuple[pd.DataFrame, list, list, str]:
    """Truth table, images and masks of every scan (participant outputs first, else truth resampling)."""
    truth = pd.read_csv(bids_dir / "sourcedata" / "truth" / "scans.tsv", sep="\t", dtype=str)
    res_label = f"{resolution:g}".replace(".", "p")
    volumes, masks, sources = [], [], []
    for _, row in truth.iterrows():
        key = Path(row["path"]).name.replace(".nii.gz", "")
        cached = cache / f"{key}_res-{res_label}.npz" if cache else None
        loaded = load_from_outputs(out_dir, row) if out_dir else None
        source = "participant outputs"
        if loaded is None:
            source = "true affine"
            if cached is not None and cached.is_file():
                z = np.load(cached)
                loaded = (z["volume"], z["mask"])
            else:
                loaded = resample_with_truth(bids_dir, row, resolution)
                if cached is not None:
                    cached.parent.mkdir(parents=True, exist_ok=True)
                    np.savez_compressed(cached, volume=loaded[0], mask=loaded[1])
        volumes.append(loaded[0])
        masks.append(loaded[1])
        sources.append(source)
    counts = pd.Series(sources).value_counts().to_dict()
    return truth, volumes, masks, ", ".join(f"{v} scans from {k}" for k, v in counts.items())


def per_bin_table(truth: pd.DataFrame, scores: pd.Series, threshold: float, bins=REAL_BINS) -> tuple[pd.DataFrame, dict]:
    """AUC and detection rate of the planted lesions per volume bin against all lesion-free scans."""
    lesion = truth["lesion"].str.lower().eq("true")
    clean = ~lesion
    vol = pd.to_numeric(truth["lesion_volume_template_mm3"], errors="coerce")
    cross = pd.to_numeric(truth["lesion_cross_section_template_mm2"], errors="coerce")
    rows = []
    for lo, hi in zip(bins[:-1], bins[1:]):
        sel = lesion & (vol >= lo) & (vol < hi)
        if not sel.any():
            continue
        y = np.r_[np.ones(int(sel.sum())), np.zeros(int(clean.sum()))]
        s = np.r_[scores[sel].to_numpy(), scores[clean].to_numpy()]
        rows.append({"bin_mm3": f"{lo:g}-{hi:g}", "n_lesion": int(sel.sum()),
                     "volume_mm3": round(float(vol[sel].median()), 0),
                     "cross_section_mm2": round(float(cross[sel].median()), 0),
                     "auc": round(safe_auc(y, s), 3),
                     "detection_rate": round(float((scores[sel] > threshold).mean()), 3)
                     if np.isfinite(threshold) else float("nan")})
    y = lesion[lesion | clean].astype(float).to_numpy()
    overall = {"auc": round(safe_auc(y, scores[lesion | clean].to_numpy()), 3),
               "false_positive_rate": round(float((scores[clean] > threshold).mean()), 3)
               if np.isfinite(threshold) else float("nan"),
               "n_lesion": int(lesion.sum()), "n_clean": int(clean.sum())}
    large = lesion & (vol >= LARGE_LESION_MM3)
    if np.isfinite(threshold):
        overall[f"detected_ge_{LARGE_LESION_MM3:g}mm3"] = f"{int((scores[large] > threshold).sum())} / {int(large.sum())}"
    return pd.DataFrame(rows), overall


def markdown(table: pd.DataFrame) -> str:
    """A pipe table (without the optional ``tabulate`` dependency)."""
    if table.empty:
        return "(none)"
    lines = ["| " + " | ".join(map(str, table.columns)) + " |", "|" + " --- |" * len(table.columns)]
    lines += ["| " + " | ".join(str(v) for v in row) + " |" for row in table.itertuples(index=False)]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bids", type=Path, default=Path("/tmp/demo_small"))
    p.add_argument("--outputs", type=Path, default=Path("/tmp/demo_small_out"))
    p.add_argument("--resolution", type=float, default=2.0)
    p.add_argument("--model-resolution", type=float, default=None,
                   help="grid of the Siamese model (block-averaged from --resolution; default: --resolution)")
    p.add_argument("--fwhm", type=float, default=DEFAULT_FWHM_MM)
    p.add_argument("--components", type=int, default=DEFAULT_COMPONENTS,
                   help="normative modes of the group reference (0: the voxelwise median reference)")
    p.add_argument("--atlas", default="harvard_oxford")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--patience", type=int, default=5)
    p.add_argument("--fusion", default="difference")
    p.add_argument("--backbone", default="small")
    p.add_argument("--no-difference-channel", action="store_true", help="image-only encoder input")
    p.add_argument("--save-model", type=Path, default=None,
                   help="also write the trained model as a checkpoint folder (for --mode apply, or "
                        "benchmarks/symmetry_heterogeneous.py --model)")
    p.add_argument("--samples-per-scan", type=int, default=2)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--no-model", action="store_true", help="only the asymmetry score")
    p.add_argument("--draws", type=int, default=2, help="simulated lesions per held-out scan and bin")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache", type=Path, default=None, help="folder caching truth-resampled scans")
    p.add_argument("--results", type=Path, default=Path("/tmp/symmetry_benchmark"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    res = args.resolution
    model_res = args.model_resolution or res
    args.results.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    truth, volumes, masks, source = load_dataset(args.bids, args.outputs if args.outputs.is_dir() else None, res,
                                                 args.cache)
    print(f"{len(truth)} scans ({source}); loading took {time.time() - t0:.0f} s", flush=True)
    lesion = truth["lesion"].str.lower().eq("true")
    flipped = truth["lr_flipped"].str.lower().eq("true")

    # --- asymmetry score (group reference) ---
    t1 = time.time()
    labels, names = atlas_on_grid(args.atlas, res)
    pairs = homologous_pairs(names)
    template = template_reference(res, args.fwhm, args.atlas)
    maps = [asymmetry_map(v, m, res, args.fwhm) for v, m in zip(volumes, masks)]
    regions = [regional_asymmetry(positive_intensities(v, m), m, labels, pairs) for v, m in zip(volumes, masks)]
    groups = truth["participant_id"].tolist()
    median_only = group_reference(maps, masks, regions, template, res, args.fwhm, components=0)
    truth["asymmetry_score_median"] = [score_map(a, m, res, median_only)["asymmetry_score"] for a, m in zip(maps, masks)]
    reference = median_only if args.components == 0 else group_reference(
        maps, masks, regions, template, res, args.fwhm, groups=groups, components=args.components)
    del median_only
    scored = [score_map(a, m, res, reference.member(i)) for i, (a, m) in enumerate(zip(maps, masks))]
    truth["asymmetry_score"] = [s["asymmetry_score"] for s in scored]
    truth["asymmetry_score_template"] = [score_map(a, m, res, template)["asymmetry_score"] for a, m in zip(maps, masks)]
    truth["raw_magnitude"] = [s["raw_magnitude"] for s in scored]
    score_seconds = time.time() - t1
    results: dict = {"scans": len(truth), "source": source, "resolution_mm": res, "fwhm_mm": args.fwhm,
                     "asymmetry_seconds": round(score_seconds, 1)}
    tables = {}
    for name, column, thr in ((f"asymmetry_score ({args.components} normative modes)", "asymmetry_score",
                               ASYMMETRY_THRESHOLD),
                              ("asymmetry_score (median reference, 0 modes)", "asymmetry_score_median",
                               ASYMMETRY_THRESHOLD),
                              ("asymmetry_score (template reference only)", "asymmetry_score_template", np.inf),
                              ("raw magnitude (mean |AI|)", "raw_magnitude", np.inf)):
        for subset, keep in (("all lesion-free", np.ones(len(truth), bool)), ("lesion-free, not flipped", ~flipped | lesion)):
            per_bin, overall = per_bin_table(truth[keep].reset_index(drop=True),
                                             truth.loc[keep, column].reset_index(drop=True), thr)
            tables[(name, subset)] = per_bin
            results[f"{name} | {subset}"] = overall
    print(json.dumps({k: v for k, v in results.items() if "|" in k}, indent=1), flush=True)

    # --- Siamese model ---
    if not args.no_model:
        families = dict(zip(truth["participant_id"], truth["family_id"]))
        healthy = truth.index[~lesion & ~flipped].tolist()
        split = subject_split(sorted({truth.at[i, "participant_id"] for i in healthy}), families, args.seed,
                              SPLIT_FRACTIONS)
        parts = {k: [i for i in healthy if split[truth.at[i, "participant_id"]] == k] for k in ("train", "validation", "test")}
        print({k: len(v) for k, v in parts.items()}, flush=True)
        config = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, seed=args.seed, lr=args.lr, flip_lr=True,
                             patience=args.patience, progress=True)
        torch.set_num_threads(args.threads)
        torch.manual_seed(args.seed)
        model = build_symmetry_model(args.backbone, args.fusion, 64, difference_channel=not args.no_difference_channel)

        def small(i: int):
            v, m = to_model_resolution(volumes[i], masks[i], res, model_res)
            return prepare_scan(v, m, model_res, str(i))

        t2 = time.time()
        result, info = train_symmetry_model(model, [small(i) for i in parts["train"]],
                                            [small(i) for i in parts["validation"]], config, model_res,
                                            samples_per_scan=args.samples_per_scan)
        model, history = result.model, result.history
        train_seconds = time.time() - t2
        history.to_csv(args.results / "training.tsv", sep="\t", index=False)
        if args.save_model is not None:
            save_symmetry_checkpoint(
                args.save_model, model, config, model_res,
                {"source": "benchmarks/symmetry.py", "bids": str(args.bids), "seed": args.seed,
                 **{f"n_{k}": len(v) for k, v in parts.items()}},
                {"validation": {"loss": info["best_val_loss"], "auc": info["best_val_auc"]}},
                info["threshold"], info["samples"])
        evaluated = parts["test"] + truth.index[lesion].tolist() + truth.index[flipped & ~lesion].tolist()
        scored_idx = evaluated + parts["validation"]  # every scan not trained on: the app's siamese_z reference
        logit_abn, logit_side = siamese_logits(model, [volumes[i] for i in scored_idx], [masks[i] for i in scored_idx],
                                               res, model_res)
        p_abn, p_left = 1.0 / (1.0 + np.exp(-logit_abn)), 1.0 / (1.0 + np.exp(-logit_side))
        truth["siamese_probability"] = np.nan
        truth.loc[scored_idx, "siamese_probability"] = p_abn
        truth["siamese_p_left"] = np.nan
        truth.loc[scored_idx, "siamese_p_left"] = p_left
        z_stats = reference_statistics(logit_abn)
        truth["siamese_z"] = np.nan
        truth.loc[scored_idx, "siamese_z"] = siamese_z(logit_abn, z_stats)
        held = truth.loc[evaluated].reset_index(drop=True)
        for subset, keep in (("held-out lesion-free", ~held["lr_flipped"].str.lower().eq("true") |
                              held["lesion"].str.lower().eq("true")),
                             ("held-out lesion-free + flipped", np.ones(len(held), bool))):
            per_bin, overall = per_bin_table(held[keep].reset_index(drop=True),
                                             held.loc[keep, "siamese_probability"].reset_index(drop=True),
                                             info["threshold"])
            tables[("siamese_probability", subset)] = per_bin
            results[f"siamese_probability | {subset}"] = overall
            per_bin, overall = per_bin_table(held[keep].reset_index(drop=True),
                                             held.loc[keep, "siamese_z"].reset_index(drop=True), SIAMESE_Z_THRESHOLD)
            tables[("siamese_z", subset)] = per_bin
            results[f"siamese_z >= {SIAMESE_Z_THRESHOLD:g} | {subset}"] = overall
            for name in ("threshold_fp5", "threshold_clean_fp5"):
                per_bin, overall = per_bin_table(held[keep].reset_index(drop=True),
                                                 held.loc[keep, "siamese_probability"].reset_index(drop=True),
                                                 info[name])
                tables[(f"siamese_probability at {name}", subset)] = per_bin
                results[f"siamese_probability at {name} | {subset}"] = overall
        # the asymmetry score on exactly the same scans, for comparison
        keep = ~held["lr_flipped"].str.lower().eq("true") | held["lesion"].str.lower().eq("true")
        for column in ("asymmetry_score", "asymmetry_score_median"):
            per_bin, overall = per_bin_table(held[keep].reset_index(drop=True),
                                             held.loc[keep, column].reset_index(drop=True), ASYMMETRY_THRESHOLD)
            tables[(column, "held-out lesion-free")] = per_bin
            results[f"{column} | held-out lesion-free"] = overall
        side_ok = held["lesion"].str.lower().eq("true")
        results["siamese side accuracy (planted lesions)"] = round(float(
            ((held.loc[side_ok, "siamese_p_left"] > 0.5) == held.loc[side_ok, "lesion_hemisphere"].eq("L")).mean()), 3)
        results["siamese_reference"] = z_stats
        results["training"] = {**info, "train_scans": len(parts["train"]), "validation_scans": len(parts["validation"]),
                               "test_scans": len(parts["test"]), "seconds": round(train_seconds, 1),
                               "threads": args.threads, "model_resolution_mm": model_res,
                               "backbone": args.backbone, "fusion": args.fusion}
        # simulated lesions in the held-out scans, per bin
        test_scans = [prepare_scan(volumes[i], masks[i], res, str(i)) for i in parts["test"]]
        scorers = {**siamese_scorers(model, res, model_res, z_stats),
                   "asymmetry_score": lambda vs, ms: np.array(
                       [score_scan(v, m, res, reference, args.fwhm)["asymmetry_score"] for v, m in zip(vs, ms)])}
        samples, sim_bins, sim_overall = evaluate_detection(
            test_scans, res, scorers, {"siamese_probability": info["threshold"], "siamese_z": SIAMESE_Z_THRESHOLD,
                                 "asymmetry_score": ASYMMETRY_THRESHOLD},
            LesionConfig(), draws=args.draws, seed=args.seed + 11)
        samples.to_csv(args.results / "simulated_samples.tsv", sep="\t", index=False)
        sim_bins.to_csv(args.results / "simulated_bins.tsv", sep="\t", index=False)
        (args.results / "simulated_detection.svg").write_text(detection_figure(
            sim_bins, f"Simulated lesions in {len(test_scans)} held-out demo scans"))
        results["simulated"] = sim_overall.to_dict(orient="records")
        print(sim_bins.to_string(index=False), flush=True)
    truth.drop(columns=["world_to_template_affine"]).to_csv(args.results / "scores.tsv", sep="\t", index=False)
    with open(args.results / "per_bin.md", "w") as fh:
        for (name, subset), table in tables.items():
            fh.write(f"\n{name} ({subset}):\n\n{markdown(table)}\n")
    (args.results / "results.json").write_text(json.dumps(results, indent=2, default=float))
    print(json.dumps(results, indent=1, default=float))
    print((args.results / "per_bin.md").read_text())
    print(f"sphere cross-sections of {' / '.join(f'{v:g}' for v in REAL_BINS)} mm3: "
          f"{' / '.join(f'{sphere_cross_section_mm2(v):.0f}' for v in REAL_BINS)} mm2; total {time.time() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
