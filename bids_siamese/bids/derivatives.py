"""The derivatives writer: output names from BIDS entities, sidecars, dataset_description.json.

Every path the app writes inside OUTPUT_DIR is built here, either from BIDS entities with the pybids
patterns in ``bids_siamese/data/naming.json`` or from the group-level names (:data:`TASK_FILES`,
:func:`model_folder`, :func:`map_file_names`). Every write is atomic: data go to a temporary file in the destination folder
which is then renamed over the target, so a killed run never leaves a half-written output.
"""
from __future__ import annotations

import contextlib
import gzip
import io
import json
import os
import tempfile
import time
from datetime import datetime, timezone
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Mapping, Sequence

import nibabel as nib
import numpy as np
import pandas as pd
from bids.layout.writing import build_path as _pybids_build_path

from .. import __version__
from ..errors import CannotCreateError
from ..resources import TEMPLATE, TEMPLATE_BRAIN, template_brain

if TYPE_CHECKING:  # config sits above bids in the layers; the type only
    from ..config import Settings

CODE_URL = "https://github.com/bids-apps/bids-siamese"
CONTAINER_ENV = "BIDS_SIAMESE_CONTAINER"  # e.g. "docker://bids/siamese:0.1.0", set in the images

# --------------------------------------------------------------------------------------------------
# Group level (workflows/group.py, train/, reports/, surface/): every group-level output name
# --------------------------------------------------------------------------------------------------


def group_file(stem: str, part: str = "", extension: str = ".tsv") -> str:
    """``group_<stem>[_<part>]<extension>``, a file at the top of OUTPUT_DIR.

    Examples:
        >>> group_file("twins", "metrics"), group_file("symmetry"), group_file("symmetry", "evaluation", ".json")
        ('group_twins_metrics.tsv', 'group_symmetry.tsv', 'group_symmetry_evaluation.json')
    """
    return f"group_{stem}{'_' + part if part else ''}{extension}"


def group_figure(stem: str, part: str) -> str:
    """``figures/group_<stem>_<part>.svg``.

    Examples:
        >>> group_figure("twins", "roc")
        'figures/group_twins_roc.svg'
    """
    return f"figures/{group_file(stem, part, '.svg')}"


def task_files(stem: str, tables: Sequence[str], figures: Sequence[str] = ()) -> dict[str, str]:
    """Role -> name of one task's files: ``<part>`` -> ``group_<stem>_<part>.tsv`` (``table`` for the part-less
    ``group_<stem>.tsv``) and ``<part>_figure`` -> ``figures/group_<stem>_<part>.svg``."""
    names = {part or "table": group_file(stem, part) for part in tables}
    return {**names, **{f"{part}_figure": group_figure(stem, part) for part in figures}}


#: ``group --task twin``: tables, figures (``relatives``: the nearest scans, also written in ``--mode apply``).
TWIN_FILES = task_files("twins", ("pairs", "metrics", "splits", "history", "relatives"), ("loss", "roc"))
#: ``group --task longitudinal``.
LONGITUDINAL_FILES = task_files("longitudinal", ("predictions", "metrics", "splits", "history"), ("loss", "roc"))
#: ``group --task orientation`` (the trained left-right model).
ORIENTATION_MODEL_FILES = task_files("orientation_model", ("", "metrics", "history"))
#: ``group --task symmetry`` (written by symmetry/run.py).
SYMMETRY_FILES = {**task_files("symmetry", ("", "training", "evaluation"), ("detection",)),
                  "evaluation_json": group_file("symmetry", "evaluation", ".json")}
#: ``group --task pretrain`` (written by train/pretrain.py): the per-epoch loss table and its curves.
PRETRAIN_FILES = task_files("pretrain", ("losses",), ("losses",))
#: The explanations of a twin model (written by explain/run.py); ``workbench``: the Workbench folder.
EXPLAIN_FILES = {**task_files("regions", ("ranking", "subjects", "statistics")),
                 "embeddings": group_file("twins", "embeddings"), "workbench": "group"}
