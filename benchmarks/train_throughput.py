"""Training throughput of the twin backbones: volumes/s, FLOPs per step and the fraction of the GPU's bf16 peak.

One command on any CUDA machine (``benchmarks/gpu.py`` runs the same section after its participant figures)::

    python benchmarks/train_throughput.py                          # all backbones, 2 mm grid, batch 8, bf16
    python benchmarks/train_throughput.py --channels-last --compile
    python benchmarks/train_throughput.py --device cpu --threads 1 # CPU volumes/s (no peak fraction)
    python benchmarks/train_throughput.py --device cpu --threads 1 --backbones small --pipeline --loader-workers 2
    python benchmarks/train_throughput.py --device cpu --threads 1 --backbones small --pipeline --pipeline-task \
        symmetry --resolution 4 --pipeline-subjects 12 --loader-workers 2
    python benchmarks/train_throughput.py --cache-memory 336       # RAM of a 336-scan stack, float32 and float16

For each backbone it builds the twin model (``small``, ``unet``, ``resnet18``, ``densenet121`` and the atlas-region
models ``regional`` and ``regional_cnn`` on the model grid) and times a training step on a batch of random
model-grid volumes already on the device: forward, a squared-embedding loss, backward and an AdamW step, under
bf16 autocast on CUDA (fp32 on the CPU), optionally with ``channels_last_3d`` and ``torch.compile``. The figure
is the median wall time per step over ``--steps`` steps after ``--warmup`` steps (the device synchronised around
each step). FLOPs per step are counted once with ``torch.utils.flop_counter.FlopCounterMode`` (convolutions and
matrix products of forward and backward; element-wise work is not counted, so the fraction is a lower bound of
the arithmetic done). On CUDA the achieved TFLOP/s is divided by the device's bf16 dense tensor-core peak from
:data:`BF16_DENSE_PEAK_TFLOPS` (``--peak-tflops`` overrides it; an unlisted device prints "unknown").

``--pipeline`` measures the app's training path instead (:func:`measure_training_pipeline`): ``train_twin`` on
``--pipeline-subjects`` brain-like random volumes held as the ``--volume-cache`` stack (float16 or float32), batches
of whole families gathered, converted to float32 and augmented by the DataLoader with ``--loader-workers`` workers
(not given: the option is not passed, so the line also measures releases without it), then forward, triplet mining,
backward and AdamW; the figure is the loop's own volumes/s of the training steps per epoch (the per-epoch
batch-norm re-estimation is not in it), and the median of the epochs after the first (which starts the workers).
``--pipeline-task symmetry`` measures the symmetry trainer the same way (:func:`measure_symmetry_pipeline`):
``train_symmetry_model`` on ``--pipeline-subjects`` such volumes (one of them for validation), whose batches are
simulated lesions and augmentations on numpy (``make_example``), assembled by the DataLoader's workers; it trains
on ``--device``.
``--cache-memory N`` reads N model-grid volumes (``--distinct-files`` NIfTI files written to a temporary folder,
listed in turn) into the training stack with ``load_volume_cache`` and prints, per dtype, the stack's bytes, the
peak of the traced (numpy) allocations while loading and the growth of the process's resident memory.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from dataclasses import dataclass
from types import SimpleNamespace

import numpy as np

#: Twin backbones measured by default (the CNN encoders, then the atlas-region models).
TRAIN_BACKBONES = ("small", "unet", "resnet18", "densenet121", "regional", "regional_cnn")

#: bf16 dense (no sparsity) tensor-core peak in TFLOP/s by device-name fragment (NVIDIA data sheets); the first
#: fragment found in the lower-cased ``torch.cuda.get_device_name`` wins, so the more specific ones come first.
BF16_DENSE_PEAK_TFLOPS = (
    ("h200 nvl", 835.0),
    ("h200", 989.0),
    ("h100 nvl", 835.0),
    ("h100 pcie", 756.0),
    ("h100", 989.0),  # SXM5 ("NVIDIA H100 80GB HBM3")
    ("a100", 312.0),
    ("l40s", 362.0),
)


def bf16_peak_tflops(device_name: str) -> float | None:
    """The bf16 dense peak of a device called ``device_name`` (None: not in :data:`BF16_DENSE_PEAK_TFLOPS`)."""
    name = device_name.lower()
    return next((peak for fragment, peak in BF16_DENSE_PEAK_TFLOPS if fragment in name), None)


@dataclass
class StepFigures:
    """One backbone's training-step figures."""

    backbone: str
    batch: int
    shape: tuple[int, int, int]
    device: str
    precision: str
    channels_last: bool
    compiled: bool
    volumes_per_second: float
    seconds_per_step: float
    flops_per_step: float
    steps: int

    @property
    def tflops_per_second(self) -> float:
        return self.flops_per_step / self.seconds_per_step / 1e12


