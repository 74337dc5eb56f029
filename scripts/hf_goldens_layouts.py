"""Checkpoint layouts for the HF golden files: upstream DeepSeek names, FP8/FP4 quantisation, shards.

Used only by `scripts/hf_goldens.py` (torch side, `.venv-hf`). Written from the format description
in /work/shared/spec/hf_reference.md sections 2.1 and 5; every layout written here is read back
by HF `from_pretrained` in the driver, which is the check that the renames and formats are right.
"""

from __future__ import annotations

import json
import math
import os
import re

import torch
from safetensors.torch import save_file

# HF name (after stripping the "model." prefix) -> upstream name; first match wins.
_LAYER_RENAMES = [
    (r"input_layernorm\.weight$", "attn_norm.weight"),
    (r"post_attention_layernorm\.weight$", "ffn_norm.weight"),
    (r"attn_hc\.(fn|base|scale)$", r"hc_attn_\1"),
    (r"ffn_hc\.(fn|base|scale)$", r"hc_ffn_\1"),
    (r"self_attn\.sinks$", "attn.attn_sink"),
    (r"self_attn\.q_a_proj\.", "attn.wq_a."),
    (r"self_attn\.q_a_norm\.", "attn.q_norm."),
    (r"self_attn\.q_b_proj\.", "attn.wq_b."),
    (r"self_attn\.kv_proj\.", "attn.wkv."),
    (r"self_attn\.kv_norm\.", "attn.norm."),
    (r"self_attn\.o_a_proj\.", "attn.wo_a."),
    (r"self_attn\.o_b_proj\.", "attn.wo_b."),
    (r"self_attn\.compressor\.indexer\.q_b_proj\.", "attn.indexer.wq_b."),
    (r"self_attn\.compressor\.indexer\.scorer\.weights_proj\.", "attn.indexer.weights_proj."),
    (r"self_attn\.compressor\.indexer\.kv_proj\.", "attn.indexer.compressor.wkv."),
    (r"self_attn\.compressor\.indexer\.gate_proj\.", "attn.indexer.compressor.wgate."),
    (r"self_attn\.compressor\.indexer\.kv_norm\.", "attn.indexer.compressor.norm."),
    (r"self_attn\.compressor\.indexer\.position_bias$", "attn.indexer.compressor.ape"),
    (r"self_attn\.compressor\.kv_proj\.", "attn.compressor.wkv."),
    (r"self_attn\.compressor\.gate_proj\.", "attn.compressor.wgate."),
    (r"self_attn\.compressor\.kv_norm\.", "attn.compressor.norm."),
    (r"self_attn\.compressor\.position_bias$", "attn.compressor.ape"),
    (r"mlp\.gate\.weight$", "ffn.gate.weight"),
    (r"mlp\.gate\.e_score_correction_bias$", "ffn.gate.bias"),
    (r"mlp\.gate\.tid2eid$", "ffn.gate.tid2eid"),
    (r"mlp\.shared_experts\.gate_proj\.", "ffn.shared_experts.w1."),
    (r"mlp\.shared_experts\.up_proj\.", "ffn.shared_experts.w3."),
    (r"mlp\.shared_experts\.down_proj\.", "ffn.shared_experts.w2."),
]
_TOP_RENAMES = {
    "model.embed_tokens.weight": "embed.weight",
    "lm_head.weight": "head.weight",
    "model.norm.weight": "norm.weight",
    "model.hc_head.hc_fn": "hc_head_fn",
    "model.hc_head.hc_base": "hc_head_base",
    "model.hc_head.hc_scale": "hc_head_scale",
}


def upstream_name(hf_name: str, layer_prefix: str = "layers") -> str:
    """Upstream DeepSeek name of one HF tensor (not the stacked experts, see `to_upstream`)."""
    if hf_name in _TOP_RENAMES:
        return _TOP_RENAMES[hf_name]
    match = re.match(r"model\.layers\.(\d+)\.(.+)$", hf_name)
    if match is None:
        raise ValueError(f"upstream_name: unexpected HF tensor name {hf_name}")
    layer, rest = match.group(1), match.group(2)
    for pattern, repl in _LAYER_RENAMES:
        if re.search(pattern, rest):
            return f"{layer_prefix}.{layer}.{re.sub(pattern, repl, rest)}"
    raise ValueError(f"upstream_name: no rename rule for {hf_name}")


def _expert_names(hf_name: str, layer_prefix: str, n_experts: int, leaves: tuple) -> list:
    head = hf_name.replace("model.layers.", f"{layer_prefix}.").rsplit(".mlp.", 1)[0]
    return [[f"{head}.ffn.experts.{e}.{leaf}.weight" for leaf in leaves] for e in range(n_experts)]


