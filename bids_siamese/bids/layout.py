"""Input side: validate the raw dataset and select the T1w scans to process.

Only the selected subjects' folders are read: listed for the default T1w query, indexed by pybids (the others
ignored by a path pattern) for a ``--bids-filter-file`` query, so a large dataset is not walked in full when one
participant is asked for.
"""
from __future__ import annotations

import csv
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import BadDataError, EmptySelectionError, NoInputError, UsageError, ValidationError

if TYPE_CHECKING:  # pandas is imported where a TSV is read (the CLI starts without it)
    import pandas as pd

LABEL_RE = re.compile(r"^[A-Za-z0-9]+$")
#: Entities users may filter on in ``--bids-filter-file`` (fMRIPrep's format: {"t1w": {...}}).
FILTER_QUERIES = {"t1w": {"datatype": "anat", "suffix": "T1w", "extension": [".nii", ".nii.gz"]}}
MAX_LISTED_ISSUES = 10
LOG = logging.getLogger("bids_siamese.layout")


def clean_label(label: str, prefix: str) -> str:
    """``sub-01`` or ``01`` -> ``01``; anything but letters and digits is a usage error.

    Examples:
        >>> clean_label("sub-01", "sub-")
        '01'
    """
    text = str(label).strip()
    if text.startswith(prefix):
        text = text[len(prefix):]
    if not LABEL_RE.match(text):
        raise UsageError(
            f"invalid label '{label}': BIDS labels contain only letters and digits; fix: pass e.g. {prefix}01 or 01"
        )
    return text


def bids_relative(path: Path, bids_dir: Path) -> Path:
    """``path`` relative to the dataset root, as the dataset names it (a symlinked file is not followed).

    HPC datasets are often assembled from symlinks to files elsewhere: resolving the link would leave the dataset.

    Examples:
        >>> str(bids_relative(Path("/data/ds/sub-01/anat/sub-01_T1w.nii.gz"), Path("/data/ds")))
        'sub-01/anat/sub-01_T1w.nii.gz'
    """
    path, bids_dir = Path(os.path.abspath(path)), Path(os.path.abspath(bids_dir))
    try:
        return path.relative_to(bids_dir)
    except ValueError:  # the dataset root given through another (symlinked) path
        return path.resolve().relative_to(bids_dir.resolve())


def read_bids_tsv(path: Path) -> pd.DataFrame:
    """A BIDS TSV file (participants.tsv, sessions, scans) as strings: tab-separated, no quoting (a value may
    start with ``"``), ``n/a`` kept as text.

    Raises:
        BadDataError: the file cannot be parsed (e.g. a row with more fields than the header).
    """
    import pandas as pd  # deferred: the CLI starts (and answers --help) without pandas

    try:
        with warnings.catch_warnings():  # a row longer than the header: pandas would drop or shift fields
            warnings.simplefilter("error", pd.errors.ParserWarning)
            return pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False, quoting=csv.QUOTE_NONE,
                               index_col=False)
    except (pd.errors.ParserError, pd.errors.ParserWarning, UnicodeDecodeError) as err:
        detail = " ".join(str(err).split())
        raise BadDataError(f"{path} is not a valid BIDS TSV file ({detail}); fix: one tab-separated row per line, "
                           "as many fields as the header") from err


def existing_subjects(bids_dir: Path) -> list[str]:
    """Subject labels present as ``sub-<label>`` folders (a cheap listing, no indexing)."""
    return sorted(p.name[4:] for p in Path(bids_dir).glob("sub-*") if p.is_dir() and LABEL_RE.match(p.name[4:]))


def resolve_participants(bids_dir: Path, requested: list[str]) -> list[str]:
    """The requested subjects (all when none requested); exit 66 naming missing and existing labels."""
    present = existing_subjects(bids_dir)
    if not present:
        raise NoInputError(f"no sub-<label> folders in {bids_dir}; fix: point BIDS_DIR at a BIDS dataset")
    if not requested:
        return present
    missing = [label for label in requested if label not in present]
    if missing:
        shown = ", ".join(present[:20]) + (" ..." if len(present) > 20 else "")
        raise NoInputError(
            f"participant(s) {', '.join(missing)} not found in {bids_dir}; existing: {shown}; fix: correct --participant-label"
        )
    return list(dict.fromkeys(requested))


def load_filter_file(path: Path) -> dict[str, dict[str, Any]]:
    """Read and check a ``--bids-filter-file`` (JSON, fMRIPrep format)."""
    path = Path(path)
    if not path.is_file():
        raise NoInputError(f"BIDS filter file {path} not found; fix: give an existing JSON file")
    try:
        data = json.loads(path.read_text())
    except ValueError as err:
        raise UsageError(f"BIDS filter file {path} is not valid JSON ({err.msg} at line {err.lineno}); fix: correct the JSON") from err
    if not isinstance(data, dict) or not all(isinstance(v, dict) for v in data.values()):
        raise UsageError(f'BIDS filter file {path} must map a query name to entities, e.g. {{"t1w": {{"session": "01"}}}}')
    unknown = sorted(set(data) - set(FILTER_QUERIES))
    if unknown:
        raise UsageError(f"BIDS filter file {path} has unknown query {', '.join(unknown)}; fix: use one of {', '.join(FILTER_QUERIES)}")
    return data


