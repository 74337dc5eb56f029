"""Orthonormal Walsh-Hadamard rotation on the last axis (the indexer's `rotate_activation`, spec/dsv4.md 7.4).

y = x @ H_n / sqrt(n), with H_n the Sylvester-ordered Hadamard matrix (H_1 = [1], H_2n = [[H, H], [H, -H]]),
which is symmetric, so y = H_n x / sqrt(n) per row, as `fast_hadamard_transform` computes it. The
rotation spreads outliers across the 128 channels before FP4 quantization; being orthonormal it leaves
q·k scores unchanged in exact arithmetic and is its own inverse.

Computed with log2(n) butterfly stages of reshapes, adds and subtracts (O(n log n), exact sums, no dense
n x n matmul whose default TPU/GPU precision would round through bf16). Accumulates in float32 and
returns x's dtype.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float


@jax.jit
def hadamard(x: Float[Array, "... n"]) -> Float[Array, "... n"]:
    """Orthonormal Walsh-Hadamard transform of the last axis; its size must be a power of two."""
    n = x.shape[-1]
    if n < 1 or n & (n - 1):
        raise ValueError(f"hadamard: last axis has size {n}, not a power of two")
    lead = x.shape[:-1]
    y = x.astype(jnp.float32)
    h = 1
    while h < n:
        # pair element i with i + h inside each group of 2h: [..., n/2h, 2, h]
        y = y.reshape(*lead, n // (2 * h), 2, h)
        a, b = y[..., 0, :], y[..., 1, :]
        y = jnp.stack([a + b, a - b], axis=-2)
        h *= 2
    return (y.reshape(*lead, n) * (n**-0.5)).astype(x.dtype)
