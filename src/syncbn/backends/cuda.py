"""The lean CUDA backend: a synchronized pass in torch's own SyncBatchNorm kernels and a few small
float64 operators, with no host sync and no host-to-device copy per pass.

The four steps and the buffer they write and read are specified in ``syncbn.backends`` and
``syncbn._wire``; ranks on this backend meet ranks on the others in one group. The operators
each step runs on CUDA, one kernel each (``tests/test_cuda.py`` counts them); "on C" means on
per-channel vectors::

    forward_reduce   the buffer's frame (one op from a cached template); x - k, k the shard's
                     first value per channel (cast to float32 first for half input);
                     torch.batch_norm_update_stats (float32 Welford) of it; sum(x) and
                     sum(x**2) from those in float64, 3 ops on C                  6 (7 for half)
    forward_apply    mean, E[x**2] + eps, count, invstd in float64 (5 ops on C); their float32
                     copy; torch.batch_norm_elemt; the running statistics: a 4-op device check
                     of the header, a copy of them, torch.batch_norm_gather_stats_with_counts
                     into it, 2 where (on CPU the gather alone)      15 (7 without running stats)
    backward_reduce  mean/invstd in float32, torch.batch_norm_backward_reduce, the frame, 2 ops
                     on C, grad_weight's copy                                                  6
    backward_apply   mean/invstd, sum(dy), sum(dy * (x - mean)) and the count in the kernel's
                     dtypes (4 ops on C), torch.batch_norm_backward_elemt                      5

``SYNCBN_KERNEL=cuda`` shifts the data by ``k`` first, so that torch's float32 Welford works on
values near zero (``x - k`` is exact for data within a factor 2 of ``k``), and combines each
rank's shifted moments into the raw moments of the wire format in float64: relative variance
error ~1e-7 at mean/std 1e4 in float32. ``SYNCBN_KERNEL=cuda-welford`` skips the shift (one full
pass and a float32 temporary fewer): torch's float32 Welford on the data itself, the numerics of
``torch.nn.SyncBatchNorm``, ~1e-5 to ~5e-4 at mean/std 1e4 (``pytest -s tests/test_cuda.py -k
numerics`` prints both, with CUDA's Welford emulated on CPU).

On CUDA the header is checked by the core one pass late; until then a device-side check
(:func:`syncbn._wire.tail_matches`) keeps a mismatching buffer, or a global count below 2 (under
CUDA-graph capture), from the running statistics. On CPU (torch has no CPU kernels for these
operators; the tests register stand-ins) the header is checked here, on the host.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .. import _stats, _wire

__all__ = ["NAME", "STATUS_WORD", "Geometry", "applies", "backward_apply", "backward_reduce",
           "forward_apply", "forward_reduce"]

NAME = "cuda"
STATUS_WORD = False
ACTIVATES = False  # no fused activation or in-place pass: such a layer needs another backend
_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@dataclass(frozen=True)
class Geometry:
    """What a plan knows of its input: channels, values per channel in this shard, the dtype of
    the kernels' statistics (float32, or float64 for float64 input), and whether the data is
    shifted before torch's Welford (``cuda``) or not (``cuda-welford``)."""

    channels: int
    count: int
    acc: torch.dtype
    shift: bool


def applies(input: Tensor, *params: Tensor | None, welford: bool = False) -> Geometry | None:
    """The geometry when this backend can take the pass, else None: a CUDA tensor (on another
    device only where torch's SyncBatchNorm operators run there: CPU in the tests) of
    float16/bfloat16/float32/float64 with C >= 1, and 1-D per-channel tensors of C values on
    its device, each of any of those dtypes (cast where torch's kernels want another)."""
    if input.device.type != "cuda" and not _operators_run_on(input.device.type):
        return None
    if input.dim() < 2 or input.dtype not in _DTYPES or input.shape[1] == 0:
        return None
    channels = input.shape[1]
    for t in params:
        if t is not None and (t.dim() != 1 or t.numel() != channels or t.device != input.device
                              or t.dtype not in _DTYPES):
            return None
    return Geometry(channels, input.numel() // channels, _stats.acc_dtype(input.dtype),
                    shift=not welford)


