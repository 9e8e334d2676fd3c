"""What a group task is: a :class:`GroupTask` subclass, one per ``--task``, listed in
:data:`bids_siamese.workflows.group.TASKS` and run by :func:`run_task`.

Every task has the same steps, called in this order on one object (its attributes carry what a step made):

1. ``collect(subjects)``: the usable participant-level model-grid scans
   (:func:`~bids_siamese.train.data.find_preproc`), what the task knows about them (relations, labels, QC
   verdicts) and, with ``--mode apply``, the checkpoint (:func:`~bids_siamese.models.checkpoint.load_checkpoint`,
   which finds the model's factory in :mod:`bids_siamese.models.registry`);
2. ``samples()``: the task's examples: twin subjects, session pairs, stored and mirrored copies, or asymmetry maps;
3. ``split()``: family-aware (:mod:`bids_siamese.train.pairs`), or the split in which ``--mode apply``'s
   checkpoint saw each participant;
4. ``fit()``: a fresh model on the shared trainer (:class:`~bids_siamese.train.trainer.Trainer`, configured by
   :func:`~bids_siamese.train.trainer.train_config`), or the checkpoint's predictions;
5. ``evaluate()``: held-out metrics;
6. ``write()``: tables, figures and the checkpoint (names from :mod:`bids_siamese.bids.derivatives`); only in the
   first process under torchrun.

A new task is one module with its :class:`GroupTask` subclass (its report section declared by ``title``, ``shown``
and ``section``), one :func:`~bids_siamese.models.registry.register_model` line for its model (unless the models
package builds it), one entry in ``TASKS`` and its output names in ``TASK_FILES``
(:mod:`bids_siamese.bids.derivatives`; ``--task`` takes its choices from there).
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import ClassVar

import torch

from ..config import Settings
from ..resources import Grid, model_grid
from .ddp import DistContext, barrier, cleanup, init_distributed
from .reproducibility import prepare

LOG = logging.getLogger("bids_siamese.group")


class GroupTask:
    """One group task (``--task NAME``); subclasses implement the six steps (module docstring).

    Class attributes:
        name: the ``--task`` value, also the step name in ``group_outputs.json`` (keys of
            :data:`~bids_siamese.bids.derivatives.TASK_FILES`).
        distributed: every torchrun process runs it (its training is distributed; only process 0 writes);
            False: only the first process runs it.
        steps: the task's steps in words (logged at the start).
        title: its section title in ``group.html`` (default: ``name``).
        shown: which of its files (roles of ``TASK_FILES[name]``) the report shows; empty: every file it wrote.
        section: the report layout (:data:`bids_siamese.reports.group.SECTION_BUILDERS`): ``files`` (a heading,
            each table and figure) or a built-in task's layout. The workflow records ``report_view()`` with the
            task's outputs, and the report is built from that record.

    Attributes:
        settings: the run's settings.
        ctx: the distributed context (one process: the default).
        device: where the task trains and predicts.
        grid: the model grid of ``--resolution``.
        train_mode: ``--mode train`` (else apply).
        t_start: when the task started (``time.perf_counter``), for the log.
    """

    name: ClassVar[str]
    distributed: ClassVar[bool] = False
    steps: ClassVar[str] = ""
    title: ClassVar[str] = ""
    shown: ClassVar[tuple[str, ...]] = ()
    section: ClassVar[str] = "files"

    @classmethod
    def report_view(cls) -> dict[str, object]:
        """How the group report shows this task (recorded in ``group_outputs.json`` with its outputs)."""
        return {"title": cls.title or cls.name, "shown": list(cls.shown), "section": cls.section}

    def __init__(self, settings: Settings, ctx: DistContext, device: torch.device):
        self.settings, self.ctx, self.device = settings, ctx, device
        self.grid: Grid = model_grid(settings.resolution)
        self.train_mode = settings.mode == "train"
        self.t_start = time.perf_counter()

    def collect(self, subjects: list[str]) -> None:
        """The task's inputs for the selected subjects (and ``--mode apply``'s checkpoint)."""
        raise NotImplementedError

    def samples(self) -> None:
        """The task's examples (pairs or samples) from the collected inputs."""
        raise NotImplementedError

    def split(self) -> None:
        """Which participant is used for what (training, validation, test), family-aware."""
        raise NotImplementedError

    def fit(self) -> None:
        """Train the task's model(s), or predict with the checkpoint of ``--mode apply``."""
        raise NotImplementedError

    def evaluate(self) -> None:
        """The held-out metrics."""
        raise NotImplementedError

    def write(self) -> list[Path]:
        """Write the task's outputs; returns the paths written."""
        raise NotImplementedError


def start_task(settings: Settings, distributed: bool) -> tuple[DistContext, torch.device]:
    """The process group of a distributed task under torchrun (one process otherwise), then the threads,
    ``--deterministic`` and the seeds (:func:`~bids_siamese.train.reproducibility.prepare`)."""
    ctx, device = init_distributed(settings.device) if distributed else (DistContext(), torch.device(settings.device))
    prepare(settings)
    if ctx.is_distributed:
        LOG.info("distributed training: rank %d of %d (%s)", ctx.rank, ctx.world_size, ctx.backend)
    return ctx, device


def run_task(task: type[GroupTask], settings: Settings, subjects: list[str]) -> list[Path]:
    """Run a task's steps in order; returns the paths written (empty in processes other than the first)."""
    t_start = time.perf_counter()
    ctx, device = start_task(settings, task.distributed)
    try:
        job = task(settings, ctx, device)
        job.collect(subjects)
        job.samples()
        job.split()
        job.fit()
        job.evaluate()
        written = job.write() if ctx.is_main else []
        LOG.info("--task %s done in %.0f s", task.name, time.perf_counter() - t_start)
        barrier(ctx)
        return written
    finally:
        cleanup(ctx)
