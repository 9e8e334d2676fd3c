"""The model registry: which factory rebuilds the model of a checkpoint, by task and backbone.

:func:`~bids_siamese.models.checkpoint.load_checkpoint` reads a card, asks :func:`model_factory` for the factory
of the card's ``task``/``backbone`` and loads the weights into what it returns. The owner of a model registers
its factory next to the model (one :func:`register_model` line); the factories of the models in this package
are registered at the end of this module. The symmetry model registers itself in
:mod:`bids_siamese.symmetry.model`, so a symmetry checkpoint can be loaded once that module is imported: the
group workflow imports every task module (:data:`bids_siamese.workflows.group.TASKS`), and
:func:`bids_siamese.symmetry.train.load_symmetry_model` imports it too.

A factory is ``f(card, state) -> nn.Module``: an untrained model shaped like the checkpoint's, ready for
``load_state_dict(state)``.
"""
from __future__ import annotations

from typing import Any, Callable

from torch import nn

from .heads import TASKS, build_model
from .orientation import OrientationEnsemble
from .regional import RegionalChange, RegionalConvEncoder, RegionalEncoder

ModelFactory = Callable[[dict[str, Any], dict[str, Any]], nn.Module]

#: ``(task, backbone)`` -> factory; ``None`` matches any task or any backbone.
FACTORIES: dict[tuple[str | None, str | None], ModelFactory] = {}


def register_model(factory: ModelFactory, task: str | None = None, backbone: str | None = None) -> ModelFactory:
    """Register ``factory`` for checkpoints of ``task`` and ``backbone`` (``None``: any); returns it.

    Examples:
        >>> f = register_model(lambda card, state: nn.Identity(), "doctest-task")
        >>> model_factory("doctest-task", "small") is f
        True
        >>> del FACTORIES[("doctest-task", None)]
    """
    FACTORIES[(task, backbone)] = factory
    return factory


def model_factory(task: str, backbone: str | None) -> ModelFactory:
    """The factory of a checkpoint: the most specific registration (task and backbone, then the task, then the
    backbone), else :func:`default_factory` (a backbone with an embedding or longitudinal head).

    Raises:
        LookupError: the task is not one of the models package's and no factory is registered for it (a bug: the
            module that owns it was not imported).
    """
    for key in ((task, backbone), (task, None), (None, backbone)):
        if key in FACTORIES:
            return FACTORIES[key]
    if task not in TASKS:
        raise LookupError(f"no model factory registered for task {task!r} (backbone {backbone!r}): import the module "
                          "that defines the task's model first (bids_siamese.workflows.group imports them all)")
    return default_factory


def default_factory(card: dict[str, Any], state: dict[str, Any]) -> nn.Module:
    """A backbone with the task's head (:func:`~bids_siamese.models.heads.build_model`), sized by the card."""
    return build_model(card["task"], card["backbone"], embedding_dim=int(card["embedding_dim"]),
                       in_channels=int(card.get("in_channels", 1)),
                       pooling=card.get("pooling", "avg"))  # cards before 0.1.0 had no pooling: avg


# The models of this package. The region layout (and the population reference) of the regional models is in their
# buffers; the orientation ensemble's architecture is in the card.
register_model(lambda card, state: OrientationEnsemble.from_card(card), task="orientation")
register_model(lambda card, state: RegionalChange.from_state_dict(state, tuple(card["grid"]["shape"]),
                                                                  pool=int(card.get("pool", 2))),
               task="longitudinal", backbone="regional")
register_model(lambda card, state: RegionalEncoder.from_state_dict(state, pool=int(card.get("pool", 2))),
               backbone="regional")
register_model(lambda card, state: RegionalConvEncoder.from_state_dict(state, pool=int(card.get("pool", 2))),
               backbone="regional_cnn")
