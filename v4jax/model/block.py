"""One V4 block: mHC -> attention -> mHC -> MoE (spec section 2), and the per-document context all blocks share."""

from __future__ import annotations

from typing import Any, NamedTuple

import flax.linen as nn

from v4jax.model.attention import Attention
from v4jax.model.config import ModelConfig
from v4jax.model.hyperconn import HyperConnection, hc_post
from v4jax.model.layers import RMSNorm, dtype_of
from v4jax.model.moe import MoE


class Context(NamedTuple):
    """Per-call inputs every block reads (broadcast over scanned layers)."""

    tokens: Any            # int32 [B, S] (hash routing)
    segment_ids: Any       # int32 [B, S], 1.. per document, 0 = padding
    doc_pos: Any           # int32 [B, S] position within the document
    rope_positions: Any    # int32 [B, S] positions used by RoPE
    token_mask: Any        # bool [B, S] real (non-padding) tokens
    inv_freq_main: Any     # f32 [r/2] sliding layers
    inv_freq_compress: Any  # f32 [r/2] CSA/HCA layers (YaRN)
    qat_factor: Any = None  # f32 scalar: QAT blend factor (0 = off, 1 = fully fake-quantised)


def hyper_connection(cfg: ModelConfig, name: str) -> HyperConnection:
    return HyperConnection(cfg.hc_mult, cfg.hc_sinkhorn_iters, cfg.hc_eps, cfg.rms_norm_eps, cfg.init_std,
                           cfg.hc_init_alpha, cfg.hc_init_comb_diag, name=name)


class Block(nn.Module):
    cfg: ModelConfig
    kind: str
    hashed: bool
    capture: bool = False
    qat: Any = None  # v4jax.quant.QATPolicy or None

    @nn.compact
    def __call__(self, X, ctx: Context, override=None):
        cfg, pdt = self.cfg, dtype_of(self.cfg.param_dtype)
        y, post, comb = hyper_connection(cfg, "attn_hc")(X)
        a, attn_stats = Attention(cfg, self.kind, self.qat, name="attn")(RMSNorm(cfg.rms_norm_eps, pdt, name="attn_norm")(y), ctx)
        X = hc_post(a, X, post, comb)
        y, post, comb = hyper_connection(cfg, "ffn_hc")(X)
        f, aux = MoE(cfg, self.hashed, self.qat, name="moe")(RMSNorm(cfg.rms_norm_eps, pdt, name="ffn_norm")(y), ctx.tokens,
                                                   ctx.token_mask, override, ctx.qat_factor)
        X = hc_post(f, X, post, comb)
        if attn_stats:
            aux["indexer"] = attn_stats
        if self.capture:
            aux.update(attn_out=a, moe_out=f, layer_out=X)
        return X, aux
