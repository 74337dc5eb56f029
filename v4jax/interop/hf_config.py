"""HuggingFace / upstream DeepSeek `config.json` <-> v4jax `ModelConfig` (hf_reference section 1).

Fields v4jax cannot express (another scoring function, tied embeddings, a hash-layer set that is not a
prefix of the stack, ...) are one-line `CheckpointError`s naming the field.
"""

from __future__ import annotations

import json
import os
from typing import Any

from v4jax.model.config import ModelConfig, default_model_config

HF_KINDS = {"sliding_attention": "sliding", "compressed_sparse_attention": "csa",
            "heavily_compressed_attention": "hca"}
CSA_KEY, HCA_KEY = "compressed_sparse_attention", "heavily_compressed_attention"


class CheckpointError(ValueError):
    """A checkpoint v4jax cannot load; the message is one line naming the file, field or tensor."""


def _expect(hf: dict, field: str, allowed, default):
    value = hf.get(field, default)
    if value not in allowed:
        raise CheckpointError(f"config.json: {field}={value!r} cannot be expressed in v4jax (supported: {allowed})")


def model_config_from_hf(hf: dict[str, Any], *, mtp_depth: int | None = None) -> ModelConfig:
    """Builds a ModelConfig from a config.json dict (HF field names, legacy upstream fields accepted)."""
    if hf.get("model_type", "deepseek_v4") != "deepseek_v4":
        raise CheckpointError(f"config.json: model_type={hf.get('model_type')!r} is not 'deepseek_v4'")
    _expect(hf, "scoring_func", ("sqrtsoftplus",), "sqrtsoftplus")
    _expect(hf, "hidden_act", ("silu",), "silu")
    _expect(hf, "tie_word_embeddings", (False,), False)
    _expect(hf, "norm_topk_prob", (True,), True)
    _expect(hf, "n_shared_experts", (1, None), 1)
    _expect(hf, "mlp_bias", (False,), False)
    for field in ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size"):
        if field not in hf:
            raise CheckpointError(f"config.json: missing field {field}")
    L = hf["num_hidden_layers"]
    head_dim = hf.get("head_dim", 512)
    rope_dim = hf.get("qk_rope_head_dim") or int(round(head_dim * (hf.get("partial_rotary_factor") or 0.125)))

    rates = dict(hf.get("compress_rates") or {})
    csa = rates.get(CSA_KEY, hf.get("compress_rate_csa", 4))
    hca = rates.get(HCA_KEY, hf.get("compress_rate_hca", 128))
    mtp_kind = "sliding"
    if hf.get("layer_types"):
        types = list(hf["layer_types"])
        unknown = [t for t in types if t not in HF_KINDS]
        if unknown:
            raise CheckpointError(f"config.json: layer_types has an unknown kind {unknown[0]!r}")
        kinds = [HF_KINDS[t] for t in types][:L]
    elif hf.get("compress_ratios"):
        ratios = list(hf["compress_ratios"])
        # HF reads these values as kinds (0 / 4 / 128); the real rates are in compress_rate_csa / _hca
        kinds = ["sliding" if r == 0 else "csa" if r in (4, csa) else "hca" for r in ratios]
        if len(kinds) > L:
            mtp_kind = kinds[L]
        kinds = kinds[:L]
    else:
        kinds = ["hca", "hca"] + ["hca" if i % 2 == 0 else "csa" for i in range(L - 2)]  # HF's fallback schedule

    if hf.get("mlp_layer_types"):
        hashed = [t == "hash_moe" for t in hf["mlp_layer_types"]][:L]
        n_hash = sum(hashed)
        if hashed != [True] * n_hash + [False] * (L - n_hash):
            raise CheckpointError("config.json: mlp_layer_types: hash layers must come first to be expressed in v4jax")
    else:
        n_hash = hf.get("num_hash_layers", 3)

    yarn = dict(factor=0.0, original=65536, beta_fast=32.0, beta_slow=1.0)
    rp = (hf.get("rope_parameters") or {}).get("compress") or hf.get("rope_scaling") or {}
    if rp.get("rope_type", rp.get("type")) == "yarn":
        yarn = dict(factor=float(rp["factor"]), original=int(rp.get("original_max_position_embeddings", 65536)),
                    beta_fast=float(rp.get("beta_fast") or 32.0), beta_slow=float(rp.get("beta_slow") or 1.0))
    compress_theta = float(((hf.get("rope_parameters") or {}).get("compress") or {}).get(
        "rope_theta", hf.get("compress_rope_theta", 160000.0)))
    main_theta = float(((hf.get("rope_parameters") or {}).get("main") or {}).get("rope_theta", hf.get("rope_theta", 10000.0)))

    d = default_model_config().to_dict()
    d.update(
        vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"], num_layers=L,
        num_heads=hf["num_attention_heads"], head_dim=head_dim, rope_head_dim=rope_dim,
        q_lora_rank=hf.get("q_lora_rank", 1024), o_groups=hf.get("o_groups", 8), o_lora_rank=hf.get("o_lora_rank", 1024),
        layer_kinds=kinds, sliding_window=hf.get("sliding_window", 128), csa_ratio=csa, hca_ratio=hca,
        index_n_heads=hf.get("index_n_heads", 64), index_head_dim=hf.get("index_head_dim", 128),
        index_topk=hf.get("index_topk", 512), rope_theta=main_theta, compress_rope_theta=compress_theta,
        yarn_factor=yarn["factor"], yarn_original_max_position=yarn["original"], yarn_beta_fast=yarn["beta_fast"],
        yarn_beta_slow=yarn["beta_slow"], rope_restart_per_document=False,
        n_routed_experts=hf.get("n_routed_experts", 256), num_experts_per_tok=hf.get("num_experts_per_tok", 6),
        moe_intermediate_size=hf.get("moe_intermediate_size", 2048), num_hash_layers=n_hash,
        routed_scaling_factor=float(hf.get("routed_scaling_factor", 1.5)),
        swiglu_limit=float(hf.get("swiglu_limit", 10.0) or 0.0), rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        hc_mult=hf.get("hc_mult", 4), hc_sinkhorn_iters=hf.get("hc_sinkhorn_iters", 20),
        hc_eps=float(hf.get("hc_eps", 1e-6)),
        mtp_depth=hf.get("num_nextn_predict_layers", 1) if mtp_depth is None else mtp_depth,
        mtp_layer_kind=mtp_kind, param_dtype="float32", dtype="float32",
    )
    try:
        return ModelConfig.from_config(d)
    except ValueError as e:
        raise CheckpointError(f"config.json: {e}") from None


