import sys
from pathlib import Path

# The spawned ranks import the worker modules by name: make tests/ importable in them too.
sys.path.insert(0, str(Path(__file__).parent))


import pytest


@pytest.fixture(autouse=True)
def _fresh_settings():
    """syncbn reads its SYNCBN_* settings once per process: each test starts from (and leaves)
    the environment as it is, so a test that sets a variable before its first pass is seen."""
    from syncbn import _settings

    _settings.reload()
    yield
    _settings.reload()


@pytest.fixture(params=["fused", "aten"])
def kernel(request, monkeypatch):
    """Run a test's ranks once with the fused C kernel and once with the plain ATen path."""
    import harness

    monkeypatch.setattr(harness, "KERNEL", request.param)
    return request.param
