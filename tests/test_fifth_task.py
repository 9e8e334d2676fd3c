"""A fifth group task needs its own module, one registry line, its names and one ``TASKS`` entry: nothing else.

The toy task below is defined here and added only by monkeypatching ``TASKS``, the model registry and
``TASK_FILES``; it runs through the group workflow, is recorded in ``group_outputs.json`` and gets its own section
in ``group.html`` without any other code knowing it. ``--task`` accepts it too.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn

from bids_siamese.bids.derivatives import TASK_FILES, group_file, group_tasks, read_group_record, write_tsv
from bids_siamese.cli.parser import parse_args
from bids_siamese.models.registry import FACTORIES, model_factory
from bids_siamese.reports.group import EARLIER_VIEWS, ReportView
from bids_siamese.train.data import find_preproc, load_volume
from bids_siamese.train.task import GroupTask
from bids_siamese.workflows import group
from test_train import make_group_inputs, settings_for

TOY_FILES = {"table": group_file("toy"), "notes": group_file("toy", "notes")}


class ToyTask(GroupTask):
    """Scores each scan's mean intensity against a threshold learned on the training participants."""

    name = "toy"
    steps = "collect -> samples (mean intensity) -> split (alternate) -> fit (threshold) -> evaluate -> write"
    title = "Toy task"
    shown = ("table",)

    def collect(self, subjects):
        self.scans = find_preproc(self.settings.output_dir, subjects)

    def samples(self):
        self.means = np.array([load_volume(Path(p), self.grid).mean() for p in self.scans["path"]])

    def split(self):
        self.fold = np.where(np.arange(len(self.means)) % 2 == 0, "train", "test")

    def fit(self):
        model = model_factory(self.name, self.settings.backbone)({}, {})  # the factory registered for the task
        with torch.no_grad():
            model.bias.fill_(-float(np.median(self.means[self.fold == "train"])))
            self.score = model(torch.tensor(self.means, dtype=torch.float32)[:, None])[:, 0].numpy()

    def evaluate(self):
        self.above = float((self.score[self.fold == "test"] > 0).mean())

    def write(self):
        table = pd.DataFrame({"participant_id": self.scans["participant_id"], "fold": self.fold,
                              "mean_intensity": self.means.round(4), "score": self.score.round(4)})
        out = self.settings.output_dir
        return [write_tsv(out / TOY_FILES["table"], table),
                write_tsv(out / TOY_FILES["notes"], pd.DataFrame({"test_above": [self.above]}))]


def toy_model(card, state) -> nn.Module:
    model = nn.Linear(1, 1)
    with torch.no_grad():
        model.weight.fill_(1.0)
    return model


def test_task_choices_are_the_tasks_with_output_names():
    """``--task`` takes its choices from the tasks' output names: they must be the workflow's tasks."""
    assert set(group_tasks()) == set(group.TASKS)


def test_earlier_records_show_the_built_in_tasks_as_they_declare():
    """Records without a ``report`` (older runs) fall back to views that must match what the tasks declare."""
    assert {name: ReportView(**{**task.report_view(), "shown": tuple(task.report_view()["shown"])})
            for name, task in group.TASKS.items()} == EARLIER_VIEWS


def test_a_fifth_task_runs_is_recorded_and_reported(tmp_path, monkeypatch):
    monkeypatch.setitem(group.TASKS, ToyTask.name, ToyTask)
    monkeypatch.setitem(FACTORIES, (ToyTask.name, None), toy_model)
    monkeypatch.setitem(TASK_FILES, ToyTask.name, TOY_FILES)
    bids, out, subjects = make_group_inputs(tmp_path, n_mz=2, n_dz=1, n_single=2, n_long=0)

    assert parse_args([str(bids), str(out), "group", "--task", "toy"]).task == "toy"
    written = group.run_group(settings_for(bids, out, "toy"), subjects)

    table = pd.read_csv(out / TOY_FILES["table"], sep="\t")
    assert len(table) == len(find_preproc(out, subjects)) > 0 and set(table["fold"]) == {"train", "test"}
    assert out / TOY_FILES["table"] in written and written[-1] == out / "group.html"
    entry = read_group_record(out)["steps"]["toy"]
    assert entry["files"] == TOY_FILES
    assert entry["report"] == {"title": "Toy task", "shown": ["table"], "section": "files"}
    html = (out / "group.html").read_text()
    assert '<section class="card" id="task-toy">' in html and "<h2>Toy task</h2>" in html
    assert f"<td>{table['score'].iloc[0]:.4g}</td>" in html  # the table's rows are shown
    assert "test_above" not in html  # a file the task does not show is only listed
    assert f'href="{TOY_FILES["notes"]}"' in html
