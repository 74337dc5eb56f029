"""v4jax.tools."""
