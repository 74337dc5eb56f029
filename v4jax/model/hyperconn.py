"""Manifold-constrained hyper-connections (mHC): the residual is `n` streams mixed by doubly-stochastic
matrices (spec section 3, hf_reference section 3.2).

Each block has two sites (before attention and before the MoE). A site reads the n streams, emits the
collapsed block input `y = sum_j pre_j X_j`, and after the block writes `X'_k = post_k f + sum_j C[j,k] X_j`
(C is applied transposed). C is a Sinkhorn projection that starts with a row softmax, then alternates
column and row normalisations, with `eps` in every denominator. All mixing math runs in float32.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from v4jax.model.layers import declare, normal_init, rms_normalize


def sinkhorn(logits: Float[Array, "... n n"], iters: int, eps: float) -> Float[Array, "... n n"]:
    """Row softmax (+eps), a column normalisation, then (iters - 1) x (row, column) normalisations."""
    c = jax.nn.softmax(logits, axis=-1) + eps
    c = c / (jnp.sum(c, axis=-2, keepdims=True) + eps)

    def row_then_column(_, c):
        c = c / (jnp.sum(c, axis=-1, keepdims=True) + eps)
        return c / (jnp.sum(c, axis=-2, keepdims=True) + eps)

    return jax.lax.fori_loop(0, iters - 1, row_then_column, c)


def _comb_base_init(n: int, diag: float):
    """Static biases: 0 for pre/post, `diag` on the diagonal of the comb logits so that B ~ I at init (spec 3.3 GUESS)."""

    def init(key, shape, dtype):
        del key
        base = np.zeros(shape, np.float32)
        base[2 * n:] = (np.eye(n) * diag).reshape(-1)
        return jnp.asarray(base, dtype)

    return init


class HyperConnection(nn.Module):
    """One mHC site: `pre(X) -> (y, post, comb)`; `post(f, X, post, comb) -> X'`."""

    n: int
    sinkhorn_iters: int
    hc_eps: float
    norm_eps: float
    init_std: float
    init_alpha: float
    init_comb_diag: float

    @nn.compact
    def __call__(self, X: Float[Array, "b s n d"]):
        n, d = self.n, X.shape[-1]
        fn = declare(self, "fn", normal_init(self.init_std), ((2 + n) * n, n * d), ("hc_mix", "hc_embed"), jnp.float32)
        base = declare(self, "base", _comb_base_init(n, self.init_comb_diag), ((2 + n) * n,), ("hc_mix",), jnp.float32)
        scale = declare(self, "scale", nn.initializers.constant(self.init_alpha), (3,), (None,), jnp.float32)
        x = X.reshape(*X.shape[:-2], n * d)
        mixes = jnp.einsum("bsi,mi->bsm", rms_normalize(x, self.norm_eps), fn)  # [B, S, (2+n)n]
        pre = jax.nn.sigmoid(mixes[..., :n] * scale[0] + base[:n]) + self.hc_eps  # [B, S, n]
        post = 2.0 * jax.nn.sigmoid(mixes[..., n:2 * n] * scale[1] + base[n:2 * n])  # [B, S, n]
        comb_logits = (mixes[..., 2 * n:] * scale[2] + base[2 * n:]).reshape(*mixes.shape[:-1], n, n)
        comb = sinkhorn(comb_logits, self.sinkhorn_iters, self.hc_eps)  # [B, S, n(src j), n(dst k)]
        y = jnp.einsum("bsj,bsjd->bsd", pre, X.astype(jnp.float32))  # [B, S, d]
        return y.astype(X.dtype), post, comb


def hc_post(f: Float[Array, "b s d"], X: Float[Array, "b s n d"], post, comb) -> Float[Array, "b s n d"]:
    """`X'_k = post_k * f + sum_j comb[j, k] * X_j` (comb transposed), in float32, cast to X's dtype."""
    mixed = jnp.einsum("bsjk,bsjd->bskd", comb, X.astype(jnp.float32))  # [B, S, n, d]
    return (post[..., None] * f.astype(jnp.float32)[..., None, :] + mixed).astype(X.dtype)


class HyperHead(nn.Module):
    """The final collapse of the n streams: `sum_j (sigmoid(mix_j * scale + base_j) + eps) X_j` (no Sinkhorn)."""

    n: int
    hc_eps: float
    norm_eps: float
    init_std: float
    init_alpha: float

    @nn.compact
    def __call__(self, X: Float[Array, "b s n d"]) -> Float[Array, "b s d"]:
        n, d = self.n, X.shape[-1]
        fn = declare(self, "fn", normal_init(self.init_std), (n, n * d), ("hc_head_mix", "hc_embed"), jnp.float32)
        base = declare(self, "base", nn.initializers.zeros, (n,), ("hc_head_mix",), jnp.float32)
        scale = declare(self, "scale", nn.initializers.constant(self.init_alpha), (1,), (None,), jnp.float32)
        x = X.reshape(*X.shape[:-2], n * d)
        mixes = jnp.einsum("bsi,mi->bsm", rms_normalize(x, self.norm_eps), fn)  # [B, S, n]
        pre = jax.nn.sigmoid(mixes * scale[0] + base) + self.hc_eps
        return jnp.einsum("bsj,bsjd->bsd", pre, X.astype(jnp.float32)).astype(X.dtype)  # [B, S, d]