#: Per-scan QC of every group run: one row per selected scan.
QC_FILES = {"orientation": group_file("orientation")}
#: Files of each group step by role, keyed as in the record (:func:`write_group_record`).
TASK_FILES = {"qc": QC_FILES, "twin": TWIN_FILES, "longitudinal": LONGITUDINAL_FILES,
              "orientation": ORIENTATION_MODEL_FILES, "symmetry": SYMMETRY_FILES, "pretrain": PRETRAIN_FILES,
              "explain": EXPLAIN_FILES}
#: Steps of :data:`TASK_FILES` that are not ``--task`` values: the per-scan QC table and the explanations.
GROUP_STEPS = ("qc", "explain")


def group_tasks() -> tuple[str, ...]:
    """The ``--task`` choices: the steps of :data:`TASK_FILES` that are tasks (a task's names come with it;
    tests/test_fifth_task.py checks these are the keys of ``workflows.group.TASKS``).

    Examples:
        >>> group_tasks()
        ('twin', 'longitudinal', 'orientation', 'symmetry', 'pretrain')
    """
    return tuple(step for step in TASK_FILES if step not in GROUP_STEPS)


#: The group report and the record of what the group steps wrote (read by the report).
GROUP_REPORT = "group.html"
GROUP_RECORD = group_file("outputs", extension=".json")
#: Learned region weights of a ``regional`` model, written into its checkpoint folder.
REGION_WEIGHTS = "region_weights.tsv"
#: Older names of the above (kept for scripts that read them).
GROUP_FILES = {"orientation": QC_FILES["orientation"],
               **{f"orientation_model{'_' + k if k != 'table' else ''}": v for k, v in ORIENTATION_MODEL_FILES.items()},
               "orientation_model_folder": "models/orientation_latnet", "twins_relatives": TWIN_FILES["relatives"]}


def model_folder(output_dir: Path, task: str, backbone: str) -> Path:
    """The checkpoint folder of a group task: ``OUTPUT_DIR/models/<twins|longitudinal|symmetry|pretrain>_<backbone>``
    (``models/orientation_latnet`` for the orientation ensemble).

    Examples:
        >>> model_folder(Path("/out"), "twin", "small").as_posix()
        '/out/models/twins_small'
    """
    if task == "orientation":
        return Path(output_dir) / GROUP_FILES["orientation_model_folder"]
    return Path(output_dir) / "models" / f"{'twins' if task == 'twin' else task}_{backbone}"


#: ``desc-`` of relevance maps: LRP of a CNN backbone, or the regional twin model's exact decomposition.
RELEVANCE_DESC = {"lrp": "lrp", "regional": "decomposition"}


def relevance_desc(regional: bool) -> str:
    """``decomposition`` for the regional twin model's exact per-voxel decomposition, ``lrp`` for LRP maps.

    Examples:
        >>> relevance_desc(True), relevance_desc(False)
        ('decomposition', 'lrp')
    """
    return RELEVANCE_DESC["regional" if regional else "lrp"]


def relevance_path(preproc: Path, desc: str = "lrp") -> Path:
    """The per-scan relevance map next to a ``desc-preproc_T1w`` file (model grid, so no ``res-``).

    Examples:
        >>> relevance_path(Path("sub-1_space-MNI152NLin2009cAsym_desc-preproc_T1w.nii.gz"), "decomposition").name
        'sub-1_space-MNI152NLin2009cAsym_desc-decomposition_relevance.nii.gz'
    """
    name = Path(preproc).name.replace(f"_{PREPROC_SUFFIX}", f"_desc-{desc}_relevance.nii.gz")
    return Path(preproc).with_name(name)