def validator_command() -> list[str]:
    exe = shutil.which("bids-validator-deno")
    if exe is None:
        candidate = Path(sys.executable).parent / "bids-validator-deno"
        if candidate.exists():
            exe = str(candidate)
    if exe is None:
        raise NoInputError(
            "bids-validator-deno is not installed; fix: pip install bids-validator-deno, or pass --skip-bids-validation"
        )
    return [exe]


@dataclass(frozen=True)
class ValidatorIssue:
    code: str
    severity: str
    location: str
    detail: str = ""

    def __str__(self) -> str:
        extra = f" ({self.detail})" if self.detail else ""
        return f"{self.code} {self.location}{extra}"


def run_validator(dataset: Path, timeout: float = 300.0) -> list[ValidatorIssue]:
    """Run ``bids-validator-deno --format json`` offline; return its issues (all severities)."""
    cmd = validator_command() + ["--format", "json", str(dataset)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired as err:
        raise ValidationError(f"bids-validator-deno timed out on {dataset}; fix: pass --skip-bids-validation") from err
    try:
        report = json.loads(proc.stdout)
    except ValueError as err:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        raise ValidationError(f"bids-validator-deno failed on {dataset}: {tail[0]}; fix: pass --skip-bids-validation") from err
    issues = []
    for item in report.get("issues", {}).get("issues", []):
        issues.append(
            ValidatorIssue(
                code=str(item.get("code", "?")),
                severity=str(item.get("severity", "error")),
                location=str(item.get("location", "")),
                detail=str(item.get("subCode") or item.get("issueMessage") or "")[:120],
            )
        )
    return issues


def issue_subject(issue: ValidatorIssue) -> str | None:
    """The subject an issue is about (from its location ``/sub-<label>/...``), None for dataset-level issues."""
    match = re.match(r"^/?sub-([A-Za-z0-9]+)(/|_|$)", issue.location)
    return match.group(1) if match else None


def validate_dataset(dataset: Path, subjects: list[str] | None = None) -> list[ValidatorIssue]:
    """Raise :class:`ValidationError` (exit 16) listing the validator's errors; return warnings.

    With ``subjects`` (the selection), errors in files of other subjects are returned as warnings and logged in
    one line: one broken subject must not block the array tasks of the others.
    """
    issues = run_validator(dataset)
    errors = [i for i in issues if i.severity == "error"]
    elsewhere: list[ValidatorIssue] = []
    if subjects is not None:
        selected = set(subjects)
        elsewhere = [i for i in errors if issue_subject(i) is not None and issue_subject(i) not in selected]
        errors = [i for i in errors if i not in elsewhere]
    if errors:
        listed = "; ".join(str(e) for e in errors[:MAX_LISTED_ISSUES])
        more = f" (+{len(errors) - MAX_LISTED_ISSUES} more)" if len(errors) > MAX_LISTED_ISSUES else ""
        raise ValidationError(
            f"{dataset} failed BIDS validation with {len(errors)} error(s): {listed}{more}; "
            "fix: correct the dataset, or pass --skip-bids-validation"
        )
    if elsewhere:
        others = sorted({f"sub-{issue_subject(i)}" for i in elsewhere})
        LOG.warning("BIDS validation: %d error(s) in subjects outside the selection (%s), e.g. %s; not blocking "
                    "this run", len(elsewhere), ", ".join(others[:MAX_LISTED_ISSUES]), elsewhere[0])
    return [i for i in issues if i.severity != "error"] + elsewhere


@dataclass(frozen=True)
class T1wScan:
    """One selected T1w scan and its BIDS entities."""

    path: Path
    entities: dict[str, str]

    @property
    def name(self) -> str:
        """The file name without extension, e.g. ``sub-01_ses-1_T1w``."""
        name = self.path.name
        return name[:-7] if name.endswith(".nii.gz") else self.path.stem


def _ignore_other_subjects(subjects: list[str]) -> list[Any]:
    keep = "|".join(re.escape(s) for s in subjects)
    return [
        re.compile(rf"^/sub-(?!({keep})(/|$))"),
        re.compile(r"^/(code|sourcedata|stimuli|derivatives|models)(/|$)"),
        re.compile(r"/\."),
    ]


#: A T1w file name of the default query: ``sub-<label>[_<key>-<label>...]_T1w.nii[.gz]``.
T1W_NAME = re.compile(r"^sub-[A-Za-z0-9]+(?:_[a-z]+-[A-Za-z0-9]+)*_T1w\.nii(?:\.gz)?$")
#: File-name keys of the entities kept (:data:`ENTITY_ORDER`), and pybids' names for them.
ENTITY_KEYS = {"sub": "subject", "ses": "session", "acq": "acquisition", "ce": "ceagent", "rec": "reconstruction",
               "run": "run"}


def _scan_dir(folder: Path) -> list[os.DirEntry]:
    """The entries of ``folder`` without hidden ones; none when it is not a folder."""
    try:
        with os.scandir(folder) as entries:
            return [e for e in entries if not e.name.startswith(".")]
    except (FileNotFoundError, NotADirectoryError):
        return []


def walk_t1w(bids_dir: Path, subjects: list[str], sessions: list[str] | None = None) -> list[T1wScan]:
    """The T1w scans of the default query (no ``--bids-filter-file``) by a listing of the subjects' folders.

    Selects what pybids' index selects for that query (datatype ``anat``, suffix ``T1w``, extension ``.nii`` or
    ``.nii.gz``), by reading only ``sub-<label>/anat/`` and ``sub-<label>/ses-<label>/anat/`` of each subject: on an
    11,000-subject dataset the index took most of a group run's time. Subject and session come from the folders,
    the other entities of :data:`ENTITY_ORDER` from the file name; hidden files are skipped (as the index's ignore
    patterns do). Sorted by path.
    """
    scans = []
    for subject in subjects:
        root = Path(bids_dir) / f"sub-{subject}"
        folders: list[tuple[str | None, Path]] = [(None, root / "anat")]
        folders += [(e.name[4:], Path(e.path) / "anat") for e in _scan_dir(root)
                    if e.name.startswith("ses-") and e.is_dir()]
        for session, anat in folders:
            for entry in _scan_dir(anat):
                if not T1W_NAME.match(entry.name) or not entry.is_file():
                    continue
                found = {"subject": subject, "session": session}
                for part in entry.name.split("_")[1:-1]:
                    key, value = part.split("-", 1)
                    if key in ENTITY_KEYS and found.get(ENTITY_KEYS[key]) is None:
                        found[ENTITY_KEYS[key]] = value
                ents = {k: found[k] for k in ENTITY_ORDER if found.get(k) is not None}
                if sessions and ents.get("session") not in sessions:
                    continue
                scans.append(T1wScan(path=Path(entry.path), entities=ents))
    scans.sort(key=lambda s: str(s.path))
    return scans


def collect_t1w(
    bids_dir: Path,
    subjects: list[str],
    sessions: list[str] | None = None,
    filters: dict[str, dict[str, Any]] | None = None,
) -> list[T1wScan]:
    """Select T1w scans of ``subjects`` (and ``sessions``), applying the filter file's ``t1w`` query.

    Without a filter file's ``t1w`` query the folders are listed (:func:`walk_t1w`); with one, pybids indexes the
    selected subjects and answers the query (any entity, as fMRIPrep's filter files).
    """
    user = dict((filters or {}).get("t1w", {}))
    scans = walk_t1w(bids_dir, subjects, sessions) if not user else query_t1w(bids_dir, subjects, sessions, user)
    if not scans:
        raise EmptySelectionError(
            f"no T1w scan in {bids_dir} matches subjects {', '.join(subjects)}"
            + (f", sessions {', '.join(sessions)}" if sessions else "")
            + (f" and filters {user}" if user else "")
            + "; fix: relax --session-label/--bids-filter-file"
        )
    return scans


def query_t1w(bids_dir: Path, subjects: list[str], sessions: list[str] | None, user: dict[str, Any]) -> list[T1wScan]:
    """The T1w query with a filter file's entities (``user``; none: the default query, as :func:`walk_t1w`),
    answered by pybids' index of the selected subjects."""
    from bids.layout import BIDSLayout, BIDSLayoutIndexer  # deferred: pybids adds ~1.5 s to the CLI's start

    indexer = BIDSLayoutIndexer(validate=False, index_metadata=False, ignore=_ignore_other_subjects(subjects))
    layout = BIDSLayout(str(bids_dir), validate=False, indexer=indexer)
    query: dict[str, Any] = dict(FILTER_QUERIES["t1w"])
    for key, value in user.items():
        query[key] = value
    query["subject"] = subjects
    if sessions:
        query["session"] = sessions
    try:
        files = layout.get(return_type="object", invalid_filters="error", **query)
    except ValueError as err:
        raise UsageError(f"invalid BIDS filter: {err}; fix: use BIDS entity names such as session, acquisition, run") from err
    scans = []
    for f in files:
        ents = {k: str(v) for k, v in f.get_entities().items() if k in ENTITY_ORDER}
        scans.append(T1wScan(path=Path(f.path), entities=ents))
    scans.sort(key=lambda s: str(s.path))
    return scans


#: Entities kept from the input file name, in BIDS order.
ENTITY_ORDER = ["subject", "session", "acquisition", "ceagent", "reconstruction", "run"]
