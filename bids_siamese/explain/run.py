"""Group level: relevance maps of a trained twin model, region ranking, Workbench files and the group report.

:func:`run_explain` is called by the group level after ``--task twin`` training or application. It reads the
participant-level model-grid T1w files and the checkpoint, and writes (names in docs/outputs.md):

* per scan, ``<source>_space-MNI152NLin2009cAsym_desc-lrp_relevance.nii.gz`` (+ ``.json``): the LRP
  relevance of a CNN backbone on the model grid (signed, summing to about the target value), or
  ``desc-decomposition_relevance`` for the regional models (their exact per-voxel decomposition, not LRP); with
  ``explain_surfaces`` also ``<source>_hemi-{L,R}_space-{fsLR_den-32k,fsaverage5}_desc-<desc>_relevance.func.gii``;
* ``group/``: the 0..1 group map as NIfTI, GIFTI (fsLR 32k, fsaverage5) and CIFTI-2, the template surfaces
  and brain, and the Workbench spec files;
* ``group_regions_ranking.tsv``, ``group_regions_subjects.tsv``, ``group_regions_statistics.tsv``;
* ``group.html`` (via :func:`bids_siamese.reports.group.write_group_report`).

Group map: each scan's map is divided by its total relevance (so every scan weighs the same and the sign
means "for" the target) and averaged per subject; each subject's map is smoothed (Gaussian,
``relevance_fwhm`` mm), its negative part set to 0, divided by its 99.5th percentile and clipped at 1
(0..1), restricted to the brain (voxels inside at least half of the subjects' brain masks); the group map is
the mean of the subjects' 0..1 maps, scaled to 0..1 the same way.
"""
from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import nibabel as nib
import numpy as np
import pandas as pd
import torch
from scipy import ndimage
from threadpoolctl import threadpool_limits  # a dependency of scikit-learn

from ..atlas import Atlas, labels_on_grid, load_atlas
from ..bids.derivatives import (
    EXPLAIN_FILES, mask_path_for, model_folder, relevance_desc, relevance_path, template_reference, write_json,
    write_nifti, write_text, write_tsv,
)
from ..bids.grids import model_grid_sidecar
from ..config import Settings
from ..errors import NoInputError, UsageError, UserError
from ..models.checkpoint import load_checkpoint
from ..models.regional import RegionalEncoder
from ..preproc.brain import torch_threads
from ..preproc.grid import template_on_grid
from ..reports.group import write_group_report
from ..resources import TEMPLATE, Grid, model_grid
from ..surface.spec import write_surface_maps, write_workbench_bundle
from ..train.data import find_preproc, load_volume
from ..train.reproducibility import configure_determinism, seed_everything
from ..train.run import load_relations
from .canonize import CanonicalModel, canonize
from .lrp import distance_shares, embedding_network, embedding_shares, lrp_memory_gb, relevance_maps
from .regions import class_contrast, rank_regions, subject_region_importance

LOG = logging.getLogger("bids_siamese.group.explain")

#: The ``.bidsignore`` patterns of the explanation outputs (entries of ``bids.derivatives.BIDSIGNORE``), added
#: when missing: an OUTPUT_DIR made by an older version may lack them.
BIDSIGNORE_PATTERNS = ("/group*", "*_relevance.*")

#: The group and subject maps are divided by this percentile of their positive in-brain values (then clipped).
UNIT_PERCENTILE = 99.5
#: Memory declared per scan thread (a scan, its mask and relevance map, their compressed bytes, surface sampling).
SCAN_MEM_GB = 0.5
#: Most scans per LRP pass (and per embedding pass): larger batches gain little and hold more memory.
MAX_LRP_BATCH = 8

REGIONAL_DESCRIPTION = (
    "Exact per-voxel decomposition of the regional twin model (no LRP approximation): for an embedding target, "
    "the squared embedding e**2 (sums to 1: where the model looks, by learned region weight); for the distance "
    "target, (e_a - e_b)**2 / 2 with the impostor scan in PairedWith (sums to their cosine distance). Values of "
    "each 4 mm block are shared equally by its 2 mm voxels.")

