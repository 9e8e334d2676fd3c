"""Asymmetry score in a heterogeneous population: several real heads, unequal numbers of scans, lesions.

The demo dataset is one anatomy (the template) deformed per subject, so every scan shares the template's
asymmetry pattern. Real studies mix heads whose normal asymmetries differ. This benchmark builds such a
population from the participant-level outputs of real T1w heads (``--outputs``: run ``bids-siamese BIDS OUT
participant`` on a BIDS folder of the heads in ``tests/real_heads.py``, e.g. Colin27, FSL's MNI152, ICBM 2009c,
pydeface's mean head and the symmetric ICBM 2009a):

* each head gives ``--variants`` scans (unequal counts, so one anatomy dominates the median): a smooth random
  deformation (``--deform-mm`` sd, ~16 mm smoothness), a smooth multiplicative bias field, Gaussian noise, and the
  participant-level intensity normalisation;
* ``--lesion-fraction`` of them get one simulated unilateral lesion
  (:func:`bids_siamese.symmetry.simulate.simulate_lesion`, volume log-uniform in ``--lesion-mm3``);
* every scan is scored by the group-level ``asymmetry_score`` with 0 (the voxelwise median reference) and with
  each ``--components`` number of normative modes (:mod:`bids_siamese.symmetry.normative`).

With ``--model`` (a symmetry checkpoint, e.g. trained on the demo by ``benchmarks/symmetry.py --save-model``),
every scan is also scored by the Siamese model, as ``--mode apply`` does: ``siamese_probability`` at the
checkpoint's threshold and the group-relative ``siamese_z`` against all scans of the population
(:mod:`bids_siamese.symmetry.calibration`).

No label is used to build any reference and the threshold (``asymmetry_score`` > 3) is fixed in advance, so the
false-positive rate on the lesion-free scans is a held-out figure.

Usage::

    python benchmarks/symmetry_heterogeneous.py --outputs /tmp/realheads_out --results /tmp/sym_hetero
"""
from __future__ import annotations

import argparse
import io
import json
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
from scipy import ndimage as ndi

from bids_siamese.preproc.grid import normalise_intensity
from bids_siamese.resources import TEMPLATE, model_grid
from bids_siamese.symmetry.analysis import template_reference
from bids_siamese.symmetry.asymmetry import (
    ASYMMETRY_THRESHOLD, asymmetry_map, group_reference, positive_intensities, score_map,
)
from bids_siamese.atlas import atlas_on_grid
from bids_siamese.symmetry.regional import homologous_pairs, regional_asymmetry
from bids_siamese.symmetry.simulate import simulate_lesion
from bids_siamese.synthetic.fields import smooth_displacement, warp
from bids_siamese.train.evaluate import safe_auc


