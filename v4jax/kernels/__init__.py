"""v4jax.kernels."""
