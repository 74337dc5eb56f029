"""v4jax.data."""
