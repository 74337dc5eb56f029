"""DeepSeekMoE: sqrt-softplus router with an aux-loss-free selection bias (or a frozen token->experts hash
table in the first layers), routed experts and one shared expert, all SwiGLU with clamping
(spec 5.1-5.3, hf_reference 3.7).

Routing runs in float32. The bias only affects which experts are selected; the combine weights are the
unbiased affinities of the K picks, renormalised and multiplied by `routed_scaling_factor`. Routed experts
run as grouped GEMMs over token-expert pairs sorted by expert (dropless), through
`v4jax.kernels.grouped_matmul`.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Int

from v4jax import quant
from v4jax.kernels.fp4_matmul.planar import FUSED_MAX_SCALE, PlanarMXFP4, as_qarray
from v4jax.kernels.grouped_matmul import grouped_matmul
from v4jax.kernels.grouped_matmul.api import is_packed_fp4
from v4jax.model.config import ModelConfig
from v4jax.model.layers import Dense, declare, dtype_of, normal_init
from v4jax.parallel.expert import expert_parallel_active, routed_experts_parallel


def clamped_swiglu(gate, up, limit: float):
    """silu(min(gate, L)) * clip(up, -L, L); `limit <= 0` disables the clamp."""
    if limit > 0:
        gate, up = jnp.minimum(gate, limit), jnp.clip(up, -limit, limit)
    return jax.nn.silu(gate) * up


def sequence_balance_loss(
    scores: Float[Array, "B S E"],
    indices: Int[Array, "B S K"],
    mask: Bool[Array, "B S"] | Float[Array, "B S"] | None = None,
) -> Float[Array, ""]:
    """Sequence-wise balance loss sum_i f_i P_i (spec §5.3), averaged over sequences with tokens.

    f_i = E / (K T) * #{t : i in TopK_t},  P_i = (1/T) sum_t s_{i,t} / sum_j s_{j,t}, with T the
    sequence's valid tokens (`mask`; padding excluded) and `scores` the sqrt-softplus affinities
    (without the balancing bias). Perfect balance with uniform scores gives 1.
    """
    n_experts, top_k = scores.shape[-1], indices.shape[-1]
    valid = (jnp.ones(scores.shape[:2]) if mask is None else mask).astype(jnp.float32)  # [B, S]
    tokens = jnp.sum(valid, axis=-1)  # [B]
    safe_tokens = jnp.maximum(tokens, 1.0)
    scores = scores.astype(jnp.float32)
    normalised = scores / jnp.maximum(jnp.sum(scores, axis=-1, keepdims=True), 1e-20)  # [B, S, E]
    selected = jnp.sum(jax.nn.one_hot(indices, n_experts, dtype=jnp.float32), axis=-2)  # [B, S, E]
    counts = jnp.einsum("bse,bs->be", selected, valid)  # [B, E]
    f = counts * (n_experts / top_k) / safe_tokens[:, None]  # [B, E]
    p = jnp.einsum("bse,bs->be", normalised, valid) / safe_tokens[:, None]  # [B, E]
    per_sequence = jnp.sum(f * p, axis=-1)  # [B]
    has_tokens = (tokens > 0).astype(jnp.float32)  # [B]
    return jnp.sum(per_sequence * has_tokens) / jnp.maximum(jnp.sum(has_tokens), 1.0)


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


PACKED_SUFFIX, SCALE_SUFFIX = "_fp4", "_fp4_scale"  # packed MXFP4 expert leaves (see v4jax.infer.fp4)
# the same in the Hopper kernel's load-time layout (`fp4_matmul.PlanarMXFP4`, `v4jax.infer.fp4.planarize_experts`)
PLANAR_SUFFIX, PLANAR_SCALE_SUFFIX = "_fp4_planar", "_fp4_planar_scale"


class Experts(nn.Module):
    """The routed experts, stacked [E, ...], run as grouped GEMMs over token-expert pairs sorted by expert.

    Weights may be float arrays (training; fake-quantised along their input axis when a QAT policy is on)
    or packed MXFP4 leaves (inference, `v4jax.infer.fp4.pack_experts`), stored [E, out, in/2] in the FP4
    kernels' layout and handed to `grouped_matmul` as `QArray`s (or `PlanarMXFP4`s, for leaves converted by
    `planarize_experts`), so the GEMMs run on the packed bytes (`v4jax.kernels.fp4_matmul`, backend
    `config.model.fp4_impl`).
    Under an active multi-device mesh (`jax.set_mesh`) the same computation runs expert-parallel through
    `v4jax.parallel.expert.routed_experts_parallel`; otherwise the single-device path below.
    """

    cfg: ModelConfig
    qat: Any = None  # v4jax.quant.QATPolicy or None

    @nn.compact
    def __call__(self, x: Float[Array, "t d"], idx: Int[Array, "t k"], weights: Float[Array, "t k"], qat_factor=None):
        cfg = self.cfg
        dtype = dtype_of(cfg.dtype)
        E, I, d, K = cfg.n_routed_experts, cfg.moe_intermediate_size, cfg.hidden_size, idx.shape[-1]
        w1 = self._weight("w1", (E, d, I), ("experts", "embed", "mlp"), qat_factor)
        w3 = self._weight("w3", (E, d, I), ("experts", "embed", "mlp"), qat_factor)
        w2 = self._weight("w2", (E, I, d), ("experts", "mlp", "embed"), qat_factor)
        if expert_parallel_active():  # a multi-device mesh is set: dispatch under shard_map (v4jax.parallel)
            activation = functools.partial(clamped_swiglu, limit=cfg.swiglu_limit)
            w1, w3, w2 = (_as_float(w, dtype) for w in (w1, w3, w2))
            return routed_experts_parallel(x.astype(dtype), idx, weights, w1, w3, w2, activation).astype(dtype)
        impl = None if cfg.fp4_impl == "auto" else cfg.fp4_impl

        def gmm(a, w, sizes):  # fp4_impl picks the backend of packed weights only; float ones: the api's choice
            if is_packed_fp4(w):
                return grouped_matmul(a, w, sizes, implementation=impl, interpret=cfg.fp4_interpret)
            return grouped_matmul(a, w, sizes)

        flat_e = idx.reshape(-1)  # [T*K] expert of each token-expert pair
        order = jnp.argsort(flat_e, stable=True)
        token_of = order // K
        group_sizes = jnp.bincount(flat_e, length=E)
        xs = x.astype(dtype)[token_of]  # [T*K, d] sorted by expert
        gate = gmm(xs, _cast(w1, dtype), group_sizes)  # [T*K, I]
        up = gmm(xs, _cast(w3, dtype), group_sizes)  # [T*K, I]
        h = clamped_swiglu(gate, up, cfg.swiglu_limit)
        h = h * weights.reshape(-1)[order][:, None].astype(dtype)  # routing weight before w2, as the reference
        ys = gmm(h, _cast(w2, dtype), group_sizes)  # [T*K, d]
        return jnp.zeros(x.shape, jnp.float32).at[token_of].add(ys.astype(jnp.float32)).astype(dtype)

    def _weight(self, name, shape, axes, qat_factor):
        """The expert tensor `name`: a float array [E, in, out], or for packed FP4 leaves a `QArray` of its
        transpose [E, out, in] quantised along `in` (the layout the FP4 kernels read, no copy per call), or
        for planar leaves the same numbers as a `PlanarMXFP4`."""
        if self.has_variable("params", name + PLANAR_SUFFIX):
            e, d_in, d_out = shape
            # the scales are traced here, so their bound comes from the config (`fp4_fused_decode`)
            return PlanarMXFP4(values=self.get_variable("params", name + PLANAR_SUFFIX),
                               scales=self.get_variable("params", name + PLANAR_SCALE_SUFFIX),
                               shape=(e, d_out, d_in), dtype=np.dtype(np.float32),
                               max_scale=FUSED_MAX_SCALE if self.cfg.fp4_fused_decode else None)
        if self.has_variable("params", name + PACKED_SUFFIX):
            e, d_in, d_out = shape
            return quant.QArray(values=self.get_variable("params", name + PACKED_SUFFIX),
                                scales=self.get_variable("params", name + SCALE_SUFFIX), global_scale=None,
                                fmt=quant.get_format("mxfp4"), shape=(e, d_out, d_in),
                                dtype=np.dtype(np.float32), axis=2)
        w = declare(self, name, normal_init(self.cfg.init_std), shape, axes, dtype_of(self.cfg.param_dtype))
        if self.qat is not None and self.qat.enabled:
            # MXFP4 blocks run along each expert matrix's input axis (K), as in the released checkpoints
            return quant.apply_qat(w, "experts", self.qat, 1.0 if qat_factor is None else qat_factor, axis=-2)
        return w


def _cast(w, dtype):
    """Float weights to the compute dtype; packed FP4 weights stay packed (the kernels decode them)."""
    return w if is_packed_fp4(w) else w.astype(dtype)


def _as_float(w, dtype) -> jax.Array:
    """Expert weights as a float [E, in, out] array (the expert-parallel path dequantises packed ones)."""
    if is_packed_fp4(w):
        return jnp.swapaxes(quant.dequantize(as_qarray(w)), -1, -2).astype(dtype)  # [E, out, in] -> [E, in, out]
    return w.astype(dtype)


class MoE(nn.Module):
    cfg: ModelConfig
    hashed: bool
    qat: Any = None  # v4jax.quant.QATPolicy or None

    @nn.compact
    def __call__(self, x: Float[Array, "b s d"], tokens, token_mask, override=None, qat_factor=None):
        cfg = self.cfg
        E, K, d = cfg.n_routed_experts, cfg.num_experts_per_tok, cfg.hidden_size
        idx, weights, scores = Router(cfg, self.hashed, name="router")(x, tokens, override)

        B, S = x.shape[:2]
        routed = Experts(cfg, self.qat, name="experts")(x.reshape(B * S, d), idx.reshape(B * S, K),
                                                 weights.reshape(B * S, K), qat_factor)
        out = routed.reshape(B, S, d) + SwiGLU(cfg, name="shared")(x)

        real = token_mask.astype(jnp.float32)
        load = jnp.sum(jax.nn.one_hot(idx, E, dtype=jnp.float32) * real[..., None, None], axis=(0, 1, 2))  # [E]
        aux = {"load": load, "balance_loss": sequence_balance_loss(scores, idx, real), "indices": idx,
               "weights": weights}
        return out, aux
