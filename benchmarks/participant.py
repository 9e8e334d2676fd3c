"""Benchmark of the participant preprocessing steps on a (synthetic demo) BIDS dataset.

Runs the pure steps of :mod:`bids_siamese.preproc` and :mod:`bids_siamese.qc.orientation` on each
T1w scan and prints one line per figure: wall time per stage, total per scan, peak memory, the
left-right flip check, and the registration accuracy (Dice of the registered brain mask with the
template mask, correlation with the template, and mean displacement error against the demo's true
affine). The same scans then go through a reference registration, ANTs ``Affine`` via antspyx (the
optional ``reference`` extra), and optionally ``torchreg.AffineRegistration``, on the same deepbet
brains, and the time ratio and accuracy of each engine are printed.

Usage::

    python benchmarks/participant.py /tmp/demo_small --resolution 2 --limit 8 --n-threads 2
    python benchmarks/participant.py /tmp/heads12 --make-heads   # build the 12 real 1 mm heads (offline)
    python benchmarks/participant.py /tmp/heads12 --workflow --nprocs 2 --omp-nthreads 1 --n-threads 1

``--make-heads`` writes the real-heads dataset of docs/benchmarks.md to ``BIDS_DIR``: Colin27 with its skull
(``ch2.nii.gz``, mricron-data), the same zero-padded to a 289x260x219 field of view, and pydeface's mean head,
each under 4 subject labels (12 scans); ``tests/real_heads.py`` says where each file comes from.

With ``--workflow`` it times the workflow a user runs instead: ``bids-siamese BIDS_DIR OUT participant`` in a
subprocess (fresh work and output folders), with its end-to-end wall time, the CPU time of all its processes
(``resource.getrusage(RUSAGE_CHILDREN)``), the peak of the summed resident memory of its process tree (sampled
from ``/proc`` every 0.2 s) and, per node, the duration, CPU time and peak memory recorded by
:class:`bids_siamese.interfaces.base.StepInterface` in nipype's result files; then the same scans go through the
same steps as plain function calls in this process (every step the workflow runs: the stages below plus the
report figures, the asymmetry analysis and the NIfTI writes), and the two CPU times are compared.

The per-scan end-to-end time of a reference pipeline is our own load/checks, conform, deepbet and
orientation times plus that engine's registration and grid+normalise times (deepbet is run once
and shared, since both pipelines use it identically). The orientation stage includes its own
shear-free (9-dof) registration, as the orientation check requires.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
from nipype.pipeline.engine.utils import load_resultfile


def _set_thread_env(n_threads: int) -> None:
    """Thread counts for the native libraries, before they are imported (torch and this package's modules are
    imported inside the functions that use them, marked ``# deferred: after _set_thread_env``)."""
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"):
        os.environ[name] = str(n_threads)


# --------------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------------

@dataclass
class Scan:
    """One T1w scan and what the demo truth says about it (when available)."""

    path: Path
    lr_flipped: bool | None = None
    template_to_subject: np.ndarray | None = None  # true affine (None when unknown)
    truth_mask: Path | None = None


def find_scans(bids_dir: Path, limit: int | None, flipped_first: bool = True) -> list[Scan]:
    """T1w scans of the dataset, with the demo truth when ``sourcedata/truth/scans.tsv`` exists.

    With ``flipped_first`` the truth's flipped scans come first (so a small ``--limit`` includes
    them), then the others in table order.
    """
    truth = bids_dir / "sourcedata" / "truth" / "scans.tsv"
    scans: list[Scan] = []
    if truth.is_file():
        table = pd.read_csv(truth, sep="\t")
        for row in table.itertuples():
            flipped = str(row.lr_flipped).lower() in ("true", "1")
            w2t = np.asarray(json.loads(row.world_to_template_affine), dtype=np.float64)
            stem = Path(row.path).name.replace(".nii.gz", "")
            mask = truth.parent / "masks" / f"{stem}_desc-brain_mask.nii.gz"
            scans.append(Scan(bids_dir / row.path, flipped, np.linalg.inv(w2t), mask if mask.is_file() else None))
        if flipped_first:
            scans.sort(key=lambda s: not s.lr_flipped)
    else:
        scans = [Scan(p) for p in sorted(bids_dir.glob("sub-*/**/anat/*_T1w.nii*"))]
    return scans[:limit] if limit else scans


def make_heads(bids_dir: Path, copies: int = 4) -> list[Path]:
    """The real-heads benchmark dataset (see the module doc): 3 heads x ``copies`` subjects, 1 mm, with skull."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    import real_heads  # deferred: a test helper, found only once tests/ is on the path

    colin = real_heads.load_head("colin27")
    pad = [(a, b - a - s) for a, b, s in zip((54, 21, 19), (289, 260, 219), colin.shape)]
    padded_affine = colin.affine.copy()
    padded_affine[:3, 3] -= colin.affine[:3, :3] @ np.array([p[0] for p in pad], dtype=float)
    padded = nib.Nifti1Image(np.pad(np.asarray(colin.dataobj), pad), padded_affine)
    heads = {"colin": colin, "colinpadded": padded, "pydeface": real_heads.load_head("pydeface_mean")}
    bids_dir.mkdir(parents=True, exist_ok=True)
    (bids_dir / "dataset_description.json").write_text(json.dumps({"Name": "real heads", "BIDSVersion": "1.10.0"}))
    (bids_dir / "README").write_text("Real 1 mm T1w heads (Colin27, padded Colin27, pydeface's mean), 4 copies.\n")
    written = []
    for name, img in heads.items():
        for copy in range(1, copies + 1):
            path = bids_dir / f"sub-{name}{copy}" / "anat" / f"sub-{name}{copy}_T1w.nii.gz"
            path.parent.mkdir(parents=True, exist_ok=True)
            out = nib.Nifti1Image(np.asarray(img.dataobj, dtype=np.float32), img.affine)
            out.header.set_xyzt_units("mm", "sec")
            out.set_qform(img.affine, 1)
            out.set_sform(img.affine, 1)
            nib.save(out, path)
            written.append(path)
    return written


def lr_axis(affine: np.ndarray) -> int:
    """The voxel axis closest to world x (left-right)."""
    return int(np.argmax(np.abs(np.asarray(affine)[0, :3])))


def flip_array(img: nib.spatialimages.SpatialImage) -> nib.Nifti1Image:
    """The image with its voxel array flipped along the left-right axis, header unchanged."""
    data = np.flip(img.get_fdata(dtype=np.float32), axis=lr_axis(img.affine))
    return nib.Nifti1Image(np.ascontiguousarray(data), img.affine, img.header)


# --------------------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------------------

def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice overlap of two boolean arrays."""
    total = int(a.sum()) + int(b.sum())
    return 2.0 * float(np.logical_and(a, b).sum()) / total if total else 1.0


def correlation(a: np.ndarray, b: np.ndarray, region: np.ndarray) -> float:
    """Pearson correlation of two arrays over a region."""
    return float(np.corrcoef(a[region].astype(np.float64), b[region].astype(np.float64))[0, 1])


def displacement_error_mm(estimate: np.ndarray, truth: np.ndarray, points: np.ndarray) -> float:
    """Mean distance (mm) between where two template->subject affines send template points (N, 3)."""
    homogeneous = np.c_[points, np.ones(len(points))]
    return float(np.linalg.norm(homogeneous @ estimate.T - homogeneous @ truth.T, axis=1).mean())


class Stopwatch:
    """Wall and CPU (all threads of this process) seconds per named stage."""

    def __init__(self) -> None:
        self.wall: dict[str, float] = {}
        self.cpu: dict[str, float] = {}

    @contextlib.contextmanager
    def stage(self, name: str):
        wall, cpu = time.perf_counter(), time.process_time()
        try:
            yield
        finally:
            self.wall[name] = self.wall.get(name, 0.0) + time.perf_counter() - wall
            self.cpu[name] = self.cpu.get(name, 0.0) + time.process_time() - cpu


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (MB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


# --------------------------------------------------------------------------------------------------
# Pipelines
# --------------------------------------------------------------------------------------------------

@dataclass
class Prepared:
    """What the stages before registration produce for one scan."""

    conformed: nib.Nifti1Image
    mask: np.ndarray
    brain: nib.Nifti1Image
    watch: Stopwatch = field(default_factory=Stopwatch)

    @property
    def times(self) -> dict[str, float]:
        """Wall seconds per stage."""
        return self.watch.wall


def prepare(path: Path, n_threads: int, flip: bool = False) -> Prepared:
    """load + header checks, conform and deepbet for one scan (optionally array-flipped first)."""
    from bids_siamese.preproc.brain import extract_brain  # deferred: after _set_thread_env
    from bids_siamese.preproc.conform import conform, header_checks, load_t1w  # deferred: after _set_thread_env

    watch = Stopwatch()
    with watch.stage("load_checks"):
        img = load_t1w(path)
        header_checks(img)
        if flip:
            img = flip_array(img)
    with watch.stage("conform"):
        conformed = conform(img)
    with watch.stage("brain_extraction"):
        mask, brain = extract_brain(conformed, n_threads=n_threads)
    return Prepared(conformed, mask, brain, watch)


#: Degrees of freedom of the registration used for the left-right orientation check (shear-free,
#: see bids_siamese.qc.orientation).


def grid_stage(prepared: Prepared, matrix: np.ndarray, resolution: float) -> tuple[float, dict]:
    """grid + normalise (timed) and the registration accuracy on the grid; returns (seconds, results)."""
    from bids_siamese.preproc.grid import (  # deferred: after _set_thread_env
        normalise_intensity,
        resample_mask_to_grid,
        resample_to_grid,
        template_on_grid,
    )
    from bids_siamese.resources import model_grid  # deferred: after _set_thread_env

    grid = model_grid(resolution)
    template, template_mask = template_on_grid(grid)
    watch = Stopwatch()
    with watch.stage("grid_normalise"):
        on_grid = resample_to_grid(prepared.brain, matrix, grid)
        mask_on_grid = resample_mask_to_grid(prepared.mask, prepared.brain.affine, matrix, grid)
        normalised = normalise_intensity(on_grid, mask_on_grid)
    seconds = watch.wall["grid_normalise"]
    region = mask_on_grid | template_mask
    results = {
        "dice": dice(mask_on_grid, template_mask),
        "corr": correlation(on_grid, template, region),
        "normalised_median": float(np.median(normalised[mask_on_grid])),
    }
    results["cpu"] = watch.cpu["grid_normalise"]
    return seconds, results


def orientation_stage(prepared: Prepared, resolution: float, n_threads: int,
                      forward: np.ndarray | None = None) -> tuple[float, dict]:
    """The paired left-right test (9-dof registrations of the scan and of its mirror) and the verdict, timed.

    As in the workflow, the scan's 9-dof registration refines the 12-dof one (``forward``) when given, and the
    mirror's refines the mirror of the scan's.
    """
    from bids_siamese.preproc.grid import template_on_grid  # deferred: after _set_thread_env
    from bids_siamese.preproc.register import register_affine  # deferred: after _set_thread_env
    from bids_siamese.qc.orientation import QC_DOF, lr_flip_verdict, paired_flip_test  # deferred: as above
    from bids_siamese.resources import model_grid  # deferred: after _set_thread_env

    grid = model_grid(resolution)
    template, _ = template_on_grid(grid)
    watch = Stopwatch()
    with watch.stage("orientation"):
        matrix = register_affine(prepared.brain, prepared.mask, nib.load(str(_template_path())),
                                 resolution=max(resolution, 2.0), n_threads=n_threads, dof=QC_DOF, initial=forward)
        test = paired_flip_test(prepared.conformed, prepared.mask, grid, template, resolution=resolution,
                                n_threads=n_threads, matrix=matrix)
        check = {"statistic": test["difference"], **lr_flip_verdict(test["difference"])}
    return watch.wall["orientation"], {**check, "cpu": watch.cpu["orientation"]}


def register_torch(prepared: Prepared, resolution: float, n_threads: int, seed: int = 0) -> np.ndarray:
    """This package's engine."""
    from bids_siamese.preproc.register import register_affine  # deferred: after _set_thread_env

    fixed = nib.load(str(_template_path()))
    return register_affine(prepared.brain, prepared.mask, fixed, resolution=resolution, seed=seed, n_threads=n_threads)


def register_ants(prepared: Prepared, resolution: float, n_threads: int, seed: int = 0) -> np.ndarray:
    """antspyx ``ants.registration(type_of_transform='Affine')``, template brain fixed, subject brain moving.

    The forward transform maps fixed (MNI) LPS points to moving (subject) LPS points, the same
    direction as ``register_affine``; it is converted to RAS.
    """
    import ants  # deferred: optional reference engine (the 'reference' extra)

    from bids_siamese.resources import LPS_FROM_RAS  # deferred: after _set_thread_env

    ants.config._random_seed = seed  # what set_ants_deterministic() sets, without forcing 1 thread
    fixed = ants.image_read(str(_template_path()))
    moving = ants.from_nibabel_nifti(prepared.brain)
    result = ants.registration(fixed=fixed, moving=moving, type_of_transform="Affine")
    transform = ants.read_transform(result["fwdtransforms"][0])
    params = np.asarray(transform.parameters, dtype=np.float64)
    centre = np.asarray(transform.fixed_parameters, dtype=np.float64)
    linear = params[:9].reshape(3, 3)
    lps = np.eye(4)
    lps[:3, :3] = linear
    lps[:3, 3] = params[9:] + centre - linear @ centre
    for path in result["fwdtransforms"] + result["invtransforms"]:
        Path(path).unlink(missing_ok=True)
    return LPS_FROM_RAS @ lps @ LPS_FROM_RAS


def register_torchreg(prepared: Prepared, resolution: float, n_threads: int, seed: int = 0) -> np.ndarray:
    """``torchreg.AffineRegistration`` with its defaults (Adam, MSE, scales 4 and 2, 500+100 steps).

    torchreg registers two arrays on the same grid in normalised coordinates and knows nothing of
    world space, so the subject brain is first resampled onto the template's 2 mm grid with the
    same centre-of-mass/volume initialisation as ``register_affine``; the result is converted back
    to a template->subject world matrix. Intensities are scaled to [0, 1] (99th percentile).
    """
    import torch  # deferred: after _set_thread_env
    import torchreg  # deferred: optional reference engine (the 'reference' extra)

    from bids_siamese.preproc.brain import torch_threads  # deferred: after _set_thread_env
    from bids_siamese.preproc.grid import resample_to_grid  # deferred: after _set_thread_env
    from bids_siamese.resources import Grid  # deferred: after _set_thread_env

    template = nib.load(str(_template_path()))
    grid_affine = template.affine @ np.diag([2.0, 2.0, 2.0, 1.0])
    grid = Grid(shape=tuple(s // 2 for s in template.shape), affine=grid_affine)
    init = _moments_init(prepared, template)
    fixed = resample_to_grid(template, np.eye(4), grid)
    moving = resample_to_grid(prepared.brain, init, grid)
    fixed /= np.percentile(fixed[fixed > 0], 99)
    moving /= np.percentile(moving[moving > 0], 99)
    with torch_threads(n_threads):
        torch.manual_seed(seed)
        reg = torchreg.AffineRegistration(is_3d=True, verbose=False)
        reg(torch.from_numpy(moving)[None, None], torch.from_numpy(fixed)[None, None], return_moved=False)
        theta = reg.get_affine().numpy()[0].astype(np.float64)  # (3, 4): output (x,y,z) -> input (x,y,z)
    # grid voxel (i, j, k) <-> normalised (x, y, z) = (k, j, i) scaled to [-1, 1] (align_corners)
    shape = np.asarray(grid.shape, dtype=float)
    to_norm = np.zeros((4, 4))
    for out_axis, array_axis in enumerate((2, 1, 0)):
        to_norm[out_axis, array_axis] = 2.0 / (shape[array_axis] - 1)
        to_norm[out_axis, 3] = -1.0
    to_norm[3, 3] = 1.0
    theta4 = np.vstack([theta, [0, 0, 0, 1]])
    vox2vox = np.linalg.inv(to_norm) @ theta4 @ to_norm  # grid voxel -> moving-grid voxel
    return init @ grid.affine @ vox2vox @ np.linalg.inv(grid.affine)


def _moments_init(prepared: Prepared, template: nib.spatialimages.SpatialImage) -> np.ndarray:
    """Centre-of-mass translation and cube-root volume-ratio scale (template -> subject)."""
    from bids_siamese.preproc.register import centre_and_cov  # deferred: after _set_thread_env

    centre_f, _, volume_f = centre_and_cov(template.get_fdata() > 0, template.affine)
    centre_m, _, volume_m = centre_and_cov(prepared.mask, prepared.brain.affine)
    scale = (volume_m / volume_f) ** (1.0 / 3.0)
    init = np.eye(4)
    init[:3, :3] *= scale
    init[:3, 3] = centre_m - scale * centre_f
    return init


ENGINES = {"torch": register_torch, "ants": register_ants, "torchreg": register_torchreg}


def _template_path() -> Path:
    from bids_siamese.resources import template_brain_path  # deferred: after _set_thread_env

    return template_brain_path()


def template_points(resolution: float) -> np.ndarray:
    """Template-brain voxel centres on the model grid (mm), where displacement errors are measured."""
    from bids_siamese.preproc.grid import template_on_grid  # deferred: after _set_thread_env
    from bids_siamese.resources import model_grid  # deferred: after _set_thread_env

    grid = model_grid(resolution)
    _, mask = template_on_grid(grid)
    ijk = np.argwhere(mask)
    return ijk @ grid.affine[:3, :3].T + grid.affine[:3, 3]


# --------------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------------

STAGES = ("load_checks", "conform", "brain_extraction", "registration", "grid_normalise", "orientation")


def _summary(values: list[float]) -> str:
    array = np.asarray(values, dtype=float)
    return f"median {np.median(array):.2f}  mean {array.mean():.2f}  max {array.max():.2f}"


# --------------------------------------------------------------------------------------------------
# The workflow end to end (--workflow)
# --------------------------------------------------------------------------------------------------

def _proc_tree_rss_mb(root_pid: int) -> float:
    """Summed resident memory (MB) of ``root_pid`` and all its descendants, from /proc."""
    parent: dict[int, int] = {}
    rss: dict[int, float] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as handle:
                fields = handle.read().rsplit(")", 1)[1].split()
            parent[int(entry)] = int(fields[1])
            rss[int(entry)] = int(fields[21]) * os.sysconf("SC_PAGE_SIZE") / 2**20
        except (OSError, IndexError, ValueError):
            continue
    total, stack = 0.0, [root_pid]
    children: dict[int, list[int]] = {}
    for pid, ppid in parent.items():
        children.setdefault(ppid, []).append(pid)
    while stack:
        pid = stack.pop()
        total += rss.get(pid, 0.0)
        stack.extend(children.get(pid, []))
    return total


def run_workflow(bids_dir: Path, labels: list[str], nprocs: int, omp: int, resolution: float, device: str,
                 root: Path) -> dict:
    """Run the app's participant level in a subprocess; returns wall, CPU, peak memory and the node records."""
    out, work = root / "out", root / "work"
    cmd = [sys.executable, "-m", "bids_siamese", str(bids_dir), str(out), "participant", "--skip-bids-validation",
           "--nprocs", str(nprocs), "--omp-nthreads", str(omp), "--resolution", str(resolution),
           "--device", device, "-w", str(work)]
    if labels:
        cmd += ["--participant-label", *labels]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    load_before = os.getloadavg()
    wall = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peak = [0.0]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], _proc_tree_rss_mb(proc.pid))
            done.wait(0.2)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    log, _ = proc.communicate()
    wall = time.perf_counter() - wall
    done.set()
    sampler.join()
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise RuntimeError(f"bids-siamese exited with {proc.returncode}:\n{log[-3000:]}")
    nodes = []
    for result in sorted(work.glob("**/result_*.pklz")):
        res = load_resultfile(str(result))
        runtime = res.runtime
        scan = next((p for p in result.parts if p.startswith("scan_")), "")
        nodes.append({"scan": scan, "node": result.parent.name, "duration": float(getattr(runtime, "duration", 0.0)),
                      "cpu": getattr(runtime, "cpu_seconds", None), "peak_gb": getattr(runtime, "peak_rss_gb", None)})
    return {
        "wall": wall,
        "cpu": (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime),
        "max_process_rss_mb": after.ru_maxrss / 1024.0,
        "peak_tree_rss_mb": peak[0],
        "load_before": load_before,
        "load_after": os.getloadavg(),
        "nodes": nodes,
        "n_scans": len({n["scan"] for n in nodes}),
    }


def stage_cpu(path: Path, resolution: float, n_threads: int, reg_threads: int, out_dir: Path) -> Stopwatch:
    """Every step of the per-scan workflow as plain calls in this process (timed per stage)."""
    from bids_siamese.bids.derivatives import write_nifti  # deferred: after _set_thread_env
    from bids_siamese.preproc.grid import (  # deferred: after _set_thread_env
        normalise_intensity,
        resample_mask_to_grid,
        resample_to_grid,
        template_on_grid,
    )
    from bids_siamese.reports.figures import (  # deferred: after _set_thread_env
        mask_contour_mosaic,
        orientation_figure,
        registration_mosaic,
    )
    from bids_siamese.resources import model_grid  # deferred: after _set_thread_env
    from bids_siamese.symmetry.analysis import analyse_scan, template_reference  # deferred: after _set_thread_env
    from bids_siamese.atlas import atlas_on_grid  # deferred: after _set_thread_env
    from bids_siamese.symmetry.regional import homologous_pairs  # deferred: after _set_thread_env

    prepared = prepare(path, n_threads)
    watch = prepared.watch
    with watch.stage("registration"):
        matrix = register_torch(prepared, resolution, reg_threads)
    with watch.stage("grid_normalise"):
        grid = model_grid(resolution)
        mask_grid = resample_mask_to_grid(prepared.mask, prepared.brain.affine, matrix, grid)
        data = normalise_intensity(resample_to_grid(prepared.conformed, matrix, grid), mask_grid)
    watch.wall["orientation"], check = orientation_stage(prepared, resolution, reg_threads, forward=matrix)
    watch.cpu["orientation"] = check["cpu"]
    with watch.stage("figures"):
        template, _ = template_on_grid(grid)
        mask_contour_mosaic(prepared.conformed.get_fdata(dtype=np.float32), prepared.mask,
                            zooms=tuple(float(z) for z in prepared.conformed.header.get_zooms()[:3]))
        registration_mosaic(data, template)
        orientation_figure(data, template)
    with watch.stage("asymmetry"):
        labels, names = atlas_on_grid("harvard_oxford", resolution)
        reference = template_reference(resolution, 6.0, "harvard_oxford")
        result = analyse_scan(data, mask_grid, resolution, labels, homologous_pairs(names), reference, fwhm_mm=6.0,
                              affine=grid.affine, names=names)
    with watch.stage("write"):
        for name, array, affine in (("preproc", data, grid.affine),
                                    ("grid_mask", mask_grid.astype(np.uint8), grid.affine),
                                    ("native_mask", prepared.mask.astype(np.uint8), prepared.conformed.affine),
                                    ("asymmetry", result.ai.astype(np.float32), grid.affine)):
            write_nifti(out_dir / f"{name}.nii.gz", nib.Nifti1Image(array, affine))
    return watch


def workflow_main(args: argparse.Namespace) -> int:
    """``--workflow``: the app end to end next to its steps as plain calls, one line per figure."""
    labels = [label.removeprefix("sub-") for label in args.participant_label]
    scans = [s for s in find_scans(args.bids_dir, None, flipped_first=False)
             if not labels or any(f"sub-{label}_" in s.path.name for label in labels)]
    print(f"workflow benchmark: {len(scans)} scan(s) of {args.bids_dir}; --nprocs {args.nprocs} --omp-nthreads "
          f"{args.omp_nthreads} --device {args.device}; {os.cpu_count()} CPUs")
    with tempfile.TemporaryDirectory(prefix="bench_workflow_") as tmp:
        run = run_workflow(args.bids_dir, labels, args.nprocs, args.omp_nthreads, args.resolution, args.device,
                           Path(tmp))
    n = run["n_scans"]
    by_node: dict[str, list[dict]] = {}
    for node in run["nodes"]:
        by_node.setdefault(node["node"], []).append(node)
    print(f"load average before: {' '.join(f'{v:.2f}' for v in run['load_before'])}, after: "
          f"{' '.join(f'{v:.2f}' for v in run['load_after'])}")
    node_cpu = sum(x["cpu"] or 0.0 for x in run["nodes"])
    for name, rows in sorted(by_node.items(), key=lambda kv: -sum(r["duration"] for r in kv[1])):
        cpu = [r["cpu"] for r in rows if r["cpu"] is not None]
        peak = [r["peak_gb"] for r in rows if r["peak_gb"] is not None]
        print(f"node {name:22s} duration s/scan median {np.median([r['duration'] for r in rows]):6.2f}"
              + (f"  cpu s/scan median {np.median(cpu):6.2f}" if cpu else "")
              + (f"  peak memory max {max(peak):5.2f} GB" if peak else ""))
    print(f"workflow: {n} scans in {run['wall']:.1f} s wall ({run['wall'] / n:.2f} s/scan), CPU {run['cpu']:.1f} s "
          f"({run['cpu'] / n:.2f} s/scan; inside the nodes {node_cpu / n:.2f} s/scan); peak memory: process tree "
          f"{run['peak_tree_rss_mb']:.0f} MB, largest process {run['max_process_rss_mb']:.0f} MB")

    _set_thread_env(args.n_threads)
    watches = []
    # the plain calls on every --stage-every-th scan (the dataset's copies of one head cost the same)
    with tempfile.TemporaryDirectory(prefix="bench_stages_") as tmp:
        wall = time.perf_counter()
        for scan in scans[::args.stage_every]:
            watches.append(stage_cpu(scan.path, args.resolution, args.n_threads, args.reg_threads, Path(tmp)))
        wall = time.perf_counter() - wall
    stages = list(watches[0].cpu)
    for stage in stages:
        print(f"stage {stage:16s} cpu s/scan median {np.median([w.cpu[stage] for w in watches]):6.2f}  "
              f"wall s/scan median {np.median([w.wall[stage] for w in watches]):6.2f}")
    stage_total = sum(sum(w.cpu.values()) for w in watches)
    print(f"stages as plain calls: {len(watches)} scans, CPU {stage_total:.1f} s ({stage_total / len(watches):.2f} "
          f"s/scan), wall {wall:.1f} s ({wall / len(watches):.2f} s/scan); peak RSS {peak_rss_mb():.0f} MB")
    per_stage = stage_total / len(watches)
    print(f"workflow CPU / stage CPU (per scan): {run['cpu'] / n / per_stage:.2f} (whole run), "
          f"{node_cpu / n / per_stage:.2f} (inside the nodes); load average now "
          f"{' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    figures_cpu = sum(r["cpu"] or 0.0 for r in by_node.get("figures", [])) / n
    print(f"PER SCAN (workflow, --nprocs {args.nprocs}, {n} scans): wall {run['wall'] / n:.2f} s, CPU {run['cpu'] / n:.2f} s "
          f"(all processes); figures node {figures_cpu:.2f} CPU s (mean) = {100 * figures_cpu / (run['cpu'] / n):.1f} % of "
          f"the scan's CPU")
    if args.json:
        args.json.write_text(json.dumps({"workflow": run, "stages": [{"cpu": w.cpu, "wall": w.wall} for w in watches]},
                                        indent=1, default=float))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bids_dir", type=Path)
    parser.add_argument("--resolution", type=float, default=2.0)
    parser.add_argument("--limit", type=int, default=None, help="first N scans (flipped ones first)")
    parser.add_argument("--n-threads", type=int, default=2, help="torch/ITK threads (deepbet, ANTs)")
    parser.add_argument("--reg-threads", type=int, default=1,
                        help="torch threads for our registration (default 1: its tensors are small, and extra "
                             "threads only add synchronisation stalls on a busy machine)")
    parser.add_argument("--reference", default="ants", help="comma-separated reference engines: ants,torchreg or none")
    parser.add_argument("--json", type=Path, default=None, help="also write per-scan results as JSON")
    parser.add_argument("--workflow", action="store_true",
                        help="time the app's participant workflow end to end next to its steps as plain calls")
    parser.add_argument("--nprocs", type=int, default=2, help="--workflow: the app's --nprocs")
    parser.add_argument("--omp-nthreads", type=int, default=2, help="--workflow: the app's --omp-nthreads")
    parser.add_argument("--device", default="cpu", help="--workflow: the app's --device")
    parser.add_argument("--participant-label", nargs="+", default=[], help="--workflow: these participants only")
    parser.add_argument("--stage-every", type=int, default=1,
                        help="--workflow: time the steps as plain calls on every N-th scan only (4 on the real-heads "
                             "dataset: one copy of each head)")
    parser.add_argument("--make-heads", action="store_true",
                        help="write the 12-scan real-heads dataset to BIDS_DIR and exit")
    args = parser.parse_args(argv)
    if args.make_heads:
        print(f"wrote {len(make_heads(args.bids_dir))} scans to {args.bids_dir}")
        return 0
    if args.workflow:
        return workflow_main(args)
    _set_thread_env(args.n_threads)
    reg_threads = args.reg_threads
    references = [e for e in args.reference.split(",") if e and e != "none"]

    scans = find_scans(args.bids_dir, args.limit)
    if not scans:
        print(f"no T1w scans under {args.bids_dir}", file=sys.stderr)
        return 1
    points = template_points(args.resolution)
    print(f"scans: {len(scans)}  resolution: {args.resolution} mm  threads: {args.n_threads} (registration {reg_threads})")

    rows = []
    prepared_all = []
    spill = tempfile.TemporaryDirectory(prefix="bench_participant_")
    print(f"load average at start: {' '.join(f'{v:.2f}' for v in os.getloadavg())} (on {os.cpu_count()} CPUs)")
    for scan in scans:
        prepared = prepare(scan.path, args.n_threads)
        with prepared.watch.stage("registration"):
            matrix = register_torch(prepared, args.resolution, reg_threads)
        prepared.times["grid_normalise"], results = grid_stage(prepared, matrix, args.resolution)
        prepared.watch.cpu["grid_normalise"] = results.pop("cpu")
        prepared.times["orientation"], check = orientation_stage(prepared, args.resolution, reg_threads, forward=matrix)
        prepared.watch.cpu["orientation"] = check.pop("cpu")
        results.update(check)
        error = None
        if scan.template_to_subject is not None and not scan.lr_flipped:
            error = displacement_error_mm(matrix, scan.template_to_subject, points)
        row = {"scan": scan.path.name, "lr_flipped": scan.lr_flipped, **prepared.times,
               "total": sum(prepared.times.values()), "cpu_total": sum(prepared.watch.cpu.values()),
               **{f"cpu_{k}": v for k, v in prepared.watch.cpu.items()},
               **results, "error_mm": error, "engine": "torch"}
        rows.append(row)
        if references:  # keep the deepbet result on disk, not in memory (peak RSS is per process)
            stem = Path(spill.name) / f"{len(prepared_all)}"
            nib.save(prepared.brain, f"{stem}_brain.nii")
            np.save(f"{stem}_mask.npy", prepared.mask)
            prepared_all.append((scan, f"{stem}", dict(prepared.times)))
        del prepared
        print(
            f"{scan.path.name}: total {row['total']:.2f} s (cpu {row['cpu_total']:.2f} s) "
            + " ".join(f"{k}={row[k]:.2f}" for k in STAGES)
            + f" | flip p={row['lr_flip_probability']:.3f} (truth {scan.lr_flipped}) diff={row['statistic']:+.3f} {row['lr_flip_verdict']}"
            + f" | dice={row['dice']:.3f} corr={row['corr']:.3f} err={'n/a' if error is None else f'{error:.2f} mm'}",
            flush=True,
        )
    ours_peak = peak_rss_mb()

    print(f"load average after our pipeline: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    for stage in (*STAGES, "total"):
        cpu_key = "cpu_total" if stage == "total" else f"cpu_{stage}"
        print(f"stage {stage:16s} wall s/scan: {_summary([r[stage] for r in rows])}   "
              f"cpu s/scan: {_summary([r[cpu_key] for r in rows])}")
    print(f"peak RSS (our pipeline, all scans): {ours_peak:.0f} MB")
    flipped = [r for r in rows if r["lr_flipped"]]
    unflipped = [r for r in rows if r["lr_flipped"] is False]
    if flipped:
        print("flipped scans p(flip): " + ", ".join(f"{r['scan']}={r['lr_flip_probability']:.3f}" for r in flipped))
    if unflipped:
        worst = max(unflipped, key=lambda r: r["lr_flip_probability"])
        print(f"max p(flip) among unflipped: {worst['lr_flip_probability']:.3f} ({worst['scan']})")
    detected = sum(r["lr_flip_suspected"] for r in flipped)
    false_alarms = sum(r["lr_flip_suspected"] for r in unflipped)
    print(f"flip detection: {detected}/{len(flipped)} flipped flagged, {false_alarms}/{len(unflipped)} unflipped flagged")

    engine_rows = {"torch": rows}
    for engine in references:
        engine_rows[engine] = []
        for scan, stem, times in prepared_all:
            brain = nib.load(f"{stem}_brain.nii")
            brain = nib.Nifti1Image(brain.get_fdata(dtype=np.float32), brain.affine)
            prepared = Prepared(brain, np.load(f"{stem}_mask.npy"), brain)
            prepared.watch.wall.update(times)
            t, cpu = time.perf_counter(), time.process_time()
            matrix = ENGINES[engine](prepared, args.resolution, args.n_threads)
            reg_time, reg_cpu = time.perf_counter() - t, time.process_time() - cpu
            grid_time, results = grid_stage(prepared, matrix, args.resolution)
            results.pop("cpu")
            error = None
            if scan.template_to_subject is not None and not scan.lr_flipped:
                error = displacement_error_mm(matrix, scan.template_to_subject, points)
            # same pipeline with this engine's registration (and its own grid stage time)
            total = sum(v for k, v in prepared.times.items() if k not in ("registration", "grid_normalise"))
            total += reg_time + grid_time
            engine_rows[engine].append({"scan": scan.path.name, "lr_flipped": scan.lr_flipped, "registration": reg_time,
                                        "cpu_registration": reg_cpu,
                                        "total": total, **results, "error_mm": error, "engine": engine})
            print(f"{engine} {scan.path.name}: registration {reg_time:.2f} s (cpu {reg_cpu:.2f} s) total {total:.2f} s | "
                  f"dice={results['dice']:.3f} corr={results['corr']:.3f} "
                  f"err={'n/a' if error is None else f'{error:.2f} mm'}",
                  flush=True)

    print("engine comparison (median over scans; error over unflipped scans with truth):")
    for engine, erows in engine_rows.items():
        errors = [r["error_mm"] for r in erows if r["error_mm"] is not None]
        err = f"{np.median(errors):.2f} mm (max {np.max(errors):.2f})" if errors else "n/a"
        ratio = np.median([r["registration"] for r in erows]) / np.median([r["registration"] for r in rows])
        total_ratio = np.median([r["total"] for r in erows]) / np.median([r["total"] for r in rows])
        cpu_ratio = np.median([r["cpu_registration"] for r in erows]) / np.median([r["cpu_registration"] for r in rows])
        print(f"  {engine:8s} registration {np.median([r['registration'] for r in erows]):6.2f} s "
              f"(x{ratio:.2f} of torch; cpu {np.median([r['cpu_registration'] for r in erows]):.2f} s, x{cpu_ratio:.2f})  total {np.median([r['total'] for r in erows]):6.2f} s (x{total_ratio:.2f}) "
              f"dice {np.median([r['dice'] for r in erows]):.3f} corr {np.median([r['corr'] for r in erows]):.3f} "
              f"error {err}")
    print(f"peak RSS (whole run, including references): {peak_rss_mb():.0f} MB")
    spill.cleanup()
    if args.json:
        args.json.write_text(json.dumps({e: r for e, r in engine_rows.items()}, indent=1, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