def twin_model(backbone: str, resolution: float, seed: int = 0):
    """A fresh twin model for ``backbone`` on the model grid at ``resolution`` mm (training mode, on the CPU).

    The regional models take their regions from the Harvard-Oxford atlas inside a whole-grid brain and their
    population reference from four random volumes (the figures depend on the grid, not on the values)."""
    import torch

    from bids_siamese.models import build_model
    from bids_siamese.models.regional import REGIONAL_MODELS
    from bids_siamese.resources import model_grid
    from bids_siamese.train.models import new_twin_model

    torch.manual_seed(seed)
    if backbone not in REGIONAL_MODELS:
        return build_model("twin", backbone).train()
    grid = model_grid(resolution)
    volumes = np.random.default_rng(seed).normal(size=(4, 1, *grid.shape)).astype(np.float32)
    settings = SimpleNamespace(backbone=backbone, atlas="harvard_oxford", atlas_labels=None, embedding_dim=128)
    return new_twin_model(settings, grid, volumes, np.ones((4, *grid.shape), bool), np.arange(4)).train()


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_training_step(backbone: str, resolution: float = 2.0, batch: int = 8, device: str = "cpu",
                          steps: int = 5, warmup: int = 2, channels_last: bool = False, compile_model: bool = False,
                          amp: bool = True) -> StepFigures:
    """Time ``steps`` training steps of ``backbone`` (after ``warmup`` steps) and count the FLOPs of one.

    Args:
        backbone: one of :data:`TRAIN_BACKBONES`.
        resolution: model-grid resolution in mm (2 mm: the app's default grid, 84 x 104 x 88).
        batch: volumes per step.
        device: ``cpu``, ``cuda`` or ``cuda:N``.
        steps: timed steps (the median is reported).
        warmup: untimed steps first (cuDNN autotuning, ``torch.compile``).
        channels_last: ``channels_last_3d`` weights and inputs.
        compile_model: ``torch.compile`` the model (the FLOPs are counted on the eager model).
        amp: bf16 autocast on CUDA (ignored on the CPU, which runs fp32).
    """
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from bids_siamese.resources import model_grid

    dev = torch.device(device)
    use_amp = amp and dev.type == "cuda"
    fmt = torch.channels_last_3d if channels_last else torch.contiguous_format
    model = twin_model(backbone, resolution).to(dev, memory_format=fmt)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    shape = tuple(model_grid(resolution).shape)
    x = torch.randn(batch, 1, *shape, generator=torch.Generator().manual_seed(1)).to(dev, memory_format=fmt)

    def step(net) -> None:
        with torch.autocast(device_type=dev.type, dtype=torch.bfloat16, enabled=use_amp):
            loss = net(x).float().pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    counter = FlopCounterMode(display=False)
    with counter:
        step(model)
    flops = float(counter.get_total_flops())
    net = torch.compile(model) if compile_model else model
    for _ in range(warmup):
        step(net)
    times = []
    for _ in range(steps):
        _sync(dev)
        start = time.perf_counter()
        step(net)
        _sync(dev)
        times.append(time.perf_counter() - start)
    seconds = statistics.median(times)
    return StepFigures(backbone=backbone, batch=batch, shape=shape, device=str(dev),
                       precision="bf16 autocast" if use_amp else "fp32", channels_last=channels_last,
                       compiled=compile_model, volumes_per_second=batch / seconds, seconds_per_step=seconds,
                       flops_per_step=flops, steps=steps)


