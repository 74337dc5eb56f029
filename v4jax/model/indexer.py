"""The lightning indexer of CSA layers: scores every visible compressed entry for every query and keeps
the top-k (spec 4.6, hf_reference 3.6).

`score[t, s] = sum_h w[t, h] * relu(qI[t, h] . KI[s]) * c_I^-0.5`, with `w = weights_proj(x) * n_I^-0.5`.
The indexer has its own overlapped compressor at width c_I; its queries come from the same low-rank
latent `cQ` as the attention queries. Selections are discrete (no gradient flows through them).

Scores and top-k run in `v4jax.kernels.indexer.indexer_topk` (backend: `config.model.indexer_impl`),
with `c_I^-0.5` folded into the head weights and the compressor's compacted entries passed as per-entry
ends and segments, so the kernel's visibility is exactly `entry_visibility`. q and keys go in as fp32
(the model's numerics: fp32 products, fp32 scores; bf16 scores while QAT is on). The order of the picks
within a row depends on the backend (xla: by decreasing score, triton: by increasing index).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

from v4jax import quant
from v4jax.kernels import indexer as indexer_kernels
from v4jax.model.compressor import Compressor, Entries, entry_visibility
from v4jax.model.config import ModelConfig
from v4jax.model.layers import Dense, dtype_of, rope_tail


def selection_mask(idx: Int[Array, "b s k"], n: int) -> Bool[Array, "b s n"]:
    """The picks as a mask over the N entries (-1 = no pick)."""
    b, s, _ = idx.shape
    rows = jnp.zeros((b, s, n + 1), jnp.bool_)
    bi, si = jnp.arange(b)[:, None, None], jnp.arange(s)[None, :, None]
    return rows.at[bi, si, jnp.where(idx < 0, n, idx)].set(True)[..., :n]


def select_topk(q: Float[Array, "b s h c"], w: Float[Array, "b s h"], entries: Entries,
                segment_ids: Int[Array, "b s"], k: int, ratio: int, cfg: ModelConfig, bf16_scores=None):
    """Top-k entries per query through the kernel api: idx [B,S,k] (-1 for no pick), no gradient.

    score = sum_h w relu(q . key) with entries visible as in `entry_visibility` (unused slots get an end
    past the sequence). `bf16_scores`: None (fp32 scores) or a traced bool; when true the top-k sees
    the scores rounded to bf16 (one `lax.cond`, so only one branch runs).
    """
    q, w, kv = (jax.lax.stop_gradient(a.astype(jnp.float32)) for a in (q, w, entries.values))
    end = jnp.where(entries.valid, entries.end, q.shape[1])  # [B, N]: unused slots are never visible
    impl = None if cfg.indexer_impl == "auto" else cfg.indexer_impl

    def run(score_dtype):
        idx, _ = indexer_kernels.indexer_topk(q, w, kv, k, ratio, (segment_ids, entries.segment),
                                              implementation=impl, interpret=cfg.indexer_interpret,
                                              entry_end=end, score_dtype=score_dtype)
        return idx

    if bf16_scores is None:
        return run(jnp.float32)
    return jax.lax.cond(bf16_scores, lambda: run(jnp.bfloat16), lambda: run(jnp.float32))


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
        bf16_scores = None
        if self.qat is not None and self.qat.enabled:
            q, kv = self._quantize_qk(q, kv, qat_factor)
            keys = keys._replace(values=kv)
            if self.qat.index_scores_bf16:  # bf16 index scores, only while QAT is switched on
                bf16_scores = jnp.asarray(1.0 if qat_factor is None else qat_factor) > 0
        w = Dense(nh, ("embed", "index_heads"), cfg.init_std, dtype, pdt, name="weights_proj")(x)
        w = w.astype(jnp.float32) * (nh ** -0.5 * hd ** -0.5)  # [B, S, nh]: both scales folded into w
        visible = entry_visibility(keys, segment_ids)
        n = kv.shape[1]
        k = min(cfg.index_topk, n)
        if k == 0:  # shorter than one window: nothing to select
            idx, selected = jnp.zeros((*q.shape[:2], 0), jnp.int32), visible
        else:
            idx = select_topk(q, w, keys, segment_ids, k, cfg.csa_ratio, cfg, bf16_scores)
            selected = selection_mask(idx, n)
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