def to_upstream(hf_state: dict, layer_prefix: str = "layers") -> dict:
    """HF state dict -> upstream DeepSeek names (experts unstacked into per-expert w1/w2/w3).

    `layer_prefix` replaces `layers` in the output (use `mtp` to turn layer 0 of a one-layer model
    into the `mtp.0.*` block).
    """
    out = {}
    for name, tensor in hf_state.items():
        if name.endswith("mlp.experts.gate_up_proj"):  # [E, 2I, D] = [w1; w3] per expert
            inter = tensor.shape[1] // 2
            for e, (w1, w3) in enumerate(_expert_names(name, layer_prefix, tensor.shape[0], ("w1", "w3"))):
                out[w1], out[w3] = tensor[e, :inter].contiguous(), tensor[e, inter:].contiguous()
        elif name.endswith("mlp.experts.down_proj"):  # [E, D, I]
            for e, (w2,) in enumerate(_expert_names(name, layer_prefix, tensor.shape[0], ("w2",))):
                out[w2] = tensor[e].contiguous()
        else:
            out[upstream_name(name, layer_prefix)] = tensor
    return out


def from_upstream(upstream: dict, hf_names: dict) -> dict:
    """Inverse of `to_upstream` for the HF names in `hf_names` (name -> reference tensor)."""
    out = {}
    for name, ref in hf_names.items():
        if name.endswith("mlp.experts.gate_up_proj"):
            pairs = _expert_names(name, "layers", ref.shape[0], ("w1", "w3"))
            out[name] = torch.stack([torch.cat([upstream[a], upstream[b]]) for a, b in pairs])
        elif name.endswith("mlp.experts.down_proj"):
            out[name] = torch.stack([upstream[a] for (a,) in _expert_names(name, "layers", ref.shape[0], ("w2",))])
        else:
            out[name] = upstream[upstream_name(name)]
        out[name] = out[name].to(ref.dtype)
    return out


# ----------------------------------------------------------------------------------------------
# FP8 (e4m3, 128x128 blocks, ue8m0 scales) and FP4 (e2m1, 1x32 blocks, ue8m0 scales)

FP8_MAX = 448.0
FP4_MAX = 6.0
_FP4_GRID = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])


def _pow2_ceil(x: torch.Tensor) -> torch.Tensor:
    """2**ceil(log2(x)) exactly (frexp avoids log2 rounding at exact powers of two)."""
    mantissa, exponent = torch.frexp(x)  # x = mantissa * 2**exponent, mantissa in [0.5, 1)
    exponent = torch.where(mantissa == 0.5, exponent - 1, exponent)
    return torch.ldexp(torch.ones_like(x), exponent)