def brain_volumes(n: int, shape, seed: int = 0) -> np.ndarray:
    """``(n, 1, *shape)`` float32 stand-ins for model-grid volumes: normal intensities (sd 1.5) in an ellipsoid
    that fills 90 % of the grid, 0 outside (augmentation works on the non-zero voxels)."""
    rng = np.random.default_rng(seed)
    centre = (np.array(shape, float) - 1) / 2
    inside = sum(((g - c) / (0.9 * c)) ** 2 for g, c in zip(np.indices(shape).astype(float), centre)) <= 1
    out = np.zeros((n, 1, *shape), np.float32)
    for i in range(n):
        out[i, 0][inside] = rng.normal(scale=1.5, size=int(inside.sum()))
    return out


@dataclass
class PipelineFigures:
    """The app's training path of a task (twin, symmetry): volumes/s of the training steps per epoch."""

    backbone: str
    batch: int
    subjects: int
    cache: str
    workers: int | None
    device: str
    per_epoch: list[float]
    assembly_seconds: float
    task: str = "twin"

    @property
    def volumes_per_second(self) -> float:
        """Median over the epochs after the first (all epochs when there is one)."""
        return statistics.median(self.per_epoch[1:] or self.per_epoch)


def measure_training_pipeline(backbone: str = "small", resolution: float = 2.0, batch: int = 8, subjects: int = 48,
                              epochs: int = 3, cache: str = "float16", workers: int | None = None,
                              device: str = "cpu") -> PipelineFigures:
    """Train ``backbone`` with ``train_twin`` for ``epochs`` epochs on ``subjects`` random brains (3/4 of them in
    MZ pairs, no validation set) held as a ``cache`` stack, with ``workers`` loader workers (None: the option is
    not passed); returns the loop's volumes/s per epoch."""
    import torch

    from bids_siamese.resources import model_grid
    from bids_siamese.train.loop import TrainConfig, TwinData, shift_voxels, train_twin

    shape = tuple(model_grid(resolution).shape)
    volumes = brain_volumes(subjects, shape)
    if cache == "float16":
        from bids_siamese.train.data import VolumeCache

        volumes = VolumeCache(volumes.astype(np.float16))
    n_twins = (3 * subjects // 4) // 2
    family = np.r_[np.repeat(np.arange(n_twins), 2), np.arange(n_twins, n_twins + subjects - 2 * n_twins)]
    same = family[:, None] == family[None, :]
    positive = (same & ~np.eye(subjects, dtype=bool)).astype(np.float32)
    assembly = _assembly_seconds(volumes, batch, shift_voxels(resolution))
    options = {} if workers is None else {"loader_workers": workers}
    config = TrainConfig(epochs=epochs, batch_size=batch, patience=epochs, max_shift=shift_voxels(resolution),
                         progress=False, **options)
    model = twin_model(backbone, resolution)
    result = train_twin(model, TwinData(volumes, family, positive, ~same), np.arange(subjects), np.arange(0), config,
                        torch.device(device))
    return PipelineFigures(backbone, batch, subjects, cache, workers, device,
                           [float(v) for v in result.history["volumes_per_second"]], assembly)


def _assembly_seconds(volumes, batch: int, max_shift: int, repeats: int = 5) -> float:
    """Median seconds to assemble one training batch in the training process: gather ``batch`` volumes from the
    stack (float32), augment them as the twin trainer does (shift, intensity, noise)."""
    import torch

    from bids_siamese.train.data import augment

    gen = torch.Generator().manual_seed(0)
    rng = np.random.default_rng(0)
    times = []
    for _ in range(repeats):
        idx = np.sort(rng.choice(len(volumes), size=min(batch, len(volumes)), replace=False))
        start = time.perf_counter()
        augment(torch.from_numpy(volumes[idx]), gen, False, max_shift, 0.1, 0.05)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure_symmetry_pipeline(backbone: str = "small", resolution: float = 4.0, batch: int = 8, scans: int = 12,
                              epochs: int = 3, cache: str = "float16", workers: int | None = None,
                              device: str = "cpu") -> PipelineFigures:
    """Train the symmetry model (``backbone``, difference fusion, difference channel) with ``train_symmetry_model``
    for ``epochs`` epochs on ``scans - 1`` brain-like random volumes on the ``resolution`` mm grid (2 samples per
    scan and epoch), validated on the last one (2 samples); training volumes held as ``cache``, ``workers`` loader
    workers (None: the option is not passed), on ``device``. Returns the loop's volumes/s per epoch (samples assembled and
    trained on per second) and the median seconds to assemble one batch of ``batch`` samples in this process."""
    import torch

    from bids_siamese.resources import model_grid
    from bids_siamese.symmetry.model import build_symmetry_model
    from bids_siamese.symmetry.simulate import LesionConfig
    from bids_siamese.symmetry.scans import prepare_scan
    from bids_siamese.symmetry.train import make_example, train_symmetry_model
    from bids_siamese.train.loop import TrainConfig

    volumes = brain_volumes(scans, tuple(model_grid(resolution).shape))
    prepared = [prepare_scan(v[0], v[0] != 0, resolution, f"scan{i}") for i, v in enumerate(volumes)]
    options = {} if workers is None else {"loader_workers": workers}
    config = TrainConfig(epochs=epochs, batch_size=batch, patience=epochs, flip_lr=True, progress=False,
                         eval_batch_size=batch, **options)
    lesion, affine = LesionConfig(), np.diag([float(resolution)] * 3 + [1.0])
    rng, times = np.random.default_rng(0), []
    for k in range(3):
        start = time.perf_counter()
        for j in range(batch):
            make_example(prepared[j % (scans - 1)], j % 2 == 0, rng, config, lesion, lesion.volume_mm3, affine)
        times.append(time.perf_counter() - start)
    torch.manual_seed(0)
    model = build_symmetry_model(backbone, "difference", 64, difference_channel=True)
    result, _ = train_symmetry_model(model, prepared[:-1], prepared[-1:], config, resolution, lesion,
                                     samples_per_scan=1, val_draws=1, volume_cache_dtype=cache, device=device)
    return PipelineFigures(backbone, batch, scans, cache, workers, device,
                           [float(v) for v in result.history["volumes_per_second"]], statistics.median(times),
                           task="symmetry")


def pipeline_line(fig: PipelineFigures) -> str:
    workers = "option not passed" if fig.workers is None else f"{fig.workers} loader workers"
    unit = "scans" if fig.task == "symmetry" else "subjects"
    what = "lesion simulation, augment" if fig.task == "symmetry" else "gather, float32, augment"
    return (f"{fig.task} training path {fig.backbone:12s} batch {fig.batch}, {fig.subjects} {unit}, {fig.cache} "
            f"cache, {workers}, {fig.device}: {fig.volumes_per_second:8.2f} volumes/s (median of epochs 2+; per "
            f"epoch {', '.join(f'{v:.2f}' for v in fig.per_epoch)}); assembling a batch ({what}) "
            f"{fig.assembly_seconds:.3f} s")


def _resident_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def measure_cache_memory(n_scans: int, resolution: float = 2.0, dtype: str = "float16", distinct: int = 8
                         ) -> dict[str, float]:
    """Read ``n_scans`` model-grid volumes (``distinct`` files, listed in turn) into the training stack of
    ``dtype``; returns its bytes, the traced peak while loading and the resident-memory growth (all in MiB)."""
    import gc
    import tempfile
    import tracemalloc
    from pathlib import Path

    import nibabel as nib

    from bids_siamese.resources import model_grid
    from bids_siamese.train.data import load_volume_cache

    grid = model_grid(resolution)
    with tempfile.TemporaryDirectory(prefix="cache_memory_") as tmp:
        files = []
        for i, volume in enumerate(brain_volumes(distinct, tuple(grid.shape))):
            files.append(Path(tmp) / f"scan{i}.nii.gz")
            nib.save(nib.Nifti1Image(volume[0], grid.affine), files[-1])
        paths = [files[i % distinct] for i in range(n_scans)]
        gc.collect()
        rss = _resident_bytes()
        tracemalloc.start()
        stack = load_volume_cache(paths, grid, dtype)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        grown = _resident_bytes() - rss
        stored = stack.nbytes
        del stack
    mib = 2.0**20
    return {"scans": n_scans, "stack_mib": stored / mib, "per_scan_mib": stored / n_scans / mib,
            "traced_peak_mib": peak / mib, "rss_growth_mib": grown / mib}


def figure_line(fig: StepFigures, peak_tflops: float | None, device_name: str) -> str:
    """The printed line of one backbone: volumes/s, FLOPs per step, TFLOP/s and (CUDA) the fraction of the peak."""
    options = ", ".join(["channels_last_3d"] * fig.channels_last + ["torch.compile"] * fig.compiled) or "eager"
    head = (f"training {fig.backbone:12s} batch {fig.batch} on {'x'.join(map(str, fig.shape))} {fig.device} "
            f"{fig.precision} ({options}): {fig.volumes_per_second:8.2f} volumes/s, {fig.seconds_per_step:.4f} s/step "
            f"(median of {fig.steps}), {fig.flops_per_step / 1e9:.2f} GFLOP/step, "
            f"{fig.tflops_per_second:.3f} TFLOP/s")
    if not fig.device.startswith("cuda"):
        return head + " (CPU: no peak fraction)"
    if peak_tflops is None:
        return head + f", fraction of bf16 dense peak unknown ({device_name} not listed; use --peak-tflops)"
    return head + f", {100 * fig.tflops_per_second / peak_tflops:.2f}% of the {peak_tflops:g} TFLOP/s bf16 dense peak"


def run_training_section(backbones, resolution: float, batch: int, device: str, steps: int, warmup: int,
                         channels_last: bool, compile_model: bool, peak_tflops: float | None,
                         batch_overrides: dict[str, int] | None = None) -> list[StepFigures]:
    """Measure each backbone and print its line; returns the figures."""
    import torch

    dev = torch.device(device)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    peak = peak_tflops if peak_tflops is not None else (bf16_peak_tflops(name) if dev.type == "cuda" else None)
    out = []
    for backbone in backbones:
        b = (batch_overrides or {}).get(backbone, batch)
        fig = measure_training_step(backbone, resolution, b, device, steps, warmup, channels_last, compile_model)
        print(figure_line(fig, peak, name), flush=True)
        out.append(fig)
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    return out


def add_training_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of the training section (shared with ``benchmarks/gpu.py``)."""
    parser.add_argument("--backbones", nargs="+", default=list(TRAIN_BACKBONES), choices=TRAIN_BACKBONES,
                        help="twin backbones to train")
    parser.add_argument("--train-batch", type=int, default=8, help="training volumes per step")
    parser.add_argument("--train-batch-for", nargs="*", default=[], metavar="BACKBONE=N",
                        help="a different batch for some backbones, e.g. densenet121=2")
    parser.add_argument("--steps", type=int, default=5, help="timed training steps per backbone")
    parser.add_argument("--warmup", type=int, default=2, help="untimed training steps first")
    parser.add_argument("--channels-last", action="store_true", help="channels_last_3d weights and inputs")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="the GPU's bf16 dense peak in TFLOP/s (default: from the device name)")
    parser.add_argument("--pipeline", action="store_true",
                        help="measure the app's training path (train_twin with the DataLoader) instead of a bare step")
    parser.add_argument("--pipeline-task", choices=("twin", "symmetry"), default="twin",
                        help="--pipeline: the trainer measured")
    parser.add_argument("--pipeline-subjects", type=int, default=48,
                        help="--pipeline: subjects in the stack (symmetry: scans, the last one for validation)")
    parser.add_argument("--pipeline-epochs", type=int, default=3, help="--pipeline: epochs (the first is not counted)")
    parser.add_argument("--volume-cache", choices=("float16", "float32"), default="float16",
                        help="--pipeline: dtype of the volume stack")
    parser.add_argument("--loader-workers", type=int, default=None,
                        help="--pipeline: DataLoader workers (default: not passed, the trainer's default)")


def run_pipeline_section(args: argparse.Namespace, device: str) -> list[PipelineFigures]:
    """``--pipeline``: measure the app's training path for each of ``--backbones`` and print its line."""
    out = []
    for backbone in args.backbones:
        if args.pipeline_task == "symmetry":
            out.append(measure_symmetry_pipeline(backbone, args.resolution, args.train_batch, args.pipeline_subjects,
                                                 args.pipeline_epochs, args.volume_cache, args.loader_workers,
                                                 device))
        else:
            out.append(measure_training_pipeline(backbone, args.resolution, args.train_batch,
                                                 args.pipeline_subjects, args.pipeline_epochs, args.volume_cache,
                                                 args.loader_workers, device))
        print(pipeline_line(out[-1]), flush=True)
    return out


def batch_overrides(items: list[str]) -> dict[str, int]:
    out = {}
    for item in items:
        name, _, value = item.partition("=")
        out[name] = int(value)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu")
    parser.add_argument("--resolution", type=float, default=2.0, help="model-grid resolution in mm")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    add_training_arguments(parser)
    parser.add_argument("--cache-memory", type=int, default=None, metavar="N",
                        help="only measure the memory of an N-scan training stack, float32 and float16")
    parser.add_argument("--distinct-files", type=int, default=8, help="--cache-memory: NIfTI files written")
    args = parser.parse_args(argv)

    if args.cache_memory:
        print(f"memory of the training stack: {args.cache_memory} scans on the {args.resolution:g} mm model grid "
              f"(read from {args.distinct_files} NIfTI files in turn)")
        for dtype in ("float32", "float16"):
            m = measure_cache_memory(args.cache_memory, args.resolution, dtype, args.distinct_files)
            print(f"volume cache {dtype}: stack {m['stack_mib']:.1f} MiB ({m['per_scan_mib']:.2f} MiB/scan), traced "
                  f"peak while loading {m['traced_peak_mib']:.1f} MiB, resident memory +{m['rss_growth_mib']:.0f} MiB",
                  flush=True)
        return 0

    os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device.startswith("cuda"):
        if not torch.cuda.is_available():
            print(f"benchmarks/train_throughput.py: no usable CUDA device (torch {torch.__version__}): nothing "
                  "measured; use --device cpu for CPU figures.", file=sys.stderr)
            return 2
        torch.backends.cudnn.benchmark = True
        print(f"device: {args.device} = {torch.cuda.get_device_name(torch.device(args.device))}; torch "
              f"{torch.__version__}, CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}")
    else:
        print(f"device: cpu, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads; torch "
              f"{torch.__version__}; load average {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    if args.pipeline:
        run_pipeline_section(args, args.device)
        return 0
    run_training_section(args.backbones, args.resolution, args.train_batch, args.device, args.steps, args.warmup,
                         args.channels_last, args.compile, args.peak_tflops, batch_overrides(args.train_batch_for))
    return 0


if __name__ == "__main__":
    sys.exit(main())
