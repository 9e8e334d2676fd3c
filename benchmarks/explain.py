"""Benchmark of the explanations on the synthetic demo dataset: where do the planted family regions rank?

The demo generator (``bids-siamese-demo``) deforms a few structures (``sourcedata/truth/truth.json``,
``signal.family_regions``: thalamus, brainstem, hippocampus in the small demo) identically within a family,
so a twin model that identifies families should look there. This script

1. builds a group-level OUTPUT_DIR in ``--results`` whose participant files are links to the participant-level
   outputs (the participant folder itself is left untouched; new files are written in ``--results``),
2. trains the twin model (``group --task twin --mode train``), or reuses ``--model``,
3. runs :func:`bids_siamese.explain.run.run_explain` for each ``--targets`` entry and prints, per target and
   atlas, the rank of every planted region (best rank over hemispheres) among all ranked regions, the
   subcortical-vs-cortical statistics, the wall and CPU time taken and the load average (the machine may be
   shared: compare timings only under similar load),
4. with ``--timing``, the time of one LRP map of every backbone (random weights) on the 2 mm grid, and
5. with ``--wb``, runs ``wb_command -file-information`` on every GIFTI/CIFTI/spec file written.

Usage::

    python benchmarks/explain.py --bids /tmp/demo_small --outputs /tmp/demo_small_out --results /tmp/explain_bench \
        --targets embedding distance --atlases harvard_oxford neuromorphometrics --timing --wb
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from bids_siamese.bids.layout import resolve_participants
from bids_siamese.cli.parser import parse_args
from bids_siamese.explain.canonize import canonize
from bids_siamese.explain.lrp import embedding_network, relevance_embedding
from bids_siamese.explain.run import explain_device, run_explain
from bids_siamese.models import BACKBONES, build_model
from bids_siamese.resources import model_grid
from bids_siamese.bids.derivatives import EXPLAIN_FILES, REGION_WEIGHTS
from bids_siamese.train.twins import run_twin

sys.path.insert(0, str(Path(__file__).parent))
from twins import add_training_options, training_argv  # noqa: E402

#: Planted region name (truth.json) -> lower-case fragments that find it among atlas region names.
REGION_KEYS = {"thalamus": ("thalam",), "brain_stem": ("stem",), "brainstem": ("stem",),
               "hippocampus": ("hippocamp",), "caudate": ("caudate",), "putamen": ("putamen",),
               "amygdala": ("amygdala",), "pallidum": ("pallid",), "accumbens": ("accumbens",),
               "cerebellum": ("cerebel",)}


def link_outputs(outputs: Path, results: Path) -> None:
    """Link every participant-level file into real folders under ``results`` (new files stay in ``results``)."""
    for item in sorted(outputs.glob("sub-*/**/*")):
        if item.is_file() and "figures" not in item.parts:
            target = results / item.relative_to(outputs)
            target.parent.mkdir(parents=True, exist_ok=True)
            if not target.exists():
                target.symlink_to(item.resolve())
    for name in ("dataset_description.json", ".bidsignore", "group_orientation.tsv"):
        if (outputs / name).is_file() and not (results / name).exists():
            shutil.copyfile(outputs / name, results / name)


def planted_ranks(ranking: pd.DataFrame, regions: list[str]) -> dict[str, int | None]:
    """Best rank (over hemispheres and sub-regions) of each planted region in a ranking table.

    Examples:
        >>> t = pd.DataFrame({"region": ["Putamen", "Thalamus", "Brain Stem"], "rank": [1, 2, 3]})
        >>> planted_ranks(t, ["Thalamus", "Brain_Stem", "Hippocampus"])
        {'Thalamus': 2, 'Brain_Stem': 3, 'Hippocampus': None}
    """
    out: dict[str, int | None] = {}
    names = ranking["region"].astype(str).str.lower().str.replace("-", " ")
    for region in regions:
        keys = REGION_KEYS.get(region.lower(), (region.lower().replace("_", " "),))
        hit = ranking[names.apply(lambda n: any(k in n for k in keys))]
        out[region] = int(hit["rank"].min()) if len(hit) else None
    return out


def lrp_seconds(backbone: str, resolution: float, device: str = "cpu") -> float:
    """Seconds for one LRP map of a randomly initialised twin model on the model grid (canonisation included)."""
    torch.manual_seed(0)
    net, normalised = embedding_network(build_model("twin", backbone).eval())
    x = np.random.default_rng(0).normal(size=model_grid(resolution).shape).astype(np.float32)
    t0 = time.perf_counter()
    relevance_embedding(canonize(net).to(explain_device(device)), x, normalised=normalised)
    return time.perf_counter() - t0


def group_argv(args: argparse.Namespace, atlas: str) -> list[str]:
    return [str(args.bids), str(args.results), "group", "--task", "twin", "--mode", "train", "--backbone",
            args.backbone, "--resolution", f"{args.resolution:g}", *training_argv(args), "--seed", str(args.seed), "--device", args.device,
            "--skip-bids-validation", "--atlas", atlas, "--omp-nthreads", str(args.threads)]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--bids", type=Path, default=Path("/tmp/demo_small"))
    p.add_argument("--outputs", type=Path, default=Path("/tmp/demo_small_out"))
    p.add_argument("--results", type=Path, default=Path("/tmp/explain_benchmark"))
    p.add_argument("--model", type=Path, help="reuse this twin checkpoint instead of training")
    add_training_options(p, "regional")
    p.add_argument("--resolution", type=float, default=2.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu", help="--device of the app (auto, cpu, cuda, cuda:N)")
    p.add_argument("--targets", nargs="+", default=["embedding"], choices=["embedding", "embedding_abs", "distance"])
    p.add_argument("--atlases", nargs="+", default=["harvard_oxford", "neuromorphometrics"])
    p.add_argument("--fwhm", type=float, default=6.0)
    p.add_argument("--timing", action="store_true", help="time one LRP map per backbone")
    p.add_argument("--wb", action="store_true", help="run wb_command -file-information on the files written")
    p.add_argument("--regions", nargs="+", help="planted regions (default: truth.json signal.family_regions)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    args.results.mkdir(parents=True, exist_ok=True)
    link_outputs(args.outputs, args.results)
    subjects = resolve_participants(args.bids, [])
    planted = args.regions or list(json.loads((args.bids / "sourcedata" / "truth" / "truth.json").read_text())[
        "signal"]["family_regions"])
    print(f"# explanations benchmark: {len(subjects)} subjects, backbone {args.backbone}, {args.resolution:g} mm, "
          f"planted family regions {', '.join(planted)}; {platform.machine()}, {torch.get_num_threads()} threads")
    settings = parse_args(group_argv(args, args.atlases[0]))
    settings.relevance_fwhm = args.fwhm
    model = args.model
    if model is None:
        t0 = time.perf_counter()
        run_twin(settings, subjects)
        model = args.results / "models" / f"twins_{args.backbone}"
        metrics = pd.read_csv(args.results / "group_twins_metrics.tsv", sep="\t").set_index("metric")["mean"]
        print(f"twin training: {time.perf_counter() - t0:.0f} s, test AUC {metrics.get('auc_roc', float('nan')):.3f} "
              f"(baseline {metrics.get('baseline_auc_roc', float('nan')):.3f})")
    weights_file = Path(model) / REGION_WEIGHTS
    if weights_file.is_file():  # the regional model's own ranking: its learned region weights
        weights = pd.read_csv(weights_file, sep="\t")
        ranks = planted_ranks(weights, planted)
        print(f"learned region weights ({len(weights)} regions): planted ranks "
              + ", ".join(f"{k} {v if v is not None else 'absent'}" for k, v in ranks.items()) + "; top 6: "
              + ", ".join(f"{r.region} {r.hemisphere} ({r.weight:.3f})" for r in weights.head(6).itertuples()))
    written: list[Path] = []
    for target in args.targets:
        for atlas in args.atlases:
            settings.atlas, settings.lrp_target = atlas, target
            t0, cpu0, load0 = time.perf_counter(), time.process_time(), os.getloadavg()[0]
            written = run_explain(settings, subjects, model)
            seconds, cpu_seconds = time.perf_counter() - t0, time.process_time() - cpu0
            ranking = pd.read_csv(args.results / EXPLAIN_FILES["ranking"], sep="\t")
            stats = pd.read_csv(args.results / EXPLAIN_FILES["statistics"], sep="\t")
            ranks = planted_ranks(ranking, planted)
            top = ", ".join(f"{r.region} {r.hemisphere} ({r.importance:.2f})" for r in ranking.head(6).itertuples())
            print(f"\n## target {target}, atlas {atlas} ({len(ranking)} regions, {seconds:.0f} s)")
            print(f"time: {seconds:.1f} s wall, {cpu_seconds:.1f} s CPU (all threads), device {settings.device}, "
                  f"load average {load0:.1f} -> {os.getloadavg()[0]:.1f}")
            print("planted ranks: " + ", ".join(f"{k} {v if v is not None else 'absent'}" for k, v in ranks.items()))
            print(f"top 6: {top}")
            for row in stats.itertuples():
                print(f"{row.level}: {row.comparison} mean {row.mean_a:.3f} vs {row.mean_b:.3f}, d {row.cohens_d:.2f}, "
                      f"Welch p {row.welch_p:.3g}, permutation p {row.permutation_p:.3g}")
            snapshot = args.results / f"group_regions_ranking_{target}_{atlas}.tsv"
            shutil.copyfile(args.results / EXPLAIN_FILES["ranking"], snapshot)
    if args.wb:
        wb = shutil.which("wb_command")
        if wb is None:
            print("wb_command: not installed")
        else:
            files = [p for p in written if p.name.endswith((".gii", ".dscalar.nii", ".spec"))]
            failed = [p.name for p in files
                      if subprocess.run([wb, "-file-information", str(p)], capture_output=True).returncode != 0]
            print(f"\nwb_command -file-information: {len(files) - len(failed)}/{len(files)} files read"
                  + (f"; FAILED: {', '.join(failed)}" if failed else ""))
    if args.timing:
        print()
        for backbone in BACKBONES:
            print(f"LRP {backbone}: {lrp_seconds(backbone, args.resolution, settings.device):.1f} s per map "
                  f"({args.resolution:g} mm grid, {settings.device}, {torch.get_num_threads()} threads)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