_available: set[str] = set()  # device types (other than CUDA) where the operators were seen to run


def _operators_run_on(device_type: str) -> bool:
    """Whether torch's SyncBatchNorm operators run on this device type (tried once on tiny
    tensors; a failure is tried again next time, so stand-ins registered later count)."""
    if device_type in _available:
        return True
    try:
        x = torch.ones(2, 1, device=device_type)
        zero, one = torch.zeros(1, device=device_type), torch.ones(1, device=device_type)
        torch.batch_norm_elemt(x, None, None, zero, one, 0.0)
        torch.batch_norm_gather_stats_with_counts(x, zero.view(1, 1), one.view(1, 1), None, None,
                                                  0.1, 0.0, one * 2)
        torch.batch_norm_backward_reduce(x, x, zero, one, None, True, False, False)
        torch.batch_norm_backward_elemt(x, x, zero, one, None, zero, zero,
                                        torch.full((1,), 2, dtype=torch.int32, device=device_type))
    except (NotImplementedError, RuntimeError):
        return False
    _available.add(device_type)
    return True


def _host_checks(buffer: Tensor) -> bool:
    """Whether the header is checked here, on the host (CPU buffers); elsewhere the core checks
    it one pass late and the running statistics are guarded on the device."""
    return buffer.is_cpu


def _first(x: Tensor) -> Tensor:
    """The shard's first value per channel, ``(1, C, 1, ...)`` (a view)."""
    return x[(slice(0, 1), slice(None)) + (slice(0, 1),) * (x.dim() - 2)]


def forward_reduce(geo: Geometry, x: Tensor, buffer: Tensor, fields: list[int]) -> int:
    """``[1 | sum(x), sum(x**2), n | 0... | header | 1]`` of this shard into ``buffer``."""
    channels, n = geo.channels, geo.count
    count_at = 1 + 2 * channels
    _wire.frame(buffer, fields, count_at=count_at, count=n)  # 1, zeros, n, zeros, header, 1
    if n == 0:
        return _wire.OK  # an empty shard sends zeros and its count 0
    k = _first(x).to(geo.acc) if geo.shift else None
    mean, var = torch.batch_norm_update_stats(x - k if k is not None else x, None, None, 0.0)
    sums = buffer[1:count_at]
    m, q = sums[:channels], sums[channels:]
    if k is not None:
        # k + mean(x - k) in float64: buffer[:1] is the first sentinel, a float64 1.0 whose
        # dtype makes the op compute in float64
        torch.addcmul(k.view(channels), mean, buffer[:1], out=m)
    else:
        m.copy_(mean)
    torch.addcmul(var, m, m, out=q)  # var + mean**2, float64
    sums.mul_(n)  # sum(x) = n*mean, sum(x**2) = n*(var + mean**2)
    return _wire.OK