def map_file_names(stem: str, desc: str, suffix: str, resolution_label: str = "") -> dict[str, str]:
    """Names of the volume, GIFTI and CIFTI files of one set of template-space maps (``stem``: ``group`` or a
    scan's source). The volume is on the model grid and so carries no ``res-``
    (:data:`~bids_siamese.bids.grids.TEMPLATEFLOW_GRIDS`);
    ``resolution_label`` is accepted for the callers' signature and not part of any name.

    Examples:
        >>> map_file_names("group", "lrp", "relevance", "2")["fsLR_L"]
        'group_hemi-L_space-fsLR_den-32k_desc-lrp_relevance.func.gii'
        >>> map_file_names("group", "lrp", "relevance", "2")["volume"]
        'group_space-MNI152NLin2009cAsym_desc-lrp_relevance.nii.gz'
    """
    tail = f"desc-{desc}_{suffix}"
    names = {"volume": f"{stem}_space-{TEMPLATE}_{tail}.nii.gz",
             "cifti": f"{stem}_space-fsLR_den-91k_{tail}.dscalar.nii"}
    for hemi in ("L", "R"):
        names[f"fsLR_{hemi}"] = f"{stem}_hemi-{hemi}_space-fsLR_den-32k_{tail}.func.gii"
        names[f"fsaverage5_{hemi}"] = f"{stem}_hemi-{hemi}_space-fsaverage5_{tail}.func.gii"
    return names


def surface_file_name(mesh: str, hemi: str, surface: str) -> str:
    """The file name of a template surface copied into a Workbench folder.

    Examples:
        >>> surface_file_name("fsLR", "L", "midthickness")
        'tpl-fsLR_den-32k_hemi-L_midthickness.surf.gii'
        >>> surface_file_name("fsaverage5", "R", "inflated")
        'tpl-fsaverage5_hemi-R_inflated.surf.gii'
    """
    den = "_den-32k" if mesh == "fsLR" else ""
    return f"tpl-{mesh}{den}_hemi-{hemi}_{surface}.surf.gii"


#: The template brain copied into a Workbench folder.
TEMPLATE_FILE = TEMPLATE_BRAIN


def group_record_entry(output_dir: Path, step: str, written: Sequence[Path], settings: Settings | None = None,
                       report: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """What one group step wrote, as kept in the record: ``run_id``, ``mode``, ``backbone``, ``finished``,
    ``files`` (role -> path relative to OUTPUT_DIR, with the roles of :data:`TASK_FILES`), ``model`` (the
    checkpoint folder it wrote, or with ``--mode apply`` the one it read), ``other`` (the remaining files) and,
    when given, ``report``: how the group report shows the step (a task's declaration: title, shown roles,
    layout)."""

    output_dir = Path(output_dir)
    rel = [_relative(output_dir, p) for p in written]
    roles = {role: name for role, name in TASK_FILES.get(step, {}).items() if name in rel}
    folders = sorted({Path(r).parent.as_posix() for r in rel if r.startswith("models/")})
    run = {"run_id": None, "mode": None, "backbone": None, "model": None} if settings is None else {
        "run_id": settings.run_id, "mode": settings.mode, "backbone": settings.backbone, "model": settings.model}
    if not folders and run["model"] and run["mode"] == "apply":
        model = Path(run["model"])
        folders = [_relative(output_dir, model if model.is_dir() else model.parent)]
    return {"run_id": run["run_id"], "mode": run["mode"], "backbone": run["backbone"],
            "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"), "files": roles,
            "model": folders[0] if folders else None,
            "other": [r for r in rel if r not in roles.values() and not r.startswith("models/")],
            **({"report": dict(report)} if report else {})}


def write_group_record(output_dir: Path, step: str, written: Sequence[Path], settings: Settings | None = None,
                       report: Mapping[str, Any] | None = None) -> Path:
    """Record what one group step wrote (:func:`group_record_entry`) in ``OUTPUT_DIR/group_outputs.json``.

    The record keeps one entry per step (``qc``, ``twin``, ``longitudinal``, ``orientation``, ``symmetry``,
    ``explain``) under ``steps``; a later run of a step replaces its entry and the other entries stay, so the
    group report shows every task run into this OUTPUT_DIR.
    """
    record = read_group_record(output_dir)
    record["steps"][step] = group_record_entry(output_dir, step, written, settings, report)
    return write_json(Path(output_dir) / GROUP_RECORD, record)


def read_group_record(output_dir: Path) -> dict[str, Any]:
    """The record of :func:`write_group_record` (``{"steps": {}}`` when there is none or it is unreadable)."""
    try:
        record = json.loads((Path(output_dir) / GROUP_RECORD).read_text())
    except (OSError, ValueError):
        return {"steps": {}}
    return record if isinstance(record.get("steps"), dict) else {"steps": {}}


