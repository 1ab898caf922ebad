"""Rank workers for tests/test_parallel.py (spawned ranks import them by name)."""

from __future__ import annotations

import torch

import syncbn


def data_parallel_in_a_group(rank: int, world_size: int) -> str:
    """syncbn.DataParallel inside a process of a multi-process group: the error's text."""
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), syncbn.SyncBatchNorm1d(4))
    dp = syncbn.DataParallel(net, device_ids=["cpu", "cpu"])
    try:
        dp(torch.randn(4, 3))
    except RuntimeError as exc:
        return str(exc)
    return "no error"