def quantize_fp8_block(weight: torch.Tensor, block: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """[out, in] fp32 -> (float8_e4m3fn [out, in], float8_e8m0fnu scale [ceil(out/128), ceil(in/128)]).

    Per block: s = 2**ceil(log2(amax / 448)), q = RNE(w / s). Dequant multiplies: w ~= q * s.
    """
    out_dim, in_dim = weight.shape
    rows, cols = math.ceil(out_dim / block), math.ceil(in_dim / block)
    padded = torch.zeros(rows * block, cols * block, dtype=torch.float32)
    padded[:out_dim, :in_dim] = weight.float()
    amax = padded.view(rows, block, cols, block).abs().amax(dim=(1, 3))  # [rows, cols]
    scale = _pow2_ceil(torch.clamp(amax, min=FP8_MAX * 2.0**-126) / FP8_MAX)
    expanded = scale.repeat_interleave(block, 0).repeat_interleave(block, 1)[:out_dim, :in_dim]
    q = (weight.float() / expanded).to(torch.float8_e4m3fn)
    return q, scale.to(torch.float8_e8m0fnu)


def dequantize_fp8_block(q: torch.Tensor, scale: torch.Tensor, block: int = 128) -> torch.Tensor:
    """Inverse of `quantize_fp8_block` (fp32)."""
    s = scale.float().repeat_interleave(block, 0).repeat_interleave(block, 1)
    return q.float() * s[: q.shape[0], : q.shape[1]]


def _fp4_codes(v: torch.Tensor) -> torch.Tensor:
    """fp32 -> e2m1 4-bit codes (sign bit 8), round to nearest, ties to the even code, saturate at 6."""
    mag = v.abs().clamp(max=FP4_MAX)
    dist = (mag.unsqueeze(-1) - _FP4_GRID).abs()  # [..., 8]
    best = dist.min(dim=-1, keepdim=True).values
    # among equally near grid points prefer the even code (the even mantissa): penalise odd codes
    tie_break = (torch.arange(8) % 2).float() * 1e-3
    code = torch.where(dist == best, tie_break, torch.full_like(dist, 1.0)).argmin(dim=-1)
    return code + 8 * (v < 0).long()


def quantize_fp4_block(weight: torch.Tensor, block: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """[out, in] fp32 -> (uint8 packed [out, in/2], float8_e8m0fnu scale [out, in/32]).

    Per 1x32 block: s = 2**ceil(log2(max(amax, 6*2**-126) / 6)); element 2i in the LOW nibble.
    """
    out_dim, in_dim = weight.shape
    if in_dim % block:
        raise ValueError(f"quantize_fp4_block: in dim {in_dim} not a multiple of {block}")
    blocks = weight.float().view(out_dim, in_dim // block, block)
    amax = blocks.abs().amax(dim=-1)  # [out, in/32]
    scale = _pow2_ceil(torch.clamp(amax, min=FP4_MAX * 2.0**-126) / FP4_MAX)
    codes = _fp4_codes(blocks / scale.unsqueeze(-1)).view(out_dim, in_dim)
    packed = (codes[:, 0::2] | (codes[:, 1::2] << 4)).to(torch.uint8)
    return packed, scale.to(torch.float8_e8m0fnu)


def dequantize_fp4_block(packed: torch.Tensor, scale: torch.Tensor, block: int = 32) -> torch.Tensor:
    """Inverse of `quantize_fp4_block` (fp32 [out, in])."""
    lut = torch.cat([_FP4_GRID, -_FP4_GRID])
    low, high = (packed & 0xF).long(), (packed >> 4).long()
    values = torch.stack([lut[low], lut[high]], dim=-1).view(packed.shape[0], -1)
    return values * scale.float().repeat_interleave(block, 1)


_FP8_LEAVES = re.compile(
    r"(attn\.(wq_a|wq_b|wkv|wo_a|wo_b)|ffn\.shared_experts\.w[123]|attn\.indexer\.wq_b|e_proj|h_proj)\.weight$"
)
_FP4_LEAVES = re.compile(r"ffn\.experts\.\d+\.w[123]\.weight$")
_FP32_LEAVES = re.compile(r"(hc_\w+_(fn|base|scale)|attn_sink|\.ape|ffn\.gate\.bias)$")


def quantize_upstream(state: dict) -> tuple[dict, dict]:
    """Upstream fp32 state -> (FP8/FP4 checkpoint tensors, the fp32 dequantised weights by name).

    Dense linears: FP8 + `X.scale`; routed experts: packed FP4 (uint8 viewed as int8) + `X.scale`;
    hc_*, attn_sink, ape, gate.bias: fp32; tid2eid: int32; everything else bf16 (spec section 5).
    The second dict holds exactly what a correct loader must reconstruct (for the HF golden model).
    """
    stored, dequant = {}, {}
    for name, tensor in state.items():
        if _FP8_LEAVES.search(name):
            q, s = quantize_fp8_block(tensor)
            stored[name], stored[name[: -len("weight")] + "scale"] = q, s
            dequant[name] = dequantize_fp8_block(q, s)
        elif _FP4_LEAVES.search(name):
            packed, s = quantize_fp4_block(tensor)
            stored[name], stored[name[: -len("weight")] + "scale"] = packed.view(torch.int8), s
            dequant[name] = dequantize_fp4_block(packed, s)
        elif name.endswith("tid2eid"):
            stored[name] = tensor.to(torch.int32)
            dequant[name] = tensor
        elif _FP32_LEAVES.search(name):
            stored[name] = tensor.float().contiguous()
            dequant[name] = stored[name]
        else:
            stored[name] = tensor.to(torch.bfloat16).contiguous()
            dequant[name] = stored[name].float()
    return stored, dequant


def as_f4_storage(stored: dict) -> dict:
    """Same checkpoint with the packed FP4 expert weights typed float4_e2m1fn_x2 (safetensors "F4")."""
    return {
        name: (t.view(torch.uint8).view(torch.float4_e2m1fn_x2) if _FP4_LEAVES.search(name) else t)
        for name, t in stored.items()
    }


# ----------------------------------------------------------------------------------------------
# Writing


def write_safetensors(state: dict, path: str) -> None:
    """One safetensors file with the `format: pt` metadata HF writes."""
    save_file({k: v.contiguous() for k, v in state.items()}, path, metadata={"format": "pt"})


def write_sharded(state: dict, directory: str, n_shards: int = 2) -> list[str]:
    """HF sharded format: `model-0000i-of-0000n.safetensors` + `model.safetensors.index.json`."""
    names = list(state)
    total = sum(t.numel() * t.element_size() for t in state.values())
    shards, current, size = [[]], 0, 0
    for name in names:  # split by bytes, in state-dict order
        nbytes = state[name].numel() * state[name].element_size()
        if size + nbytes / 2 > total / n_shards * (current + 1) and current < n_shards - 1:
            current += 1
            shards.append([])
        shards[current].append(name)
        size += nbytes
    weight_map, files = {}, []
    for i, shard in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        write_safetensors({n: state[n] for n in shard}, os.path.join(directory, file))
        weight_map.update({n: file for n in shard})
        files.append(file)
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    with open(os.path.join(directory, "model.safetensors.index.json"), "w") as f:
        json.dump(index, f, indent=2, sort_keys=True)
    return files
