"""Participant level with ``--model``: the embedding of one model-grid T1w (nipype interface).

The node writes ``embedding.tsv`` in its working directory: a header line and **one row** with the columns
``embedding_0 … embedding_<D-1>`` (D = the model's embedding size, 128 by default), values with 6
decimals. One row per scan makes a dataset's embeddings a plain concatenation of these files. The
derivatives sink stores it as ``<source>_desc-<task>_embedding.tsv`` where ``<task>`` is the model card's
task (``out_task``: ``twin`` or ``longitudinal``).

For a twin model the embedding is the L2-normalised vector whose cosine (or euclidean, see the model card's
``hyperparameters.distance``) distance identifies co-twins; for a longitudinal model it is the per-session
embedding that the classifier fuses.
"""
from __future__ import annotations

import os

import numpy as np
import pandas as pd
import torch
from nipype.interfaces.base import (
    BaseInterfaceInputSpec,
    File,
    TraitedSpec,
    traits,
)
from torch import nn

from ..models.checkpoint import load_checkpoint
from ..resources import model_grid
from ..train.data import load_volume
from .base import StepInterface


def embedding_table(vector: np.ndarray, decimals: int = 6) -> pd.DataFrame:
    """One-row table ``embedding_0 … embedding_<D-1>``.

    Examples:
        >>> embedding_table(np.array([0.5, -0.25])).to_dict("records")
        [{'embedding_0': 0.5, 'embedding_1': -0.25}]
    """
    vector = np.asarray(vector, dtype=float).ravel()
    return pd.DataFrame([np.round(vector, decimals)], columns=[f"embedding_{i}" for i in range(len(vector))])


@torch.no_grad()
def embed_volume(model: nn.Module, volume: np.ndarray, device: str | torch.device = "cpu") -> np.ndarray:
    """The embedding ``(D,)`` of one model-grid volume ``(X, Y, Z)`` (model in eval mode).

    Examples:
        >>> from bids_siamese.models import build_model
        >>> e = embed_volume(build_model("twin", embedding_dim=8).eval(), np.zeros((21, 26, 22), np.float32))
        >>> e.shape
        (8,)
    """
    net = model.eval()
    x = torch.from_numpy(np.ascontiguousarray(volume, dtype=np.float32))[None, None].to(device)
    out = net.embed(x) if hasattr(net, "embed") else net(x)
    return out[0].float().cpu().numpy()


class _ComputeEmbeddingInputSpec(BaseInterfaceInputSpec):
    in_file = File(exists=True, mandatory=True,
                   desc="model-grid T1w (space-MNI152NLin2009cAsym_desc-preproc_T1w.nii.gz)")
    model = traits.Str(mandatory=True, desc="checkpoint: folder, model.pt or model_card.json")
    device = traits.Str("cpu", usedefault=True, desc="cpu, cuda or cuda:N")
    use_gpu = traits.Bool(False, usedefault=True, desc="runs on a GPU (nipype's MultiProc counts it in n_gpu_procs)")
    num_threads = traits.Int(1, usedefault=True, desc="torch CPU threads")


class _ComputeEmbeddingOutputSpec(TraitedSpec):
    out_tsv = File(exists=True, desc="one row: embedding_0 … embedding_<D-1>")
    out_task = traits.Str(desc="the model's task (twin or longitudinal), for desc-<task>")


class ComputeEmbedding(StepInterface):
    """Embed one scan with a trained checkpoint (the checkpoint's sha256, task and grid are checked).

    Raises (at run time):
        NoInputError / BadDataError: missing or corrupt checkpoint, or a volume not on the model's grid.
    """

    input_spec = _ComputeEmbeddingInputSpec
    output_spec = _ComputeEmbeddingOutputSpec

    def _run_step(self, runtime):
        torch.set_num_threads(max(1, int(self.inputs.num_threads)))
        model, card = load_checkpoint(self.inputs.model, device=self.inputs.device)
        volume = load_volume(self.inputs.in_file, model_grid(float(card["grid"]["resolution"])))
        table = embedding_table(embed_volume(model, volume, self.inputs.device))
        out = os.path.abspath("embedding.tsv")
        table.to_csv(out, sep="\t", index=False, lineterminator="\n")
        self._results["out_tsv"] = out
        self._results["out_task"] = str(card["task"])
        return runtime
