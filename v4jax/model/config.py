"""The model's hyper-parameters: one frozen dataclass, built from `config.model`, validated up front.

Flax modules need hashable attributes, so the ml-collections `ConfigDict` a researcher edits is
turned into a frozen `ModelConfig` once, after `validate_model_config` has checked every field.
Every inconsistency is a one-line `ConfigError` naming the field, raised before anything is traced.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import ml_collections

from v4jax.errors import ConfigError

LAYER_KINDS = ("sliding", "csa", "hca")
MOE_KINDS = ("hash", "learned")
DTYPES = ("float32", "bfloat16", "float16")
INDEXER_IMPLS = ("auto", "xla", "triton", "mosaic_gpu", "mosaic_tpu")  # "auto": kernels.indexer's own platform choice
FP4_IMPLS = ("auto", "xla", "triton", "mosaic_gpu", "mosaic_tpu")  # "auto": kernels.fp4_matmul's own platform choice


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    # sizes
    vocab_size: int = 129280
    hidden_size: int = 4096
    num_layers: int = 43
    num_heads: int = 64
    head_dim: int = 512
    rope_head_dim: int = 64
    q_lora_rank: int = 1024
    o_groups: int = 8
    o_lora_rank: int = 1024
    # attention schedule: one kind per main layer ("sliding" | "csa" | "hca"); the MTP blocks use mtp_layer_kind
    layer_kinds: tuple[str, ...] = ()
    sliding_window: int = 128
    csa_ratio: int = 4
    hca_ratio: int = 128
    index_n_heads: int = 64
    index_head_dim: int = 128
    index_topk: int = 512
    indexer_impl: str = "auto"      # backend of the indexer's scores + top-k (v4jax.kernels.indexer)
    indexer_interpret: bool = False  # run a Pallas indexer backend in interpret mode (CPU tests, debugging)
    fp4_impl: str = "auto"  # backend of packed-FP4 expert GEMMs (v4jax.kernels.fp4_matmul); "auto": its choice
    fp4_interpret: bool = False  # run a Pallas FP4 backend in interpret mode (CPU tests, debugging)
    # planar expert weights whose E8M0 scale bytes are all <= 128 (scales <= 2; `v4jax.infer.fp4.planar_max_scale`
    # reads it): the Mosaic GPU kernels then decode with one FMA per register ("asm_fused", H200: kernels 3-6% faster);
    # True on other weights gives inf/NaN outputs, so set it from that reading, not by hand
    fp4_fused_decode: bool = False
    # rope: main (sliding layers) and compress (CSA/HCA layers, with YaRN when yarn_factor > 0)
    rope_theta: float = 10000.0
    compress_rope_theta: float = 160000.0
    yarn_factor: float = 16.0
    yarn_original_max_position: int = 65536
    yarn_beta_fast: float = 32.0
    yarn_beta_slow: float = 1.0
    rope_restart_per_document: bool = True
    # MoE
    n_routed_experts: int = 256
    num_experts_per_tok: int = 6
    moe_intermediate_size: int = 2048
    num_hash_layers: int = 3
    routed_scaling_factor: float = 1.5
    swiglu_limit: float = 10.0  # 0 disables the clamp
    # norms and mHC
    rms_norm_eps: float = 1e-6
    hc_mult: int = 4
    hc_sinkhorn_iters: int = 20
    hc_eps: float = 1e-6
    # MTP
    mtp_depth: int = 1
    mtp_layer_kind: str = "sliding"
    # numerics and compilation
    param_dtype: str = "float32"
    dtype: str = "bfloat16"
    init_std: float = 0.02
    hc_init_alpha: float = 0.01
    hc_init_comb_diag: float = 4.0
    scan_layers: bool = True
    remat: bool = False

    # ---- derived views -------------------------------------------------------------------------
    @property
    def moe_kinds(self) -> tuple[str, ...]:
        return tuple("hash" if i < self.num_hash_layers else "learned" for i in range(self.num_layers))

    def ratio(self, kind: str) -> int:
        return {"sliding": 0, "csa": self.csa_ratio, "hca": self.hca_ratio}[kind]

    @property
    def nope_head_dim(self) -> int:
        return self.head_dim - self.rope_head_dim

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any] | ml_collections.ConfigDict) -> ModelConfig:
        """Validates `cfg` (a ConfigDict or mapping of ModelConfig fields) and freezes it."""
        d = dict(cfg.to_dict() if isinstance(cfg, ml_collections.ConfigDict) else cfg)
        validate_model_config(d)
        d["layer_kinds"] = tuple(d["layer_kinds"])
        return cls(**d)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["layer_kinds"] = list(self.layer_kinds)
        return d


FIELDS = {f.name: f for f in dataclasses.fields(ModelConfig)}


def default_model_config() -> ml_collections.ConfigDict:
    """The schema as a ConfigDict (V4-Flash sizes); presets override fields of it."""
    d = ModelConfig().to_dict()
    d["layer_kinds"] = schedule_from_compress_ratios([0, 0] + [4, 128] * 20 + [4])
    return ml_collections.ConfigDict(d)


def schedule_from_compress_ratios(ratios, csa_ratio: int = 4) -> list[str]:
    """Upstream `compress_ratios` (0 / csa ratio / anything else = HCA) to layer kinds."""
    return ["sliding" if r == 0 else "csa" if r == csa_ratio else "hca" for r in ratios]


def _err(field: str, msg: str) -> ConfigError:
    return ConfigError(f"config.model.{field}: {msg}")


def validate_model_config(d: Mapping[str, Any]) -> None:
    """Checks every field of a model config mapping; raises a one-line ConfigError on the first problem."""
    unknown = sorted(set(d) - set(FIELDS))
    if unknown:
        raise _err(unknown[0], f"unknown field (known: {', '.join(sorted(FIELDS))})")
    missing = sorted(set(FIELDS) - set(d))
    if missing:
        raise _err(missing[0], "missing field")

    def pos_int(name, allow_zero=False):
        v = d[name]
        if isinstance(v, bool) or not isinstance(v, int) or v < (0 if allow_zero else 1):
            raise _err(name, f"must be a {'non-negative' if allow_zero else 'positive'} integer, got {v!r}")

    for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "head_dim", "rope_head_dim",
                 "q_lora_rank", "o_groups", "o_lora_rank", "sliding_window", "csa_ratio", "hca_ratio",
                 "index_n_heads", "index_head_dim", "index_topk", "n_routed_experts", "num_experts_per_tok",
                 "moe_intermediate_size", "hc_mult", "hc_sinkhorn_iters", "yarn_original_max_position"):
        pos_int(name)
    for name in ("num_hash_layers", "mtp_depth"):
        pos_int(name, allow_zero=True)
    for name in ("rope_theta", "compress_rope_theta", "rms_norm_eps", "hc_eps", "init_std", "routed_scaling_factor"):
        if not isinstance(d[name], (int, float)) or isinstance(d[name], bool) or d[name] <= 0:
            raise _err(name, f"must be a positive number, got {d[name]!r}")
    for name in ("yarn_factor", "swiglu_limit", "hc_init_alpha", "yarn_beta_fast", "yarn_beta_slow", "hc_init_comb_diag"):
        if not isinstance(d[name], (int, float)) or isinstance(d[name], bool) or d[name] < 0:
            raise _err(name, f"must be a non-negative number, got {d[name]!r}")
    for name in ("scan_layers", "remat", "rope_restart_per_document", "indexer_interpret", "fp4_interpret",
                 "fp4_fused_decode"):
        if not isinstance(d[name], bool):
            raise _err(name, f"must be True or False, got {d[name]!r}")
    for name in ("param_dtype", "dtype"):
        if d[name] not in DTYPES:
            raise _err(name, f"must be one of {DTYPES}, got {d[name]!r}")
    if d["indexer_impl"] not in INDEXER_IMPLS:
        raise _err("indexer_impl", f"must be one of {INDEXER_IMPLS}, got {d['indexer_impl']!r}")
    if d["fp4_impl"] not in FP4_IMPLS:
        raise _err("fp4_impl", f"must be one of {FP4_IMPLS}, got {d['fp4_impl']!r}")

    if d["rope_head_dim"] % 2:
        raise _err("rope_head_dim", f"must be even (interleaved pairs), got {d['rope_head_dim']}")
    if d["rope_head_dim"] > d["head_dim"]:
        raise _err("rope_head_dim", f"{d['rope_head_dim']} is larger than head_dim {d['head_dim']}")
    if d["rope_head_dim"] > d["index_head_dim"]:
        raise _err("rope_head_dim", f"{d['rope_head_dim']} is larger than index_head_dim {d['index_head_dim']}")
    if d["num_heads"] % d["o_groups"]:
        raise _err("o_groups", f"{d['o_groups']} does not divide num_heads {d['num_heads']}")
    if d["num_experts_per_tok"] > d["n_routed_experts"]:
        raise _err("num_experts_per_tok", f"{d['num_experts_per_tok']} exceeds n_routed_experts {d['n_routed_experts']}")
    if d["num_hash_layers"] > d["num_layers"]:
        raise _err("num_hash_layers", f"{d['num_hash_layers']} exceeds num_layers {d['num_layers']}")
    if d["csa_ratio"] < 2:
        raise _err("csa_ratio", f"must be at least 2, got {d['csa_ratio']}")
    kinds = d["layer_kinds"]
    if isinstance(kinds, str) or not hasattr(kinds, "__len__"):
        raise _err("layer_kinds", f"must be a list of {LAYER_KINDS}, got {kinds!r}")
    if len(kinds) != d["num_layers"]:
        raise _err("layer_kinds", f"has {len(kinds)} entries but num_layers is {d['num_layers']}")
    for i, k in enumerate(kinds):
        if k not in LAYER_KINDS:
            raise _err(f"layer_kinds[{i}]", f"unknown layer kind {k!r} (known: {', '.join(LAYER_KINDS)})")
    if d["mtp_layer_kind"] not in LAYER_KINDS:
        raise _err("mtp_layer_kind", f"unknown layer kind {d['mtp_layer_kind']!r} (known: {', '.join(LAYER_KINDS)})")
