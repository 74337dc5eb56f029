"""v4jax.interop."""
