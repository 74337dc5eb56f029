"""Checkpoint key vocabularies -> one canonical (HF-style, no `model.` prefix) name per tensor.

Three layouts are seen in the wild (hf_reference 2.1): HF module names, upstream DeepSeek names, and
`save_pretrained`'s mixture (upstream leaf names with a `model.` prefix). MTP tensors (`mtp.K.*`,
upstream only) map to `mtp.K.*` with the block's parts renamed like a layer's. FP8/FP4 scales
(`X.scale` upstream, `X.weight_scale_inv` HF) become `X.weight_scale_inv`.
"""

from __future__ import annotations

import re

# upstream suffix (inside a layer / mtp block) -> HF suffix
_LAYER_RENAMES = [
    (r"attn_norm\.weight", "input_layernorm.weight"),
    (r"ffn_norm\.weight", "post_attention_layernorm.weight"),
    (r"hc_attn_(fn|base|scale)", r"attn_hc.\1"),
    (r"hc_ffn_(fn|base|scale)", r"ffn_hc.\1"),
    (r"attn\.attn_sink", "self_attn.sinks"),
    (r"attn\.wq_a\.(weight|scale)", r"self_attn.q_a_proj.\1"),
    (r"attn\.q_norm\.weight", "self_attn.q_a_norm.weight"),
    (r"attn\.wq_b\.(weight|scale)", r"self_attn.q_b_proj.\1"),
    (r"attn\.wkv\.(weight|scale)", r"self_attn.kv_proj.\1"),
    (r"attn\.(?:kv_)?norm\.weight", "self_attn.kv_norm.weight"),
    (r"attn\.wo_a\.(weight|scale)", r"self_attn.o_a_proj.\1"),
    (r"attn\.wo_b\.(weight|scale)", r"self_attn.o_b_proj.\1"),
    (r"attn\.compressor\.wkv\.weight", "self_attn.compressor.kv_proj.weight"),
    (r"attn\.compressor\.wgate\.weight", "self_attn.compressor.gate_proj.weight"),
    (r"attn\.compressor\.norm\.weight", "self_attn.compressor.kv_norm.weight"),
    (r"attn\.compressor\.ape", "self_attn.compressor.position_bias"),
    (r"attn\.indexer\.compressor\.wkv\.weight", "self_attn.compressor.indexer.kv_proj.weight"),
    (r"attn\.indexer\.compressor\.wgate\.weight", "self_attn.compressor.indexer.gate_proj.weight"),
    (r"attn\.indexer\.compressor\.norm\.weight", "self_attn.compressor.indexer.kv_norm.weight"),
    (r"attn\.indexer\.compressor\.ape", "self_attn.compressor.indexer.position_bias"),
    (r"attn\.indexer\.wq_b\.(weight|scale)", r"self_attn.compressor.indexer.q_b_proj.\1"),
    (r"attn\.indexer\.weights_proj\.weight", "self_attn.compressor.indexer.scorer.weights_proj.weight"),
    (r"ffn\.gate\.weight", "mlp.gate.weight"),
    (r"ffn\.gate\.bias", "mlp.gate.e_score_correction_bias"),
    (r"ffn\.gate\.tid2eid", "mlp.gate.tid2eid"),
    (r"ffn\.shared_experts\.w1\.(weight|scale)", r"mlp.shared_experts.gate_proj.\1"),
    (r"ffn\.shared_experts\.w2\.(weight|scale)", r"mlp.shared_experts.down_proj.\1"),
    (r"ffn\.shared_experts\.w3\.(weight|scale)", r"mlp.shared_experts.up_proj.\1"),
    (r"ffn\.experts\.(\d+)\.(w[123])\.(weight|scale)", r"mlp.experts.\1.\2.\3"),
]
_LAYER_RENAMES = [(re.compile(a + "$"), b) for a, b in _LAYER_RENAMES]
_TOP_RENAMES = [
    (re.compile(r"embed\.weight$"), "embed_tokens.weight"),
    (re.compile(r"head\.weight$"), "lm_head.weight"),
    (re.compile(r"hc_head_(fn|base|scale)$"), r"hc_head.hc_\1"),
]
_MTP_OWN = re.compile(r"(e_proj|h_proj)\.(weight|scale)$|(enorm|hnorm|norm)\.weight$|hc_head_(fn|base|scale)$"
                      r"|hc_head\.hc_(fn|base|scale)$")


def canonical_name(name: str, num_layers: int) -> str:
    """The canonical name of a stored tensor key (any of the three layouts)."""
    name = name.removeprefix("model.")
    m = re.match(r"(layers|mtp)\.(\d+)\.(.*)$", name)
    if m:
        kind, idx, rest = m.group(1), int(m.group(2)), m.group(3)
        if kind == "mtp" and rest.startswith("block."):  # already canonical (v4jax's own export)
            return _scale_name(f"mtp.{idx}.{rest}")
        if kind == "mtp" and _MTP_OWN.match(rest):
            rest = re.sub(r"^hc_head_(fn|base|scale)$", r"hc_head.hc_\1", rest)
            return _scale_name(f"mtp.{idx}.{rest}")
        for pat, rep in _LAYER_RENAMES:
            if pat.fullmatch(rest):
                rest = pat.sub(rep, rest)
                break
        prefix = f"mtp.{idx}.block" if kind == "mtp" else f"layers.{idx}"
        return _scale_name(f"{prefix}.{rest}")
    for pat, rep in _TOP_RENAMES:
        if pat.fullmatch(name):
            return pat.sub(rep, name)
    return name


def _scale_name(name: str) -> str:
    """`X.scale` of a quantised linear -> `X.weight_scale_inv` (mHC `attn_hc.scale` is not a linear's scale)."""
    if name.endswith(".scale") and not re.search(r"(attn_hc|ffn_hc)\.scale$", name):
        return name[: -len(".scale")] + ".weight_scale_inv"
    return name