def _relative(root: Path, path: Path) -> str:
    path = Path(path)
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return path.as_posix()


#: Participant-level outputs that the group level reads (written under the names of ``data/naming.json``).
#: The model-grid files carry ``space-`` but no ``res-``: ``res-`` is kept for TemplateFlow's grids.
PREPROC_SUFFIX = "desc-preproc_T1w.nii.gz"
MASK_SUFFIX = "desc-brain_mask.nii.gz"
ORIENTATION_QC_SUFFIX = "desc-orientation_qc.json"


def preproc_name_pattern() -> str:
    """Glob for the model-grid T1w files: ``*_space-MNI152NLin2009cAsym_desc-preproc_T1w.nii.gz``."""
    return f"*_space-{TEMPLATE}_{PREPROC_SUFFIX}"


def legacy_preproc_pattern() -> str:
    """Glob for model-grid T1w files named by earlier versions, with a ``res-<R>`` that was not TemplateFlow's grid."""
    return f"*_space-{TEMPLATE}_res-*_{PREPROC_SUFFIX}"


def mask_path_for(preproc: Path) -> Path:
    """The brain mask written next to a ``desc-preproc_T1w`` file.

    Examples:
        >>> mask_path_for(Path("sub-1_space-X_desc-preproc_T1w.nii.gz")).name
        'sub-1_space-X_desc-brain_mask.nii.gz'
    """
    return Path(preproc).with_name(Path(preproc).name.replace(PREPROC_SUFFIX, MASK_SUFFIX))


# --------------------------------------------------------------------------------------------------
# (end of the group-level names)
# --------------------------------------------------------------------------------------------------

# --------------------------------------------------------------------------------------------------
# Participant level (workflows/participant.py, interfaces/derivatives.py): every per-scan output name
# --------------------------------------------------------------------------------------------------

#: The ``desc-`` of the three per-scan figures, in the order the figures node gives them.
FIGURE_DESCS = ("brainmask", "reg", "orientation")


def output_names(entities: Mapping[str, Any], resolution_label: str | None = None) -> dict[str, Path]:
    """Relative output paths for one scan (a pure function of its BIDS entities).

    The model-grid files (``preproc``, ``grid_mask``) carry ``space-`` without ``res-``: ``res-`` means
    TemplateFlow's grid of that resolution (:data:`~bids_siamese.bids.grids.TEMPLATEFLOW_GRIDS`), which only the
    asymmetry map is
    resampled onto. ``resolution_label`` (``--resolution``) is accepted for the callers and names nothing.

    Examples:
        >>> names = output_names({"subject": "01", "session": "1"})
        >>> str(names["orientation"]), str(names["status"])
        ('sub-01/ses-1/anat/sub-01_ses-1_desc-orientation_qc.json', 'sub-01/ses-1/anat/sub-01_ses-1_desc-status_qc.json')
    """
    base = dict(entities)
    std = dict(base, space=TEMPLATE)
    names = {
        "preproc": build_path(dict(std, desc="preproc", suffix="T1w", extension=".nii.gz")),
        "grid_mask": build_path(dict(std, desc="brain", suffix="mask", extension=".nii.gz")),
        "native_mask": build_path(dict(base, desc="brain", suffix="mask", extension=".nii.gz")),
        "xfm": build_path(dict(base, **{"from": "T1w", "to": TEMPLATE, "mode": "image"}, suffix="xfm",
                               extension=".txt")),
        "orientation": orientation_record_name(entities),
        "asymmetry_map": build_path(dict(std, res=RESULT_RES, desc="asymmetry", suffix="statmap",
                                         extension=".nii.gz")),
        "asymmetry_regions": build_path(dict(std, desc="asymmetry", suffix="regions", extension=".tsv")),
        "asymmetry_report": build_path(dict(base, desc="asymmetry", suffix="qc", extension=".json")),
    }
    for desc in FIGURE_DESCS:
        names[f"figure_{desc}"] = build_path(dict(base, desc=desc, suffix="T1w", extension=".svg"))
    names["status"] = completion_record_name(entities)
    return names


