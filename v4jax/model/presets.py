"""Model presets: the released DeepSeek-V4 hyper-parameters (spec sections 1.1-1.2) and a CPU-sized tiny model."""

from __future__ import annotations

import ml_collections

from v4jax.model.config import default_model_config, schedule_from_compress_ratios


def flash() -> ml_collections.ConfigDict:
    """DeepSeek-V4-Flash: 43 layers, d=4096, 256 experts (284B total / 13B active)."""
    m = default_model_config()
    m.layer_kinds = schedule_from_compress_ratios([0, 0] + [4, 128] * 20 + [4])
    return m


def pro() -> ml_collections.ConfigDict:
    """DeepSeek-V4-Pro: 61 layers, d=7168, 384 experts (1.6T total / 49B active)."""
    m = default_model_config()
    m.update(hidden_size=7168, num_layers=61, num_heads=128, q_lora_rank=1536, o_groups=16, index_topk=1024,
             n_routed_experts=384, moe_intermediate_size=3072, routed_scaling_factor=2.5)
    m.layer_kinds = schedule_from_compress_ratios([128, 128] + [4, 128] * 29 + [4])
    return m


def tiny() -> ml_collections.ConfigDict:
    """A V4 with every mechanism switched on, small enough to train on 2 CPU cores in minutes (byte vocab)."""
    m = default_model_config()
    m.update(vocab_size=256, hidden_size=128, num_layers=4, num_heads=4, head_dim=64, rope_head_dim=16,
             q_lora_rank=64, o_groups=2, o_lora_rank=64, sliding_window=32, csa_ratio=4, hca_ratio=16,
             index_n_heads=4, index_head_dim=32, index_topk=8, yarn_original_max_position=256,
             n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=128, num_hash_layers=1,
             hc_mult=4, mtp_depth=1, dtype="float32")
    m.layer_kinds = ["sliding", "csa", "hca", "csa"]
    return m