def load_heads(out_dir: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Every participant's model-grid image and mask in a participant-level output folder."""
    heads = {}
    for pre in sorted(out_dir.glob(f"sub-*/**/anat/*_space-{TEMPLATE}_desc-preproc_T1w.nii.gz")):
        mask = Path(str(pre).replace("_desc-preproc_T1w", "_desc-brain_mask"))
        heads[pre.name.split("_")[0]] = (np.asanyarray(nib.load(str(pre)).dataobj, dtype=np.float32),
                                         np.asanyarray(nib.load(str(mask)).dataobj) > 0)
    return heads


def variant(volume: np.ndarray, mask: np.ndarray, rng: np.random.Generator, resolution: float,
            deform_mm: float) -> tuple[np.ndarray, np.ndarray]:
    """A deformed, bias-modulated, noisy copy of a head, normalised like the participant level."""
    disp = smooth_displacement(volume.shape, 16.0 / resolution, deform_mm / resolution, rng)
    out = warp(volume, disp, order=1)
    new_mask = warp(mask.astype(np.float32), disp, order=1) > 0.5
    bias = smooth_displacement(volume.shape, 40.0 / resolution, 0.08, rng)[0]
    out = out * np.exp(bias)
    iqr = float(np.subtract(*np.percentile(out[new_mask], [75, 25])))
    out = out + rng.normal(0.0, 0.04 * iqr, out.shape).astype(np.float32)
    return normalise_intensity(np.where(new_mask, out, 0.0), new_mask).astype(np.float32), new_mask


def build_population(args, heads, counts, lo, hi, rng, labels, pairs, grid):
    """The scans (table, asymmetry maps, masks, regional tables) of the heterogeneous population."""
    res = args.resolution
    rows, maps, masks, regions, volumes = [], [], [], [], []
    for (head, (vol, mask)), n in zip(sorted(heads.items()), counts):
        for k in range(n):
            v, m = variant(vol, mask, rng, res, args.deform_mm)
            row = {"scan": f"{head}_v{k:02d}", "head": head, "participant_id": f"{head}{k:02d}", "lesion": False,
                   "lesion_volume_mm3": np.nan, "hemisphere": "n/a"}
            if rng.random() < args.lesion_fraction:
                volume = float(np.exp(rng.uniform(np.log(lo), np.log(hi))))
                v, les = simulate_lesion(v, m, grid.affine, rng, volume_range=(volume, volume))
                row.update(lesion=True, lesion_volume_mm3=round(float(les.volume_mm3), 1), hemisphere=les.hemisphere,
                           lesion_center_mm=",".join(f"{c:.0f}" for c in les.center_mm))
            rows.append(row)
            volumes.append(v.astype(np.float16).astype(np.float32))  # as cached: fresh and cached runs score alike
            masks.append(m)
            maps.append(asymmetry_map(v, m, res, args.fwhm))
            regions.append(regional_asymmetry(positive_intensities(v, m), m, labels, pairs))
    return pd.DataFrame(rows), maps, masks, regions, volumes


def save_population(path: Path, table, maps, masks, regions, volumes) -> None:
    """Cache the population (maps and images as float16, masks packed)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, maps=np.stack(maps).astype(np.float16), masks=np.packbits(np.stack(masks), axis=-1),
             volumes=np.stack(volumes).astype(np.float16),
             shape=np.array(masks[0].shape), table=table.to_json(), regions=json.dumps(
                 [r.to_dict(orient="list") for r in regions]))


def load_population(path: Path):
    """The cached population."""
    z = np.load(path)
    shape = tuple(int(v) for v in z["shape"])
    masks = list(np.unpackbits(z["masks"], axis=-1, count=shape[-1]).astype(bool))
    maps = list(z["maps"].astype(np.float32))
    regions = [pd.DataFrame(r) for r in json.loads(str(z["regions"]))]
    volumes = list(z["volumes"].astype(np.float32)) if "volumes" in z.files else None
    return pd.read_json(io.StringIO(str(z["table"]))), maps, masks, regions, volumes


def rates(flagged: np.ndarray, lesion: np.ndarray, head: pd.Series, heads: list[str]) -> dict:
    """Detections and false positives of a decision (overall and per head)."""
    return {"detected": f"{int(flagged[lesion].sum())} / {int(lesion.sum())}",
            "detection_rate": round(float(flagged[lesion].mean()), 3),
            "false_positive_rate": round(float(flagged[~lesion].mean()), 3),
            "fp_per_head": {h: round(float(flagged[(~lesion) & (head == h).to_numpy()].mean()), 3) for h in heads}}


def siamese_summary(path: Path, k: int, table: pd.DataFrame, volumes, masks, res: float, heads: list[str]) -> dict:
    """Score the population with a symmetry checkpoint (as ``--mode apply``): two summary rows' worth of
    figures, at the checkpoint's threshold on p and at ``siamese_z >= 3`` against the whole population."""
    import torch  # only with --model

    from bids_siamese.symmetry.calibration import SIAMESE_Z_THRESHOLD, reference_statistics, siamese_z
    from bids_siamese.symmetry.train import load_symmetry_model, model_resolution, siamese_logits

    t1 = time.time()
    model, card = load_symmetry_model(path)
    logit, _ = siamese_logits(model, volumes, masks, res, model_resolution(card))
    p = 1.0 / (1.0 + np.exp(-logit))
    stats = reference_statistics(logit)
    z = siamese_z(logit, stats)
    table[f"siamese_probability_{k}"], table[f"siamese_z_{k}"] = np.round(p, 4), np.round(z, 3)
    lesion = table["lesion"].to_numpy(bool)
    threshold = float(card["decision"]["threshold"])
    return {"model": str(path), "fusion": card["hyperparameters"].get("fusion"),
            "auc": round(safe_auc(lesion.astype(float), logit), 3), "threshold": round(threshold, 4),
            "at_threshold": rates(p >= threshold, lesion, table["head"], heads),
            "at_z3": rates(z >= SIAMESE_Z_THRESHOLD, lesion, table["head"], heads),
            "reference": stats, "min_lesion_z": round(float(z[lesion].min()), 2),
            "max_clean_z": round(float(z[~lesion].max()), 2), "seconds": round(time.time() - t1, 1),
            "torch_threads": torch.get_num_threads()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--outputs", type=Path, required=True, help="participant-level outputs of the real heads")
    p.add_argument("--resolution", type=float, default=2.0)
    p.add_argument("--variants", default="32,24,16,12,8", help="scans per head, in the heads' sorted order")
    p.add_argument("--lesion-fraction", type=float, default=0.5)
    p.add_argument("--lesion-mm3", default="1500,8000", help="lesion volume range (log-uniform)")
    p.add_argument("--deform-mm", type=float, default=2.0)
    p.add_argument("--components", default="0,5,10,20")
    p.add_argument("--fwhm", type=float, default=6.0)
    p.add_argument("--atlas", default="harvard_oxford")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache", type=Path, default=None, help="folder caching the simulated population")
    p.add_argument("--results", type=Path, default=Path("/tmp/symmetry_heterogeneous"))
    p.add_argument("--model", type=Path, action="append", default=[],
                   help="a symmetry checkpoint to score the population with (repeatable)")
    p.add_argument("--threads", type=int, default=1, help="torch threads for --model")
    args = p.parse_args(argv)
    t0 = time.time()
    res = args.resolution
    grid = model_grid(res)
    heads = load_heads(args.outputs)
    counts = [int(v) for v in args.variants.split(",")]
    if len(heads) < 2 or len(counts) < len(heads):
        raise SystemExit(f"need at least 2 heads and a --variants count for each; found {sorted(heads)}")
    lo, hi = (float(v) for v in args.lesion_mm3.split(","))
    rng = np.random.default_rng(args.seed)
    labels, names = atlas_on_grid(args.atlas, res)
    pairs = homologous_pairs(names)
    key = f"seed{args.seed}_n{args.variants}_v{args.lesion_mm3}_f{args.lesion_fraction:g}_d{args.deform_mm:g}".replace(",", "-")
    cache = args.cache / f"population_{key}.npz" if args.cache else None
    volumes = None
    if cache is not None and cache.is_file():
        table, maps, masks, regions, volumes = load_population(cache)
    if volumes is None:  # no cache, or a cache of an older version without the images
        table, maps, masks, regions, volumes = build_population(args, heads, counts, lo, hi, rng, labels, pairs, grid)
        if cache is not None:
            save_population(cache, table, maps, masks, regions, volumes)
    print(f"{len(table)} scans from {len(heads)} heads ({table['lesion'].sum()} with a lesion) in "
          f"{time.time() - t0:.0f} s", flush=True)
    template = template_reference(res, args.fwhm, args.atlas)
    summary = []
    lesion = table["lesion"].to_numpy(bool)
    for comps in (int(c) for c in args.components.split(",")):
        t1 = time.time()
        ref = group_reference(maps, masks, regions, template, res, args.fwhm,
                              groups=table["participant_id"].tolist(), components=comps)
        score = np.array([score_map(a, m, res, ref.member(i))["asymmetry_score"]
                          for i, (a, m) in enumerate(zip(maps, masks))])
        table[f"asymmetry_score_{comps}"] = np.round(score, 3)
        summary.append({"components": comps, "auc": round(safe_auc(lesion.astype(float), score), 3),
                        **rates(score > ASYMMETRY_THRESHOLD, lesion, table["head"], sorted(heads)),
                        "min_lesion_score": round(float(score[lesion].min()), 2),
                        "max_clean_score": round(float(score[~lesion].max()), 2),
                        "seconds": round(time.time() - t1, 1)})
        print(json.dumps(summary[-1]), flush=True)
    if args.model:
        import torch

        torch.set_num_threads(args.threads)
    for k, path in enumerate(args.model):
        summary.append(siamese_summary(path, k, table, volumes, masks, res, sorted(heads)))
        print(json.dumps(summary[-1]), flush=True)
    args.results.mkdir(parents=True, exist_ok=True)
    table.to_csv(args.results / "scores.tsv", sep="\t", index=False)
    result = {"heads": {h: c for h, c in zip(sorted(heads), counts)}, "scans": len(table),
              "lesions": int(lesion.sum()), "lesion_mm3": [lo, hi], "deform_mm": args.deform_mm,
              "summary": summary, "seconds": round(time.time() - t0, 1)}
    (args.results / "results.json").write_text(json.dumps(result, indent=2))
    print(pd.DataFrame([r for r in summary if "components" in r]).drop(columns=["fp_per_head"]).to_string(index=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
