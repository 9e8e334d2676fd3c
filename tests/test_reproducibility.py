"""Same inputs, same ``--seed``, same device: the same bytes (issue 28).

Every group task runs twice on the CPU from fresh copies of the same participant-level outputs, the second time
with another ``--nprocs`` and with torch's global generator scrambled first (each torch process starts from its
own random seed, so a model built before seeding differs per run). Tables, figures, relevance maps and
checkpoints are then compared byte for byte. Only what is run-specific by design is left out
(:data:`RUN_SPECIFIC`): wall-clock columns and rows, the model card's ``created`` time and timing
hyper-parameters, and the group report's generation time. ``--omp-nthreads`` is part of a CPU result (torch sums
gradients per thread); ``--deterministic`` makes it not matter (one training thread). Last, the README's quick
start: the tiny demo's orientation task three times from the same participant outputs.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch

from bids_siamese.cli.main import main
from bids_siamese.cli.parser import parse_args
from bids_siamese.config import Settings
from bids_siamese.explain.run import run_explain
from bids_siamese.symmetry.run import run_symmetry
from bids_siamese.train.longitudinal import run_longitudinal
from bids_siamese.train.reproducibility import configure_determinism, reproducibility_record
from bids_siamese.train.twins import run_twin

from test_orientation_model import _dataset as orientation_dataset
from test_orientation_model import _group_args as orientation_args
from test_participant import RES as DEMO_RES  # the tiny demo at test_participant's coarse grid
from test_participant import demo, participant_run  # noqa: F401 - fixtures (the tiny demo's participant run)
from test_symmetry import _fake_outputs, _settings as symmetry_settings
from test_symmetry import template8  # noqa: F401 - a fixture
from test_train import make_group_inputs, settings_for

pytestmark = pytest.mark.slow

#: Left out of the comparison, as run-specific by design: TSV columns and metric rows of wall-clock time, JSON
#: keys (model card, evaluation summary, group_outputs.json) of time or of the run, at any depth, and the run ids
#: and times the group report shows.
RUN_SPECIFIC = {
    "columns": {"seconds", "volumes_per_second"},
    "metrics": {"training_seconds", "inference_seconds_per_volume", "seconds"},
    "keys": {"created", "seconds", "training_seconds", "volumes_per_second", "inference_seconds_per_volume",
             "run_id", "started", "finished"},
    "html": re.compile(rb"\d{8}-\d{6}_[0-9a-f]{8}|\d{4}-\d{2}-\d{2}[T ]\d{2}:\d{2}(:\d{2})?(\+00:00| UTC)?"),
}
#: Runs differ in these settings only: the result must not depend on them.
RUNS = ({"nprocs": 1, "omp_nthreads": 2}, {"nprocs": 2, "omp_nthreads": 2})


def _tsv(text: str) -> str:
    """A TSV without the wall-clock columns and metric rows of :data:`RUN_SPECIFIC`."""
    rows = [line.split("\t") for line in text.splitlines()]
    keep = [i for i, name in enumerate(rows[0]) if name not in RUN_SPECIFIC["columns"]] if rows else []
    rows = [r for r in rows if not r or r[0] not in RUN_SPECIFIC["metrics"]]
    return "\n".join("\t".join(r[i] for i in keep if i < len(r)) for r in rows)


def _json(value):
    """A JSON value without the keys of :data:`RUN_SPECIFIC`, at any depth."""
    if isinstance(value, dict):
        return {k: _json(v) for k, v in value.items() if k not in RUN_SPECIFIC["keys"]}
    if isinstance(value, list):
        return [_json(v) for v in value]
    return value


def comparable(path: Path) -> bytes:
    """The bytes of an output, less :data:`RUN_SPECIFIC`."""
    if path.suffix == ".json":
        return json.dumps(_json(json.loads(path.read_text())), sort_keys=True).encode()
    if path.suffix == ".tsv":
        return _tsv(path.read_text()).encode()
    if path.suffix == ".html":
        return RUN_SPECIFIC["html"].sub(b"", path.read_bytes())
    return path.read_bytes()


def outputs(root: Path, inputs: set[str]) -> dict[str, bytes]:
    """Every file a run wrote (not the inputs, not ``logs/``), as :func:`comparable` bytes."""
    return {rel: comparable(p) for p in sorted(root.rglob("*")) if p.is_file()
            and (rel := p.relative_to(root).as_posix()) not in inputs and not rel.startswith("logs/")}


def twice(source: Path, tmp_path: Path, run: Callable[[Path, dict], None], runs=RUNS) -> tuple[dict, dict]:
    """Run ``run(out, runtime)`` on two fresh copies of ``source`` with the settings of ``runs``, torch's
    global generator scrambled before each, and return what each wrote."""
    inputs = {p.relative_to(source).as_posix() for p in source.rglob("*") if p.is_file()}
    results = []
    for k, runtime in enumerate(runs):
        out = tmp_path / f"run{k}"
        shutil.copytree(source, out)
        torch.seed()  # a fresh process: torch's generator starts from a random seed
        np.random.seed(None)
        run(out, runtime)
        results.append(outputs(out, inputs))
    return results[0], results[1]


def assert_same(first: dict[str, bytes], second: dict[str, bytes], must_have: set[str]) -> None:
    assert set(first) == set(second)
    assert must_have <= set(first), sorted(first)
    differ = sorted(name for name in first if first[name] != second[name])
    assert not differ, differ


@pytest.fixture(scope="module")
def group_inputs(tmp_path_factory):
    """25 subjects (6 MZ, 3 DZ families, 12 with two sessions) on the 8 mm grid (tests/test_train.py)."""
    return make_group_inputs(tmp_path_factory.mktemp("repro_group"))


def test_twin_task_and_its_explanations_are_byte_identical(group_inputs, tmp_path):
    bids, source, subjects = group_inputs

    def run(out: Path, runtime: dict) -> None:
        settings = settings_for(bids, out, "twin", epochs=2, patience=2, n_draws=2, atlas="harvard_oxford",
                                relevance_fwhm=8.0, **runtime)
        run_twin(settings, subjects)
        run_explain(settings, subjects)

    first, second = twice(source, tmp_path, run)
    assert_same(first, second, {"models/twins_small/model.pt", "models/twins_small/model_card.json",
                                "group_twins_pairs.tsv", "group_regions_ranking.tsv", "group.html"})
    assert any(name.endswith("desc-lrp_relevance.nii.gz") for name in first)
    record = json.loads(first["models/twins_small/model_card.json"])["reproducibility"]
    assert record["device"] == "cpu" and record["cpu_threads"] == 2 and record["bit_identical_reruns"] is True
    assert record["deterministic_algorithms"] is False and record["cudnn_deterministic"] is None


def test_longitudinal_task_is_byte_identical(group_inputs, tmp_path):
    bids, source, subjects = group_inputs

    def run(out: Path, runtime: dict) -> None:
        run_longitudinal(settings_for(bids, out, "longitudinal", epochs=2, patience=2, n_draws=2, **runtime),
                         subjects)

    first, second = twice(source, tmp_path, run)
    assert_same(first, second, {"models/longitudinal_small/model.pt", "group_longitudinal_predictions.tsv"})


def test_deterministic_trains_as_one_thread_whatever_omp_nthreads(group_inputs, tmp_path):
    """``--deterministic --omp-nthreads 2`` on the CPU writes what ``--omp-nthreads 1`` writes (the model card's
    ``reproducibility`` record aside, which says which was asked)."""
    bids, source, subjects = group_inputs

    def run(out: Path, runtime: dict) -> None:
        run_longitudinal(settings_for(bids, out, "longitudinal", epochs=2, patience=2, n_draws=1, **runtime),
                         subjects)

    plain, deterministic = twice(source, tmp_path, run, ({"omp_nthreads": 1},
                                                         {"omp_nthreads": 2, "deterministic": True}))
    card = "models/longitudinal_small/model_card.json"
    records = [json.loads(result.pop(card))["reproducibility"] for result in (plain, deterministic)]
    assert_same(plain, deterministic, {"models/longitudinal_small/model.pt", "group_longitudinal_predictions.tsv"})
    assert [r["cpu_threads"] for r in records] == [1, 1]
    assert [r["deterministic_algorithms"] for r in records] == [False, True]


def test_symmetry_task_is_byte_identical(template8, tmp_path):  # noqa: F811 - the fixture
    source = tmp_path / "source"
    _fake_outputs(source, template8, 12, {0: "L"})
    subjects = [f"{i:02d}" for i in range(12)]

    def run(out: Path, runtime: dict) -> None:
        run_symmetry(symmetry_settings(out, task="symmetry", mode="train", epochs=1, batch_size=4,
                                       embedding_dim=16, **runtime), subjects)

    first, second = twice(source, tmp_path, run)
    assert_same(first, second, {"models/symmetry_small/model.pt", "group_symmetry.tsv",
                                "group_symmetry_evaluation.tsv", "figures/group_symmetry_detection.svg"})


def test_orientation_task_is_byte_identical(tmp_path):
    """Through the command line, as in issue 28 (its first ensemble member started from unseeded weights)."""
    root = tmp_path / "data"
    bids, source = orientation_dataset(root, n_subjects=6)

    def run(out: Path, runtime: dict) -> None:
        args = orientation_args(root, bids, out)
        args[args.index("--nprocs") + 1] = str(runtime["nprocs"])
        args[args.index("--omp-nthreads") + 1] = str(runtime["omp_nthreads"])
        assert main([*args, "--epochs", "2", "--patience", "2", "--batch-size", "4"]) == 0

    first, second = twice(source, tmp_path, run)
    assert_same(first, second, {"models/orientation_latnet/model.pt", "group_orientation_model.tsv",
                                "group_orientation_model_history.tsv"})


def test_deterministic_flag_sets_torch_and_the_card_says_so(tmp_path, monkeypatch):
    """``--deterministic`` reaches the settings and turns on torch's deterministic algorithms (warning where an
    operation has none), deterministic cuDNN and the cuBLAS workspace; the card's record follows."""
    (tmp_path / "bids").mkdir()
    (tmp_path / "bids" / "dataset_description.json").write_text('{"Name": "x", "BIDSVersion": "1.10.0"}')
    base = [str(tmp_path / "bids"), str(tmp_path / "out"), "group", "--skip-bids-validation", "--device", "cpu"]
    assert parse_args(base).deterministic is False
    assert parse_args([*base, "--deterministic"]).deterministic is True
    assert Settings(bids_dir=tmp_path, output_dir=tmp_path, analysis_level="group", work_dir=tmp_path).deterministic \
        is False
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    before = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
              torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    try:
        configure_determinism(False)
        assert not torch.are_deterministic_algorithms_enabled()
        assert reproducibility_record("cpu")["bit_identical_reruns"] is True
        assert reproducibility_record("cuda")["bit_identical_reruns"] is False
        assert not reproducibility_record("cuda")["deterministic_algorithms"]
        configure_determinism(True)
        assert torch.are_deterministic_algorithms_enabled() and torch.is_deterministic_algorithms_warn_only_enabled()
        assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
        record = reproducibility_record("cuda")
        assert record["deterministic_algorithms"] and record["cudnn_deterministic"]
        assert "docs/reliability.md" in record["tolerance"]
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = before[2], before[3]


# ---------------------------------------------------------------------------------------------------------------
# The README's quick start: the tiny demo's orientation task, several times from the same participant outputs
# ---------------------------------------------------------------------------------------------------------------


def test_tiny_demo_orientation_task_gives_the_same_verdicts_every_run(demo, participant_run, tmp_path):  # noqa: F811
    """Issue 28: on the same participant outputs, the quick start's ``group --task orientation`` flagged other
    scans from run to run. Three runs (default epochs and seed) now write the same table and checkpoint."""
    code, source, _ = participant_run
    assert code == 0
    tables, weights = [], []
    for k in range(3):
        out = tmp_path / f"run{k}"
        shutil.copytree(source, out)
        torch.seed()
        assert main([str(demo), str(out), "group", "--task", "orientation", "--resolution", DEMO_RES,
                     "--skip-bids-validation", "--nprocs", "1", "--omp-nthreads", "1"]) == 0
        tables.append((out / "group_orientation_model.tsv").read_bytes())
        weights.append((out / "models" / "orientation_latnet" / "model.pt").read_bytes())
    assert tables[0] == tables[1] == tables[2]
    assert weights[0] == weights[1] == weights[2]
