"""Pairs, families and splits for the group-level models.

Twins come from ``participants.tsv`` (a family column and a zygosity column, HCP names accepted) or from a
pairs TSV (``subject_a, subject_b, relation``). Longitudinal pairs come from each participant's sessions,
ordered by ``acq_time`` (``*_sessions.tsv``, else ``*_scans.tsv``) or by session label. Splits never put one
family in two splits, are stratified (by family type or label) and seeded.

All functions but the ``read_*`` ones are pure (tables in, tables out). Participant ids are always written
with their ``sub-`` prefix.
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from itertools import combinations
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np
import pandas as pd

from ..bids.layout import read_bids_tsv
from ..errors import BadDataError, NoInputError, UsageError

LOG = logging.getLogger("bids_siamese.pairs")

RELATIONS = ("MZ", "DZ", "sibling", "unrelated")
SPLITS = ("train", "validation", "test")
DEFAULT_FRACTIONS = (0.6, 0.2, 0.2)

_MZ = {"mz", "monozygotic", "identical"}
_DZ = {"dz", "notmz", "dizygotic", "fraternal"}
_NOT_TWIN = {"", "n/a", "na", "nan", "none", "nottwin", "not twin", "singleton", "sibling", "no"}
_DECLINE = {"decline", "declined", "1", "true"}
_STABLE = {"stable", "0", "false"}


def participant_id(label: object) -> str:
    """``01`` or ``sub-01`` -> ``sub-01``.

    Examples:
        >>> participant_id("01"), participant_id("sub-01"), participant_id(100307)
        ('sub-01', 'sub-01', 'sub-100307')
    """
    text = str(label).strip()
    return text if text.startswith("sub-") else f"sub-{text}"


def _is_missing(value: object) -> bool:
    if value is None:
        return True
    if isinstance(value, float) and np.isnan(value):
        return True
    return str(value).strip().lower() in ("", "n/a", "na", "nan", "none")


def normalise_zygosity(value: object) -> str:
    """``MZ``, ``DZ`` or ``""`` (not a twin or unknown) from the spellings used by datasets.

    HCP's ``ZygosityGT`` uses ``MZ``/``DZ`` (blank for non-twins) and ``ZygositySR`` uses ``MZ``/``NotMZ``/
    ``NotTwin``; ``NotMZ`` counts as DZ.

    Raises:
        BadDataError: an unknown value.

    Examples:
        >>> [normalise_zygosity(v) for v in ("MZ", "dz", "NotMZ", "NotTwin", " ", float("nan"))]
        ['MZ', 'DZ', 'DZ', '', '', '']
    """
    if _is_missing(value):
        return ""
    text = str(value).strip().lower()
    if text in _MZ:
        return "MZ"
    if text in _DZ:
        return "DZ"
    if text in _NOT_TWIN:
        return ""
    raise BadDataError(f"unknown zygosity value '{value}'; fix: use MZ, DZ (or NotMZ) and NotTwin/n/a")


def normalise_label(value: object) -> int | None:
    """1 for decline, 0 for stable, ``None`` when missing.

    Raises:
        BadDataError: any other value.

    Examples:
        >>> [normalise_label(v) for v in ("decline", "Stable", "n/a")]
        [1, 0, None]
    """
    if _is_missing(value):
        return None
    text = str(value).strip().lower()
    if text in _DECLINE:
        return 1
    if text in _STABLE:
        return 0
    raise BadDataError(f"unknown longitudinal label '{value}'; fix: use decline or stable (n/a when unknown)")


def find_column(table: pd.DataFrame, name: str, fallbacks: Sequence[str] = ()) -> str | None:
    """The column called ``name`` (case-insensitive), else the first of ``fallbacks`` present, else None.

    Examples:
        >>> t = pd.DataFrame(columns=["participant_id", "Family_ID", "ZygositySR"])
        >>> find_column(t, "family_id"), find_column(t, "zygosity", ["ZygosityGT", "ZygositySR"])
        ('Family_ID', 'ZygositySR')
    """
    lower = {str(c).lower(): str(c) for c in table.columns}
    for candidate in (name, *fallbacks):
        if candidate in table.columns:
            return candidate
        if candidate.lower() in lower:
            return lower[candidate.lower()]
    return None


FAMILY_FALLBACKS = ("family_id", "Family_ID", "family")
ZYGOSITY_FALLBACKS = ("zygosity", "ZygosityGT", "ZygositySR")


def read_participants(bids_dir: Path) -> pd.DataFrame:
    """``participants.tsv`` of a dataset with string values and a ``sub-``-prefixed ``participant_id``.

    Raises:
        NoInputError: no participants.tsv.
        BadDataError: no participant_id column, a participant listed twice, a row that is not BIDS TSV.
    """
    path = Path(bids_dir) / "participants.tsv"
    if not path.is_file():
        raise NoInputError(f"{path} not found; fix: add a participants.tsv (participant_id, family and zygosity "
                           "or label columns) or pass --pairs-file")
    table = read_bids_tsv(path)
    if "participant_id" not in table.columns:
        raise BadDataError(f"{path} has no participant_id column; fix: add it (BIDS requires it)")
    table["participant_id"] = table["participant_id"].map(participant_id)
    duplicated = sorted(set(table.loc[table["participant_id"].duplicated(), "participant_id"]))
    if duplicated:
        raise BadDataError(f"{path} lists participant(s) {', '.join(duplicated)} more than once; fix: keep one row "
                           "per participant (the BIDS validator reports this unless --skip-bids-validation)")
    return table


@dataclass
class Relations:
    """Who is related to whom among the selected subjects.

    Attributes:
        family: participant_id -> family id (singletons get their own family).
        pairs: ``subject_a, subject_b, relation`` for every related pair (MZ, DZ, sibling), a < b.
    """

    family: dict[str, str]
    pairs: pd.DataFrame

    def relation(self, a: str, b: str) -> str:
        """``MZ``, ``DZ``, ``sibling`` or ``unrelated``."""
        if self.family.get(a) != self.family.get(b):
            return "unrelated"
        lo, hi = sorted((a, b))
        hit = self.pairs[(self.pairs["subject_a"] == lo) & (self.pairs["subject_b"] == hi)]
        return str(hit["relation"].iloc[0]) if len(hit) else "sibling"

    def family_type(self) -> dict[str, str]:
        """Per family: the closest relation inside it (MZ > DZ > sibling > singleton)."""
        rank = {"MZ": 0, "DZ": 1, "sibling": 2}
        best: dict[str, str] = {f: "singleton" for f in self.family.values()}
        for row in self.pairs.itertuples(index=False):
            fam = self.family[row.subject_a]
            if best[fam] == "singleton" or rank[row.relation] < rank[best[fam]]:
                best[fam] = row.relation
        return best


def _pair_frame(rows: Iterable[tuple[str, str, str]]) -> pd.DataFrame:
    rows = [(*sorted((a, b)), r) for a, b, r in rows]
    table = pd.DataFrame(rows, columns=["subject_a", "subject_b", "relation"])
    return table.drop_duplicates(["subject_a", "subject_b"]).sort_values(["subject_a", "subject_b"]).reset_index(
        drop=True)


def relations_from_participants(
    table: pd.DataFrame,
    subjects: Sequence[str],
    family_column: str = "family_id",
    zygosity_column: str = "zygosity",
    source: str = "participants.tsv",
) -> Relations:
    """Twin pairs and families from participants.tsv columns.

    Members of one family with the same twin zygosity (MZ or DZ) are co-twins; all other pairs inside a family
    are siblings. A missing family id makes a singleton. When the zygosity column is HCP's ``ZygosityGT`` and
    ``ZygositySR`` exists, blanks in the genotype column are filled from the self report.

    Args:
        table: participants table (``participant_id`` with ``sub-``).
        subjects: the selected subjects (labels with or without ``sub-``).
        family_column: family id column (case-insensitive; ``Family_ID`` is found for the default).
        zygosity_column: zygosity column (``ZygosityGT``/``ZygositySR`` are found for the default).
        source: file name for messages.

    Raises:
        UsageError: a column is missing (the message lists the columns present).

    Examples:
        >>> t = pd.DataFrame({"participant_id": ["sub-1", "sub-2", "sub-3", "sub-4"],
        ...                   "Family_ID": ["f1", "f1", "f1", "f2"], "ZygosityGT": ["MZ", "MZ", "", ""]})
        >>> r = relations_from_participants(t, ["1", "2", "3", "4"])
        >>> r.pairs.values.tolist()
        [['sub-1', 'sub-2', 'MZ'], ['sub-1', 'sub-3', 'sibling'], ['sub-2', 'sub-3', 'sibling']]
        >>> r.relation("sub-1", "sub-4")
        'unrelated'
    """
    fam_fallbacks = FAMILY_FALLBACKS if family_column == "family_id" else ()
    zyg_fallbacks = ZYGOSITY_FALLBACKS if zygosity_column == "zygosity" else ()
    fam_col = find_column(table, family_column, fam_fallbacks)
    zyg_col = find_column(table, zygosity_column, zyg_fallbacks)
    for name, col, option in ((family_column, fam_col, "--family-column"), (zygosity_column, zyg_col,
                                                                             "--zygosity-column")):
        if col is None:
            raise UsageError(f"{source} has no column '{name}' (columns: {', '.join(map(str, table.columns))}); "
                             f"fix: pass {option} NAME or --pairs-file")
    wanted = [participant_id(s) for s in subjects]
    rows = table.set_index("participant_id")
    missing = [s for s in wanted if s not in rows.index]
    if missing:
        raise BadDataError(f"{source} has no row for {', '.join(missing[:5])}; fix: add them to participants.tsv")
    rows = rows.loc[wanted]
    zygosity = rows[zyg_col].copy()
    sr = find_column(table, "ZygositySR")
    if zyg_col.lower() == "zygositygt" and sr is not None:
        zygosity = zygosity.where(~zygosity.map(_is_missing), rows[sr])
    zyg = zygosity.map(normalise_zygosity)
    family: dict[str, str] = {}
    for pid, fam in rows[fam_col].items():
        family[pid] = f"singleton-{pid}" if _is_missing(fam) else str(fam).strip()
    members: dict[str, list[str]] = {}
    for pid in wanted:
        members.setdefault(family[pid], []).append(pid)
    out = []
    for fam, group in members.items():
        for a, b in combinations(group, 2):
            za, zb = zyg[a], zyg[b]
            out.append((a, b, za if za and za == zb else "sibling"))
        for kind in ("MZ", "DZ"):
            n = sum(zyg[p] == kind for p in group)
            if n > 2:
                LOG.warning("family %s has %d members with zygosity %s; all of them are paired as co-twins",
                            fam, n, kind)
    return Relations(family=family, pairs=_pair_frame(out))


def relations_from_pairs_table(table: pd.DataFrame, subjects: Sequence[str], source: str = "--pairs-file"
                               ) -> Relations:
    """Twin pairs from a pairs TSV (``subject_a, subject_b, relation`` in MZ|DZ|sibling|unrelated).

    Families are the connected groups of related pairs; subjects in no related pair are singletons. Pairs with
    a subject outside the selection are dropped.

    Raises:
        UsageError: missing columns or an unknown relation.

    Examples:
        >>> t = pd.DataFrame({"subject_a": ["1", "3"], "subject_b": ["sub-2", "4"], "relation": ["mz", "unrelated"]})
        >>> r = relations_from_pairs_table(t, ["1", "2", "3", "4"])
        >>> r.pairs.values.tolist(), r.family["sub-1"] == r.family["sub-2"], r.family["sub-3"] == r.family["sub-4"]
        ([['sub-1', 'sub-2', 'MZ']], True, False)
    """
    needed = ["subject_a", "subject_b", "relation"]
    missing = [c for c in needed if c not in table.columns]
    if missing:
        raise UsageError(f"{source} lacks column(s) {', '.join(missing)}; fix: use a TSV with columns "
                         "subject_a, subject_b, relation (MZ|DZ|sibling|unrelated)")
    wanted = {participant_id(s) for s in subjects}
    canon = {r.lower(): r for r in RELATIONS}
    parent = {s: s for s in wanted}

    def root(x: str) -> str:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    out, dropped = [], 0
    for row in table.itertuples(index=False):
        rel = canon.get(str(row.relation).strip().lower())
        if rel is None:
            raise UsageError(f"{source}: relation '{row.relation}' is not one of {'|'.join(RELATIONS)}; fix: "
                             "correct the relation column")
        a, b = participant_id(row.subject_a), participant_id(row.subject_b)
        if a not in wanted or b not in wanted:
            dropped += 1
            continue
        if rel == "unrelated" or a == b:
            continue
        parent[root(a)] = root(b)
        out.append((a, b, rel))
    if dropped:
        LOG.info("%s: %d pair(s) with unselected subjects ignored", source, dropped)
    family = {s: f"family-{root(s)}" for s in sorted(wanted)}
    return Relations(family=family, pairs=_pair_frame(out))


def read_pairs_file(path: Path) -> pd.DataFrame:
    """The pairs TSV as strings.

    Raises:
        NoInputError: the file does not exist.
    """
    path = Path(path)
    if not path.is_file():
        raise NoInputError(f"--pairs-file {path} not found; fix: give an existing TSV")
    return read_bids_tsv(path)


def unrelated_pairs(subjects: Sequence[str], family: Mapping[str, str]) -> list[tuple[str, str]]:
    """All pairs ``(a, b)``, ``a < b``, of subjects from different families.

    Examples:
        >>> unrelated_pairs(["a", "b", "c"], {"a": "1", "b": "1", "c": "2"})
        [('a', 'c'), ('b', 'c')]
    """
    subs = sorted(subjects)
    return [(a, b) for a, b in combinations(subs, 2) if family[a] != family[b]]


def _allocate(n: int, fractions: Sequence[float]) -> tuple[int, int, int]:
    """Families per split for a stratum of ``n`` families: test and validation get one each as soon as there
    are enough (test from 2 families, validation from 3), training keeps at least one.

    Examples:
        >>> [_allocate(n, (0.6, 0.2, 0.2)) for n in (1, 2, 3, 6, 10)]
        [(1, 0, 0), (1, 0, 1), (1, 1, 1), (4, 1, 1), (6, 2, 2)]
    """
    _, f_val, f_test = fractions
    n_test = max(1, int(round(n * f_test))) if n >= 2 else 0
    n_val = max(1, int(round(n * f_val))) if n >= 3 else 0
    while n - n_test - n_val < 1 and (n_test or n_val):
        if n_val >= n_test and n_val:
            n_val -= 1
        else:
            n_test -= 1
    return n - n_val - n_test, n_val, n_test


def family_aware_split(
    table: pd.DataFrame,
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
    seed: int = 0,
) -> pd.DataFrame:
    """Assign every row to train/validation/test so that no family spans two splits, stratified by ``stratum``.

    Args:
        table: one row per subject with ``participant_id``, ``family_id`` and ``stratum`` (one value per family,
            e.g. MZ/DZ/singleton or decline/stable).
        fractions: train, validation, test fractions of the families in each stratum.
        seed: random seed (same seed, same split).

    Returns:
        ``table`` sorted by participant_id with a ``split`` column.

    Examples:
        >>> t = pd.DataFrame({"participant_id": [f"sub-{i}" for i in range(10)],
        ...                   "family_id": [i // 2 for i in range(10)], "stratum": ["MZ"] * 10})
        >>> s = family_aware_split(t, seed=1)
        >>> int(s.groupby("family_id")["split"].nunique().max()), sorted(s["split"].value_counts().to_dict().items())
        (1, [('test', 2), ('train', 6), ('validation', 2)])
    """
    if not np.isclose(sum(fractions), 1.0):
        raise ValueError(f"split fractions must sum to 1, got {fractions}")
    rng = np.random.default_rng(seed)
    fam = table.drop_duplicates("family_id")[["family_id", "stratum"]]
    split_of: dict[object, str] = {}
    for stratum in sorted(fam["stratum"].astype(str).unique()):
        families = sorted(fam.loc[fam["stratum"].astype(str) == stratum, "family_id"].tolist(), key=str)
        order = rng.permutation(len(families))
        n_train, n_val, _ = _allocate(len(families), fractions)
        for rank, idx in enumerate(order):
            split_of[families[idx]] = "train" if rank < n_train else "validation" if rank < n_train + n_val else "test"
    out = table.copy()
    out["split"] = out["family_id"].map(split_of)
    return out.sort_values("participant_id").reset_index(drop=True)


def twin_split_table(relations: Relations, seed: int = 0, fractions: Sequence[float] = DEFAULT_FRACTIONS
                     ) -> pd.DataFrame:
    """The twin split: ``participant_id, family_id, family_type, split`` (stratified by family type).

    Examples:
        >>> r = Relations({"sub-1": "a", "sub-2": "a", "sub-3": "b"},
        ...               pd.DataFrame([("sub-1", "sub-2", "MZ")], columns=["subject_a", "subject_b", "relation"]))
        >>> twin_split_table(r)["family_type"].tolist()
        ['MZ', 'MZ', 'singleton']
    """
    ftype = relations.family_type()
    table = pd.DataFrame({"participant_id": list(relations.family),
                          "family_id": [relations.family[s] for s in relations.family]})
    table["stratum"] = table["family_id"].map(ftype)
    out = family_aware_split(table, fractions, seed)
    return out.rename(columns={"stratum": "family_type"})[["participant_id", "family_id", "family_type", "split"]]


# ---------------------------------------------------------------------------------------------------------------
# Longitudinal pairs
# ---------------------------------------------------------------------------------------------------------------


def _session_key(label: str) -> tuple:
    """Natural sort key of a session label: ``2`` < ``10``, ``baseline`` after numbers."""
    parts = re.split(r"(\d+)", str(label))
    return tuple((0, int(p)) if p.isdigit() else (1, p) for p in parts if p != "")


def read_session_times(bids_dir: Path, subject: str) -> dict[str, pd.Timestamp]:
    """Acquisition time per session of one subject: ``sub-X_sessions.tsv`` (``session_id``, ``acq_time``), else
    the earliest ``acq_time`` of the anat files in each ``sub-X_ses-Y_scans.tsv``. Sessions without a time are
    left out.

    Args:
        bids_dir: the raw dataset.
        subject: participant id (with or without ``sub-``).
    """
    pid = participant_id(subject)
    root = Path(bids_dir) / pid
    times: dict[str, pd.Timestamp] = {}
    sessions_tsv = root / f"{pid}_sessions.tsv"
    if sessions_tsv.is_file():
        table = read_bids_tsv(sessions_tsv)
        if {"session_id", "acq_time"} <= set(table.columns):
            for ses, value in zip(table["session_id"], table["acq_time"]):
                stamp = pd.to_datetime(value, errors="coerce")
                if not pd.isna(stamp):
                    times[str(ses).removeprefix("ses-")] = stamp
    for scans_tsv in sorted(root.glob(f"ses-*/{pid}_ses-*_scans.tsv")):
        ses = scans_tsv.parent.name.removeprefix("ses-")
        if ses in times:
            continue
        table = read_bids_tsv(scans_tsv)
        if not {"filename", "acq_time"} <= set(table.columns):
            continue
        anat = table[table["filename"].str.startswith("anat/")]
        stamps = pd.to_datetime(anat["acq_time"], errors="coerce").dropna()
        if len(stamps):
            times[ses] = stamps.min()
    return times


def order_sessions(sessions: Sequence[str], times: Mapping[str, pd.Timestamp]) -> list[str]:
    """Sessions in time order when every one has an ``acq_time``, else in natural label order.

    Examples:
        >>> order_sessions(["10", "2"], {})
        ['2', '10']
        >>> order_sessions(["a", "b"], {"a": pd.Timestamp("2021-01-01"), "b": pd.Timestamp("2020-01-01")})
        ['b', 'a']
    """
    if sessions and all(s in times for s in sessions):
        return sorted(sessions, key=lambda s: (times[s], _session_key(s)))
    return sorted(sessions, key=_session_key)


def longitudinal_pairs(
    scans: pd.DataFrame,
    times: Mapping[str, Mapping[str, pd.Timestamp]],
    labels: Mapping[str, int | None],
) -> pd.DataFrame:
    """One pair per later session: (first session, later session) of every participant with two or more.

    Args:
        scans: ``participant_id``, ``session`` (one row per usable scan).
        times: per participant, session -> acquisition time (may be empty).
        labels: participant -> 1 (decline), 0 (stable) or None.

    Returns:
        ``participant_id, session_a, session_b, label`` (label as float, NaN when unknown).

    Examples:
        >>> s = pd.DataFrame({"participant_id": ["sub-1", "sub-1", "sub-2"], "session": ["2", "1", "1"]})
        >>> longitudinal_pairs(s, {}, {"sub-1": 1, "sub-2": 0}).values.tolist()
        [['sub-1', '1', '2', 1.0]]
    """
    rows = []
    for pid, group in scans.groupby("participant_id", sort=True):
        sessions = order_sessions(sorted(set(group["session"].astype(str))), times.get(pid, {}))
        label = labels.get(pid)
        for later in sessions[1:]:
            rows.append((pid, sessions[0], later, np.nan if label is None else float(label)))
    return pd.DataFrame(rows, columns=["participant_id", "session_a", "session_b", "label"])


def longitudinal_split_table(pairs: pd.DataFrame, family: Mapping[str, str] | None = None, seed: int = 0,
                             fractions: Sequence[float] = DEFAULT_FRACTIONS) -> pd.DataFrame:
    """Participant-level split of longitudinal pairs (``participant_id, family_id, label, split``), stratified by
    label, family-aware when ``family`` is given; unlabelled participants get split ``unlabelled``.

    Examples:
        >>> p = pd.DataFrame({"participant_id": [f"sub-{i}" for i in range(6)], "label": [1.0, 0.0] * 3})
        >>> longitudinal_split_table(p)["split"].value_counts().sort_index().to_dict()
        {'test': 2, 'train': 2, 'validation': 2}
    """
    per = pairs.drop_duplicates("participant_id")[["participant_id", "label"]].copy()
    per["family_id"] = [(family or {}).get(p, p) for p in per["participant_id"]]
    labelled = per[per["label"].notna()].copy()
    labelled["stratum"] = labelled["label"].map(lambda v: "decline" if v == 1 else "stable")
    # a family takes the label of its first member (families with mixed labels are rare)
    labelled["stratum"] = labelled.groupby("family_id")["stratum"].transform("first")
    out = family_aware_split(labelled, fractions, seed) if len(labelled) else labelled.assign(split=[])
    rest = per[per["label"].isna()].assign(split="unlabelled")
    table = pd.concat([out, rest], ignore_index=True)
    return table[["participant_id", "family_id", "label", "split"]].sort_values("participant_id").reset_index(
        drop=True)


def family_folds(family: Mapping[str, str], n_folds: int, seed: int = 0) -> dict[str, int]:
    """Assign every participant to one of ``n_folds`` folds so that a family never spans two folds.

    Families are shuffled (seeded) and dealt largest first to the fold with the fewest participants, so the
    folds are about the same size.

    Args:
        family: participant_id -> family id (singletons have their own).
        n_folds: number of folds (at most the number of families).
        seed: random seed.

    Returns:
        participant_id -> fold (0-based).

    Examples:
        >>> folds = family_folds({"a": "1", "b": "1", "c": "2", "d": "3"}, 2)
        >>> folds["a"] == folds["b"], sorted(set(folds.values()))
        (True, [0, 1])
    """
    members: dict[str, list[str]] = {}
    for pid, fam in sorted(family.items()):
        members.setdefault(str(fam), []).append(pid)
    if not 1 <= n_folds <= len(members):
        raise ValueError(f"need 1 <= n_folds <= {len(members)} families, got {n_folds}")
    rng = np.random.default_rng(seed)
    names = sorted(members)
    order = [names[i] for i in rng.permutation(len(names))]
    order.sort(key=lambda f: -len(members[f]))  # stable: the shuffle breaks ties
    sizes = [0] * n_folds
    out: dict[str, int] = {}
    for fam in order:
        fold = int(np.argmin(sizes))
        sizes[fold] += len(members[fam])
        for pid in members[fam]:
            out[pid] = fold
    return out


# ---------------------------------------------------------------------------------------------------------------
# Families of any task (the symmetry task's split; added by the symmetry/atlas work)
# ---------------------------------------------------------------------------------------------------------------


def read_families(bids_dir: Path, family_column: str = "family_id") -> dict[str, str]:
    """``participant_id -> family id`` from ``participants.tsv`` (HCP's ``Family_ID`` is found for the default
    column, as for twins); empty when the file or the column is missing, so that every subject is its own family.
    A participants.tsv that cannot be read as a BIDS table gives the same, with a WARNING naming it.

    Examples:
        >>> read_families(Path("/nonexistent"))
        {}
    """
    if not (Path(bids_dir) / "participants.tsv").is_file():
        return {}
    try:
        table = read_participants(bids_dir)
    except BadDataError as err:
        LOG.warning("family information dropped, every subject is its own family in the split: %s", err)
        return {}
    column = find_column(table, family_column, FAMILY_FALLBACKS if family_column == "family_id" else ())
    if column is None:
        return {}
    return {pid: str(fam).strip() for pid, fam in zip(table["participant_id"], table[column]) if not _is_missing(fam)}


def subject_split(subjects: Sequence[str], family: Mapping[str, str], seed: int = 0,
                  fractions: Sequence[float] = DEFAULT_FRACTIONS) -> dict[str, str]:
    """``participant_id -> train | validation | test`` with whole families per split (:func:`family_aware_split`,
    one stratum); subjects without a family are their own.

    Examples:
        >>> split = subject_split([f"sub-{i:02d}" for i in range(10)], {"sub-00": "f", "sub-01": "f"}, 0, (0.7, 0.15, 0.15))
        >>> split["sub-00"] == split["sub-01"], sorted(set(split.values()))
        (True, ['test', 'train', 'validation'])
    """
    pids = sorted({participant_id(s) for s in subjects})
    table = pd.DataFrame({"participant_id": pids, "family_id": [family.get(p) or f"singleton-{p}" for p in pids],
                          "stratum": "all"})
    out = family_aware_split(table, fractions, seed)
    return dict(zip(out["participant_id"], out["split"]))
