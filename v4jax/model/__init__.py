"""v4jax.model."""