def read_config_json(checkpoint_dir: str) -> dict:
    path = os.path.join(checkpoint_dir, "config.json")
    if not os.path.isfile(path):
        raise CheckpointError(f"{checkpoint_dir}: no config.json")
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None


def hf_config_from_model(cfg: ModelConfig) -> dict[str, Any]:
    """The HF `config.json` of a v4jax model (for export)."""
    inv = {v: k for k, v in HF_KINDS.items()}
    compress = {"rope_type": "default", "rope_theta": cfg.compress_rope_theta,
                "partial_rotary_factor": cfg.rope_head_dim / cfg.head_dim}
    if cfg.yarn_factor > 0:
        compress.update(rope_type="yarn", factor=cfg.yarn_factor, attention_factor=1.0,
                        original_max_position_embeddings=cfg.yarn_original_max_position,
                        beta_fast=cfg.yarn_beta_fast, beta_slow=cfg.yarn_beta_slow)
    return {
        "model_type": "deepseek_v4", "architectures": ["DeepseekV4ForCausalLM"],
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size, "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads, "num_key_value_heads": 1, "head_dim": cfg.head_dim,
        "qk_rope_head_dim": cfg.rope_head_dim, "partial_rotary_factor": cfg.rope_head_dim / cfg.head_dim,
        "q_lora_rank": cfg.q_lora_rank, "o_groups": cfg.o_groups, "o_lora_rank": cfg.o_lora_rank,
        "layer_types": [inv[k] for k in cfg.layer_kinds], "sliding_window": cfg.sliding_window,
        "compress_rates": {CSA_KEY: cfg.csa_ratio, HCA_KEY: cfg.hca_ratio},
        "index_n_heads": cfg.index_n_heads, "index_head_dim": cfg.index_head_dim, "index_topk": cfg.index_topk,
        "rope_theta": cfg.rope_theta, "compress_rope_theta": cfg.compress_rope_theta,
        "rope_parameters": {"main": {"rope_type": "default", "rope_theta": cfg.rope_theta,
                                     "partial_rotary_factor": cfg.rope_head_dim / cfg.head_dim},
                            "compress": compress},
        "n_routed_experts": cfg.n_routed_experts, "num_experts_per_tok": cfg.num_experts_per_tok,
        "n_shared_experts": 1, "moe_intermediate_size": cfg.moe_intermediate_size,
        "mlp_layer_types": ["hash_moe" if k == "hash" else "moe" for k in cfg.moe_kinds],
        "scoring_func": "sqrtsoftplus", "norm_topk_prob": True, "routed_scaling_factor": cfg.routed_scaling_factor,
        "swiglu_limit": cfg.swiglu_limit, "rms_norm_eps": cfg.rms_norm_eps, "hc_mult": cfg.hc_mult,
        "hc_sinkhorn_iters": cfg.hc_sinkhorn_iters, "hc_eps": cfg.hc_eps,
        "num_nextn_predict_layers": cfg.mtp_depth, "tie_word_embeddings": False, "hidden_act": "silu",
        "bos_token_id": 0, "eos_token_id": 1,
    }