def orientation_record_name(entities: Mapping[str, Any]) -> Path:
    """``<source>_desc-orientation_qc.json``: the scan's orientation QC record (``output_names``'s ``orientation``)."""
    return build_path(dict(entities, desc="orientation", suffix="qc", extension=".json"))


def completion_record_name(entities: Mapping[str, Any]) -> Path:
    """``<source>_desc-status_qc.json``: the scan's completion record (see docs/reliability.md)."""
    return build_path(dict(entities, desc="status", suffix="qc", extension=".json"))


def qc_record_names(entities: Mapping[str, Any]) -> tuple[Path, Path]:
    """``(completion record, orientation QC record)`` of one scan, from one naming-pattern lookup.

    The two names differ only in ``desc-`` (the last entity before the suffix), so the second is the first with its
    end replaced: the group level names 10,000 scans' records in a fraction of the time of two lookups each.

    Examples:
        >>> ents = {"subject": "01", "session": "2", "acquisition": "mp", "run": "3"}
        >>> qc_record_names(ents) == (completion_record_name(ents), orientation_record_name(ents))
        True
    """
    status = completion_record_name(entities)
    return status, status.with_name(status.name[: -len("desc-status_qc.json")] + "desc-orientation_qc.json")


def embedding_name(entities: Mapping[str, Any], task: str) -> Path:
    """``<source>_desc-<task>_embedding.tsv`` for a participant-level embedding."""
    return build_path(dict(entities, desc=task, suffix="embedding", extension=".tsv"))


def subject_report_name(subject: str) -> str:
    """``sub-<label>.html``: one subject's participant-level report, at the top of OUTPUT_DIR.

    Examples:
        >>> subject_report_name("01")
        'sub-01.html'
    """
    return f"sub-{subject}.html"


def orientation_qc_path(preproc: Path | str) -> Path:
    """The ``*_desc-orientation_qc.json`` next to a model-grid ``*_space-..._desc-preproc_T1w`` file.

    Examples:
        >>> orientation_qc_path("a/sub-1_ses-2_space-X_desc-preproc_T1w.nii.gz").as_posix()
        'a/sub-1_ses-2_desc-orientation_qc.json'
    """
    preproc = Path(preproc)
    return preproc.with_name(preproc.name.split("_space-")[0] + "_" + ORIENTATION_QC_SUFFIX)


#: ``OUTPUT_DIR/logs``: one folder per run (``logs/<run_id>/``, :func:`run_log_dir`) and the subjects' locks.
LOGS_FOLDER = "logs"
#: In ``logs/<run_id>/``: the run's settings, its command line and the template files it read.
RUN_SETTINGS, RUN_COMMAND, RUN_TEMPLATES = "settings.json", "command.txt", "templates.json"
#: In ``OUTPUT_DIR/logs``: the folder of the subjects' locks, and the TemplateFlow cache state last warned about.
LOCKS_FOLDER, TEMPLATE_STATE = "locks", ".templateflow-cache-state"
#: In ``logs/<run_id>/``: nipype's crash files of the participant level.
CRASH_FOLDER = "crash"


def run_log_dir(output_dir: Path | str, run_id: str) -> Path:
    """``OUTPUT_DIR/logs/<run_id>``: one run's settings, command, templates and failures.

    Examples:
        >>> run_log_dir("out", "20261206-120000_ab12cd34").as_posix()
        'out/logs/20261206-120000_ab12cd34'
    """
    return Path(output_dir) / LOGS_FOLDER / run_id


#: ``logs/<run_id>/failures.json``: only when a scan failed, one entry per failed scan (``scan``, ``node``,
#: ``error``, ``message``, ``exit_code``), the same as the run's ``FAILED`` lines.
RUN_FAILURES = "failures.json"


#: The ``res-`` of the result maps resampled for users (fMRIPrep's default output grid).
RESULT_RES = "2"

