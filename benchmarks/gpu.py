"""GPU figures of the participant level: deepbet, registration and embedding on CUDA next to the CPU.

One command on any CUDA machine::

    python benchmarks/gpu.py                      # Colin27 (mricron-data) if installed, else the template brain
    python benchmarks/gpu.py --t1w head.nii.gz --bids /data/bids --participant-label 01 02

Prints one line per figure: the device, then for each step the median wall seconds over ``--repeats`` runs
(after one warm-up run) on the CPU (``--threads`` torch threads) and on the GPU, the speed-up, the GPU's peak
memory, and how far the GPU result is from the CPU one (mask Dice, registration displacement in mm). With
``--bids`` it also runs the app's participant workflow end to end (``--device cuda`` and ``--device cpu``,
``benchmarks/participant.py``'s ``run_workflow``) and prints wall and CPU seconds per scan. On a machine without
a usable CUDA device it prints why and exits with status 2, measuring nothing. ``--device cpu`` runs the same
measurements with the CPU in the GPU's place (a check of the script itself, not a GPU figure).

Then the training section (``benchmarks/train_throughput.py``): for each twin backbone at the model grid of
``--resolution`` (2 mm) and ``--train-batch`` (8) volumes, a training step under bf16 autocast, one line with
volumes/s, FLOPs per step, the achieved TFLOP/s and its fraction of the GPU's bf16 dense peak
(``--channels-last``, ``--compile``, ``--peak-tflops``, ``--backbones``). ``--section training`` runs only that
section, ``--section participant`` only the participant figures above. With ``--pipeline`` the training section
measures the app's training path instead (``train_twin`` from a float16 ``--volume-cache`` stack, batches
assembled by ``--loader-workers`` DataLoader workers into pinned memory, non-blocking copies to the GPU), e.g.
``python benchmarks/gpu.py --section training --backbones small --pipeline --loader-workers 4``.

Then the pretraining section (``benchmarks/pretrain.py``, issue 26): for each of ``--pretrain-backbones`` (all five
encoders) the step of ``group --task pretrain``'s trainer under bf16 autocast at the model grid of ``--resolution``
with ``--pretrain-batch`` (4) scans, two views each: scans/s, the CPU time of making the views and the peak GPU
memory. ``--section pretrain`` runs only that section, e.g.
``python benchmarks/gpu.py --section pretrain --resolution 2 --pretrain-backbones small unet swin``.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

COLIN27 = Path("/usr/share/mricron/templates/ch2.nii.gz")


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize(torch.device(device))


def timed(function, device: str, repeats: int) -> tuple[float, object]:
    """Median wall seconds of ``function()`` over ``repeats`` runs after one warm-up run; and its last result."""
    result = function()
    _sync(device)
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        result = function()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def gpu_peak_mb(device: str) -> str:
    import torch

    if not device.startswith("cuda"):
        return "n/a"
    return f"{torch.cuda.max_memory_allocated(torch.device(device)) / 2**20:.0f} MB"


def reset_peak(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats(torch.device(device))


def line(step: str, cpu_s: float, gpu_s: float, device: str, extra: str) -> None:
    print(f"{step:28s} cpu {cpu_s:7.3f} s   {device} {gpu_s:7.3f} s   speed-up x{cpu_s / gpu_s:5.1f}   "
          f"peak GPU memory {gpu_peak_mb(device)}   {extra}", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--t1w", type=Path, default=None, help="a T1w head image (default: Colin27 or the template)")
    parser.add_argument("--device", default="cuda", help="the GPU (cuda or cuda:N); cpu only checks this script")
    parser.add_argument("--threads", type=int, default=min(8, os.cpu_count() or 1), help="CPU torch threads")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per step (after one warm-up)")
    parser.add_argument("--resolution", type=float, default=2.0, help="model grid and registration resolution")
    parser.add_argument("--batch", type=int, default=8, help="embedding batch size")
    parser.add_argument("--bids", type=Path, default=None, help="also run the participant workflow on this dataset")
    parser.add_argument("--participant-label", nargs="+", default=[], help="with --bids: these participants")
    parser.add_argument("--nprocs", type=int, default=min(8, os.cpu_count() or 1), help="with --bids: --nprocs")
    parser.add_argument("--section", choices=("all", "participant", "training", "pretrain"), default="all",
                        help="which figures: the participant level, the training or the pretraining throughput, or all")
    parser.add_argument("--pretrain-backbones", nargs="+", default=["small", "unet", "resnet18", "densenet121", "swin"],
                        help="encoders of the pretraining section")
    parser.add_argument("--pretrain-batch", type=int, default=4, help="scans per pretraining step (2 views each)")
    sys.path.insert(0, str(Path(__file__).parent))
    import train_throughput  # benchmarks/train_throughput.py

    train_throughput.add_training_arguments(parser)
    args = parser.parse_args(argv)

    os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")
    import torch

    device = str(args.device)
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            print(f"benchmarks/gpu.py: no usable CUDA device (torch {torch.__version__}, built for CUDA "
                  f"{torch.version.cuda or 'none'}; torch.cuda.is_available() is False): nothing measured. Run it on "
                  "a machine with an NVIDIA GPU and a CUDA build of torch.", file=sys.stderr)
            return 2
        index = torch.device(device).index or 0
        props = torch.cuda.get_device_properties(index)
        print(f"device: {device} = {props.name}, {props.total_memory / 2**30:.1f} GiB; torch {torch.__version__}, "
              f"CUDA {torch.version.cuda}; CPU: {os.cpu_count()} cores, {args.threads} torch threads; load average "
              f"{' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    else:
        print(f"device: {device} (script check only: no GPU figures); {os.cpu_count()} cores")
    if args.section in ("all", "participant"):
        participant_section(args, device)
    if args.section != "participant":
        if device.startswith("cuda"):
            torch.backends.cudnn.benchmark = True
        torch.set_num_threads(args.threads)
    if args.section in ("all", "training"):
        if args.pipeline:
            train_throughput.run_pipeline_section(args, device)
        else:
            train_throughput.run_training_section(
                args.backbones, args.resolution, args.train_batch, device, args.steps, args.warmup,
                args.channels_last, args.compile, args.peak_tflops,
                train_throughput.batch_overrides(args.train_batch_for))
    if args.section in ("all", "pretrain"):
        import pretrain  # benchmarks/pretrain.py

        pretrain.run_pretrain_section(args.pretrain_backbones, args.resolution, args.pretrain_batch, args.steps,
                                      args.warmup, device)
    return 0


def participant_section(args: argparse.Namespace, device: str) -> None:
    """deepbet, registration and embedding on the CPU and on ``device``; with ``--bids`` the whole workflow."""
    import torch

    import nibabel as nib

    from bids_siamese.preproc.brain import extract_brain
    from bids_siamese.preproc.conform import conform, load_t1w
    from bids_siamese.preproc.register import register_affine
    from bids_siamese.resources import template_brain_path

    path = args.t1w or (COLIN27 if COLIN27.is_file() else template_brain_path())
    img = conform(load_t1w(path))
    print(f"input: {path} {img.shape} voxels")

    # deepbet
    torch.set_num_threads(args.threads)
    cpu_s, (cpu_mask, _) = timed(lambda: extract_brain(img, device="cpu", n_threads=args.threads), "cpu",
                                 args.repeats)
    reset_peak(device)
    gpu_s, (gpu_mask, _) = timed(lambda: extract_brain(img, device=device, n_threads=1), device, args.repeats)
    dice = 2 * np.logical_and(cpu_mask, gpu_mask).sum() / (cpu_mask.sum() + gpu_mask.sum())
    line("brain extraction (deepbet)", cpu_s, gpu_s, device, f"mask Dice cpu vs {device} {dice:.4f}")

    # registration (both of a scan's: 12 dof for the model input, 9 dof for the orientation check)
    template = nib.load(template_brain_path())
    points = np.argwhere(cpu_mask)[:: 97]
    world = np.c_[points, np.ones(len(points))] @ img.affine.T
    for dof in (12, 9):
        cpu_s, cpu_matrix = timed(lambda: register_affine(img, cpu_mask, template, resolution=args.resolution,
                                                          device="cpu", n_threads=1, dof=dof), "cpu", args.repeats)
        reset_peak(device)
        gpu_s, gpu_matrix = timed(lambda: register_affine(img, cpu_mask, template, resolution=args.resolution,
                                                          device=device, n_threads=1, dof=dof), device, args.repeats)
        moved = world @ np.linalg.inv(cpu_matrix).T - world @ np.linalg.inv(gpu_matrix).T
        line(f"registration ({dof} dof)", cpu_s, gpu_s, device,
             f"mean displacement cpu vs {device} {np.linalg.norm(moved[:, :3], axis=1).mean():.3f} mm")

    # embedding forward pass (the small CNN the twin/longitudinal models use), a batch of model-grid volumes
    from bids_siamese.models.heads import build_model
    from bids_siamese.resources import model_grid

    grid = model_grid(args.resolution)
    batch = torch.randn(args.batch, 1, *grid.shape)
    model = build_model("twin", "small").eval()

    def forward(dev: str):
        net = model.to(dev)
        with torch.inference_mode():
            return net.embed(batch.to(dev)).float().cpu()

    cpu_s, cpu_emb = timed(lambda: forward("cpu"), "cpu", args.repeats)
    reset_peak(device)
    gpu_s, gpu_emb = timed(lambda: forward(device), device, args.repeats)
    line(f"embedding (small, batch {args.batch})", cpu_s, gpu_s, device,
         f"{args.batch / gpu_s:.1f} volumes/s on {device} vs {args.batch / cpu_s:.1f} on cpu; max |diff| "
         f"{float((cpu_emb - gpu_emb).abs().max()):.2e}")

    if args.bids is not None:
        from participant import run_workflow  # benchmarks/participant.py

        for dev, nprocs in ((device, args.nprocs), ("cpu", args.nprocs)):
            with tempfile.TemporaryDirectory(prefix="bench_gpu_") as tmp:
                run = run_workflow(args.bids, [p.removeprefix("sub-") for p in args.participant_label], nprocs,
                                   args.threads, args.resolution, dev, Path(tmp))
            n = max(run["n_scans"], 1)
            # on CUDA the workers are children of a forkserver, which getrusage(RUSAGE_CHILDREN) does not count
            cpu = "n/a (forkserver workers)" if dev.startswith("cuda") else f"{run['cpu'] / n:.2f} s/scan"
            print(f"workflow --device {dev} --nprocs {nprocs}: {n} scans, {run['wall'] / n:.2f} s/scan wall, "
                  f"CPU {cpu}, peak memory of the process tree {run['peak_tree_rss_mb']:.0f} MB; "
                  f"load average {' '.join(f'{v:.2f}' for v in run['load_after'])}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
