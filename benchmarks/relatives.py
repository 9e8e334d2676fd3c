"""Benchmark of the closest-relatives search (``group --task twin``) on synthetic embeddings.

For each N, draws N/2 random unit embeddings (d = 128 by default) and a co-twin for each (the same vector
plus noise), shuffles them, and runs :func:`bids_siamese.train.relatives.nearest_relatives` (exact, blocked).
Prints one line per N: wall and CPU seconds, peak memory traced by Python during the search (numpy buffers),
the size an N x N float32 distance table would have, the fraction of scans whose co-twin is ranked first, and
(for N <= --check-max) whether the result equals a brute-force search. The load average is printed at the
start and after each N (the machine may be shared).

Usage::

    python benchmarks/relatives.py --n 1000 10000 100000 --dim 128 --top-k 5
"""
from __future__ import annotations

import argparse
import os
import resource
import sys
import time
import tracemalloc

import numpy as np


def synthetic_embeddings(n: int, dim: int, noise: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``n`` float32 embeddings in co-twin pairs (``n`` even); returns (embeddings, index of each co-twin)."""
    rng = np.random.default_rng(seed)
    half = n // 2
    base = rng.normal(size=(half, dim)).astype(np.float32)
    twin = base + noise * rng.normal(size=base.shape).astype(np.float32)
    emb = np.concatenate([base, twin])
    cotwin = np.concatenate([np.arange(half, 2 * half), np.arange(half)])
    order = rng.permutation(len(emb))
    inverse = np.empty_like(order)
    inverse[order] = np.arange(len(order))
    emb = emb[order]
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    return emb, inverse[cotwin[order]]


def brute_force(emb: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k nearest other rows by cosine distance from the full N x N table."""
    full = 1.0 - emb.astype(np.float64) @ emb.astype(np.float64).T
    np.fill_diagonal(full, np.inf)
    return np.argsort(full, axis=1, kind="stable")[:, :k]


def load() -> str:
    return " ".join(f"{v:.2f}" for v in os.getloadavg())


def main(argv: list[str] | None = None) -> int:
    from bids_siamese.train.relatives import BLOCK, nearest_relatives

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, nargs="+", default=[1000, 10000, 100000], help="numbers of scans")
    parser.add_argument("--dim", type=int, default=128, help="embedding size")
    parser.add_argument("--top-k", type=int, default=5, help="relatives per scan")
    parser.add_argument("--noise", type=float, default=0.5, help="co-twin noise (per dimension, before normalising)")
    parser.add_argument("--block", type=int, default=BLOCK, help="rows per block")
    parser.add_argument("--check-max", type=int, default=10000, help="compare with brute force up to this N")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    import torch  # only for the thread count shown: numpy's BLAS does the work

    print(f"machine: {os.cpu_count()} CPUs, load average at start: {load()}; torch threads {torch.get_num_threads()}, "
          f"block {args.block}, d={args.dim}, k={args.top_k}")
    for n in args.n:
        emb, cotwin = synthetic_embeddings(n, args.dim, args.noise, args.seed)
        tracemalloc.start()
        tracemalloc.reset_peak()
        wall, cpu = time.perf_counter(), time.process_time()
        index, dist = nearest_relatives(emb, args.top_k, "cosine", block=args.block)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        found = float((index[:, 0] == cotwin).mean())
        exact = "not checked"
        if n <= args.check_max:
            exact = "equal" if np.array_equal(index, brute_force(emb, args.top_k)) else "DIFFERENT"
        print(f"N={n:>7d}: search {wall:7.2f} s wall, {cpu:7.2f} s CPU; peak traced memory {peak / 2**20:7.1f} MiB "
              f"(embeddings {emb.nbytes / 2**20:.1f} MiB; an N x N float32 table would be "
              f"{4 * n * n / 2**20:,.0f} MiB); "
              f"co-twin ranked first for {100 * found:.1f}% of scans; brute force: {exact}; load average {load()}",
              flush=True)
    print(f"peak RSS of the process: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
