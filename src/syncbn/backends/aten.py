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
ACTIVATES = True  # fuses the activation and in-place passes (issue 21)


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
                  status: Tensor | None = None, *, act: int = _stats.IDENTITY,
                  act_param: float = 0.0, out: Tensor | None = None,
                  ) -> tuple[Tensor | None, Tensor | None, int]:
    """Header check, global mean/invstd/count, running statistics, then the normalization and
    the activation (in place on the normalized output). ``out`` (x itself for an in-place
    layer): the result is copied there (a transient tensor of x's size: torch has no
    normalize-into-x operator that keeps the accumulation precision of half inputs)."""
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
    y = _stats.normalize(x, mean.to(acc), var.to(acc), weight, bias, eps)
    y = _stats.activate(y, act, act_param, inplace=True)  # y is ours: no second tensor
    if out is not None:
        y = out.copy_(y)
    return y, stats, _wire.OK


def _mean_invstd(stats: Tensor, x: Tensor) -> tuple[Tensor, Tensor]:
    channels, acc = x.shape[1], _stats.acc_dtype(x.dtype)
    return stats[:channels].to(acc), stats[channels:2 * channels].to(acc)


def _grad_z(dy: Tensor, x: Tensor, mean: Tensor, invstd: Tensor, weight: Tensor | None,
            bias: Tensor | None, act: int, act_param: float) -> Tensor:
    """``dz = dy * act'(z)`` with ``z = (x - mean) * invstd * weight + bias`` recomputed from
    ``x``, in x's dtype (the backward of an activated layer that kept its input)."""
    acc = mean.dtype
    scale = invstd if weight is None else invstd * weight.to(acc)
    shift = torch.zeros_like(mean) if bias is None else bias.to(acc)
    view = _stats.channel_view
    z = torch.addcmul(view(shift, x), x - view(mean, x), view(scale, x))
    return (dy * _stats.act_grad(z, act, act_param)).to(x.dtype)


def _from_output(dy: Tensor, y: Tensor, weight: Tensor | None, bias: Tensor | None, act: int,
                 act_param: float, acc: torch.dtype) -> tuple[Tensor, Tensor]:
    """``(dz, xhat)`` in ``acc`` from the saved output ``y`` alone (an in-place layer):
    ``z = act^-1(y)``, ``dz = dy * act'(z)`` (from y), ``xhat = (z - bias) / weight``."""
    ya = y.to(acc)
    dz = dy.to(acc) * _stats.act_grad_from_output(ya, act, act_param)
    z = _stats.act_inverse(ya, act, act_param)
    if bias is not None:
        z = z - _stats.channel_view(bias.to(acc), y)
    if weight is not None:
        z = z / _stats.channel_view(weight.to(acc), y)
    return dz, z


def backward_reduce(geo: tuple[int, ...], dy: Tensor, x: Tensor | None, stats: Tensor,
                    buffer: Tensor | None, fields: list[int], weight_dtype: torch.dtype | None,
                    bias_dtype: torch.dtype | None, *, act: int = _stats.IDENTITY,
                    act_param: float = 0.0, saved_output: Tensor | None = None,
                    weight: Tensor | None = None, bias: Tensor | None = None,
                    ) -> tuple[Tensor | None, Tensor | None, int]:
    """Local sum(dz) and sum(dz * xhat), ``dz = dy * act'(z)`` (``dy`` itself for identity):
    the weight/bias gradients (this rank's share) and, when ``buffer`` is given,
    ``[1 | sum(dz), sum(dz * xhat) | 0... | header | 1]``. ``saved_output``: recover ``z`` and
    ``xhat`` from the output (x is not read; it may be None); else from ``x``."""
    ref = x if saved_output is None else saved_output
    assert ref is not None, "syncbn aten backend: backward_reduce needs x or saved_output"
    mean, invstd = _mean_invstd(stats, ref)
    if saved_output is not None:
        dz, xhat = _from_output(dy, saved_output, weight, bias, act, act_param, mean.dtype)
        dims = _stats.reduction_dims(ref)
        sum_dy, sum_dy_xhat = dz.sum(dims), (dz * xhat).sum(dims)
    else:
        assert x is not None
        if act != _stats.IDENTITY:
            dy = _grad_z(dy, x, mean, invstd, weight, bias, act, act_param)
        sum_dy, sum_dy_xhat = _stats.backward_reduce(dy, x, mean, invstd)
    if buffer is not None:
        payload = torch.cat([sum_dy, sum_dy_xhat]).double()  # C, C -> (2C)
        torch.cat(_wire.parts(payload, fields, buffer.numel()), out=buffer)
    grad_weight = sum_dy_xhat.to(weight_dtype) if weight_dtype is not None else None
    grad_bias = sum_dy.to(bias_dtype) if bias_dtype is not None else None
    return grad_weight, grad_bias, _wire.OK


def backward_apply(geo: tuple[int, ...], dy: Tensor, x: Tensor | None, stats: Tensor,
                   weight: Tensor | None, buffer: Tensor, world: int, fields: list[int],
                   status: Tensor | None = None, *, act: int = _stats.IDENTITY,
                   act_param: float = 0.0, saved_output: Tensor | None = None,
                   bias: Tensor | None = None) -> tuple[Tensor | None, int]:
    """Header check, then grad_input from the global sums (``dz`` and ``xhat`` as in
    :func:`backward_reduce`)."""
    if not _checked(buffer, world, fields):
        return None, _wire.MISMATCH
    ref = x if saved_output is None else saved_output
    assert ref is not None, "syncbn aten backend: backward_apply needs x or saved_output"
    channels = ref.shape[1]
    mean, invstd = _mean_invstd(stats, ref)
    sums = _wire.payload(buffer, 2 * channels).to(mean.dtype)
    sum_dz, sum_dz_xhat, count = sums[:channels], sums[channels:], stats[2 * channels]
    if saved_output is None:
        assert x is not None
        if act != _stats.IDENTITY:
            dy = _grad_z(dy, x, mean, invstd, weight, bias, act, act_param)
        grad_in = _stats.grad_input(dy, x, mean, invstd, weight, sum_dz, sum_dz_xhat, count)
        return grad_in, _wire.OK
    # dx = weight * invstd * (dz - sum(dz)/n - xhat * sum(dz * xhat)/n)
    dz, xhat = _from_output(dy, saved_output, weight, bias, act, act_param, mean.dtype)
    n = count.to(mean.dtype)
    scale = invstd if weight is None else invstd * weight.to(mean.dtype)
    view = _stats.channel_view
    grad_in = dz.sub_(view(sum_dz / n, ref)).sub_(xhat * view(sum_dz_xhat / n, ref))
    return grad_in.mul_(view(scale, ref)).to(ref.dtype), _wire.OK
