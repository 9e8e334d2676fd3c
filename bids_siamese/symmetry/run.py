"""Group level of the symmetry task: dataset reference, group table, Siamese model training/application.

``run_symmetry(settings, subjects)``:

1. collects the participant-level ``*_space-MNI152NLin2009cAsym_desc-preproc_T1w.nii.gz`` (and its
   ``desc-brain_mask``) of the selected subjects as every group task does (:func:`collect_scans`);
2. computes each scan's asymmetry map and regional indices, builds the dataset reference (template + scans,
   :func:`~bids_siamese.symmetry.asymmetry.group_reference`) and re-scores every scan against it;
3. with ``--task symmetry --mode train``: trains the Siamese hemisphere model on the scans that look
   lesion-free (``asymmetry_score`` <= 3 and not flagged as left-right flipped by the orientation QC), split by
   family/subject into training (70 %), validation (15 %) and test (15 %) scans; evaluates it and the
   asymmetry score on lesions planted in the test scans per volume bin; saves the checkpoint to
   ``models/symmetry_<backbone>/``; with ``--mode apply``: loads ``--model``;
4. writes (names: :data:`~bids_siamese.bids.derivatives.SYMMETRY_FILES`) ``group_symmetry.tsv`` (one row per
   scan, with the Siamese probability and the group-relative
   ``siamese_z`` (:mod:`bids_siamese.symmetry.calibration`) when a model was trained or applied) and, after
   training, ``group_symmetry_training.tsv``, ``group_symmetry_evaluation.tsv``,
   ``group_symmetry_evaluation.json`` and ``figures/group_symmetry_detection.svg``.
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import torch

from ..atlas import atlas_on_grid
from ..bids.derivatives import (
    SYMMETRY_FILES,
    mask_path_for,
    model_folder,
    orientation_qc_path,
    write_json,
    write_text,
    write_tsv,
)
from ..config import Settings
from ..errors import NoInputError
from ..models.init import init_record, start_from_pretrained
from ..resources import TEMPLATE, model_grid
from ..train.data import VOLUME_CACHE_DTYPES, find_preproc, load_volume, release_pages, stack_array
from ..train.ddp import DistContext
from ..train.pairs import read_families, subject_split
from ..train.reproducibility import prepare
from ..train.run import seen_split, training_fingerprint
from ..train.task import GroupTask, run_task
from ..train.trainer import train_config
from .analysis import template_reference
from .asymmetry import (
    ASYMMETRY_THRESHOLD,
    asymmetry_map,
    group_reference,
    peak_location,
    positive_intensities,
    score_map,
    score_scan,
)
from .regional import (
    format_top_regions,
    homologous_pairs,
    region_at,
    regional_asymmetry,
    regional_z,
    top_regions,
)
from .calibration import MIN_REFERENCE_SCANS, SIAMESE_Z_THRESHOLD, reference_statistics, siamese_z, suspected
from .model import build_symmetry_model
from .normative import DEFAULT_COMPONENTS
from .scans import ScanStack
from .simulate import LesionConfig
from .train import (
    detection_figure,
    evaluate_detection,
    hyperparameters,
    load_symmetry_model,
    model_resolution,
    save_symmetry_checkpoint,
    siamese_logits,
    siamese_scorers,
    to_model_resolution,
    train_symmetry_model,
)

LOG = logging.getLogger("bids_siamese.symmetry")

#: Train, validation and test fractions of the lesion-free subjects' families.
SPLIT_FRACTIONS = (0.7, 0.15, 0.15)

GROUP_COLUMNS = [
    "participant_id", "session_id", "asymmetry_score", "asymmetry_suspected", "focal_z", "raw_magnitude",
    "peak_mm", "peak_region", "top_regions", "siamese_probability", "siamese_z", "siamese_suspected", "siamese_p_left",
    "split", "scan",
]


@dataclass
class ScanFiles:
    """A participant-level scan: its preproc image, mask and identifiers."""

    preproc: Path
    mask: Path
    participant_id: str
    session_id: str
    source: str
    orientation_qc: Path | None = None


def collect_scans(settings: Settings, subjects: Sequence[str]) -> list[ScanFiles]:
    """collect: the participant-level model-grid scans of ``subjects`` as every group task collects them
    (:func:`~bids_siamese.train.data.find_preproc`: one per session, ``--session-label``, the usable-scan gate
    unless ``--include-unusable``), with their brain masks (a scan without one is skipped with a warning) and
    orientation QC records. Their grid is checked by :func:`load_scan`.

    Raises:
        NoInputError: a selected subject has no participant-level output, or no scan has a brain mask.
    """
    table = find_preproc(settings.output_dir, subjects, settings.session_label,
                         include_unusable=settings.include_unusable)
    found = []
    for pid, session, preproc in table[["participant_id", "session", "path"]].itertuples(index=False):
        preproc = Path(preproc)
        mask = mask_path_for(preproc)
        if not mask.is_file():
            LOG.warning("%s has no brain mask next to it; left out of the symmetry task", preproc.name)
            continue
        qc = orientation_qc_path(preproc)
        found.append(ScanFiles(preproc, mask, pid, f"ses-{session}" if session else "n/a",
                               preproc.name.split(f"_space-{TEMPLATE}")[0], qc if qc.is_file() else None))
    if not found:
        raise NoInputError(f"no participant-level brain mask next to the scans in {settings.output_dir}; fix: rerun "
                           "the participant level with the same --resolution")
    return found


def load_scan(files: ScanFiles, resolution: float) -> tuple[np.ndarray, np.ndarray]:
    """Image and mask of a scan, checked to be on ``model_grid(resolution)`` (:func:`bids_siamese.train.data.load_volume`).

    Raises:
        BadDataError: unreadable, or not on the model grid.
    """
    grid = model_grid(resolution)
    return load_volume(files.preproc, grid), load_volume(files.mask, grid) > 0.5


def lr_flip_suspected(files: ScanFiles) -> bool:
    """Whether the orientation QC of the scan flagged a left-right flip (False without a QC file)."""
    if files.orientation_qc is None:
        return False
    try:
        return bool(json.loads(files.orientation_qc.read_text()).get("lr_flip_suspected", False))
    except (OSError, ValueError) as err:
        LOG.warning("symmetry: unreadable orientation QC record %s (%s); %s is taken as not left-right flipped",
                    files.orientation_qc, err, files.source)
        return False


class ScanVolumes:
    """The images (or, with ``masks=True``, the brain masks) of scans read from their files on demand:
    ``volumes[i]`` is one volume (float32, or bool for masks), ``volumes[a:b]`` a list; so a pass over the scans
    holds one batch, not N volumes.

    Raises:
        BadDataError: on access, as :func:`load_scan`.
    """

    def __init__(self, files: Sequence[ScanFiles], resolution: float, masks: bool = False):
        self.files, self.grid, self.masks = list(files), model_grid(resolution), masks

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, idx: int | slice) -> np.ndarray | list[np.ndarray]:
        if isinstance(idx, slice):
            return [self[i] for i in range(*idx.indices(len(self)))]
        f = self.files[idx]
        return load_volume(f.mask, self.grid) > 0.5 if self.masks else load_volume(f.preproc, self.grid)


@dataclass
class ScoredDataset:
    """Every scan of the group level with its asymmetry results; ``volumes`` and ``masks`` read the scans from
    disk when indexed (:class:`ScanVolumes`)."""

    files: list[ScanFiles]
    volumes: Sequence[np.ndarray]
    masks: Sequence[np.ndarray]
    reference: object
    table: pd.DataFrame


def score_dataset(files: Sequence[ScanFiles], resolution: float, atlas: str, fwhm: float,
                  components: int = DEFAULT_COMPONENTS, map_dtype: str = "float16") -> ScoredDataset:
    """Asymmetry maps and regional indices of every scan, the dataset reference (with ``components`` modes of
    normal asymmetry, :mod:`bids_siamese.symmetry.normative`) and the group table rows (Siamese columns empty,
    ``split`` ``n/a``).

    Streams: each scan is read once and its asymmetry map and mask go to ``map_dtype`` and bool stacks
    (:func:`~bids_siamese.train.data.stack_array`: memory-mapped temporary files for a large cohort, 1.5 MB per
    scan at 2 mm in float16); the reference reads them a slab of x planes at a time
    (:func:`~bids_siamese.symmetry.asymmetry.group_reference`) and the scores a scan at a time, so memory holds one
    scan, one slab and per-scan records. With ``map_dtype="float32"`` (``--volume-cache float32``) the results are
    those of every map held in memory, bit for bit; the default float16 rounds each map value by at most 2**-11 of
    it (scores move by well under 1 %; tests/test_symmetry_streaming.py)."""
    labels, names = atlas_on_grid(atlas, resolution)
    pairs = homologous_pairs(names)
    template = template_reference(resolution, fwhm, atlas)
    grid = model_grid(resolution)
    if map_dtype not in VOLUME_CACHE_DTYPES:
        raise ValueError(f"map dtype {map_dtype!r} is not one of {VOLUME_CACHE_DTYPES}")
    maps = stack_array((len(files), *grid.shape), np.dtype(map_dtype))
    masks = stack_array((len(files), *grid.shape), bool)
    regions, t_start = [], time.perf_counter()
    for i, f in enumerate(files):
        data, mask = load_scan(f, resolution)
        maps[i] = asymmetry_map(data, mask, resolution, fwhm)
        masks[i] = mask
        regions.append(regional_asymmetry(positive_intensities(data, mask), mask, labels, pairs))
        if i % 64 == 63:
            release_pages(maps)
            release_pages(masks)
    LOG.info("symmetry: asymmetry maps of %d scan(s) in %.0f s", len(files), time.perf_counter() - t_start)
    reference = group_reference(maps, masks, regions, template, resolution, fwhm,
                                groups=[f.participant_id for f in files], components=components)
    LOG.info("symmetry: dataset reference (%s) after %.0f s", reference.source, time.perf_counter() - t_start)
    rows = []
    for i, (f, reg) in enumerate(zip(files, regions)):
        s = score_map(np.asarray(maps[i], np.float32), masks[i], resolution, reference.member(i))
        peak_mm = peak_location(s["peak"], s["z"], grid.affine)
        top = top_regions(regional_z(reg, reference), 3)
        rows.append({
            "participant_id": f.participant_id, "session_id": f.session_id,
            "asymmetry_score": round(s["asymmetry_score"], 3),
            "asymmetry_suspected": bool(s["asymmetry_score"] > ASYMMETRY_THRESHOLD),
            "focal_z": round(s["focal_z"], 3), "raw_magnitude": round(s["raw_magnitude"], 5),
            "peak_mm": ",".join(f"{v:.0f}" for v in peak_mm),
            "peak_region": region_at(peak_mm, labels, names, grid.affine), "top_regions": format_top_regions(top),
            "siamese_probability": np.nan, "siamese_z": np.nan, "siamese_suspected": np.nan, "siamese_p_left": np.nan,
            "split": "n/a",
            "scan": f.preproc.name,
        })
        if i % 64 == 63:
            release_pages(maps)
            release_pages(masks)
    return ScoredDataset(list(files), ScanVolumes(files, resolution), ScanVolumes(files, resolution, masks=True),
                         reference, pd.DataFrame(rows, columns=GROUP_COLUMNS))


def scan_stack(data: ScoredDataset, idx: Sequence[int], resolution: float) -> ScanStack:
    """The scans ``idx`` of ``data`` on the model grid of ``resolution`` as a
    :class:`~bids_siamese.symmetry.scans.ScanStack` (read one at a time from their files, held in memory-mapped stacks when large; keys: the scans' sources)."""
    idx = list(idx)

    def scan_of(k: int) -> tuple[np.ndarray, np.ndarray, str]:
        i = idx[k]
        small, small_mask = to_model_resolution(data.volumes[i], data.masks[i], resolution, resolution)
        return small, small_mask, data.files[i].source

    return ScanStack.gather(len(idx), model_grid(resolution).shape, resolution, scan_of)


def apply_model(data: ScoredDataset, model, model_res: float, resolution: float, fallback_threshold: float) -> dict:
    """Fill the Siamese columns of ``data.table``: ``siamese_probability``, ``siamese_p_left`` and the
    group-relative ``siamese_z`` against every scan with ``split`` other than ``train``
    (:mod:`bids_siamese.symmetry.calibration`), ``siamese_suspected`` (``siamese_z >= 3``, or
    ``p >= fallback_threshold`` with too few reference scans).

    Returns:
        the reference statistics (:func:`~bids_siamese.symmetry.calibration.reference_statistics`).
    """
    logit, side = siamese_logits(model, data.volumes, data.masks, resolution, model_res)
    p, p_left = 1.0 / (1.0 + np.exp(-logit)), 1.0 / (1.0 + np.exp(-side))
    stats = reference_statistics(logit[(data.table["split"] != "train").to_numpy()])
    z = siamese_z(logit, stats)
    data.table["siamese_probability"] = np.round(p, 4)
    data.table["siamese_z"] = np.round(z, 3)
    data.table["siamese_suspected"] = suspected(p, z, fallback_threshold)
    data.table["siamese_p_left"] = np.round(p_left, 4)
    if np.isfinite(stats["median_logit"]):
        LOG.info("symmetry: siamese_z against %d reference scan(s) (median logit %.3f, robust sd %.3f); %d scan(s) "
                 "with siamese_z >= %g", stats["n_reference"], stats["median_logit"], stats["sd_logit"],
                 int(data.table["siamese_suspected"].sum()), SIAMESE_Z_THRESHOLD)
    else:
        LOG.warning("symmetry: only %d scan(s) the model was not trained on, fewer than the %d a group-relative "
                    "siamese_z needs; siamese_suspected uses the checkpoint's threshold on the probability, which is "
                    "not calibrated for scans unlike the training data (fix: score at least %d scans together)",
                    stats["n_reference"], MIN_REFERENCE_SCANS, MIN_REFERENCE_SCANS)
    return stats


def mark_seen_scans(data: ScoredDataset, card: dict) -> int:
    """``--mode apply``: set ``split`` to ``train`` or ``validation`` for the scans the checkpoint saw (by the
    sha256 of the file, :func:`bids_siamese.train.run.seen_split`), so that ``siamese_z`` is not measured against
    scans the model has memorised (applying a model to the dataset it was trained on); the others keep ``n/a``.

    Returns:
        the number of scans the checkpoint was trained on.
    """
    scans = pd.DataFrame({"participant_id": [f.source for f in data.files], "path": [f.preproc for f in data.files]})
    seen = seen_split(card, scans, "")
    data.table["split"] = [seen.get(f.source) if seen.get(f.source) in ("train", "validation") else "n/a"
                           for f in data.files]
    n_train = int((data.table["split"] == "train").sum())
    if n_train:
        LOG.info("symmetry: %d scan(s) were training scans of the checkpoint (split 'train'); siamese_z leaves them "
                 "out of its reference", n_train)
    return n_train


def run_symmetry(settings: Settings, subjects: list[str]) -> list[Path]:
    """The symmetry group level (see the module docstring); returns the paths written (the group table first).

    Raises:
        NoInputError: no participant-level outputs for the selected subjects, or too few scans to train.
        BadDataError: an output is not on the model grid of ``--resolution``.
        UsageError: ``--mode apply`` with a checkpoint of another task.
    """
    return run_task(SymmetryTask, settings, subjects)


class SymmetryTask(GroupTask):
    """``--task symmetry``: collect -> samples -> split -> fit -> evaluate -> write (module docstring). Run for
    another ``--task`` (no model), it scores the asymmetry and writes the group table only."""

    name = "symmetry"
    title = "Symmetry"
    shown = ("table", "evaluation", "detection_figure")
    section = "symmetry"
    steps = ("collect (usable scans with brain masks) -> samples (asymmetry maps, group reference) -> family split "
             "of the lesion-free scans -> fit (planted lesions) or --model -> evaluate (lesions planted in test "
             "scans) -> write")

    def __init__(self, settings: Settings, ctx: DistContext, device: torch.device):
        super().__init__(settings, ctx, device)
        self.resolution = float(settings.resolution)
        self.fwhm = float(settings.symmetry_fwhm)
        self.modelled = settings.task == "symmetry"
        self.training = self.modelled and self.train_mode

    def collect(self, subjects: list[str]) -> None:
        """The scans (:func:`collect_scans`) and, in ``--mode apply``, the checkpoint."""
        self.files = collect_scans(self.settings, subjects)
        LOG.info("symmetry: %d scan(s) at %g mm", len(self.files), self.resolution)
        if self.modelled and not self.train_mode:
            self.model, self.card = load_symmetry_model(self.settings.model)

    def samples(self) -> None:
        """Every scan's asymmetry map and regional indices, scored against the dataset reference
        (:func:`score_dataset`: streamed through a ``--volume-cache`` dtype stack, memory-mapped for a large
        cohort)."""
        self.data = score_dataset(self.files, self.resolution, self.settings.atlas, self.fwhm,
                                  int(self.settings.symmetry_components), self.settings.volume_cache)

    def split(self) -> None:
        """Train: the lesion-free scans (``asymmetry_score`` <= 3, no left-right flip) split by family
        (:func:`~bids_siamese.train.pairs.subject_split`, families from ``participants.tsv`` as for twins); apply:
        the scans the checkpoint saw (:func:`mark_seen_scans`)."""
        settings, files, table = self.settings, self.data.files, self.data.table
        if self.modelled and not self.train_mode:
            mark_seen_scans(self.data, self.card)
        if not self.training:
            return
        healthy = [i for i, f in enumerate(files) if not table.at[i, "asymmetry_suspected"]
                   and not lr_flip_suspected(f)]
        families = read_families(settings.bids_dir, settings.family_column)
        split = subject_split(sorted({files[i].participant_id for i in healthy}), families, settings.seed,
                              SPLIT_FRACTIONS)
        self.parts = parts = {name: [i for i in healthy if split.get(files[i].participant_id) == name]
                              for name in ("train", "validation", "test")}
        if min(len(p) for p in parts.values()) < 1 or len(parts["train"]) < 2:
            raise NoInputError(
                f"symmetry training needs lesion-free scans of at least 4 subjects/families (got {len(healthy)} "
                f"scan(s) of {len(split)} subject(s) in {len({families.get(p, p) for p in split})} "
                f"famil(ies), split {', '.join(f'{k} {len(v)}' for k, v in parts.items())}); fix: add participants "
                "or use --mode apply --model PATH")
        table["split"] = "excluded"
        for name, idx in parts.items():
            table.loc[idx, "split"] = name

    def fit(self) -> None:
        """Train the hemisphere model on the training scans with planted lesions (:func:`train_symmetry_model`),
        or take the checkpoint; then fill the Siamese columns of the group table (:func:`apply_model`)."""
        settings, data, resolution = self.settings, self.data, self.resolution
        if not self.modelled:
            return
        if not self.train_mode:
            apply_model(data, self.model, model_resolution(self.card), resolution,
                        float(self.card.get("decision", {}).get("threshold", 0.5)))
            return
        parts = self.parts
        # the task's overrides: left-right flips (the lesion side flips with the image), evaluation in training
        # batches
        self.config = train_config(settings, flip_lr=True, eval_batch_size=int(settings.batch_size))
        self.lesion = LesionConfig()
        prepare(settings)  # the seeds again: the model's initial weights do not depend on the scoring before
        model = build_symmetry_model(settings.backbone, settings.symmetry_fusion,
                                     int(min(settings.embedding_dim, 128)), difference_channel=True)
        if settings.init is not None:  # the pretrained encoder; the difference channel's weights start at zero
            start_from_pretrained(model.encoder, settings.init, settings.backbone, self.grid)

        LOG.info("symmetry: training the %s/%s model on %d scans (validation %d, test %d)", settings.backbone,
                 settings.symmetry_fusion, len(parts["train"]), len(parts["validation"]), len(parts["test"]))
        self.result, self.info = train_symmetry_model(
            model, scan_stack(data, parts["train"], resolution), scan_stack(data, parts["validation"], resolution),
            self.config, resolution, self.lesion, volume_cache_dtype=settings.volume_cache, device=settings.device)
        self.model, info = self.result.model, self.info
        LOG.info("symmetry: best epoch %d of %d, validation loss %.4f, AUC %.3f (%.1f s)", info["best_epoch"],
                 info["epochs_run"], info["best_val_loss"], info["best_val_auc"], info["seconds"])
        self.stats = apply_model(data, self.model, resolution, resolution, info["threshold"])

    def evaluate(self) -> None:
        """Train: the model and the asymmetry score on lesions planted in the test scans, per volume bin
        (:func:`~bids_siamese.symmetry.train.evaluate_detection`)."""
        if not self.training:
            return
        data, resolution, info = self.data, self.resolution, self.info
        self.test_scans = scan_stack(data, self.parts["test"], resolution)
        reference, fwhm = data.reference, self.fwhm
        scorers = {  # siamese_z only with enough reference scans (else it is n/a)
            **siamese_scorers(self.model, resolution, resolution, self.stats),
            "asymmetry_score": lambda vols, ms: np.array(
                [score_scan(v, m, resolution, reference, fwhm)["asymmetry_score"] for v, m in zip(vols, ms)]),
        }
        thresholds = {"siamese_probability": info["threshold"], "siamese_z": SIAMESE_Z_THRESHOLD,
                      "asymmetry_score": ASYMMETRY_THRESHOLD}
        _, self.per_bin, self.overall = evaluate_detection(self.test_scans, resolution, scorers, thresholds,
                                                           self.lesion, draws=2, seed=self.settings.seed + 7)

    def write(self) -> list[Path]:
        """The group table (first), and after training the checkpoint and the training/evaluation files."""
        out_dir = Path(self.settings.output_dir)
        written = self.write_training() if self.training else []
        table = self.data.table.sort_values(["participant_id", "session_id", "scan"], kind="stable").reset_index(
            drop=True)
        written.insert(0, write_tsv(out_dir / SYMMETRY_FILES["table"], table))
        LOG.info("symmetry: %d scan(s) in %s, %d with asymmetry_score > %g", len(table), SYMMETRY_FILES["table"],
                 int(table["asymmetry_suspected"].sum()), ASYMMETRY_THRESHOLD)
        return written

    def write_training(self) -> list[Path]:
        """write, train: the checkpoint folder, the training history, the evaluation table, JSON and figure."""
        settings, info, parts, model, config = self.settings, self.info, self.parts, self.model, self.config
        out_dir, resolution = Path(settings.output_dir), self.resolution
        files, table = self.data.files, self.data.table
        metrics = {"validation": {"loss": info["best_val_loss"], "auc": info["best_val_auc"],
                                  "best_epoch": info["best_epoch"]},
                   "test_simulated": self.overall.set_index("scorer").to_dict(orient="index"),
                   "training_seconds": info["seconds"]}
        scans = pd.DataFrame({"participant_id": [f.source for f in files], "path": [f.preproc for f in files]})
        training_data = {**training_fingerprint(scans, dict(zip(scans["participant_id"], table["split"]))),
                         "n_train": len(parts["train"]), "n_validation": len(parts["validation"]),
                         "n_test": len(parts["test"]), "selection": "asymmetry_score <= 3 and no left-right flip"}
        folder = model_folder(out_dir, "symmetry", settings.backbone)
        written = list(save_symmetry_checkpoint(folder, model, config, resolution, training_data, metrics,
                                                info["threshold"], info["samples"], settings.device,
                                                init=init_record(settings.init) if settings.init else None))
        written.append(write_tsv(out_dir / SYMMETRY_FILES["training"], self.result.history.round(5)))
        written.append(write_tsv(out_dir / SYMMETRY_FILES["evaluation"], self.per_bin))
        written.append(write_json(out_dir / SYMMETRY_FILES["evaluation_json"], {
            "overall": self.overall.to_dict(orient="records"), "training": info,
            "siamese_reference": {k: (v if np.isfinite(v) else None) for k, v in self.stats.items()},  # null, not NaN
            "config": hyperparameters(model, config, resolution, info["samples"]),
            "split": {k: len(v) for k, v in parts.items()}, "checkpoint": str(folder.relative_to(out_dir)),
        }))
        written.append(write_text(out_dir / SYMMETRY_FILES["detection_figure"], detection_figure(
            self.per_bin, f"Held-out scans with planted lesions ({len(self.test_scans)} scans)")))
        return written
