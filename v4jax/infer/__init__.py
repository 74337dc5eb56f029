"""v4jax.infer."""
