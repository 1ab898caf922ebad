"""Workers for tests/test_backends.py (top level, so that spawned ranks can import them)."""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.distributed as dist

import syncbn
from reference import assert_matches, make_data, make_params, reference_steps


def mixed_backends(rank: int, world_size: int, kernels: list[str], sizes: list[int],
                   tail: tuple[int, ...], dtype_name: str, channels_last: bool,
                   steps: int) -> dict[str, Any]:
    """Rank r computes with backend ``kernels[r]`` (SYNCBN_KERNEL); every rank's output,
    gradients and running statistics must match plain float64 BatchNorm on the concatenated
    batch, and the running statistics must be identical across ranks of one backend. Returns the backend module each rank's passes used."""
    from syncbn import _settings, backends

    os.environ["SYNCBN_KERNEL"] = kernels[rank]
    _settings.reload()
    dtype = getattr(torch, dtype_name)
    shards, grads = make_data(sizes, tail, dtype, seed=3, mean=2.0, std=1.5)
    weight, bias = make_params(tail[0], seed=3)
    ref = reference_steps(shards, grads, weight, bias, steps, 0.1, 1e-5, True)
    layer = syncbn.SyncBatchNorm(tail[0]).to(dtype)
    with torch.no_grad():
        layer.weight.copy_(weight)
        layer.bias.copy_(bias)
    used = []
    real = backends.select

    def spy(*args: Any) -> Any:
        backend = real(*args)
        used.append(backend[0].NAME)
        return backend

    backends.select = spy
    try:
        for step in range(steps):
            x = shards[rank].clone()
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            x.requires_grad_()
            layer.zero_grad()
            y = layer(x)
            y.backward(grads[rank])
            where = f"rank {rank} ({kernels[rank]}) step {step}"
            assert_matches(y.detach(), ref[step]["y"][rank], dtype, f"{where}: output")
            assert_matches(x.grad, ref[step]["dx"][rank], dtype, f"{where}: grad_input")
            if channels_last and x.numel():
                assert y.is_contiguous(memory_format=torch.channels_last), where
            for key, got in (("dw", layer.weight.grad), ("db", layer.bias.grad)):
                total = got.detach().double().clone()
                dist.all_reduce(total)
                assert_matches(total, ref[step][key], dtype, f"{where}: summed {key}")
            for key in ("running_mean", "running_var"):
                assert_matches(getattr(layer, key), ref[step][key], dtype, f"{where}: {key}")
                gathered = [torch.empty_like(getattr(layer, key)) for _ in range(world_size)]
                dist.all_gather(gathered, getattr(layer, key))
                # Bitwise identical across ranks on one backend (the same float64 operations
                # on the same reduced buffer); backends differ in float rounding (e.g. fused
                # multiply-adds), so across backends they agree to the reference's tolerance.
                if len(set(kernels)) == 1:
                    assert all(torch.equal(g, gathered[0]) for g in gathered), f"{where}: {key} differs"
    finally:
        backends.select = real
    return {"backends": sorted(set(used))}


def triton_mismatch(rank: int, world_size: int) -> str:
    """Triton backend (interpreted on CPU) with ranks out of step: the error must come on every
    rank, from the backend's result code."""
    import torch.nn as nn

    from syncbn import _settings

    os.environ["SYNCBN_KERNEL"] = "triton"
    _settings.reload()
    model = syncbn.convert_sync_batchnorm(nn.Sequential(nn.BatchNorm1d(3), nn.BatchNorm1d(3)))
    x = torch.randn(4, 3)
    try:
        if rank == 0:
            model(x)
        else:
            model[1](x)  # rank 1 skips the first layer
    except RuntimeError as e:
        return str(e)
    return ""
