import sys
from pathlib import Path

# The spawned ranks import the worker modules by name: make tests/ importable in them too.
sys.path.insert(0, str(Path(__file__).parent))


import pytest


@pytest.fixture(params=["fused", "aten"])
def kernel(request, monkeypatch):
    """Run a test's ranks once with the fused C kernel and once with the plain ATen path."""
    import harness

    monkeypatch.setattr(harness, "KERNEL", request.param)
    return request.param
