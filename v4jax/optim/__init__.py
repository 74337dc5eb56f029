"""v4jax.optim."""
