"""v4jax.rl."""
