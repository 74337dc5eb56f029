"""DeepSeekMoE: sqrt-softplus router with an aux-loss-free selection bias (or a frozen token->experts hash
table in the first layers), routed experts and one shared expert, all SwiGLU with clamping
(spec 5.1-5.3, hf_reference 3.7).

Routing runs in float32. The bias only affects which experts are selected; the combine weights are the
unbiased affinities of the K picks, renormalised and multiplied by `routed_scaling_factor`. Routed experts
run as grouped GEMMs over token-expert pairs sorted by expert (dropless), through
`v4jax.kernels.grouped_matmul`.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from v4jax.kernels.grouped_matmul import grouped_matmul
from v4jax.model.config import ModelConfig
from v4jax.model.layers import Dense, declare, dtype_of, normal_init


def clamped_swiglu(gate, up, limit: float):
    """silu(min(gate, L)) * clip(up, -L, L); `limit <= 0` disables the clamp."""
    if limit > 0:
        gate, up = jnp.minimum(gate, limit), jnp.clip(up, -limit, limit)
    return jax.nn.silu(gate) * up


def sequence_balance_loss(scores: Float[Array, "b s e"], indices: Int[Array, "b s k"], mask) -> Float[Array, ""]:
    """Sequence-wise balance loss `sum_i f_i P_i` averaged over sequences (spec 5.3, unweighted).

    f_i = E / (K T) * #{t : i in TopK_t};  P_i = mean_t s_{i,t} / sum_j s_{j,t}; T = the sequence's real tokens.
    """
    e, k = scores.shape[-1], indices.shape[-1]
    mask = mask.astype(jnp.float32)
    tokens = jnp.maximum(jnp.sum(mask, -1), 1.0)  # [B]
    hits = jnp.sum(jax.nn.one_hot(indices, e, dtype=jnp.float32), axis=-2) * mask[..., None]  # [B, S, E]
    f = jnp.sum(hits, 1) * e / (k * tokens[:, None])  # [B, E]
    p = jnp.sum(scores / jnp.sum(scores, -1, keepdims=True) * mask[..., None], 1) / tokens[:, None]  # [B, E]
    return jnp.mean(jnp.sum(f * p, -1))


class SwiGLU(nn.Module):
    """The shared expert: a clamped SwiGLU MLP of width `moe_intermediate_size`."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x):
        cfg = self.cfg
        dtype, pdt, I = dtype_of(cfg.dtype), dtype_of(cfg.param_dtype), cfg.moe_intermediate_size
        gate = Dense(I, ("embed", "mlp"), cfg.init_std, dtype, pdt, name="w1")(x)
        up = Dense(I, ("embed", "mlp"), cfg.init_std, dtype, pdt, name="w3")(x)
        return Dense(cfg.hidden_size, ("mlp", "embed"), cfg.init_std, dtype, pdt, name="w2")(
            clamped_swiglu(gate, up, cfg.swiglu_limit))


def _random_hash_table(key, vocab: int, n_experts: int, k: int):
    """K distinct random experts per token id (a stand-in until a frequency-balanced table is installed)."""
    return jnp.argsort(jax.random.uniform(key, (vocab, n_experts)), axis=-1)[:, :k].astype(jnp.int32)


class Router(nn.Module):
    cfg: ModelConfig
    hashed: bool

    @nn.compact
    def __call__(self, x: Float[Array, "b s d"], tokens, override=None):
        """Returns (indices [B,S,K] int32, combine weights [B,S,K] f32, affinities [B,S,E] f32)."""
        cfg = self.cfg
        E, K = cfg.n_routed_experts, cfg.num_experts_per_tok
        kernel = declare(self, "kernel", normal_init(cfg.init_std), (cfg.hidden_size, E), ("embed", "experts_router"),
                         dtype_of(cfg.param_dtype))
        logits = jnp.einsum("bsd,de->bse", x.astype(jnp.float32), kernel.astype(jnp.float32))  # [B, S, E]
        scores = jnp.sqrt(jax.nn.softplus(logits))
        if self.hashed:
            table = self.variable("buffers", "tid2eid", lambda: _random_hash_table(
                self.make_rng("params"), cfg.vocab_size, E, K))
            idx = table.value[tokens]
        else:
            bias = self.variable("buffers", "bias", lambda: jnp.zeros((E,), jnp.float32))
            if override is not None:
                idx = override
            else:
                _, idx = jax.lax.top_k(jax.lax.stop_gradient(scores) + bias.value, K)
        idx = idx.astype(jnp.int32)
        picked = jnp.take_along_axis(scores, idx, axis=-1)
        weights = picked / (jnp.sum(picked, -1, keepdims=True) + 1e-20) * cfg.routed_scaling_factor
        return idx, weights, scores


class Experts(nn.Module):
    """The routed experts, stacked [E, ...], run as grouped GEMMs over token-expert pairs sorted by expert."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x: Float[Array, "t d"], idx: Int[Array, "t k"], weights: Float[Array, "t k"]):
        cfg = self.cfg
        dtype, pdt = dtype_of(cfg.dtype), dtype_of(cfg.param_dtype)
        E, I, d, K = cfg.n_routed_experts, cfg.moe_intermediate_size, cfg.hidden_size, idx.shape[-1]
        w1 = declare(self, "w1", normal_init(cfg.init_std), (E, d, I), ("experts", "embed", "mlp"), pdt)
        w3 = declare(self, "w3", normal_init(cfg.init_std), (E, d, I), ("experts", "embed", "mlp"), pdt)
        w2 = declare(self, "w2", normal_init(cfg.init_std), (E, I, d), ("experts", "mlp", "embed"), pdt)
        flat_e = idx.reshape(-1)  # [T*K] expert of each token-expert pair
        order = jnp.argsort(flat_e, stable=True)
        token_of = order // K
        group_sizes = jnp.bincount(flat_e, length=E)
        xs = x.astype(dtype)[token_of]  # [T*K, d] sorted by expert
        gate = grouped_matmul(xs, w1.astype(dtype), group_sizes)  # [T*K, I]
        up = grouped_matmul(xs, w3.astype(dtype), group_sizes)  # [T*K, I]
        h = clamped_swiglu(gate, up, cfg.swiglu_limit)
        h = h * weights.reshape(-1)[order][:, None].astype(dtype)  # routing weight before w2, as the reference
        ys = grouped_matmul(h, w2.astype(dtype), group_sizes)  # [T*K, d]
        return jnp.zeros(x.shape, jnp.float32).at[token_of].add(ys.astype(jnp.float32)).astype(dtype)


class MoE(nn.Module):
    cfg: ModelConfig
    hashed: bool

    @nn.compact
    def __call__(self, x: Float[Array, "b s d"], tokens, token_mask, override=None):
        cfg = self.cfg
        E, K, d = cfg.n_routed_experts, cfg.num_experts_per_tok, cfg.hidden_size
        idx, weights, scores = Router(cfg, self.hashed, name="router")(x, tokens, override)

        B, S = x.shape[:2]
        routed = Experts(cfg, name="experts")(x.reshape(B * S, d), idx.reshape(B * S, K), weights.reshape(B * S, K))
        out = routed.reshape(B, S, d) + SwiGLU(cfg, name="shared")(x)

        real = token_mask.astype(jnp.float32)
        load = jnp.sum(jax.nn.one_hot(idx, E, dtype=jnp.float32) * real[..., None, None], axis=(0, 1, 2))  # [E]
        aux = {"load": load, "balance_loss": sequence_balance_loss(scores, idx, real), "indices": idx,
               "weights": weights}
        return out, aux
