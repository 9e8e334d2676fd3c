"""What a group task is: :class:`GroupTask`, one per ``--task``, listed in
:data:`bids_siamese.workflows.group.TASKS`.

Every task runs the same steps, in its own module, over the shared parts of :mod:`bids_siamese.train`:

1. collect: the usable participant-level model-grid scans (:func:`~bids_siamese.train.data.find_preproc`);
2. pairs or samples: twin pairs, session pairs, stored + mirrored copies, or asymmetry maps + planted lesions;
3. split: family-aware (:mod:`bids_siamese.train.pairs`);
4. fit: a fresh model on the shared trainer (:class:`~bids_siamese.train.trainer.Trainer`, configured by
   :func:`~bids_siamese.train.trainer.train_config`), or ``--mode apply``'s checkpoint
   (:func:`~bids_siamese.models.checkpoint.load_checkpoint`, which finds the model's factory in
   :mod:`bids_siamese.models.registry`);
5. evaluate: held-out metrics;
6. write: tables, figures, checkpoint (names from :mod:`bids_siamese.bids.derivatives`).

A new task is a module with a ``run(settings, subjects)`` and its ``TASK``, one :func:`~bids_siamese.models.registry.register_model` line for its
model (:mod:`bids_siamese.models.registry`) and one entry in ``TASKS``.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..config import Settings


@dataclass(frozen=True)
class GroupTask:
    """One group task (``--task NAME``).

    Attributes:
        name: the ``--task`` value, also the step name in ``group_outputs.json`` (keys of
            :data:`~bids_siamese.bids.derivatives.TASK_FILES`).
        run: ``run(settings, subjects) -> paths written``: collect -> pairs/samples -> split -> fit -> evaluate ->
            write.
        distributed: every torchrun process runs it (the training is distributed; only process 0 writes);
            False: only process 0 runs it.
        steps: the task's steps in words (the log and docs/architecture.md).
    """

    name: str
    run: Callable[[Settings, list[str]], list[Path]]
    distributed: bool
    steps: str
