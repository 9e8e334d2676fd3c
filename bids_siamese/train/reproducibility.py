"""Seeds and determinism of the group level's training (``--seed``, ``--deterministic``).

Every group task starts with :func:`prepare`: torch's CPU threads (``--omp-nthreads``), the deterministic
algorithms of ``--deterministic``, and the global random generators of Python, numpy and torch seeded with
``--seed``, before any model is built. A model's initial weights come from the global torch generator, so a
task that builds a model without seeding it first starts from different weights every run (the orientation
task's first ensemble member did, issue 28).

On the CPU a task is byte-identical run after run and across ``--nprocs`` for the same ``--omp-nthreads``
(tests/test_reproducibility.py). The number of torch threads is part of the result: torch's CPU kernels sum
the gradients of convolution weights and biases, and batch-norm statistics, in per-thread partial sums, so
another ``--omp-nthreads`` trains weights that differ in the last bits, and the difference grows over the
epochs (inference, i.e. ``--mode apply``, is the same whatever the threads). ``--deterministic`` on the CPU
trains on one torch thread: the result of ``--omp-nthreads 1`` whatever ``--omp-nthreads`` says.

On CUDA, cuDNN and cuBLAS choose kernels and reduction orders per run; ``--deterministic`` asks torch for
deterministic algorithms where they exist (operations that have none, e.g. some 3-D pooling backward passes,
still run and warn). The model card's ``reproducibility`` record says which held (docs/reliability.md,
"Reproducibility").
"""
from __future__ import annotations

import logging
import os
import random
from typing import Any

import numpy as np
import torch

from ..config import Settings

LOG = logging.getLogger("bids_siamese.group")

#: cuBLAS workspace that makes its reductions deterministic (CUDA >= 10.2; see torch's "Reproducibility" notes).
CUBLAS_WORKSPACE = ":4096:8"
#: What a rerun on the same device gives, by device type (recorded in the model card).
TOLERANCE = {
    "cpu": "byte-identical tables and checkpoints for the same --seed, inputs, --omp-nthreads (cpu_threads) and "
           "library versions; other thread counts differ in the last bits of the weights",
    "cuda": "not bit-identical: float32 sums in another order per run; probabilities and scores differ by about "
            "what another CPU thread count gives (a few thousandths after a short training) and decisions near "
            "a threshold can change (docs/reliability.md, Reproducibility)",
    "cuda_deterministic": "deterministic kernels where torch has them; operations without one may still differ "
                          "in the last bits (docs/reliability.md, Reproducibility)",
}


def seed_everything(seed: int) -> None:
    """Seed Python's, numpy's and torch's global generators (torch's seeds every CUDA device too).

    Examples:
        >>> seed_everything(3); a = torch.rand(2); seed_everything(3)
        >>> bool(torch.equal(a, torch.rand(2)))
        True
    """
    random.seed(int(seed))
    np.random.seed(int(seed) % 2**32)
    torch.manual_seed(int(seed))


def configure_determinism(deterministic: bool) -> None:
    """``--deterministic``: torch's deterministic algorithms (warning, not failing, where an operation has none),
    deterministic cuDNN convolutions without autotuning, and cuBLAS's deterministic workspace (when the
    environment does not set ``CUBLAS_WORKSPACE_CONFIG`` already). Without it torch's deterministic algorithms
    and cuDNN's deterministic mode are off (also after a task of the same process had them on)."""
    torch.use_deterministic_algorithms(bool(deterministic), warn_only=True)
    torch.backends.cudnn.deterministic = bool(deterministic)
    if not deterministic:
        return
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE)
    torch.backends.cudnn.benchmark = False
    LOG.info("--deterministic: torch deterministic algorithms on, cuDNN deterministic, CUBLAS_WORKSPACE_CONFIG=%s",
             os.environ["CUBLAS_WORKSPACE_CONFIG"])


def training_threads(settings: Settings) -> int:
    """torch threads of a group task: ``--omp-nthreads``; one with ``--deterministic`` on the CPU (the CPU kernels'
    sums depend on the number of threads).

    Examples:
        >>> from types import SimpleNamespace as S
        >>> training_threads(S(omp_nthreads=4, deterministic=True, device="cpu"))
        1
        >>> training_threads(S(omp_nthreads=4, deterministic=True, device="cuda"))
        4
    """
    threads = max(1, int(settings.omp_nthreads))
    if getattr(settings, "deterministic", False) and torch.device(settings.device).type == "cpu":
        return 1
    return threads


def prepare(settings: Settings) -> None:
    """The start of every group task: torch threads (:func:`training_threads`), ``--deterministic``, then the
    seeds."""
    threads = training_threads(settings)
    if threads < int(settings.omp_nthreads):
        LOG.info("--deterministic on the CPU: training on 1 torch thread instead of %d (the result of "
                 "--omp-nthreads 1, whatever the number of threads)", int(settings.omp_nthreads))
    torch.set_num_threads(threads)
    configure_determinism(bool(getattr(settings, "deterministic", False)))
    seed_everything(int(settings.seed))


def reproducibility_record(device: Any) -> dict[str, Any]:
    """The model card's ``reproducibility``: the device type, torch's CPU threads (part of a CPU result), whether
    torch's deterministic algorithms were on, whether a rerun is expected to be byte-identical, and the
    documented tolerance.

    Examples:
        >>> reproducibility_record("cpu")["bit_identical_reruns"]
        True
    """
    kind = torch.device(device).type
    algorithms = bool(torch.are_deterministic_algorithms_enabled())
    cudnn = bool(getattr(torch.backends.cudnn, "deterministic", False)) if kind == "cuda" else None
    if kind == "cpu":
        identical, tolerance = True, TOLERANCE["cpu"]
    elif algorithms and cudnn:
        identical, tolerance = False, TOLERANCE["cuda_deterministic"]
    else:
        identical, tolerance = False, TOLERANCE.get(kind, TOLERANCE["cuda"])
    return {"device": kind, "cpu_threads": int(torch.get_num_threads()), "deterministic_algorithms": algorithms,
            "cudnn_deterministic": cudnn,
            "bit_identical_reruns": identical, "tolerance": tolerance}
