"""Twin and longitudinal pairs, families and family-aware splits."""
from __future__ import annotations

import pandas as pd
import pytest

from bids_siamese.errors import BadDataError, UsageError
from bids_siamese.train.pairs import (
    Relations,
    family_aware_split,
    longitudinal_pairs,
    longitudinal_split_table,
    normalise_label,
    normalise_zygosity,
    order_sessions,
    read_session_times,
    relations_from_pairs_table,
    relations_from_participants,
    twin_split_table,
    unrelated_pairs,
)


def hcp_table() -> pd.DataFrame:
    """HCP-style columns: an MZ pair with a sibling, a DZ pair (genotype blank, self report NotMZ), singletons."""
    return pd.DataFrame({
        "participant_id": ["sub-100", "sub-101", "sub-102", "sub-200", "sub-201", "sub-300", "sub-400"],
        "Family_ID": ["51488", "51488", "51488", "51777", "51777", "52000", ""],
        "ZygosityGT": ["MZ", "MZ", " ", "", "", "", ""],
        "ZygositySR": ["MZ", "MZ", "NotTwin", "NotMZ", "NotMZ", "NotTwin", "NotTwin"],
    })


def test_hcp_columns_are_found_and_genotype_blanks_filled_from_self_report():
    subjects = ["100", "101", "102", "200", "201", "300", "400"]
    rel = relations_from_participants(hcp_table(), subjects)  # defaults find Family_ID and ZygosityGT
    pairs = {(a, b): r for a, b, r in rel.pairs.itertuples(index=False)}
    assert pairs == {
        ("sub-100", "sub-101"): "MZ",
        ("sub-100", "sub-102"): "sibling",
        ("sub-101", "sub-102"): "sibling",
        ("sub-200", "sub-201"): "DZ",
    }
    assert rel.relation("sub-102", "sub-100") == "sibling"
    assert rel.relation("sub-300", "sub-400") == "unrelated"
    assert rel.family["sub-400"] != rel.family["sub-300"]  # missing family id: a singleton
    assert rel.family_type() == {"51488": "MZ", "51777": "DZ", "52000": "singleton", "singleton-sub-400": "singleton"}


def test_explicit_hcp_column_names():
    rel = relations_from_participants(hcp_table(), ["100", "101", "200", "201"], family_column="Family_ID",
                                      zygosity_column="ZygositySR")
    assert rel.pairs["relation"].tolist() == ["MZ", "DZ"]


def test_missing_column_names_file_and_fix():
    table = pd.DataFrame({"participant_id": ["sub-1"], "age": ["30"]})
    with pytest.raises(UsageError, match=r"/data/participants.tsv has no column 'family_id'.*fix: pass --family-column"):
        relations_from_participants(table, ["1"], source="/data/participants.tsv")


def test_unknown_zygosity_and_label_values():
    assert normalise_zygosity("Monozygotic") == "MZ"
    with pytest.raises(BadDataError, match="unknown zygosity"):
        normalise_zygosity("triplet")
    assert [normalise_label(v) for v in ("DECLINE", "stable", "", None)] == [1, 0, None, None]
    with pytest.raises(BadDataError, match="decline or stable"):
        normalise_label("AD")


def test_pairs_file_defines_families_and_relations():
    table = pd.DataFrame({
        "subject_a": ["sub-01", "03", "05", "01", "07"],
        "subject_b": ["02", "sub-04", "06", "sub-09", "08"],
        "relation": ["MZ", "DZ", "sibling", "unrelated", "MZ"],  # 07-08: not selected
    })
    rel = relations_from_pairs_table(table, [f"{i:02d}" for i in range(1, 7)] + ["09"])
    assert rel.pairs.values.tolist() == [["sub-01", "sub-02", "MZ"], ["sub-03", "sub-04", "DZ"],
                                         ["sub-05", "sub-06", "sibling"]]
    assert rel.relation("sub-01", "sub-09") == "unrelated"
    assert rel.family["sub-05"] == rel.family["sub-06"]
    with pytest.raises(UsageError, match="relation 'cousin'"):
        relations_from_pairs_table(pd.DataFrame({"subject_a": ["1"], "subject_b": ["2"], "relation": ["cousin"]}),
                                   ["1", "2"])
    with pytest.raises(UsageError, match="subject_a, subject_b, relation"):
        relations_from_pairs_table(pd.DataFrame({"a": ["1"]}), ["1"])


def test_unrelated_pairs_exclude_every_relative():
    rel = relations_from_participants(hcp_table(), ["100", "101", "102", "300"])
    assert unrelated_pairs(list(rel.family), rel.family) == [("sub-100", "sub-300"), ("sub-101", "sub-300"),
                                                             ("sub-102", "sub-300")]


def _families(n_mz=10, n_dz=6, n_single=8) -> Relations:
    fam, rows, k = {}, [], 0
    for kind, n in (("MZ", n_mz), ("DZ", n_dz)):
        for f in range(n):
            a, b = f"sub-{k:03d}", f"sub-{k + 1:03d}"
            fam[a] = fam[b] = f"{kind}{f}"
            rows.append((a, b, kind))
            k += 2
    for f in range(n_single):
        fam[f"sub-{k:03d}"] = f"S{f}"
        k += 1
    return Relations(fam, pd.DataFrame(rows, columns=["subject_a", "subject_b", "relation"]))


