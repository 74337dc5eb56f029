"""v4jax.optim: parameter partitions (Muon / AdamW / router / frozen), the paper's Muon, the router's
delayed schedule, aux-loss-free router-bias balancing and frequency-balanced hash tables."""

from v4jax.optim.build import build_optimizer, trainable_global_norm
from v4jax.optim.config import default_optim_config, validate_optim_config
from v4jax.optim.hash_routing import build_hash_table, load_imbalance
from v4jax.optim.labels import LABEL_RULES, LABELS, param_labels, path_to_str
from v4jax.optim.muon import (
    HYBRID_NS_COEFFS,
    hybrid_muon,
    hybrid_newton_schulz,
    scale_by_hybrid_muon,
)
from v4jax.optim.router_bias import (
    BALANCE_LOSS_WEIGHT,
    ROUTER_BIAS_SPEED,
    sequence_balance_loss,
    update_router_bias,
)
from v4jax.optim.router_schedule import delay_updates, every_k
from v4jax.optim.schedule import learning_rate_schedule

__all__ = [
    "BALANCE_LOSS_WEIGHT",
    "HYBRID_NS_COEFFS",
    "LABELS",
    "LABEL_RULES",
    "ROUTER_BIAS_SPEED",
    "build_hash_table",
    "build_optimizer",
    "default_optim_config",
    "delay_updates",
    "every_k",
    "hybrid_muon",
    "hybrid_newton_schulz",
    "learning_rate_schedule",
    "load_imbalance",
    "param_labels",
    "path_to_str",
    "scale_by_hybrid_muon",
    "sequence_balance_loss",
    "trainable_global_norm",
    "update_router_bias",
    "validate_optim_config",
]
