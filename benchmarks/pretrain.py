"""Self-supervised pretraining throughput: volumes/s of one ``pretrain_step`` per backbone (issue 26).

::

    python benchmarks/pretrain.py                                # CPU, 4 mm grid, batch 4, float32
    python benchmarks/pretrain.py --backbones small swin --steps 5 --threads 2

For each backbone (``small``, ``unet``, ``resnet18``, ``densenet121``, ``swin``) it builds the encoder and its
:class:`~bids_siamese.models.pretrain.PretrainHeads` and times :func:`~bids_siamese.models.pretrain.pretrain_step`
(two views of each scan made by ``bids_siamese.train.data.augment``, sagittal rotation and 30 % masked cubes;
one encoder pass over the ``2 x batch`` views; the four losses; backward; an AdamW step) on a batch of random
brain-like model-grid volumes, float32 on ``--device``. The figure is the median wall time per step over
``--steps`` steps after ``--warmup`` steps, and ``volumes/s = batch / median`` (scans, not views: each scan is
encoded twice). One line per backbone; the 1-minute load average is printed with each line, since the machine
may be shared.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from bids_siamese.models.backbones import BACKBONES, build_backbone
from bids_siamese.models.pretrain import PretrainHeads, pretrain_step
from bids_siamese.resources import model_grid
from bids_siamese.train.data import augment


def brain_like(n: int, shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    """``(n, 1, *shape)`` smooth random volumes inside an ellipsoid (zeros outside), z-scored-like values."""
    axes = [torch.linspace(-1.0, 1.0, s) for s in shape]
    grid = torch.stack(torch.meshgrid(*axes, indexing="ij"))
    inside = (grid ** 2).sum(0) < 0.8
    noise = torch.randn((n, 1, *shape), generator=generator)
    smooth = torch.nn.functional.avg_pool3d(noise, 5, stride=1, padding=2) * 3.0
    return torch.where(inside, smooth, torch.zeros_like(smooth))


def measure(name: str, resolution: float, batch: int, steps: int, warmup: int, device: str) -> tuple[float, float]:
    """``(median seconds per step, volumes/s)`` of ``pretrain_step`` for backbone ``name``."""
    torch.manual_seed(0)
    encoder = build_backbone(name).to(device).train()
    heads = PretrainHeads(encoder.out_channels).to(device).train()
    optimizer = torch.optim.AdamW([*encoder.parameters(), *heads.parameters()], lr=1e-4)
    generator = torch.Generator().manual_seed(0)
    volumes = brain_like(batch, model_grid(resolution).shape, generator).to(device)
    times = []
    for step in range(warmup + steps):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        pretrain_step(encoder, heads, optimizer, volumes, generator, augment=augment)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        if step >= warmup:
            times.append(time.perf_counter() - start)
    median = statistics.median(times)
    return median, batch / median


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
    shape = "x".join(str(n) for n in model_grid(args.resolution).shape)
    print(f"pretrain_step, {args.device}, float32, grid {args.resolution:g} mm ({shape}), batch {args.batch}, "
          f"{torch.get_num_threads()} threads, median of {args.steps} steps after {args.warmup}")
    for name in args.backbones:
        median, rate = measure(name, args.resolution, args.batch, args.steps, args.warmup, args.device)
        print(f"{name:12s} {median:8.2f} s/step {rate:7.2f} volumes/s  (load average {os.getloadavg()[0]:.1f})",
              flush=True)


if __name__ == "__main__":
    main()
