import sys
from pathlib import Path

# The spawned ranks import the worker modules by name: make tests/ importable in them too.
sys.path.insert(0, str(Path(__file__).parent))


import os

import pytest

# SYNCBN_KERNEL=triton (or another kernel) in the environment pins the ``kernel`` fixture to it:
# the ranks set SYNCBN_KERNEL from the fixture, so without this an outer setting was overridden.
_KERNELS = [os.environ["SYNCBN_KERNEL"]] if os.environ.get("SYNCBN_KERNEL") else ["fused", "aten"]


@pytest.fixture(autouse=True)
def _fresh_settings():
    """syncbn reads its SYNCBN_* settings once per process: each test starts from (and leaves)
    the environment as it is, so a test that sets a variable before its first pass is seen."""
    from syncbn import _settings

    _settings.reload()
    yield
    _settings.reload()


@pytest.fixture(params=_KERNELS)
def kernel(request, monkeypatch):
    """Run a test's ranks once with the fused C kernel and once with the plain ATen path (only
    with ``SYNCBN_KERNEL`` when the environment sets it)."""
    import harness

    monkeypatch.setattr(harness, "KERNEL", request.param)
    return request.param
