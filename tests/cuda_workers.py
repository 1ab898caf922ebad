"""Workers for tests/test_cuda.py (top level, so that spawned ranks can import them)."""

from __future__ import annotations

from typing import Any

import backend_workers
import cuda_standins


def mixed_backends(rank: int, world_size: int, kernels: list[str], *args: Any) -> dict[str, Any]:
    """:func:`backend_workers.mixed_backends` with torch's SyncBatchNorm operators given CPU
    stand-ins in this rank, and ``batch_norm_update_stats`` computing as on CUDA."""
    cuda_standins.register()
    with cuda_standins.CudaWelford():
        return backend_workers.mixed_backends(rank, world_size, kernels, *args)
