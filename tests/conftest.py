"""Shared test setup. Runs before any test module imports JAX."""
import os

# 8 fake CPU devices for mesh/sharding tests (jax.devices("cpu")); must be set before JAX initialises its backends.
# Appended to any XLA_FLAGS the caller set, unless they already choose a device count.
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
    os.environ["XLA_FLAGS"] = f"{_flags} --xla_force_host_platform_device_count=8".strip()
