"""The derivatives writer: output names from BIDS entities, sidecars, dataset_description.json.

Every path the app writes inside OUTPUT_DIR is built here, either from BIDS entities with the pybids
patterns in ``bids_siamese/data/naming.json`` or from the fixed group-level names in
:data:`GROUP_FILES`. Every write is atomic: data go to a temporary file in the destination folder
which is then renamed over the target, so a killed run never leaves a half-written output.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import tempfile
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any, Iterator, Mapping

import nibabel as nib
import numpy as np
import pandas as pd
from bids.layout.writing import build_path as _pybids_build_path

from .. import __version__
from ..errors import CannotCreateError

CODE_URL = "https://github.com/bids-apps/bids-siamese"
CONTAINER_ENV = "BIDS_SIAMESE_CONTAINER"  # e.g. "docker://bids/siamese:0.1.0", set in the images

#: Fixed names of group-level outputs at the top of OUTPUT_DIR.
GROUP_FILES = {
    "orientation": "group_orientation.tsv",
    "twins_relatives": "group_twins_relatives.tsv",
}

#: Non-BIDS files in the output folder, hidden from the validator (as fMRIPrep does).
BIDSIGNORE = [
    "*.html",
    "logs",
    "figures",
    "sub-*/figures",
    "*_xfm.txt",
    "*_qc.json",
    "*_regions.tsv",
    "*_embedding.tsv",
    "group_*.tsv",
    "group_*.json",
    "models",
    "group",
    "*_relevance.*",
]


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
        ...                 "res": "2", "desc": "preproc", "suffix": "T1w", "extension": ".nii.gz"}))
        'sub-01/ses-1/anat/sub-01_ses-1_space-MNI152NLin2009cAsym_res-2_desc-preproc_T1w.nii.gz'
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
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".part{suffix}", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.chmod(tmp_path, 0o644)
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


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
        import gzip

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


def container_info() -> dict[str, str] | None:
    """``GeneratedBy.Container`` from ``$BIDS_SIAMESE_CONTAINER`` (``docker://image:tag``)."""
    value = os.environ.get(CONTAINER_ENV, "").strip()
    if not value:
        return None
    kind, _, tag = value.partition("://")
    if not tag:
        return {"Type": "docker", "Tag": value}
    return {"Type": kind, "Tag": tag}


def dataset_description(bids_dir: Path | None = None) -> dict[str, Any]:
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
    return description


def init_output_dir(output_dir: Path, bids_dir: Path | None = None) -> None:
    """Create OUTPUT_DIR with dataset_description.json, README and .bidsignore (kept when present)."""
    output_dir = Path(output_dir)
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise CannotCreateError(
            f"cannot create output folder {output_dir}: {err.strerror}; fix: choose a writable OUTPUT_DIR"
        ) from err
    if not os.access(output_dir, os.W_OK):
        raise CannotCreateError(f"output folder {output_dir} is not writable; fix: choose a writable OUTPUT_DIR")
    write_json(output_dir / "dataset_description.json", dataset_description(bids_dir))
    ignore_file = output_dir / ".bidsignore"
    existing = ignore_file.read_text().splitlines() if ignore_file.exists() else []
    lines = existing + [p for p in BIDSIGNORE if p not in existing]
    write_text(ignore_file, "\n".join(lines) + "\n")
    readme = output_dir / "README.md"
    if not readme.exists():
        write_text(
            readme,
            "# bids-siamese derivatives\n\nOutputs of bids-siamese "
            f"{__version__}. Every file is described in the bids-siamese documentation (docs/outputs.md).\n",
        )
