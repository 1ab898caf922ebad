"""The torch-operator backend: a synchronized pass's reduce and apply steps in plain torch operators
(the formulas of ``_stats.py``). Takes every input: any device, dtype and layout; the fallback
of the other backends and the reference they are tested against.

The four steps and the buffer they write and read are specified in ``syncbn.backends`` and
``syncbn._wire``. The header check is a host read here, so it runs on CPU only; on other devices the
core checks the header one pass late (``_comm.defer_check``), and the running statistics are
updated only where the header matches (decided on the device).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import _stats, _wire

__all__ = ["NAME", "STATUS_WORD", "applies", "backward_apply", "backward_reduce", "forward_apply",
           "forward_reduce"]

NAME = "aten"
STATUS_WORD = False


def applies(input: Tensor, *params: Tensor | None) -> tuple[int, ...]:
    """Every input: its shape stands for the geometry (truthy)."""
    return tuple(input.shape)


def forward_reduce(geo: tuple[int, ...], x: Tensor, buffer: Tensor, fields: list[int]) -> int:
    """``[1 | sum(x), sum(x**2), n | 0... | header | 1]`` of this shard into ``buffer``."""
    torch.cat(_wire.parts(_stats.local_moments(x), fields, buffer.numel()), out=buffer)
    return _wire.OK


def _checked(buffer: Tensor, world: int, fields: list[int]) -> bool:
    return buffer.device.type != "cpu" or _wire.header_ok(buffer, fields, world)


def forward_apply(geo: tuple[int, ...], x: Tensor, buffer: Tensor, world: int, fields: list[int],
                  weight: Tensor | None, bias: Tensor | None, running_mean: Tensor | None,
                  running_var: Tensor | None, eps: float, momentum: float, policy: int,
                  status: Tensor | None = None) -> tuple[Tensor | None, Tensor | None, int]:
    """Header check, global mean/invstd/count, running statistics, then the normalization."""
    if not _checked(buffer, world, fields):
        return None, None, _wire.MISMATCH
    channels = x.shape[1]
    moments = _wire.payload(buffer, 2 * channels + 1)
    if policy == _wire.POLICIES["raise"] and not bool(torch.isfinite(moments).all()):
        return None, None, _wire.NONFINITE  # a device sync on GPU (documented)
    mean, var, count = _stats.global_mean_var(moments, channels)
    if running_mean is not None or running_var is not None:
        # On a device the header is checked on the host one pass late: until then, a buffer
        # whose header disagrees must not reach the running statistics, nor a global count
        # below 2 (the host does not read it under CUDA-graph capture): decided there, no sync.
        valid = None
        if not buffer.is_cpu:
            valid = _wire.header_matches(buffer, fields, world) & (count >= 2)
        _stats.update_running_stats(running_mean, running_var, mean, var, count, momentum,
                                    keep_nonfinite=policy != _wire.POLICIES["skip"], valid=valid)
    invstd = torch.rsqrt(var + eps)
    stats = torch.cat([mean, invstd, count.view(1)])  # C, C, 1 -> (2C + 1)
    acc = _stats.acc_dtype(x.dtype)
    out = _stats.normalize(x, mean.to(acc), var.to(acc), weight, bias, eps)
    return out, stats, _wire.OK


def _mean_invstd(stats: Tensor, x: Tensor) -> tuple[Tensor, Tensor]:
    channels, acc = x.shape[1], _stats.acc_dtype(x.dtype)
    return stats[:channels].to(acc), stats[channels:2 * channels].to(acc)


def backward_reduce(geo: tuple[int, ...], dy: Tensor, x: Tensor, stats: Tensor,
                    buffer: Tensor | None, fields: list[int], weight_dtype: torch.dtype | None,
                    bias_dtype: torch.dtype | None) -> tuple[Tensor | None, Tensor | None, int]:
    """Local sum(dy) and sum(dy * xhat): the weight/bias gradients (this rank's share) and,
    when ``buffer`` is given, ``[1 | sum(dy), sum(dy * xhat) | 0... | header | 1]``."""
    mean, invstd = _mean_invstd(stats, x)
    sum_dy, sum_dy_xhat = _stats.backward_reduce(dy, x, mean, invstd)
    if buffer is not None:
        payload = torch.cat([sum_dy, sum_dy_xhat]).double()  # C, C -> (2C)
        torch.cat(_wire.parts(payload, fields, buffer.numel()), out=buffer)
    grad_weight = sum_dy_xhat.to(weight_dtype) if weight_dtype is not None else None
    grad_bias = sum_dy.to(bias_dtype) if bias_dtype is not None else None
    return grad_weight, grad_bias, _wire.OK


def backward_apply(geo: tuple[int, ...], dy: Tensor, x: Tensor, stats: Tensor, weight: Tensor | None, buffer: Tensor,
                   world: int, fields: list[int],
                   status: Tensor | None = None) -> tuple[Tensor | None, int]:
    """Header check, then grad_input from the global sums."""
    if not _checked(buffer, world, fields):
        return None, _wire.MISMATCH
    channels = x.shape[1]
    mean, invstd = _mean_invstd(stats, x)
    sums = _wire.payload(buffer, 2 * channels).to(mean.dtype)
    grad_in = _stats.grad_input(dy, x, mean, invstd, weight, sums[:channels], sums[channels:],
                                stats[2 * channels])
    return grad_in, _wire.OK