@dataclass
class ExplainResult:
    """What the explanation step computed (used by the group report)."""

    scans: pd.DataFrame
    group_map: np.ndarray
    affine: np.ndarray
    template: np.ndarray | None
    ranking: pd.DataFrame
    statistics: pd.DataFrame
    embeddings: pd.DataFrame
    target: str
    atlas: str
    fwhm: float
    written: list[Path] = field(default_factory=list)


# ----------------------------------------------------------------------------------------------------------
# Pure steps
# ----------------------------------------------------------------------------------------------------------
def unit_total(relevance: np.ndarray) -> np.ndarray:
    """A relevance map divided by its total (0 map when the total is 0).

    Examples:
        >>> unit_total(np.array([1.0, 3.0])).tolist(), unit_total(np.array([-1.0, -1.0])).tolist()
        ([0.25, 0.75], [0.5, 0.5])
    """
    total = float(np.sum(relevance, dtype=np.float64))
    return (relevance / total).astype(np.float32) if abs(total) > 1e-20 else np.zeros_like(relevance, np.float32)


def smooth(volume: np.ndarray, fwhm_mm: float, voxel_mm: float) -> np.ndarray:
    """Gaussian smoothing with a full width at half maximum in mm (0: unchanged).

    Examples:
        >>> v = np.zeros((9, 9, 9)); v[4, 4, 4] = 1
        >>> s = smooth(v, 4.0, 2.0)
        >>> round(float(s.sum()), 4), bool(s[4, 4, 4] < 1)
        (1.0, True)
    """
    if not fwhm_mm or fwhm_mm <= 0:
        return np.asarray(volume, dtype=np.float32)
    sigma = fwhm_mm / (2.0 * np.sqrt(2.0 * np.log(2.0))) / voxel_mm
    return ndimage.gaussian_filter(np.asarray(volume, dtype=np.float32), sigma, mode="constant")


def to_unit_range(volume: np.ndarray, mask: np.ndarray | None = None, percentile: float = UNIT_PERCENTILE) -> np.ndarray:
    """Negative part set to 0, divided by a high percentile of the positive values and clipped (0..1); 0 outside
    ``mask``. A percentile rather than the maximum keeps one extreme voxel from squashing the whole map.

    Examples:
        >>> to_unit_range(np.array([-1.0, 1.0, 4.0]), percentile=100).tolist()
        [0.0, 0.25, 1.0]
    """
    out = np.clip(np.asarray(volume, dtype=np.float32), 0, None)
    if mask is not None:
        out = np.where(mask, out, 0.0).astype(np.float32)
    positive = out[out > 0]
    top = float(np.percentile(positive, percentile)) if positive.size else 0.0
    return np.clip(out / top, 0.0, 1.0).astype(np.float32) if top > 0 else out


