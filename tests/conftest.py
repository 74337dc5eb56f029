"""Test-session setup: 8 fake CPU devices (set before jax is imported) for the sharding tests."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
