"""Torch-side helpers for the HF golden files: build, re-randomise and probe tiny DeepSeek-V4 models.

Used only by `scripts/hf_goldens.py` (run with the separate `.venv-hf` torch environment; CI never
imports this). Three jobs:

* `randomise_`: overwrite HF's init (which zeroes sinks, position_bias, hc base, the router
  correction bias and `tid2eid`) so that every branch of the forward pass contributes O(1) values;
* `capture`: run one forward with hooks and collect every intermediate the golden contract names
  (layer inputs/outputs, attention and MoE outputs, router and indexer selections, logits);
* `margins`: the smallest gap at every discrete decision (router top-k, indexer top-k, greedy
  argmax), so the caller can pick a seed where a correct float32 port makes identical choices.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import torch
import torch.nn.functional as F
from transformers import DeepseekV4Config, DeepseekV4ForCausalLM

SLIDING = "sliding_attention"
CSA = "compressed_sparse_attention"
HCA = "heavily_compressed_attention"


def build_model(config_kwargs: dict, seed: int) -> DeepseekV4ForCausalLM:
    """A float32 eager `DeepseekV4ForCausalLM` from `config_kwargs`, re-randomised with `seed`."""
    config = DeepseekV4Config(**config_kwargs)
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = DeepseekV4ForCausalLM(config).to(torch.float32).eval()
    randomise_(model, seed)
    return model


@torch.no_grad()
def randomise_(model: DeepseekV4ForCausalLM, seed: int) -> None:
    """Overwrite every parameter and persistent buffer with values that make all branches matter.

    Linear weights get std 1/sqrt(fan_in) so that (normed) activations stay O(1) and the SwiGLU
    clamp fires for small `swiglu_limit`; the tensors HF zeroes get the distributions of the brief.
    """
    gen = torch.Generator().manual_seed(seed)
    config = model.config

    def normal(shape, std, mean=0.0):
        return torch.randn(shape, generator=gen, dtype=torch.float32) * std + mean

    for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
        leaf = name.rsplit(".", 1)[-1]
        shape = tuple(tensor.shape)
        if "inv_freq" in name:  # rotary tables: derived, non-persistent
            continue
        if leaf == "tid2eid":
            rows = [torch.randperm(config.n_routed_experts, generator=gen)[: shape[1]] for _ in range(shape[0])]
            tensor.copy_(torch.stack(rows).to(tensor.dtype))
        elif leaf == "e_score_correction_bias":
            tensor.copy_(normal(shape, 0.1))
        elif leaf == "sinks":
            tensor.copy_(normal(shape, 1.0))
        elif leaf == "position_bias":
            tensor.copy_(normal(shape, 0.5))
        elif leaf in ("fn", "hc_fn"):  # mHC mixes: flat input has unit RMS over n*D values
            tensor.copy_(normal(shape, 1.0 / math.sqrt(shape[1])))
        elif leaf in ("base", "hc_base"):
            tensor.copy_(normal(shape, 0.5))
        elif leaf in ("scale", "hc_scale"):
            tensor.copy_(torch.rand(shape, generator=gen) + 0.5)
        elif "norm" in name or "layernorm" in name:
            tensor.copy_(normal(shape, 0.1, mean=1.0))
        elif name.endswith("embed_tokens.weight"):
            tensor.copy_(normal(shape, 1.0))
        elif tensor.dim() >= 2:  # linear / grouped / stacked-expert weights: [..., out, in]
            tensor.copy_(normal(shape, 1.0 / math.sqrt(shape[-1])))
        else:
            raise ValueError(f"randomise_: no rule for tensor {name} {shape}")


@dataclasses.dataclass
class Capture:
    """Everything one forward pass of the golden contract records (numpy, float32 / int)."""

    logits: np.ndarray
    hidden_in: list
    layer_out: list
    attn_out: list
    moe_out: list
    final_hidden: np.ndarray
    hf_hidden_states: list
    router_logits: dict  # layer -> [B*S, E]
    router_w: dict  # layer -> [B*S, K], HF order
    router_idx: dict  # layer -> [B*S, K], HF order
    indexer_idx: dict  # CSA layer -> [B, S, topk_eff] raw HF output (-1 = invalid)
    indexer_scores: dict  # CSA layer -> [B, S, T] before the causal mask
    clamp_hits: int
    clamp_total: int


@torch.no_grad()
def capture(model: DeepseekV4ForCausalLM, input_ids: torch.Tensor) -> Capture:
    """Run `model(input_ids)` once (no cache) with hooks on every module the contract names."""
    layers = model.model.layers
    limit = model.config.swiglu_limit
    store: dict = {k: {} for k in ("hin", "lout", "attn", "moe", "router", "idx", "score")}
    clamp = [0, 0]
    handles = []

    def count_clamp(gate: torch.Tensor, up: torch.Tensor) -> None:
        clamp[0] += int((gate > limit).sum()) + int((up.abs() > limit).sum())
        clamp[1] += gate.numel() + up.numel()

    for i, layer in enumerate(layers):
        handles.append(layer.register_forward_pre_hook(lambda m, a, i=i: store["hin"].__setitem__(i, a[0].clone())))
        handles.append(layer.register_forward_hook(lambda m, a, o, i=i: store["lout"].__setitem__(i, o.clone())))
        handles.append(layer.self_attn.register_forward_hook(lambda m, a, o, i=i: store["attn"].__setitem__(i, o[0].clone())))
        handles.append(layer.mlp.register_forward_hook(lambda m, a, o, i=i: store["moe"].__setitem__(i, o.clone())))
        handles.append(layer.mlp.gate.register_forward_hook(lambda m, a, o, i=i: store["router"].__setitem__(i, o)))

        def shared_pre(m, a):
            count_clamp(m.gate_proj(a[0]), m.up_proj(a[0]))

        def experts_pre(m, a):
            hidden, top_idx = a[0], a[1]  # [T, D], [T, K]
            for k in range(top_idx.shape[1]):
                w = m.gate_up_proj[top_idx[:, k]]  # [T, 2I, D]
                gate_up = torch.einsum("tod,td->to", w, hidden)  # [T, 2I]
                gate, up = gate_up.chunk(2, dim=-1)
                count_clamp(gate, up)

        handles.append(layer.mlp.shared_experts.register_forward_pre_hook(shared_pre))
        handles.append(layer.mlp.experts.register_forward_pre_hook(experts_pre))
        if model.config.layer_types[i] == CSA:
            indexer = layer.self_attn.compressor.indexer
            handles.append(indexer.register_forward_hook(lambda m, a, o, i=i: store["idx"].__setitem__(i, o.clone())))
            handles.append(indexer.scorer.register_forward_hook(lambda m, a, o, i=i: store["score"].__setitem__(i, o.clone())))
    final = {}
    handles.append(model.model.norm.register_forward_hook(lambda m, a, o: final.__setitem__("x", o.clone())))
    try:
        out = model(input_ids=input_ids, output_hidden_states=True, use_cache=False)
    finally:
        for h in handles:
            h.remove()

    n_layers = len(layers)
    npy = lambda t: t.detach().cpu().numpy()
    return Capture(
        logits=npy(out.logits).astype(np.float32),
        hidden_in=[npy(store["hin"][i]) for i in range(n_layers)],
        layer_out=[npy(store["lout"][i]) for i in range(n_layers)],
        attn_out=[npy(store["attn"][i]) for i in range(n_layers)],
        moe_out=[npy(store["moe"][i]) for i in range(n_layers)],
        final_hidden=npy(final["x"]),
        hf_hidden_states=[npy(h) for h in out.hidden_states],
        router_logits={i: npy(store["router"][i][0]) for i in range(n_layers)},
        router_w={i: npy(store["router"][i][1]) for i in range(n_layers)},
        router_idx={i: npy(store["router"][i][2]) for i in range(n_layers)},
        indexer_idx={i: npy(v) for i, v in store["idx"].items()},
        indexer_scores={i: npy(v) for i, v in store["score"].items()},
        clamp_hits=clamp[0],
        clamp_total=clamp[1],
    )


def margins(model: DeepseekV4ForCausalLM, cap: Capture) -> dict:
    """Smallest gap at each discrete decision: learned-router top-k, indexer top-k, greedy argmax.

    Router: gap between the k-th and (k+1)-th of `sqrt(softplus(logits)) + bias` (hash layers have
    no data-dependent choice). Indexer: gap between the k-th and (k+1)-th score among the VALID
    (causally complete) entries, only for queries with more than k valid entries. Argmax: top-1
    minus top-2 logit. `inf` when a decision kind does not occur.
    """
    config = model.config
    k = config.num_experts_per_tok
    router, indexer = math.inf, math.inf
    for i, kind in enumerate(config.mlp_layer_types):
        if kind != "moe":
            continue
        bias = model.model.layers[i].mlp.gate.e_score_correction_bias.detach().numpy()
        scores = np.sqrt(F.softplus(torch.from_numpy(cap.router_logits[i])).numpy()) + bias
        top = -np.sort(-scores, axis=-1)
        router = min(router, float((top[:, k - 1] - top[:, k]).min()))
    m = config.compress_rates[CSA]
    for i, scores in cap.indexer_scores.items():
        batch, seq, n_entries = scores.shape
        top_k = min(config.index_topk, n_entries)
        for s in range(seq):
            n_valid = min((s + 1) // m, n_entries)
            if top_k >= n_valid:
                continue
            top = -np.sort(-scores[:, s, :n_valid], axis=-1)
            indexer = min(indexer, float((top[:, top_k - 1] - top[:, top_k]).min()))
    top2 = -np.sort(-cap.logits, axis=-1)[..., :2]
    argmax = float((top2[..., 0] - top2[..., 1]).min())
    return {"min_router_margin": router, "min_indexer_margin": indexer, "min_argmax_margin": argmax}


def count_indexer_rows(model: DeepseekV4ForCausalLM, cap: Capture) -> dict:
    """How many (layer, batch, query) rows select (k < #valid) vs take all valid entries (k >= #valid)."""
    m = model.config.compress_rates[CSA]
    selecting, taking_all = 0, 0
    for scores in cap.indexer_scores.values():
        batch, seq, n_entries = scores.shape
        top_k = min(model.config.index_topk, n_entries)
        for s in range(seq):
            if top_k < min((s + 1) // m, n_entries):
                selecting += batch
            else:
                taking_all += batch
    return {"indexer_rows_selecting": selecting, "indexer_rows_taking_all": taking_all}