def forward_apply(geo: Geometry, x: Tensor, buffer: Tensor, world: int, fields: list[int],
                  weight: Tensor | None, bias: Tensor | None, running_mean: Tensor | None,
                  running_var: Tensor | None, eps: float, momentum: float, policy: int,
                  status: Tensor | None = None) -> tuple[Tensor | None, Tensor | None, int]:
    """Header check (on the host for CPU buffers), global mean/invstd/count in float64, running
    statistics, then the normalization."""
    channels = geo.channels
    host = _host_checks(buffer)
    if host and not _wire.header_ok(buffer, fields, world):
        return None, None, _wire.MISMATCH
    moments = _wire.payload(buffer, 2 * channels + 1)  # sum(x), sum(x**2), N
    if policy == _wire.POLICIES["raise"] and not bool(torch.isfinite(moments).all()):
        return None, None, _wire.NONFINITE  # a device sync on GPU (documented)
    stats = torch.empty(2 * channels + 1, dtype=torch.float64, device=x.device)
    mean, var = stats[:channels], stats[channels:2 * channels]
    torch.addcdiv(_eps_tail(x.device, channels, eps), moments[:2 * channels], moments[2 * channels:],
                  out=stats[:2 * channels])  # mean, E[x**2] + eps
    stats[2 * channels:].copy_(moments[2 * channels:])
    var.addcmul_(mean, mean, value=-1.0).clamp_min_(eps).rsqrt_()  # 1/sqrt(max(var, 0) + eps)
    low = stats if geo.acc == torch.float64 else stats.to(geo.acc)  # mean, invstd, N for the kernels
    if running_mean is not None and running_var is not None:
        _update_running(geo, x, buffer, world, fields, running_mean, running_var, stats, low,
                        eps, momentum, policy, host)
    if geo.count == 0:
        return torch.empty_like(x), stats, _wire.OK  # torch's kernels are not called on no data
    affine = {t.dtype for t in (weight, bias) if t is not None}
    if not (affine <= {x.dtype} or affine == {geo.acc}):  # the kernel reads both in one dtype,
        weight, bias = (None if t is None else t.to(geo.acc) for t in (weight, bias))  # x's or acc
    out = torch.batch_norm_elemt(x, weight, bias, low[:channels], low[channels:2 * channels], eps)
    return out, stats, _wire.OK


_eps_vectors: dict[tuple[torch.device, int, float], Tensor] = {}


def _eps_tail(device: torch.device, channels: int, eps: float) -> Tensor:
    """``[0 (C) | eps (C)]`` in float64 on the device (made once per device, width and eps)."""
    key = (device, channels, eps)
    vector = _eps_vectors.get(key)
    if vector is None:
        vector = torch.zeros(2 * channels, dtype=torch.float64)
        vector[channels:] = eps
        vector = _eps_vectors[key] = vector.to(device)
    return vector


def _update_running(geo: Geometry, x: Tensor, buffer: Tensor, world: int, fields: list[int],
                    running_mean: Tensor, running_var: Tensor, stats: Tensor, low: Tensor,
                    eps: float, momentum: float, policy: int, host: bool) -> None:
    """``running = (1 - momentum) * running + momentum * batch`` (unbiased var) by torch's
    gather kernel, which takes the global statistics as one "rank" of N values and updates the
    running statistics in their dtype. Off the host, into a copy first, kept only where the
    buffer's header matches and N >= 2 (decided on the device); under
    ``SYNCBN_NONFINITE=skip`` a channel whose new value is not finite keeps its old one. Running
    statistics of two dtypes, or float16 ones (the kernel reads N in their dtype: 65504 at
    most), go through a copy in float32 or better."""
    channels = geo.channels
    dtype = running_mean.dtype
    native = dtype == running_var.dtype and dtype != torch.float16
    if not native:
        dtype = torch.promote_types(torch.promote_types(dtype, running_var.dtype), torch.float32)
    # the kernel reads mean/invstd in its accumulation dtype and N in the running dtype
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    source = low if low.dtype == acc else stats.to(acc)  # (stats itself for float64)
    counts = source[2 * channels:]
    if counts.dtype != dtype:
        counts = counts.to(dtype)
    guard = None if host else _wire.tail_matches(buffer, fields, world, 1 + 2 * channels, 2)
    skip = policy == _wire.POLICIES["skip"]
    direct = native and guard is None and not skip
    new = None if direct else torch.stack([running_mean, running_var]).to(dtype)
    torch.batch_norm_gather_stats_with_counts(
        x, source[:channels].view(1, channels), source[channels:2 * channels].view(1, channels),
        *((running_mean, running_var) if new is None else new), momentum, eps, counts)
    if new is None:
        return
    if guard is None and not skip:
        running_mean.copy_(new[0])
        running_var.copy_(new[1])
        return
    if guard is None:
        keep = torch.isfinite(new)  # skip, on the host path
    elif skip:
        keep = torch.isfinite(new) & guard
    else:
        keep = guard.expand(2)  # one decision for both (a view)
    for take, value, running in zip(keep, new, (running_mean, running_var)):
        if running.dtype == value.dtype:
            torch.where(take, value, running, out=running)
        else:  # (where's out= takes its result's dtype only)
            running.copy_(torch.where(take, value, running))


