"""v4jax.quant."""