def test_twin_split_is_family_aware_stratified_and_seeded():
    rel = _families()
    split = twin_split_table(rel, seed=7)
    assert split.groupby("family_id")["split"].nunique().max() == 1  # no family in two splits
    counts = split.drop_duplicates("family_id").groupby(["family_type", "split"]).size().unstack(fill_value=0)
    assert counts.loc["MZ"].to_dict() == {"test": 2, "train": 6, "validation": 2}
    assert counts.loc["DZ"].to_dict() == {"test": 1, "train": 4, "validation": 1}
    assert counts.loc["singleton"].to_dict() == {"test": 2, "train": 4, "validation": 2}
    assert split.equals(twin_split_table(rel, seed=7))
    assert not split["split"].equals(twin_split_table(rel, seed=8)["split"])


def test_small_strata_keep_a_training_family():
    table = pd.DataFrame({"participant_id": ["sub-1", "sub-2"], "family_id": ["a", "b"], "stratum": ["x", "x"]})
    split = family_aware_split(table, seed=0)
    assert sorted(split["split"]) == ["test", "train"]


def test_sessions_are_ordered_by_acq_time_then_label(tmp_path):
    bids = tmp_path / "bids"
    sub = bids / "sub-01"
    (sub / "ses-a" / "anat").mkdir(parents=True)
    (sub / "ses-b" / "anat").mkdir(parents=True)
    # sessions.tsv puts "b" first in time
    (sub / "sub-01_sessions.tsv").write_text("session_id\tacq_time\nses-a\t2021-05-01T10:00:00\nses-b\t2019-01-01T09:00:00\n")
    times = read_session_times(bids, "01")
    assert order_sessions(["a", "b"], times) == ["b", "a"]
    # scans.tsv fallback for another subject
    sub2 = bids / "sub-02"
    for ses, when in (("1", "2020-06-01T08:00:00"), ("2", "2018-06-01T08:00:00")):
        (sub2 / f"ses-{ses}" / "anat").mkdir(parents=True)
        (sub2 / f"ses-{ses}" / f"sub-02_ses-{ses}_scans.tsv").write_text(
            f"filename\tacq_time\nanat/sub-02_ses-{ses}_T1w.nii.gz\t{when}\n")
    times2 = read_session_times(bids, "sub-02")
    assert order_sessions(["1", "2"], times2) == ["2", "1"]
    # no times: natural label order
    assert order_sessions(["10", "9", "2"], {}) == ["2", "9", "10"]
    scans = pd.DataFrame({"participant_id": ["sub-01", "sub-01", "sub-02", "sub-02", "sub-03"],
                          "session": ["a", "b", "1", "2", "1"]})
    pairs = longitudinal_pairs(scans, {"sub-01": times, "sub-02": times2}, {"sub-01": 1, "sub-02": None})
    assert pairs.values.tolist()[0] == ["sub-01", "b", "a", 1.0]
    assert pairs.values.tolist()[1][:3] == ["sub-02", "2", "1"] and pd.isna(pairs.values.tolist()[1][3])
    assert len(pairs) == 2  # sub-03 has one session


def test_longitudinal_split_is_label_stratified_and_family_aware():
    pids = [f"sub-{i:02d}" for i in range(16)]
    pairs = pd.DataFrame({"participant_id": pids + ["sub-99"], "session_a": "1", "session_b": "2",
                          "label": [1.0, 0.0] * 8 + [float("nan")]})
    family = {p: f"f{i // 2}" for i, p in enumerate(pids)}  # siblings share a family
    split = longitudinal_split_table(pairs, family, seed=1)
    assert split.groupby("family_id")["split"].nunique().max() == 1
    assert split.set_index("participant_id").loc["sub-99", "split"] == "unlabelled"
    labelled = split[split["split"] != "unlabelled"]
    assert set(labelled["split"]) == {"train", "validation", "test"}


def test_read_families_finds_hcp_family_id_for_every_task(tmp_path):
    from bids_siamese.train.pairs import read_families, subject_split

    pd.DataFrame({"participant_id": [f"{i:02d}" for i in range(12)],
                  "Family_ID": [f"f{i // 2}" for i in range(10)] + ["", "n/a"]}).to_csv(
        tmp_path / "participants.tsv", sep="\t", index=False)
    family = read_families(tmp_path)  # the default --family-column family_id: HCP's Family_ID is found
    assert family["sub-00"] == family["sub-01"] == "f0" and "sub-10" not in family and "sub-11" not in family
    assert read_families(tmp_path, "other_column") == {} and read_families(tmp_path / "missing") == {}
    split = subject_split([f"sub-{i:02d}" for i in range(12)], family, seed=3, fractions=(0.7, 0.15, 0.15))
    assert all(split[f"sub-{2 * k:02d}"] == split[f"sub-{2 * k + 1:02d}"] for k in range(5))
    assert sorted(set(split.values())) == ["test", "train", "validation"]
    assert split == subject_split([f"{i:02d}" for i in range(12)], family, seed=3, fractions=(0.7, 0.15, 0.15))
