"""Frequency-balanced token -> experts tables for the hash-routed MoE layers (spec §5.1, GUESS).

The paper's hash function is not disclosed. This builds a fixed table giving every token id K
distinct experts so that the expected load (token frequency) is balanced: tokens in descending
frequency each go to the K currently least-loaded experts (greedy longest-processing-time), ties
broken by a seeded permutation of the experts. Pure numpy with a heap: it runs once, offline.
"""

from __future__ import annotations

import heapq

import numpy as np
from jaxtyping import Int, Num


def build_hash_table(
    token_counts: Num[np.ndarray, " V"],
    n_experts: int,
    k: int,
    seed: int = 0,
    unseen_weight: float = 1.0,
) -> Int[np.ndarray, "V K"]:
    """int32 [V, K] table of K distinct experts per token id, greedily balancing expected load.

    `unseen_weight` is added to every count so that ids absent from the corpus are spread across
    experts instead of all landing on the same K (set 0 to balance the raw counts only).
    """
    counts = np.asarray(token_counts, dtype=np.float64)
    if counts.ndim != 1 or counts.size == 0:
        raise ValueError(
            f"token_counts must be a non-empty [V] vector, got shape {counts.shape}"
        )
    if np.any(counts < 0) or not np.all(np.isfinite(counts)):
        raise ValueError("token_counts must be finite and >= 0")
    if not 1 <= k <= n_experts:
        raise ValueError(f"k must be in [1, n_experts={n_experts}], got {k}")
    if unseen_weight < 0:
        raise ValueError(f"unseen_weight must be >= 0, got {unseen_weight}")
    weights = counts + unseen_weight
    tie_rank = np.random.default_rng(seed).permutation(n_experts)
    heap = [(0.0, int(tie_rank[e]), e) for e in range(n_experts)]
    heapq.heapify(heap)
    table = np.empty((counts.size, k), dtype=np.int32)
    for token in np.argsort(-weights, kind="stable"):
        chosen = [
            heapq.heappop(heap) for _ in range(k)
        ]  # K least loaded, distinct by construction
        w = float(weights[token])
        for slot, (load, rank, expert) in enumerate(chosen):
            table[token, slot] = expert
            heapq.heappush(heap, (load + w, rank, expert))
    return table


def expert_loads(
    table: Int[np.ndarray, "V K"], token_counts: Num[np.ndarray, " V"], n_experts: int
) -> np.ndarray:
    """float64 [E]: expected tokens routed to each expert under `table` for these counts."""
    counts = np.asarray(token_counts, dtype=np.float64)
    return np.bincount(
        table.reshape(-1),
        weights=np.repeat(counts, table.shape[1]),
        minlength=n_experts,
    )


def load_imbalance(
    table: Int[np.ndarray, "V K"], token_counts: Num[np.ndarray, " V"], n_experts: int
) -> float:
    """max / mean expert load of `table` on `token_counts` (1.0 = perfectly balanced)."""
    loads = expert_loads(table, token_counts, n_experts)
    return float(loads.max() / loads.mean())
