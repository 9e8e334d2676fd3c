"""The dataset plan: participants, families, longitudinal groups, lesion and flip assignments, dates."""
from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

import numpy as np

from ..errors import UsageError
from .params import SIZES, SignalParams


@dataclass(frozen=True)
class SubjectPlan:
    """One participant: identity, family and design."""

    participant_id: str
    index: int  # generation index (seeds the subject's random streams)
    family_id: str
    family_index: int
    zygosity: str  # MZ | DZ | none
    age: int  # at ses-01
    sex: str  # M | F
    group: str  # decline | stable | n/a
    sessions: tuple[str, ...]


@dataclass(frozen=True)
class ScanPlan:
    """One T1w scan (one session of one participant) and what is planted in it."""

    participant_id: str
    session_id: str
    session_index: int
    acq_time: str
    age: float
    lr_flipped: bool
    lesion_volume_target_mm3: float | None
    lesion_hemisphere: str | None

    @property
    def stem(self) -> str:
        """File name stem of the scan, e.g. ``sub-001_ses-01_T1w``."""
        return f"{self.participant_id}_{self.session_id}_T1w"

    @property
    def path(self) -> str:
        """Path of the image relative to the BIDS root."""
        return f"{self.participant_id}/{self.session_id}/anat/{self.stem}.nii.gz"


def plan_dataset(size: str, seed: int, params: SignalParams | None = None) -> tuple[list[SubjectPlan], list[ScanPlan]]:
    """Subjects and scans of a dataset: families, longitudinal groups, lesion and flip assignments, dates."""
    if size not in SIZES:
        raise UsageError(f"unknown size '{size}'; fix: use one of {', '.join(SIZES)}")
    params = params or SignalParams()
    spec = SIZES[size]
    rng = np.random.default_rng([seed, 0])
    kinds = ["MZ"] * spec.mz_pairs + ["DZ"] * spec.dz_pairs + ["none"] * spec.singletons
    members = [(f, kind) for f, kind in enumerate(kinds) for _ in range(1 if kind == "none" else 2)]
    n = len(members)
    number = rng.permutation(n) + 1  # shuffled subject numbers: co-twins do not get neighbouring labels
    width = max(3, len(str(n)))
    # families are labelled in order of their lowest subject number
    first = {}
    for (f, _), num in zip(members, number):
        first[f] = min(first.get(f, n + 1), int(num))
    fam_order = {f: i + 1 for i, f in enumerate(sorted(first, key=first.get))}
    fam_width = max(2, len(str(len(kinds))))
    fam_age = {f: int(rng.integers(40, 81)) for f in range(len(kinds))}
    fam_sex = {f: str(rng.choice(["M", "F"])) for f in range(len(kinds))}
    longitudinal = set(rng.choice(n, size=min(spec.longitudinal, n), replace=False).tolist())
    long_order = sorted(longitudinal, key=lambda i: int(number[i]))
    decliners = set(rng.permutation(long_order)[: (len(long_order) + 1) // 2].tolist())
    subjects = []
    for i, (f, kind) in enumerate(members):
        sex = fam_sex[f] if kind == "MZ" else str(rng.choice(["M", "F"])) if kind == "DZ" else fam_sex[f]
        group = "n/a" if i not in longitudinal else "decline" if i in decliners else "stable"
        subjects.append(SubjectPlan(
            participant_id=f"sub-{int(number[i]):0{width}d}", index=i, family_id=f"fam{fam_order[f]:0{fam_width}d}",
            family_index=f, zygosity=kind, age=fam_age[f], sex=sex, group=group,
            sessions=("ses-01", "ses-02") if i in longitudinal else ("ses-01",)))
    subjects.sort(key=lambda s: s.participant_id)
    # lesions go into single-session scans, flips into any scan without a lesion
    singles = [s for s in subjects if len(s.sessions) == 1]
    n_les = min(spec.lesions, len(singles))
    lesion_subjects = [singles[i].participant_id for i in sorted(rng.choice(len(singles), n_les, replace=False))]
    lo, hi = params.lesion_volume_mm3
    volumes = np.geomspace(lo, hi, n_les) if n_les > 1 else np.array([np.sqrt(lo * hi) * 2.0][:n_les])
    volumes = rng.permutation(volumes) * rng.uniform(0.95, 1.05, size=n_les)
    hemis = rng.permutation(["L", "R"] * ((n_les + 1) // 2))[:n_les]
    lesion_of = {sid: (float(v), str(h)) for sid, v, h in zip(lesion_subjects, volumes, hemis)}
    keys = [(s.participant_id, ses) for s in subjects for ses in s.sessions]
    free = [k for k in keys if not (k[0] in lesion_of and k[1] == "ses-01")]
    flipped = {free[i] for i in rng.choice(len(free), size=min(spec.flipped, len(free)), replace=False)}
    scans = []
    epoch = datetime(2016, 1, 4, 8, 0, 0)
    for s in subjects:
        start = epoch + timedelta(days=int(rng.integers(0, 4 * 365)), minutes=int(rng.integers(0, 10 * 60)))
        gap_days = int(rng.integers(365, 3 * 365 + 1))
        for k, ses in enumerate(s.sessions):
            when = start if k == 0 else start.replace(hour=8, minute=0) + timedelta(
                days=gap_days, minutes=int(rng.integers(0, 10 * 60)))
            lesion = lesion_of.get(s.participant_id) if k == 0 else None
            scans.append(ScanPlan(
                participant_id=s.participant_id, session_id=ses, session_index=k,
                acq_time=when.strftime("%Y-%m-%dT%H:%M:%S"), age=round(s.age + (when - start).days / 365.25, 1),
                lr_flipped=(s.participant_id, ses) in flipped,
                lesion_volume_target_mm3=lesion[0] if lesion else None,
                lesion_hemisphere=lesion[1] if lesion else None))
    return subjects, scans
