"""Checkpoints in and out: HuggingFace / upstream DeepSeek layouts (bf16, fp32, FP8 + packed FP4)."""

from v4jax.interop.export import export_hf
from v4jax.interop.hf_config import (
    CheckpointError,
    hf_config_from_model,
    model_config_from_hf,
)
from v4jax.interop.load import load_checkpoint

__all__ = ["CheckpointError", "export_hf", "hf_config_from_model", "load_checkpoint", "model_config_from_hf"]
