"""Grouped (ragged) matmul for MoE experts: one api, backends chosen by platform."""

from v4jax.kernels.grouped_matmul.api import default_implementation, grouped_matmul

__all__ = ["default_implementation", "grouped_matmul"]
