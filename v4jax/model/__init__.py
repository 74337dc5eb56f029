"""The DeepSeek-V4 model in Flax linen (functional: init/apply, params are plain pytrees)."""

from v4jax.model import presets
from v4jax.model.config import (
    ConfigError,
    ModelConfig,
    default_model_config,
    validate_model_config,
)
from v4jax.model.transformer import (
    ModelOutput,
    Transformer,
    layer_plan,
    learned_router_mask,
    router_bias,
    with_router_bias,
)

__all__ = ["ConfigError", "ModelConfig", "ModelOutput", "Transformer", "default_model_config", "layer_plan",
           "learned_router_mask", "presets", "router_bias", "validate_model_config", "with_router_bias"]
