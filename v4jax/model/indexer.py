"""The lightning indexer of CSA layers: scores every visible compressed entry for every query and keeps
the top-k (spec 4.6, hf_reference 3.6).

`score[t, s] = sum_h w[t, h] * relu(qI[t, h] . KI[s]) * c_I^-0.5`, with `w = weights_proj(x) * n_I^-0.5`.
The indexer has its own overlapped compressor at width c_I; its queries come from the same low-rank
latent `cQ` as the attention queries. Selections are discrete (no gradient flows through them).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float

from v4jax import quant
from v4jax.model.compressor import Compressor, entry_visibility
from v4jax.model.config import ModelConfig
from v4jax.model.layers import Dense, dtype_of, rope_tail


def topk_selection(scores: Float[Array, "b s n"], visible: Bool[Array, "b s n"], k: int):
    """Top-k of the visible scores: (indices [B,S,k] with -1 for invalid picks, selection mask [B,S,N])."""
    masked = jnp.where(visible, scores, -jnp.inf)
    vals, idx = jax.lax.top_k(masked, k)
    ok = vals > -jnp.inf
    idx = jnp.where(ok, idx, -1).astype(jnp.int32)
    onehot = jax.nn.one_hot(jnp.where(ok, idx, scores.shape[-1]), scores.shape[-1] + 1, dtype=jnp.bool_)
    return idx, jnp.any(onehot, axis=-2)[..., :-1]


class Indexer(nn.Module):
    """With a QAT policy, q and keys are Hadamard-rotated and fake-quantised and the scores cast to bf16 (spec 7.1, 7.4)."""

    cfg: ModelConfig
    qat: Any = None  # v4jax.quant.QATPolicy or None

    @nn.compact
    def __call__(self, x, q_latent, segment_ids, doc_pos, rope_positions, inv_freq, qat_factor=None):
        cfg = self.cfg
        dtype, pdt = dtype_of(cfg.dtype), dtype_of(cfg.param_dtype)
        nh, hd = cfg.index_n_heads, cfg.index_head_dim
        q = Dense(nh * hd, ("q_lora", "index_heads_flat"), cfg.init_std, dtype, pdt, name="wq_b")(q_latent)
        q = q.reshape(*q.shape[:-1], nh, hd)
        q = rope_tail(q, rope_positions[..., None], inv_freq, cfg.rope_head_dim)  # [B, S, nh, hd]
        keys = Compressor(hd, cfg.csa_ratio, True, cfg.rope_head_dim, cfg.rms_norm_eps, cfg.init_std, pdt,
                          name="compressor")(x, segment_ids, doc_pos, rope_positions, inv_freq)
        kv = keys.values
        if self.qat is not None and self.qat.enabled:
            q, kv = self._quantize_qk(q, kv, qat_factor)
        w = Dense(nh, ("embed", "index_heads"), cfg.init_std, dtype, pdt, name="weights_proj")(x)
        w = w.astype(jnp.float32) * nh ** -0.5  # [B, S, nh]
        qk = jnp.einsum("bshc,bnc->bshn", q.astype(jnp.float32), kv.astype(jnp.float32))  # [B, S, nh, N]
        scores = jnp.einsum("bshn,bsh->bsn", jax.nn.relu(qk) * hd ** -0.5, w)  # [B, S, N]
        if self.qat is not None and self.qat.enabled:  # bf16 index scores, only while QAT is switched on
            on = jnp.asarray(1.0 if qat_factor is None else qat_factor) > 0
            scores = jnp.where(on, quant.cast_index_scores(scores, self.qat), scores)
        visible = entry_visibility(keys, segment_ids)
        k = min(cfg.index_topk, scores.shape[-1])
        if k == 0:  # shorter than one window: nothing to select
            idx, selected = jnp.zeros((*scores.shape[:2], 0), jnp.int32), visible
        else:
            idx, selected = topk_selection(jax.lax.stop_gradient(scores), visible, k)
        stats = {"visible": jnp.sum(visible, -1), "selected": jnp.sum(selected, -1)}
        return idx, selected, stats

    def _quantize_qk(self, q, kv, factor):
        """QAT numerics of the indexer's QK path: Hadamard rotation (orthonormal) then fake-quant.

        With factor 0 (QAT not started) q and keys are left exactly as they are: the rotation changes
        float rounding, which could flip near-tied top-k picks.
        """
        factor = jnp.asarray(1.0 if factor is None else factor, jnp.float32)
        qr, kr = (quant.hadamard(q), quant.hadamard(kv)) if self.qat.hadamard else (q, kv)
        qq = quant.apply_qat(qr, "indexer_q", self.qat, factor)
        kq = quant.apply_qat(kr, "indexer_k", self.qat, factor)
        on = factor > 0
        return jnp.where(on, qq, q), jnp.where(on, kq, kv)