def group_relevance(subject_maps: Mapping[str, np.ndarray], brain: np.ndarray, fwhm_mm: float, voxel_mm: float,
                    map_fn: Callable[..., Iterable] = map) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Each subject's 0..1 map and the 0..1 group map (the mean of the subjects' 0..1 maps, rescaled).

    A subject's map (its scans' unit-total maps averaged) is smoothed and scaled to 0..1 by
    :func:`to_unit_range` before averaging, so every subject weighs the same and one scan whose relevance
    is concentrated in a few voxels (a lesion, an artefact) cannot dominate the group map. ``map_fn`` (e.g. a
    thread pool's ``map``) smooths the subjects' maps side by side.

    Returns:
        ``(group map, {subject: map})``.

    Examples:
        >>> maps = {"a": np.array([0.0, 1.0, 0.0]), "b": np.array([0.0, 0.5, 100.0])}  # b: one extreme voxel
        >>> group, _ = group_relevance(maps, np.ones(3, bool), 0.0, 1.0)
        >>> bool(group[1] >= group[2])  # the plain mean would be [0, 0.75, 50]
        True
    """
    subjects = sorted(subject_maps)
    per_subject = dict(zip(subjects, map_fn(lambda s: to_unit_range(smooth(subject_maps[s], fwhm_mm, voxel_mm), brain),
                                            subjects)))
    group = to_unit_range(np.mean([per_subject[s] for s in sorted(per_subject)], axis=0), brain)
    return group, per_subject


def impostor_partners(families: Sequence[str]) -> list[int]:
    """For each scan, the next scan (cyclically) from another family: the pair whose distance is explained.

    Examples:
        >>> impostor_partners(["a", "a", "b", "c"])
        [2, 2, 3, 0]
    """
    n = len(families)
    partners = []
    for i in range(n):
        j = next((k % n for k in range(i + 1, i + n) if families[k % n] != families[i]), (i + 1) % n)
        partners.append(j)
    return partners


def ensure_bidsignore(output_dir: Path, patterns: Sequence[str] = BIDSIGNORE_PATTERNS) -> None:
    """Append the explanation outputs' patterns to OUTPUT_DIR/.bidsignore when missing."""
    path = Path(output_dir) / ".bidsignore"
    lines = path.read_text().splitlines() if path.is_file() else []
    missing = [p for p in patterns if p not in lines]
    if missing:
        write_text(path, "\n".join(lines + missing) + "\n")


def source_stem(preproc: Path) -> str:
    """``sub-1_ses-2`` from ``sub-1_ses-2_space-..._desc-preproc_T1w.nii.gz``."""
    return Path(preproc).name.split(f"_space-{TEMPLATE}")[0]


# ----------------------------------------------------------------------------------------------------------
# The step
# ----------------------------------------------------------------------------------------------------------
def _families(settings: Settings, pids: Sequence[str]) -> dict[str, str]:
    """``{participant_id: family}`` of the explained subjects; without readable family information (no
    participants.tsv or family column, a bad ``--pairs-file``: a :class:`~bids_siamese.errors.UserError`) every
    subject is its own family, with a WARNING naming what is lost. Any other error is a bug and propagates."""
    try:
        return dict(load_relations(settings, [p.removeprefix("sub-") for p in pids]).family)
    except UserError as err:
        LOG.warning("no family information for the explanations, so every subject counts as its own family in "
                    "the embeddings table's family_id and the group report (%s)", err)
        return {p: p for p in pids}


def _find_checkpoint(settings: Settings, model_path: Path | None) -> Path:
    if model_path is not None:
        return Path(model_path)
    if settings.model:
        return Path(settings.model)
    folder = model_folder(settings.output_dir, "twin", settings.backbone)
    if folder.is_dir():
        return folder
    raise NoInputError(f"no twin checkpoint at {folder}; fix: run the group level with --task twin --mode train "
                       "first, or pass --model PATH")


def explain_device(requested: str) -> torch.device:
    """The torch device of the explanations: the run's ``--device`` (``cpu``, ``cuda``, ``cuda:N``; the CLI has
    already turned ``auto`` into one of them), the CPU when CUDA is asked for but not usable here.

    Examples:
        >>> explain_device("cpu")
        device(type='cpu')
    """
    requested = str(requested or "cpu")
    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    if requested.startswith("cuda"):
        if torch.cuda.is_available():
            return torch.device(requested)
        LOG.warning("--device %s: no usable CUDA device in this process; the explanations run on the CPU", requested)
    return torch.device("cpu")


def scan_workers(settings: Settings) -> int:
    """Threads that read, write and smooth scans next to the LRP (``--nprocs``, at most one per
    :data:`SCAN_MEM_GB` of ``--mem-gb``; at least 1)."""
    by_memory = int(float(settings.mem_gb) // SCAN_MEM_GB)
    return max(1, min(int(settings.nprocs), by_memory))


def lrp_batch(canon: CanonicalModel | None, shape: Sequence[int], device: torch.device, mem_gb: float) -> int:
    """Scans explained per LRP pass: as many as fit in half of the memory (``--mem-gb`` on the CPU, the free
    memory of the GPU), at most :data:`MAX_LRP_BATCH`; 1 for per-scan normalisations (regional model: the
    batch of its embedding pass)."""
    if canon is None:
        return MAX_LRP_BATCH
    if canon.needs_calibration:
        return 1
    if device.type == "cuda":
        mem_gb = torch.cuda.mem_get_info(device)[0] / 1024 ** 3
    per_scan = lrp_memory_gb(canon, shape)
    return max(1, min(MAX_LRP_BATCH, int(0.5 * float(mem_gb) / max(per_scan, 1e-6))))


def _batches(n: int, size: int) -> list[list[int]]:
    """``[[0, 1], [2, 3], [4]]`` for ``n = 5, size = 2``."""
    return [list(range(start, min(n, start + size))) for start in range(0, n, size)]


def _read_scan(path: Path, grid: Grid) -> tuple[np.ndarray, np.ndarray]:
    """A scan on the model grid and its brain mask (the non-zero voxels when no mask file is next to it)."""
    volume = load_volume(Path(path), grid)
    mask_path = mask_path_for(Path(path))
    return volume, ((load_volume(mask_path, grid) > 0.5) if mask_path.is_file() else volume != 0)


def _scan_embeddings(model: torch.nn.Module, canon: CanonicalModel | None, volumes: Sequence[np.ndarray],
                     batch: int, device: torch.device) -> np.ndarray:
    """Every scan's pre-normalisation embedding ``(N, D)`` (float32, CPU), ``batch`` scans at a time."""
    out = []
    for idx in _batches(len(volumes), batch):
        x = torch.as_tensor(np.stack([volumes[i] for i in idx]), dtype=torch.float32)[:, None].to(device)
        with torch.no_grad():
            e = canon.embed(x) if canon is not None else model.embed(x)
        out.append(e.float().cpu().numpy())
    return np.concatenate(out).astype(np.float32)


def _write_scan(settings: Settings, path: Path, relevance: np.ndarray, sidecar: dict[str, Any], grid: Grid, desc: str
                ) -> list[Path]:
    """The relevance map of one scan (NIfTI, JSON sidecar, GIFTI with ``explain_surfaces``), named ``desc-<desc>``
    (:func:`~bids_siamese.bids.derivatives.relevance_desc`); returns the paths."""
    out_path = relevance_path(Path(path), desc)
    written = [write_nifti(out_path, nib.Nifti1Image(relevance.astype(np.float32), grid.affine)),
               write_json(out_path.with_name(out_path.name.replace(".nii.gz", ".json")),
                          {k: v for k, v in sidecar.items() if v is not None})]
    if settings.explain_surfaces:
        written += list(write_surface_maps(out_path.parent, source_stem(Path(path)),
                                           {"relevance": (relevance, grid.affine)}, settings.resolution_label,
                                           desc=desc, cifti=False).values())
    return written


def run_explain(settings: Settings, subjects: list[str], model_path: Path | None = None) -> list[Path]:
    """Relevance maps, region ranking and statistics, Workbench files and ``group.html`` for a twin model.

    The model runs on ``settings.device`` (CPU fallback), explaining :func:`lrp_batch` scans per LRP pass;
    :func:`scan_workers` threads read, write and smooth the scans meanwhile (``--nprocs``, ``--mem-gb``).

    Args:
        settings: the run's :class:`~bids_siamese.config.Settings` (``output_dir``, ``resolution``,
            ``session_label``, ``atlas``, ``device``, ``seed``, ``nprocs``, ``omp_nthreads``, ``mem_gb``,
            ``lrp_target``, ``lrp_rules``, ``relevance_fwhm``, ``explain_surfaces``, ``report_subjects``,
            ``atlas_labels``).
        subjects: participant labels.
        model_path: the checkpoint (folder, ``model.pt`` or ``model_card.json``); default ``--model`` or
            ``OUTPUT_DIR/models/twins_<backbone>``.

    Returns:
        Every path written.
    """
    workers = scan_workers(settings)
    LOG.info("explanations: %d scan thread(s), %d torch thread(s)", workers, settings.omp_nthreads)
    with torch_threads(settings.omp_nthreads), ThreadPoolExecutor(workers) as pool:
        return _run_explain(settings, subjects, model_path, pool)


def _run_explain(settings: Settings, subjects: list[str], model_path: Path | None, pool: ThreadPoolExecutor
                 ) -> list[Path]:
    t0 = time.perf_counter()
    out_dir = Path(settings.output_dir)
    grid = model_grid(settings.resolution)
    res_label = settings.resolution_label
    target = settings.lrp_target
    rules = settings.lrp_rules
    fwhm = float(settings.relevance_fwhm)
    device = explain_device(settings.device)
    checkpoint = _find_checkpoint(settings, model_path)
    model, card = load_checkpoint(checkpoint, "twin", grid, device)
    if card.get("backbone") == "swin":  # torch.fx cannot trace the Swin blocks; the LRP rules cover the CNNs only
        raise UsageError(f"{checkpoint} is a swin twin model, which has no LRP explanation; fix: add --no-explain")
    distance = card.get("hyperparameters", {}).get("distance", settings.distance)
    configure_determinism(bool(settings.deterministic))
    seed_everything(int(settings.seed))
    scans = find_preproc(out_dir, subjects, settings.session_label,
                         include_unusable=settings.include_unusable)
    scans = scans.sort_values(["participant_id", "session"], kind="stable").reset_index(drop=True)
    pids = scans["participant_id"].tolist()
    families = _families(settings, sorted(set(pids)))
    scans["family"] = [families.get(p, p) for p in pids]
    reading = [pool.submit(_read_scan, Path(p), grid) for p in scans["path"]]
    atlas_job = pool.submit(_atlas_on_grid, settings, grid)  # independent of the scans: side by side with the LRP
    template_job = pool.submit(_template_on_grid, grid)
    regional = isinstance(model, RegionalEncoder)
    desc = relevance_desc(regional)  # desc-decomposition (regional model) or desc-lrp
    if regional:  # exact decomposition of its similarity instead of LRP (see bids_siamese.models.regional)
        canon, normalised = None, True
    else:
        net, normalised = embedding_network(model)
        canon = canonize(net.cpu()).to(device)
    batch = lrp_batch(canon, grid.shape, device, settings.mem_gb)
    ensure_bidsignore(out_dir)
    volumes, masks = zip(*(f.result() for f in reading)) if reading else ((), ())
    partners = impostor_partners(scans["family"].tolist()) if target == "distance" else [None] * len(scans)
    raw_embeddings = _scan_embeddings(model, canon, volumes, batch, device)
    embeddings = (np.stack([e / max(float(np.linalg.norm(e)), 1e-12) for e in raw_embeddings]) if normalised
                  else raw_embeddings)
    LOG.info("explanations on %s: %d scans, %d per pass", device, len(scans), batch)
    unit_maps: list[np.ndarray] = [np.empty(0)] * len(scans)
    totals = [0.0] * len(scans)
    writing = []
    for idx in _batches(len(scans), batch):
        t_batch = time.perf_counter()
        values = [0.0] * len(idx)
        if regional:  # from the embeddings above: no second forward pass
            maps = [model.contributions(raw_embeddings[i], raw_embeddings[partners[i]] if target == "distance"
                                        else None) for i in idx]
            values = [float(m.sum()) for m in maps]
        else:
            e = torch.as_tensor(raw_embeddings[idx]).to(device)
            if target == "distance":
                shares, _ = distance_shares(e, torch.as_tensor(raw_embeddings[[partners[i] for i in idx]]).to(device),
                                            distance)
                values = [2.0 * float(s) for s in shares.sum(dim=1).cpu()]
            else:
                shares = embedding_shares(e, target, normalised)
                values = [float(np.sum(embeddings[i])) if target == "embedding" else float(np.abs(embeddings[i]).sum())
                          for i in idx]
            x = torch.as_tensor(np.stack([volumes[i] for i in idx]))[:, None]
            maps = list(relevance_maps(canon, x, shares, e, rules))
        for i, relevance, value in zip(idx, maps, values):
            totals[i] = float(relevance.sum())
            unit_maps[i] = unit_total(relevance)
            path = Path(scans["path"][i])
            sidecar = {
                "Description": (REGIONAL_DESCRIPTION if regional else
                                "Layer-wise relevance propagation (captum) of the twin model for this scan: signed "
                                "relevance per voxel, summing to about the explained target."),
                "Sources": [f"bids::{path.relative_to(out_dir).as_posix()}"],
                **template_reference(),
                **model_grid_sidecar(grid.resolution),
                "RelevanceTarget": target,
                "TargetValue": round(float(value), 6),
                "RelevanceSum": round(totals[i], 6),
                "PairedWith": (Path(scans["path"][partners[i]]).name if target == "distance" else None),
                "Distance": distance if target == "distance" else None,
                "LRPRules": None if regional else rules,
                "Model": {"checkpoint": Path(checkpoint).name, "backbone": card.get("backbone"),
                          "weights_sha256": card.get("weights", {}).get("sha256")},
            }
            writing.append(pool.submit(_write_scan, settings, path, relevance, sidecar, grid, desc))
        LOG.info("relevance %d-%d/%d: %.1f s", idx[0] + 1, idx[-1] + 1, len(scans), time.perf_counter() - t_batch)
    # group and subject maps
    subject_maps = {pid: np.mean([unit_maps[i] for i in idx], axis=0)
                    for pid, idx in scans.groupby("participant_id").indices.items()}
    subject_masks = {pid: np.mean([masks[i] for i in idx], axis=0) > 0.5
                     for pid, idx in scans.groupby("participant_id").indices.items()}
    brain = np.mean(list(subject_masks.values()), axis=0) >= 0.5
    group_map, per_subject = group_relevance(subject_maps, brain, fwhm, grid.resolution, pool.map)
    workbench_job = pool.submit(write_workbench_bundle, out_dir / EXPLAIN_FILES["workbench"],
                                {"relevance": (group_map, grid.affine)}, res_label, desc=desc)
    written: list[Path] = [p for f in writing for p in f.result()]
    # ranking and statistics
    atlas, grid_labels = atlas_job.result()
    ranking = rank_regions(group_map, grid_labels, atlas.table)
    per_subject_regions = subject_region_importance(per_subject, grid_labels, atlas.table)
    statistics = class_contrast(per_subject_regions, ranking, seed=int(settings.seed))
    written.append(write_tsv(out_dir / EXPLAIN_FILES["ranking"], ranking))
    written.append(write_tsv(out_dir / EXPLAIN_FILES["subjects"], per_subject_regions))
    written.append(write_tsv(out_dir / EXPLAIN_FILES["statistics"], statistics))
    emb_table = _embedding_table(scans, embeddings, totals)
    written.append(write_tsv(out_dir / EXPLAIN_FILES["embeddings"], emb_table))
    written += workbench_job.result()  # the Workbench folder
    LOG.info("explanations: %d scans, atlas %s, top regions %s (%.0f s)", len(scans), atlas.name,
             ", ".join(f"{r.region} {r.hemisphere}" for r in ranking.head(3).itertuples()), time.perf_counter() - t0)
    result = ExplainResult(scans=scans, group_map=group_map, affine=grid.affine, template=template_job.result(),
                           ranking=ranking, statistics=statistics, embeddings=emb_table, target=target,
                           atlas=atlas.name, fwhm=fwhm, written=written)
    # one OpenMP/BLAS thread for the report: its t-SNE of a few hundred scans takes 0.2-0.6 s on one thread, but 10-50 s
    # with one spinning thread per core when other jobs share the cores; the coordinates are bit-identical
    with threadpool_limits(limits=1):
        written.append(write_group_report(settings, explain=result))
    return written


def _atlas_on_grid(settings: Settings, grid: Grid) -> tuple[Atlas, np.ndarray]:
    """The run's atlas (``--atlas``, ``--atlas-labels``) and its labels on the model grid."""
    atlas = load_atlas(str(settings.atlas), settings.atlas_labels)
    return atlas, labels_on_grid(atlas, grid.shape, grid.affine)


def _embedding_table(scans: pd.DataFrame, embeddings: np.ndarray, totals: Sequence[float]) -> pd.DataFrame:
    table = pd.DataFrame({
        "participant_id": scans["participant_id"],
        "session_id": scans["session"].replace("", "n/a").fillna("n/a"),
        "family_id": scans["family"],
        "relevance_sum": np.round(totals, 6),
    })
    emb = pd.DataFrame(np.round(embeddings, 6), columns=[f"e{k}" for k in range(embeddings.shape[1])])
    return pd.concat([table.reset_index(drop=True), emb], axis=1)


def _template_on_grid(grid: Grid) -> np.ndarray | None:
    """The template brain on the model grid (:func:`bids_siamese.preproc.grid.template_on_grid`), the report's
    underlay."""
    try:
        return template_on_grid(grid)[0]
    except OSError as err:  # an unreadable bundled template: the report still works without its underlay
        LOG.warning("the group report's relevance figures have no template underlay: %s", err)
        return None