def backward_reduce(geo: Geometry, dy: Tensor, x: Tensor, stats: Tensor, buffer: Tensor | None,
                    fields: list[int], weight_dtype: torch.dtype | None,
                    bias_dtype: torch.dtype | None) -> tuple[Tensor | None, Tensor | None, int]:
    """Local sum(dy) and sum(dy * xhat): the weight/bias gradients (this rank's share) and,
    when ``buffer`` is given, ``[1 | sum(dy), sum(dy * xhat) | 0... | header | 1]``."""
    channels = geo.channels
    if geo.count == 0:
        sum_dy = torch.zeros(channels, dtype=geo.acc, device=x.device)
        sum_dy_xmu = sum_dy
    else:
        low = stats[:2 * channels] if geo.acc == torch.float64 else stats[:2 * channels].to(geo.acc)
        sum_dy, sum_dy_xmu, _, _ = torch.batch_norm_backward_reduce(
            dy, x, low[:channels], low[channels:], None, True, False, False)
    invstd = stats[channels:2 * channels]
    if buffer is not None:
        _wire.frame(buffer, fields)  # 1, zeros, header, 1
        buffer[1:1 + channels].copy_(sum_dy)
        # sum(dy * xhat) = invstd * sum(dy * (x - mean)), in float64
        sum_dy_xhat = torch.mul(sum_dy_xmu, invstd, out=buffer[1 + channels:1 + 2 * channels])
    else:
        sum_dy_xhat = torch.mul(sum_dy_xmu, invstd)
    # copies: the buffer is summed over the ranks in place next
    grad_weight = (sum_dy_xhat.to(weight_dtype, copy=True) if weight_dtype is not None
                   else None)
    grad_bias = sum_dy.to(bias_dtype) if bias_dtype is not None else None
    return grad_weight, grad_bias, _wire.OK


def backward_apply(geo: Geometry, dy: Tensor, x: Tensor, stats: Tensor, weight: Tensor | None,
                   buffer: Tensor, world: int, fields: list[int],
                   status: Tensor | None = None) -> tuple[Tensor | None, int]:
    """Header check (on the host for CPU buffers), then grad_input from the global sums."""
    if _host_checks(buffer) and not _wire.header_ok(buffer, fields, world):
        return None, _wire.MISMATCH
    if geo.count == 0:
        return torch.empty_like(x), _wire.OK
    channels, acc = geo.channels, geo.acc
    low = stats if acc == torch.float64 else stats.to(acc)
    sums = _wire.payload(buffer, 2 * channels)
    sum_dy = sums[:channels].to(acc)
    # torch's kernel takes sum(dy * (x - mean)) = sum(dy * xhat) / invstd
    sum_dy_xmu = torch.div(sums[channels:], stats[channels:2 * channels],
                           out=torch.empty(channels, dtype=acc, device=x.device))
    count = stats[2 * channels:].to(torch.int32)  # the kernel sums the ranks' int32 counts
    if weight is not None and weight.dtype != acc:
        weight = weight.to(acc)  # half weights: the kernel reads them in its statistics' dtype
    grad_in = torch.batch_norm_backward_elemt(dy, x, low[:channels], low[channels:2 * channels],
                                              weight, sum_dy, sum_dy_xmu, count)
    return grad_in, _wire.OK