#: ``.bidsignore``: the outputs that BIDS 1.11 has no name for, each with why (docs/outputs.md lists them).
#: Everything else (T1w, masks, dataset_description.json, README.md, sidecars) is validated; ``logs/`` is a
#: directory of BIDS itself (opaque, not validated), so it needs no line. Folder patterns
#: have no trailing ``/``: bids-validator-deno then matches ``figures`` inside ``sub-<label>/`` too.
BIDSIGNORE_REASONS = {
    "*.html": "reports (BIDS has no report files)",
    "figures": "SVG figures of the reports, top level and sub-<label>/figures/ (as fMRIPrep)",
    "models": "trained checkpoints (weights, model cards)",
    "/group*": "group-level tables, the group record and the Workbench folder group/ (BIDS names only "
               "per-subject files in a derivative dataset's root)",
    "*_xfm.*": "transforms: the xfm suffix and from-/to-/mode- entities are not in BIDS 1.11 (as fMRIPrep)",
    "*_qc.json": "per-scan QC and completion records (no BIDS suffix for QC metrics)",
    "*_statmap.*": "voxelwise asymmetry index maps (statmap: the suffix proposed for statistic maps, BEP041, "
                   "not yet in BIDS)",
    "*_relevance.*": "per-scan relevance maps of a twin model (no BIDS suffix)",
    "*_regions.tsv": "per-scan regional asymmetry tables (no BIDS suffix for regional statistics)",
    "*_embedding.tsv": "per-scan embeddings of a trained model (no BIDS suffix)",
}
BIDSIGNORE = list(BIDSIGNORE_REASONS)
#: Lines that earlier versions wrote and the patterns above replace or make unneeded (dropped when OUTPUT_DIR is
#: reused; lines a user added stay).
LEGACY_BIDSIGNORE = ("logs", "sub-*/figures", "*_xfm.txt", "group_*.tsv", "group_*.json", "group")


@lru_cache(maxsize=1)
def path_patterns() -> tuple[str, ...]:
    text = resources.files("bids_siamese.data").joinpath("naming.json").read_text()
    return tuple(json.loads(text)["default_path_patterns"])


def build_path(entities: Mapping[str, Any], root: Path | None = None) -> Path:
    """The output path for ``entities`` (relative, or under ``root``).

    Raises:
        ValueError: no pattern accepts these entities (a programming error, not a user error).

    Examples:
        >>> str(build_path({"subject": "01", "session": "1", "space": "MNI152NLin2009cAsym",
        ...                 "desc": "preproc", "suffix": "T1w", "extension": ".nii.gz"}))
        'sub-01/ses-1/anat/sub-01_ses-1_space-MNI152NLin2009cAsym_desc-preproc_T1w.nii.gz'
    """
    clean = {k: v for k, v in entities.items() if v is not None and v != ""}
    if "extension" in clean and not str(clean["extension"]).startswith("."):
        clean["extension"] = "." + str(clean["extension"])
    relpath = _pybids_build_path(clean, list(path_patterns()), strict=True)
    if relpath is None:
        raise ValueError(f"no output naming pattern accepts entities {dict(clean)}")
    return Path(root) / relpath if root is not None else Path(relpath)


def sidecar_path(path: Path) -> Path:
    """``x.nii.gz`` -> ``x.json``."""
    name = path.name
    for ext in (".nii.gz", ".nii", ".tsv", ".txt", ".h5", ".svg"):
        if name.endswith(ext):
            return path.with_name(name[: -len(ext)] + ".json")
    return path.with_suffix(".json")


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it onto ``path`` only on success."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise CannotCreateError(f"cannot create folder {path.parent}: {err.strerror}; fix: choose a writable OUTPUT_DIR") from err
    suffix = "".join(path.suffixes) or ".tmp"
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f"{PART_MARK}{suffix}", dir=path.parent)
    except OSError as err:
        raise cannot_write(path, err) from err
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        try:
            yield tmp_path
            os.chmod(tmp_path, 0o644)
            os.replace(tmp_path, path)
        except OSError as err:  # disk full, folder made read-only, quota, ... while writing
            raise cannot_write(path, err) from err
    finally:
        with contextlib.suppress(OSError):
            if tmp_path.exists():
                tmp_path.unlink()


def cannot_write(path: Path, err: OSError) -> CannotCreateError:
    return CannotCreateError(f"cannot write {path}: {err.strerror or err}; fix: free space or restore write access "
                             "to OUTPUT_DIR, then rerun (finished scans are reused)")


