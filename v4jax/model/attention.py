"""Shared-KV multi-query attention of every V4 layer: a sliding window over raw tokens, plus (CSA) the
indexer's top-k compressed entries or (HCA) every visible compressed entry, in one softmax with a
per-head sink (spec 4.1-4.8, hf_reference 3.4).

One 512-d vector per token serves as both key and value (K = V, roped), the query is low rank with an
unweighted per-head RMSNorm, the rope slice of the output is de-rotated at the query position, and the
output projection is grouped (block-diagonal `wo_a`, then `wo_b`).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from v4jax.model.compressor import Compressor, entry_visibility
from v4jax.model.config import ModelConfig
from v4jax.model.indexer import Indexer
from v4jax.model.layers import (
    Dense,
    RMSNorm,
    declare,
    dtype_of,
    rms_normalize,
    rope_tail,
)


def window_mask(segment_ids, window: int):
    """[B, S, S]: key s visible to query t iff t - window < s <= t, in the same document."""
    t = jnp.arange(segment_ids.shape[1])
    band = (t[:, None] >= t[None, :]) & (t[:, None] - t[None, :] < window)
    return band[None] & (segment_ids[:, :, None] == segment_ids[:, None, :])


class Attention(nn.Module):
    cfg: ModelConfig
    kind: str  # "sliding" | "csa" | "hca"
    qat: Any = None  # v4jax.quant.QATPolicy or None

    @nn.compact
    def __call__(self, x: Float[Array, "b s d"], ctx) -> tuple[Float[Array, "b s d"], dict]:
        cfg, kind = self.cfg, self.kind
        dtype, pdt = dtype_of(cfg.dtype), dtype_of(cfg.param_dtype)
        H, c, r, std = cfg.num_heads, cfg.head_dim, cfg.rope_head_dim, cfg.init_std
        inv_freq = ctx.inv_freq_main if kind == "sliding" else ctx.inv_freq_compress
        pos = ctx.rope_positions

        q_latent = RMSNorm(cfg.rms_norm_eps, pdt, name="q_norm")(
            Dense(cfg.q_lora_rank, ("embed", "q_lora"), std, dtype, pdt, name="wq_a")(x))
        q = Dense(H * c, ("q_lora", "heads_flat"), std, dtype, pdt, name="wq_b")(q_latent)
        q = rms_normalize(q.reshape(*q.shape[:-1], H, c), cfg.rms_norm_eps).astype(dtype)  # [B, S, H, c]
        q = rope_tail(q, pos[..., None], inv_freq, r)
        kv = RMSNorm(cfg.rms_norm_eps, pdt, name="kv_norm")(Dense(c, ("embed", "kv"), std, dtype, pdt, name="wkv")(x))
        kv = rope_tail(kv, pos, inv_freq, r)  # [B, S, c]: one shared head, key and value at once
        sink = declare(self, "sink", nn.initializers.zeros, (H,), ("heads",), jnp.float32)

        scale = c ** -0.5
        logits = [jnp.einsum("bshc,btc->bhst", q, kv).astype(jnp.float32) * scale]  # [B, H, S, S]
        masks = [window_mask(ctx.segment_ids, cfg.sliding_window)]
        values = [kv]
        stats = {}
        ratio = cfg.ratio(kind)
        if kind != "sliding":  # (parameters exist whatever the length; a sequence shorter than one window has no entries)
            entries = Compressor(c, ratio, kind == "csa", r, cfg.rms_norm_eps, std, pdt, name="compressor")(
                x, ctx.segment_ids, ctx.doc_pos, pos, inv_freq)
            if kind == "csa":
                idx, mask, stats = Indexer(cfg, self.qat, name="indexer")(x, q_latent, ctx.segment_ids, ctx.doc_pos, pos, inv_freq,
                                                                ctx.qat_factor)
                stats = dict(stats, indices=idx)
            else:
                mask = entry_visibility(entries, ctx.segment_ids)
            if entries.values.shape[1] > 0:
                logits.append(jnp.einsum("bshc,bnc->bhsn", q, entries.values.astype(dtype)).astype(jnp.float32) * scale)
                masks.append(mask)  # [B, S, N]
                values.append(entries.values.astype(dtype))
        logits = jnp.concatenate([jnp.where(m[:, None], lg, -jnp.inf) for m, lg in zip(masks, logits)], axis=-1)
        sink_logit = jnp.broadcast_to(sink[None, :, None, None], (*logits.shape[:-1], 1))
        probs = jax.nn.softmax(jnp.concatenate([logits, sink_logit], -1), axis=-1)[..., :-1]  # sink has no value
        out = jnp.einsum("bhsj,bjc->bshc", probs.astype(dtype), jnp.concatenate(values, 1))  # [B, S, H, c]
        out = rope_tail(out, pos[..., None], inv_freq, r, inverse=True)

        g = cfg.o_groups
        out = out.reshape(*out.shape[:2], g, H * c // g)  # consecutive heads form a group
        wo_a = declare(self, "wo_a", nn.initializers.normal(std), (g, H * c // g, cfg.o_lora_rank),
                       ("o_groups", "heads_flat_group", "o_lora"), pdt)
        out = jnp.einsum("bsgi,gio->bsgo", out, wo_a.astype(dtype))  # [B, S, g, d_g]
        out = out.reshape(*out.shape[:2], g * cfg.o_lora_rank)
        return Dense(cfg.hidden_size, ("o_lora_flat", "embed"), std, dtype, pdt, name="wo_b")(out), stats
