"""The shared trainer's hooks, the one TrainConfig builder, the model registry and the group task shape."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from bids_siamese.config import Settings
from bids_siamese.models.registry import FACTORIES, default_factory, model_factory, register_model
from bids_siamese.train.batches import BatchAssembly
from bids_siamese.train.task import GroupTask, run_task
from bids_siamese.train.trainer import TrainConfig, Trainer, train_config


class _Regression(Trainer):
    """A toy task: fit y = 2x with a linear model; the validation loss is given per epoch."""

    name = "toy"
    extra_columns = ("batch_size",)

    def __init__(self, val_losses: list[float], config: TrainConfig, calls: list[str]):
        super().__init__(nn.Linear(1, 1), config, np.arange(8))
        self.x = torch.linspace(-1, 1, 8)[:, None]
        self.val_losses, self.calls = val_losses, calls

    def batches(self, rng: np.random.Generator) -> list[np.ndarray]:
        return [np.arange(0, 4), np.arange(4, 8)]

    def assemble(self, idx: np.ndarray, generator: torch.Generator, epoch: int) -> tuple[torch.Tensor, ...]:
        return self.x[idx], 2 * self.x[idx]

    def train_step(self, batch: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, dict[str, float]]:
        self.calls.append("train_step")
        x, y = batch
        with self.autocast():
            return nn.functional.mse_loss(self.net(x), y), {"batch_size": float(len(x))}

    def on_epoch_start(self, epoch: int) -> dict[str, float]:
        self.calls.append(f"start {epoch}")
        return {"stage": float(epoch)}

    def on_train_epoch_end(self) -> None:
        self.calls.append("train_end")

    def validation_step(self) -> dict[str, float]:
        self.calls.append("validation")
        return {"val_loss": self.val_losses.pop(0)}

    def on_epoch_end(self, epoch: int, row: dict) -> None:
        self.calls.append(f"end {epoch}")


def test_trainer_runs_the_hooks_in_order_keeps_the_best_epoch_and_stops_early():
    calls: list[str] = []
    config = TrainConfig(epochs=6, patience=2, progress=False, lr=0.1)
    result = _Regression([0.5, 0.2, 0.3, 0.4, 0.1, 0.1], config, calls).fit()
    # epoch 2 is the best; epochs 3 and 4 are worse: patience 2 stops after epoch 4
    assert result.best_epoch == 2 and len(result.history) == 4
    assert calls[:6] == ["start 1", "train_step", "train_step", "train_end", "validation", "end 1"]
    assert list(result.history.columns) == ["epoch", "stage", "train_loss", "val_loss", "batch_size", "seconds",
                                            "volumes_per_second"]
    assert (result.history["batch_size"] == 4).all() and not result.model.training


def test_trainer_assembles_batches_with_its_generator():
    trainer = _Regression([0.0], TrainConfig(epochs=1, progress=False, seed=3), [])
    assembly = trainer.assembly()
    assert isinstance(assembly, BatchAssembly) and assembly.generator is trainer.generator
    assert torch.equal(assembly.assemble(np.array([0, 1]), trainer.generator, 1)[1], 2 * trainer.x[:2])


def test_one_train_config_from_the_settings_with_task_overrides(tmp_path):
    settings = Settings(bids_dir=tmp_path, output_dir=tmp_path, work_dir=tmp_path, analysis_level="group", epochs=7,
                        batch_size=3, lr=0.01, patience=2, seed=5, loader_workers=1, compile=True)
    config = train_config(settings, flip_lr=True, seed=9)
    assert (config.epochs, config.batch_size, config.lr, config.patience) == (7, 3, 0.01, 2)
    assert (config.loader_workers, config.compile, config.flip_lr, config.seed) == (1, True, True, 9)
    assert train_config(settings).seed == 5


def test_registry_takes_the_most_specific_factory():
    assert model_factory("longitudinal", "regional") is FACTORIES[("longitudinal", "regional")]
    assert model_factory("twin", "regional") is FACTORIES[(None, "regional")]
    assert model_factory("orientation", "latnet") is FACTORIES[("orientation", None)]
    assert model_factory("twin", "small") is default_factory
    with pytest.raises(LookupError, match="no model factory registered for task 'fifth'"):
        model_factory("fifth", "small")
    factory = register_model(lambda card, state: nn.Identity(), task="fifth")
    try:
        assert model_factory("fifth", "small") is factory
    finally:
        del FACTORIES[("fifth", None)]


def test_the_group_workflow_registers_every_task_model():
    """Importing the group workflow imports the task modules: the symmetry model's factory is then registered."""
    from bids_siamese.workflows.group import TASKS

    assert set(TASKS) == {"twin", "longitudinal", "orientation", "symmetry", "pretrain"}
    assert all(issubclass(task, GroupTask) and task.name == name for name, task in TASKS.items())
    assert model_factory("symmetry", "small") is FACTORIES[("symmetry", None)]


def test_run_task_calls_the_steps_in_order_and_writes_in_the_first_process(tmp_path):
    calls = []

    class Fifth(GroupTask):
        name = "fifth"

        def collect(self, subjects):
            calls.append(("collect", tuple(subjects)))

        def samples(self):
            calls.append("samples")

        def split(self):
            calls.append("split")

        def fit(self):
            calls.append("fit")

        def evaluate(self):
            calls.append("evaluate")

        def write(self):
            calls.append("write")
            return [Path(self.settings.output_dir) / "group_fifth.tsv"]

    settings = Settings(bids_dir=tmp_path, output_dir=tmp_path, work_dir=tmp_path, analysis_level="group",
                        omp_nthreads=1)
    threads = torch.get_num_threads()
    try:
        assert run_task(Fifth, settings, ["01"]) == [tmp_path / "group_fifth.tsv"]
    finally:
        torch.set_num_threads(threads)
    assert calls == [("collect", ("01",)), "samples", "split", "fit", "evaluate", "write"]


@pytest.mark.slow
def test_a_fresh_process_loads_a_symmetry_checkpoint_through_the_group_workflow(tmp_path):
    """The CLI checks --model before any work (check_checkpoint): in a fresh interpreter that has imported only
    the group workflow, the symmetry model's factory is registered."""
    import subprocess
    import sys

    from bids_siamese.symmetry.model import build_symmetry_model
    from bids_siamese.symmetry.train import save_symmetry_checkpoint

    save_symmetry_checkpoint(tmp_path / "symmetry_small", build_symmetry_model("small"), TrainConfig(), 8.0, {}, {})
    code = ("import sys; from bids_siamese.workflows.group import check_checkpoint; "
            "print(check_checkpoint(sys.argv[1])['task'])")
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path / "symmetry_small")], capture_output=True,
                          text=True, cwd=Path(__file__).parents[1], check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "symmetry"
