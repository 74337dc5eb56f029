"""Muon as in the DeepSeek-V4 paper (Alg. 1): Nesterov momentum, hybrid Newton-Schulz, RMS 0.18.

    M = mu M + G;  O' = HybridNS(mu M + G);  O = O' sqrt(max(n, m)) * update_rms
    W <- W (1 - lr wd) - lr O           (weight decay and lr are chained after this transform)

HybridNS normalises X = M / ||M||_F per matrix and runs 8 quintic iterations at
(3.4445, -4.7750, 2.0315) then 2 at (2, -1.5, 0.5). The matrix is the LAST TWO axes of a leaf; all
leading axes (scan repeats, experts, output groups) are batch, so every expert's matrix is
orthogonalised on its own.

Why not `optax.contrib.muon`: it can express the hybrid coefficients, the batching and the
sqrt(max(n, m)) * 0.18 rescale, but its momentum is a bias-corrected EMA (m = b m + (1 - b) g,
divided by 1 - b^t), which weights the first steps differently from Alg. 1's plain M = mu M + G,
and it has no way to run the iterations in bfloat16 for float32 parameters (`muon_ns_dtype`).
The transform is short, so it is written here to match the paper exactly.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jaxtyping import Array, Float

HYBRID_NS_COEFFS: tuple[tuple[float, float, float], ...] = (
    (3.4445, -4.7750, 2.0315),
) * 8 + ((2.0, -1.5, 0.5),) * 2


def hybrid_newton_schulz(
    m: Float[Array, "*batch n k"],
    coeffs: tuple[tuple[float, float, float], ...] = HYBRID_NS_COEFFS,
    eps: float = 1e-7,
    compute_dtype: Any = jnp.float32,
) -> Float[Array, "*batch n k"]:
    """Approximate the orthogonal polar factor of every matrix in `m` (last two axes) by Newton-Schulz.

    Each iteration is X <- aX + b(XX^T)X + c(XX^T)^2X, with X transposed so that XX^T is the smaller
    Gram matrix. Output has `m`'s shape and dtype.
    """
    if m.ndim < 2:
        raise ValueError(
            f"Newton-Schulz needs a matrix (rank >= 2), got shape {m.shape}"
        )
    transpose = m.shape[-2] > m.shape[-1]
    x = jnp.swapaxes(m, -1, -2) if transpose else m
    x32 = x.astype(jnp.float32)
    norm = jnp.sqrt(
        jnp.sum(jnp.square(x32), axis=(-2, -1), keepdims=True)
    )  # [*batch, 1, 1]
    x = (x32 / (norm + eps)).astype(compute_dtype)

    def iteration(x, abc):
        a, b, c = abc[0], abc[1], abc[2]
        # n = the smaller side (x was transposed so that the Gram matrix is the small one)
        gram = jnp.einsum("...ij,...kj->...ik", x, x)  # [*batch, n, n]
        gram2 = jnp.einsum("...ij,...jk->...ik", gram, gram)  # [*batch, n, n]
        mixed = jnp.einsum(
            "...ij,...jk->...ik", b * gram + c * gram2, x
        )  # [*batch, n, k]
        return (a * x + mixed).astype(compute_dtype), None

    # A scan over the coefficient rows, not a Python loop: one loop body per leaf keeps compile time
    # small when a model has dozens of Muon leaves.
    x, _ = jax.lax.scan(iteration, x, jnp.asarray(coeffs, compute_dtype))
    if transpose:
        x = jnp.swapaxes(x, -1, -2)
    return x.astype(m.dtype)


class HybridMuonState(NamedTuple):
    """Muon's state: the momentum buffer M (float32, one per Muon leaf)."""

    momentum: Any


def scale_by_hybrid_muon(
    momentum: float = 0.95,
    update_rms: float = 0.18,
    ns_dtype: Any = jnp.float32,
    eps: float = 1e-7,
) -> optax.GradientTransformation:
    """The direction O of paper Alg. 1 (before weight decay and learning rate) for every leaf."""

    def init_fn(params):
        for leaf in jax.tree.leaves(params):
            if leaf.ndim < 2:
                raise ValueError(f"Muon needs rank >= 2 leaves, got shape {leaf.shape}")
        return HybridMuonState(
            momentum=jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
        )

    def update_fn(updates, state, params=None):
        del params
        new_momentum = jax.tree.map(
            lambda m, g: momentum * m + g.astype(jnp.float32), state.momentum, updates
        )

        def direction(m, g):
            nesterov = momentum * m + g.astype(jnp.float32)
            ortho = hybrid_newton_schulz(nesterov, eps=eps, compute_dtype=ns_dtype)
            scale = jnp.sqrt(float(max(g.shape[-2], g.shape[-1]))) * update_rms
            return (ortho * scale).astype(g.dtype)

        return jax.tree.map(direction, new_momentum, updates), HybridMuonState(
            momentum=new_momentum
        )

    return optax.GradientTransformation(init_fn, update_fn)


def hybrid_muon(
    learning_rate: optax.ScalarOrSchedule,
    momentum: float = 0.95,
    update_rms: float = 0.18,
    weight_decay: float = 0.1,
    ns_dtype: Any = jnp.float32,
) -> optax.GradientTransformation:
    """Full Muon step: W <- W (1 - lr wd) - lr O (decoupled weight decay, as in Alg. 1)."""
    return optax.chain(
        scale_by_hybrid_muon(momentum, update_rms, ns_dtype),
        optax.add_decayed_weights(weight_decay),
        optax.scale_by_learning_rate(learning_rate),
    )
