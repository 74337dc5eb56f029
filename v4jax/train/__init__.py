"""v4jax.train."""
