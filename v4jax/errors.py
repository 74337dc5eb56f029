"""Errors shared across v4jax's packages, in a module that imports nothing of v4jax (so that any package can
raise them without importing the model package)."""


class ConfigError(ValueError):
    """A bad configuration value; the message is one line that names the field."""
