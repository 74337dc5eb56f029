"""v4jax.parallel."""
