"""Self-supervised pretraining throughput: scans/s of the app's pretraining step per backbone (issue 26).

::

    python benchmarks/pretrain.py                                # CPU, 4 mm grid, batch 4, float32
    python benchmarks/pretrain.py --backbones small swin --steps 5 --threads 2
    python benchmarks/pretrain.py --device cuda --resolution 2 --batch 8   # bf16 autocast (benchmarks/gpu.py)

For each backbone (``small``, ``unet``, ``resnet18``, ``densenet121``, ``swin``) it builds what ``group --task
pretrain`` trains (:class:`~bids_siamese.train.pretrain.PretrainTrainer` around the encoder and its
:class:`~bids_siamese.models.pretrain.PretrainHeads`, on a float16 volume cache of brain-like random model-grid
volumes) and times the trainer's step on ``--device``: the batch's two views per scan (shift/intensity/noise
augmentation, mirror, sagittal rotation, 30 % masked cubes; made on the CPU, where the app's loader workers make
them) copied to the device, one encoder pass over the ``2 x batch`` views, the four losses, backward and an AdamW
step, under bf16 autocast on CUDA (float32 on the CPU), as the app trains. The figures are the medians over
``--steps`` steps after ``--warmup`` steps of the step (device synchronised) and of making the views, and
``scans/s = batch / median step`` (scans, not views: each scan is encoded twice). One line per backbone; the
1-minute load average is printed with each line, since the machine may be shared.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np
import torch

from bids_siamese.models.backbones import BACKBONES, build_backbone
from bids_siamese.models.pretrain import PretrainHeads
from bids_siamese.resources import model_grid
from bids_siamese.train.data import volume_cache
from bids_siamese.train.pretrain import PretrainNet, PretrainTrainer, cube_voxels
from bids_siamese.train.trainer import TrainConfig, optimiser_step


def brain_like(n: int, shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    """``(n, 1, *shape)`` smooth random volumes inside an ellipsoid (zeros outside), z-scored-like values."""
    axes = [torch.linspace(-1.0, 1.0, s) for s in shape]
    grid = torch.stack(torch.meshgrid(*axes, indexing="ij"))
    inside = (grid ** 2).sum(0) < 0.8
    noise = torch.randn((n, 1, *shape), generator=generator)
    smooth = torch.nn.functional.avg_pool3d(noise, 5, stride=1, padding=2) * 3.0
    return torch.where(inside, smooth, torch.zeros_like(smooth))


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def measure(name: str, resolution: float, batch: int, steps: int, warmup: int, device: str
            ) -> tuple[float, float, float]:
    """``(median seconds per step, median seconds making the views, scans/s)`` of the pretraining step of
    backbone ``name``."""
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    volumes = volume_cache(list(brain_like(batch, model_grid(resolution).shape, generator)[:, 0].numpy()))
    encoder = build_backbone(name)
    model = PretrainNet(encoder, PretrainHeads(encoder.out_channels))
    config = TrainConfig(batch_size=batch, lr=1e-4, progress=False, max_shift=1)
    trainer = PretrainTrainer(model, volumes, np.arange(batch), np.arange(0), config, cube_voxels(resolution), device)
    trainer.net.train()
    step_times, view_times = [], []
    for step in range(warmup + steps):
        start = time.perf_counter()
        batch_cpu = trainer.assemble(np.arange(batch), generator, 1)
        views = time.perf_counter() - start
        _sync(device)
        start = time.perf_counter()
        loss, _ = trainer.train_step(tuple(t.to(device) for t in batch_cpu))
        optimiser_step(loss, trainer.optimizer, trainer.scaler)
        _sync(device)
        if step >= warmup:
            step_times.append(time.perf_counter() - start)
            view_times.append(views)
    median = statistics.median(step_times)
    return median, statistics.median(view_times), batch / median


def run_pretrain_section(backbones: list[str], resolution: float, batch: int, steps: int, warmup: int,
                         device: str) -> None:
    """Print the header line and one line per backbone (also ``benchmarks/gpu.py --section pretrain``)."""
    shape = "x".join(str(n) for n in model_grid(resolution).shape)
    precision = "bf16 autocast" if device.startswith("cuda") else "float32"
    print(f"pretraining step (PretrainTrainer), {device}, {precision}, grid {resolution:g} mm ({shape}), batch "
          f"{batch} scans (2 views each), {torch.get_num_threads()} threads, median of {steps} steps after {warmup}",
          flush=True)
    for name in backbones:
        median, views, rate = measure(name, resolution, batch, steps, warmup, device)
        memory = (f", peak GPU memory {torch.cuda.max_memory_allocated() / 2**20:.0f} MB"
                  if device.startswith("cuda") else "")
        print(f"{name:12s} {median:8.3f} s/step {rate:8.2f} scans/s (views made on the CPU in {views:.3f} s){memory}"
              f"  (load average {os.getloadavg()[0]:.1f})", flush=True)
        if device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backbones", nargs="+", choices=BACKBONES, default=list(BACKBONES))
    parser.add_argument("--resolution", type=float, default=4.0, help="model grid spacing in mm")
    parser.add_argument("--batch", type=int, default=4, help="scans per step (2 views each)")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    run_pretrain_section(args.backbones, args.resolution, args.batch, args.steps, args.warmup, args.device)


if __name__ == "__main__":
    main()