#: Marks the temporary files of :func:`atomic_path`: ``.<name>.<random>.part<ext>``.
PART_MARK = ".part"
#: Temporary files of files every run writes (dataset_description.json, ...) are swept only when older than
#: this (seconds): a concurrent run may be writing one right now.
SHARED_PART_AGE_S = 600.0


def partial_files(folder: Path, recursive: bool = True) -> list[Path]:
    """Temporary files left by killed writes in ``folder``."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = folder.rglob(f".*{PART_MARK}*") if recursive else folder.glob(f".*{PART_MARK}*")
    return sorted(p for p in found if p.is_file())


def sweep_partial_files(output_dir: Path, subjects: Sequence[str] | None = None, now: float | None = None) -> list[Path]:
    """Delete temporary files left by a killed run; return them.

    With ``subjects`` (whose locks the caller holds): everything under ``sub-<label>/`` and their reports;
    without: the group-level folders. Top-level files shared by all runs are swept only when older than
    :data:`SHARED_PART_AGE_S`.
    """

    output_dir = Path(output_dir)
    now = time.time() if now is None else now
    owned: list[Path] = []
    if subjects is None:
        for name in ("group", "figures", "models"):
            owned += partial_files(output_dir / name)
    else:
        for subject in subjects:
            owned += partial_files(output_dir / f"sub-{subject}")
            owned += [p for p in partial_files(output_dir, recursive=False) if p.name.startswith(f".sub-{subject}.")]
    shared = [p for p in partial_files(output_dir, recursive=False) if not p.name.startswith(".sub-")
              and (subjects is None and p.name.startswith(".group") or now - p.stat().st_mtime > SHARED_PART_AGE_S)]
    removed = []
    for path in dict.fromkeys(owned + shared):
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
            removed.append(path)
    return removed


def write_bytes(path: Path, data: bytes) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_text(path: Path, text: str) -> Path:
    return write_bytes(path, text.encode("utf-8"))


def write_json(path: Path, data: Any) -> Path:
    return write_text(path, json.dumps(data, indent=2, sort_keys=False, default=_json_default) + "\n")


def write_tsv(path: Path, table: pd.DataFrame) -> Path:
    buffer = io.StringIO()
    table.to_csv(buffer, sep="\t", index=False, na_rep="n/a", lineterminator="\n")
    return write_text(path, buffer.getvalue())


def write_nifti(path: Path, img: nib.Nifti1Image) -> Path:
    """Write a NIfTI image atomically, with mm/s units and deterministic gzip bytes."""
    img = nib.Nifti1Image(np.asanyarray(img.dataobj), img.affine, img.header)
    img.header.set_xyzt_units("mm", "sec")
    data = img.to_bytes()  # plain .nii bytes
    if str(path).endswith(".gz"):

        data = gzip.compress(data, compresslevel=6, mtime=0)
    return write_bytes(path, data)


def _json_default(value: Any) -> Any:
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return float(value)
    if isinstance(value, (np.bool_,)):
        return bool(value)
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def template_reference() -> dict[str, Any]:
    """Sidecar fields naming the template a file is aligned to: ``SpatialReference`` (the TemplateFlow URI of
    MNI152NLin2009cAsym's 1 mm brain) and ``SpatialReferenceFile`` (the file this run actually used: path,
    source ``templateflow`` cache or ``bundled`` copy, sha256)."""

    used = template_brain()
    return {"SpatialReference": used.uri,
            "SpatialReferenceFile": {"Path": str(used.path), "Source": used.source, "SHA256": used.sha256}}


def container_info() -> dict[str, str] | None:
    """``GeneratedBy.Container`` from ``$BIDS_SIAMESE_CONTAINER`` (``docker://image[:tag]``); the images set
    the image name only, and the tag is this package's version, so the version has one source (``version``).

    Examples:
        >>> os.environ[CONTAINER_ENV] = "docker://bids/siamese"
        >>> container_info()["Tag"] == f"bids/siamese:{__version__}"
        True
        >>> del os.environ[CONTAINER_ENV]
    """
    value = os.environ.get(CONTAINER_ENV, "").strip()
    if not value:
        return None
    kind, _, tag = value.partition("://")
    if not tag:
        kind, tag = "docker", value
    if ":" not in tag.rsplit("/", 1)[-1]:
        tag = f"{tag}:{__version__}"
    return {"Type": kind, "Tag": tag}


def dataset_description(bids_dir: Path | None = None, derivatives: Sequence[Any] = ()) -> dict[str, Any]:
    """Our ``dataset_description.json``; ``derivatives``: the reused pipelines' datasets
    (:class:`~bids_siamese.bids.fmriprep.PipelineDataset`), added to ``SourceDatasets`` and ``DatasetLinks``
    under their ``--derivatives`` name, so that sidecars can name their files as ``bids:<name>:<path>``."""
    generated_by: dict[str, Any] = {"Name": "bids-siamese", "Version": __version__, "CodeURL": CODE_URL}
    container = container_info()
    if container:
        generated_by["Container"] = container
    description: dict[str, Any] = {
        "Name": "bids-siamese derivatives",
        "BIDSVersion": "1.10.0",
        "DatasetType": "derivative",
        "GeneratedBy": [generated_by],
    }
    if bids_dir is not None:
        source: dict[str, Any] = {"URL": Path(bids_dir).resolve().as_uri()}
        src_desc = Path(bids_dir) / "dataset_description.json"
        try:
            src = json.loads(src_desc.read_text())
        except (OSError, ValueError):
            src = {}
        if src.get("DatasetDOI"):
            source["DOI"] = src["DatasetDOI"]
        if src.get("Name"):
            description["Name"] = f"bids-siamese derivatives of {src['Name']}"
        description["SourceDatasets"] = [source]
        description["DatasetLinks"] = {"raw": source["URL"]}
    for dataset in derivatives:
        url = Path(dataset.path).resolve().as_uri()
        description.setdefault("SourceDatasets", []).append(
            {"URL": url, "Version": dataset.version})
        description.setdefault("DatasetLinks", {})[dataset.name] = url
    return description


def init_output_dir(output_dir: Path, bids_dir: Path | None = None, derivatives: Sequence[Any] = ()) -> None:
    """Create OUTPUT_DIR with dataset_description.json, README and .bidsignore (its lines kept when present,
    less those of :data:`LEGACY_BIDSIGNORE`; missing patterns appended).

    Derivative datasets linked by an earlier run (``DatasetLinks``/``SourceDatasets`` of another name) are kept,
    so that the ``bids:<name>:`` URIs its sidecars hold still resolve after a run without ``--derivatives``."""
    output_dir = Path(output_dir)
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise CannotCreateError(
            f"cannot create output folder {output_dir}: {err.strerror}; fix: choose a writable OUTPUT_DIR"
        ) from err
    if not os.access(output_dir, os.W_OK):
        raise CannotCreateError(f"output folder {output_dir} is not writable; fix: choose a writable OUTPUT_DIR")
    description = dataset_description(bids_dir, derivatives)
    try:
        previous = json.loads((output_dir / "dataset_description.json").read_text())
    except (OSError, ValueError):
        previous = {}
    links = description.setdefault("DatasetLinks", {})
    for name, url in (previous.get("DatasetLinks") or {}).items():
        if name not in links:
            links[name] = url
            description.setdefault("SourceDatasets", []).extend(
                s for s in previous.get("SourceDatasets", []) if isinstance(s, dict) and s.get("URL") == url)
    if not links:
        del description["DatasetLinks"]
    write_json(output_dir / "dataset_description.json", description)
    ignore_file = output_dir / ".bidsignore"
    existing = [line for line in (ignore_file.read_text().splitlines() if ignore_file.exists() else [])
                if line not in LEGACY_BIDSIGNORE]
    lines = existing + [p for p in BIDSIGNORE if p not in existing]
    write_text(ignore_file, "\n".join(lines) + "\n")
    readme = output_dir / "README.md"
    if not readme.exists():
        write_text(
            readme,
            "# bids-siamese derivatives\n\nOutputs of bids-siamese "
            f"{__version__}. Every file is described in the bids-siamese documentation (docs/outputs.md).\n",
        )
