"""Test setup: four virtual CPU devices, so multi-device code is exercised without accelerators.

This must run before JAX initialises its backends, hence the environment variable at import time.
"""
import os

_flag = "--xla_force_host_platform_device_count=4"
if _flag not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _flag).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
