"""The backends in real process groups: ranks computing with different backends (the fused C
kernel, torch operators, Triton run by its interpreter on CPU) meet in one group, exchange the
same buffer, and every rank's results equal plain float64 BatchNorm on the concatenated batch.
(One rank never synchronizes: tests/test_triton.py runs the Triton backend's passes at W = 1.)
"""

from __future__ import annotations

import pytest

import backend_workers
import harness

pytest.importorskip("triton", reason="triton is not installed: the Triton backend is not tested")

# TRITON_INTERPRET=1 in the ranks (fresh processes, set before their first syncbn pass): the
# Triton kernels run on CPU tensors through the interpreter.
ENV = {"TRITON_INTERPRET": "1"}


@pytest.mark.timeout(300)
@pytest.mark.parametrize("kernels,sizes", [
    (["triton", "triton"], [3, 2]),
    (["triton", "fused", "aten"], [2, 0, 3]),
], ids=["2-ranks", "3-ranks-mixed-one-empty"])
@pytest.mark.parametrize("dtype,tail,channels_last", [
    ("float32", (3, 2, 2), True),
    ("float64", (3, 4), False),
], ids=["float32-channels-last-2d", "float64-1d"])
def test_ranks_on_different_backends_agree(tmp_path, kernels, sizes, dtype, tail, channels_last):
    out = harness.run(backend_workers.mixed_backends, len(kernels), tmp_path, kernels, sizes,
                      tail, dtype, channels_last, 2, env=ENV, fresh=True, timeout=240)
    for rank, kernel in enumerate(kernels):
        assert out[rank]["backends"] == [kernel], (rank, out)


@pytest.mark.timeout(200)
def test_triton_ranks_out_of_step_raise_everywhere(tmp_path):
    errors = harness.run(backend_workers.triton_mismatch, 2, tmp_path, env=ENV, fresh=True,
                         pg_timeout=5, timeout=180)
    for e in errors:
        assert "syncbn: ranks are out of step at SyncBatchNorm1d(3)" in e, errors
