"""Fixtures for the kernel tests."""

import types

import pytest


@pytest.fixture
def fake_hopper(monkeypatch):
    """Lets Pallas-Triton lower for CUDA on a machine without a GPU: its lowering asks the device for the
    compute capability, which here answers sm_90 (the H200's)."""
    from jax._src.pallas.triton import pallas_call_registration as registration

    gpu = types.SimpleNamespace(get_gpu_info=lambda: types.SimpleNamespace(compute_capability=90))
    monkeypatch.setattr(registration, "gpu_info_lib", gpu)
