"""CPU stand-ins for torch's SyncBatchNorm operators, so that the lean CUDA backend
(``syncbn.backends.cuda``) runs its own code on CPU tensors in the tests.

torch has CUDA (and XPU) kernels for ``batch_norm_elemt``, ``batch_norm_gather_stats_with_counts``,
``batch_norm_backward_reduce`` and ``batch_norm_backward_elemt``, and none for CPU:
:func:`register` adds CPU kernels for them, written from the CUDA kernels
(``aten/src/ATen/native/cuda/Normalization.cu{,h}``): the same formulas in the same accumulation
dtype (float32 for float16/bfloat16/float32 input, float64 for float64), and the same dtype
rules, checked with the CUDA kernels' words, so that a dtype the GPU would refuse fails here too.

``batch_norm_update_stats`` has a CPU kernel, with other semantics than CUDA's (it accumulates
in float64 and returns the input's dtype, where CUDA runs a float32 Welford and returns float32
for half input). :class:`CudaWelford` reroutes it, within a ``with`` block only, to an emulation
of CUDA's: 512 interleaved float32 Welford partials merged pairwise, results in the
accumulation dtype.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode

_library: torch.library.Library | None = None


def acc(dtype: torch.dtype) -> torch.dtype:
    """CUDA's accumulation dtype (``at::acc_type<T, true>``)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _expect(t: Tensor | None, dtype: torch.dtype, name: str) -> None:
    if t is not None and t.dtype != dtype:
        raise RuntimeError(f"Expected {name} to have type {dtype} but got {t.dtype}")


def _stat_dtype(input: Tensor, *params: Tensor | None) -> torch.dtype:
    """``stat_scalar_t``: the parameters' dtype when it differs from the input's ("mixed
    type"), else the input's."""
    defined = [p.dtype for p in params if p is not None]
    return acc(input.dtype) if defined and defined[0] != input.dtype else input.dtype


def _channel(t: Tensor, like: Tensor) -> Tensor:
    return t.view(1, -1, *([1] * (like.dim() - 2)))


def _dims(t: Tensor) -> list[int]:
    return [0, *range(2, t.dim())]


def batch_norm_elemt(input: Tensor, weight: Tensor | None, bias: Tensor | None, mean: Tensor,
                     invstd: Tensor, eps: float) -> Tensor:
    """``(x - mean) * invstd * weight + bias`` in the accumulation dtype, in x's dtype."""
    stat = _stat_dtype(input, weight, bias)
    _expect(weight, stat, "weight")
    _expect(bias, stat, "bias")
    _expect(mean, acc(stat), "mean")
    _expect(invstd, acc(stat), "invstd")
    a = acc(input.dtype)
    out = (input.to(a) - _channel(mean, input)) * _channel(invstd, input)
    if weight is not None:
        out = out * _channel(weight.to(a), input)
    if bias is not None:
        out = out + _channel(bias.to(a), input)
    return out.to(input.dtype)


def batch_norm_gather_stats_with_counts(input: Tensor, mean: Tensor, invstd: Tensor,
                                        running_mean: Tensor | None, running_var: Tensor | None,
                                        momentum: float, eps: float,
                                        counts: Tensor) -> tuple[Tensor, Tensor]:
    """The ranks' (mean, invstd, count) merged as ``batch_norm_reduce_statistics_kernel`` does
    (rank by rank, in the accumulation dtype of the running statistics' dtype); running
    statistics updated in place with the unbiased variance."""
    scalar = running_mean.dtype if running_mean is not None else input.dtype
    a = acc(scalar)
    _expect(mean, a, "mean")
    _expect(invstd, a, "invstd")
    _expect(running_mean, scalar, "running_mean")
    _expect(running_var, scalar, "running_mean")  # (sic, the CUDA source's word)
    _expect(counts, scalar, "counts")
    eps_a = torch.tensor(eps, dtype=a)
    avg = torch.zeros(mean.shape[1], dtype=a)
    var_n = torch.zeros_like(avg)
    n = torch.zeros((), dtype=a)
    for j in range(mean.shape[0]):
        count = counts[j].to(a)
        m = mean[j]
        v = 1.0 / invstd[j]
        v = (v * v - eps_a) * count
        factor = 1.0 / (n + count)
        var_n = var_n + v + (avg - m) * (avg - m) * n * count * factor
        avg = n * factor * avg + count * factor * m
        n = n + count
    out_invstd = 1.0 / torch.sqrt(var_n / n + eps_a)
    mom = torch.tensor(momentum, dtype=a)
    if running_mean is not None:
        running_mean.copy_(((1 - mom) * running_mean.to(a) + mom * avg).to(scalar))
    if running_var is not None:
        unbiased = var_n / (n - 1)
        running_var.copy_(((1 - mom) * running_var.to(a) + mom * unbiased).to(scalar))
    return avg, out_invstd


def batch_norm_backward_reduce(grad_out: Tensor, input: Tensor, mean: Tensor, invstd: Tensor,
                               weight: Tensor | None, input_g: bool, weight_g: bool,
                               bias_g: bool) -> tuple[Any, Any, Any, Any]:
    """sum(dy), sum(dy * (x - mean)) per channel in the accumulation dtype (when ``input_g``);
    grad_weight = sum(dy * (x - mean)) * invstd, grad_bias = sum(dy) in weight's dtype."""
    if mean.dtype != invstd.dtype:
        raise RuntimeError("mean and invstd need to have the same data types")
    stat = _stat_dtype(input, weight)
    _expect(mean, acc(stat), "mean")
    _expect(grad_out, input.dtype, "grad_output")
    if (weight_g or bias_g) and weight is None:
        raise RuntimeError("batch_norm_backward_reduce: weight_g/bias_g need the weight "
                           "(its dtype and device)")
    a = acc(input.dtype)
    dy = grad_out.to(a)
    sum_dy = dy.sum(_dims(input))
    sum_dy_xmu = (dy * (input.to(a) - _channel(mean, input))).sum(_dims(input))
    grad_weight = (sum_dy_xmu * invstd).to(weight.dtype) if weight_g else None
    grad_bias = sum_dy.to(weight.dtype) if bias_g else None
    if not input_g:
        sum_dy = sum_dy_xmu = None
    return sum_dy, sum_dy_xmu, grad_weight, grad_bias


def batch_norm_backward_elemt(grad_out: Tensor, input: Tensor, mean: Tensor, invstd: Tensor,
                              weight: Tensor | None, sum_dy: Tensor, sum_dy_xmu: Tensor,
                              count: Tensor) -> Tensor:
    """``(dy - sum_dy/N - (x - mean) * invstd**2 * sum_dy_xmu/N) * invstd * weight`` with
    ``N = sum(count)`` (int32, read on the device)."""
    if mean.dtype != invstd.dtype:
        raise RuntimeError("mean and invstd need to have the same data types")
    # the parameters' dtype follows mean's here: float32 for half input with float32 statistics
    half = input.dtype in (torch.float16, torch.bfloat16) and mean.dtype == torch.float32
    stat = torch.float32 if half else input.dtype
    _expect(weight, stat, "weight")
    for t, name in ((mean, "mean"), (invstd, "invstd"), (sum_dy, "sum_dy"),
                    (sum_dy_xmu, "sum_dy_xmu")):
        _expect(t, acc(stat), name)
    _expect(count, torch.int32, "count")
    a = acc(input.dtype)
    norm = 1.0 / count.to(torch.int64).sum().to(a)
    invstd_c = _channel(invstd, input)
    factor_1 = invstd_c * invstd_c * _channel(sum_dy_xmu, input) * norm
    factor_2 = invstd_c if weight is None else invstd_c * _channel(weight.to(a), input)
    out = (grad_out.to(a) - _channel(sum_dy, input) * norm
           - (input.to(a) - _channel(mean, input)) * factor_1) * factor_2
    return out.to(input.dtype)


def register() -> None:
    """Register the four stand-ins as these operators' CPU kernels (once per process)."""
    global _library
    if _library is not None:
        return
    library = torch.library.Library("aten", "IMPL")
    for fn in (batch_norm_elemt, batch_norm_gather_stats_with_counts, batch_norm_backward_reduce,
               batch_norm_backward_elemt):
        library.impl(fn.__name__, fn, "CPU")
    _library = library


def welford32(values: Tensor, partials: int = 512) -> tuple[Tensor, Tensor]:
    """Mean and biased variance per column of ``values (n, C)`` as CUDA computes them: each of
    ``partials`` threads runs a Welford over every ``partials``-th value in the accumulation
    dtype (float32), then the partials are merged pairwise."""
    n, channels = values.shape
    steps = -(-n // partials)
    padded = torch.zeros(steps * partials, channels, dtype=values.dtype)
    padded[:n] = values
    padded = padded.view(steps, partials, channels)
    valid = (torch.arange(steps * partials) < n).view(steps, partials, 1)
    mean = torch.zeros(partials, channels, dtype=values.dtype)
    m2 = torch.zeros_like(mean)
    count = torch.zeros(partials, 1, dtype=values.dtype)
    for s in range(steps):
        v, ok = padded[s], valid[s]
        count = count + ok
        delta = v - mean
        moved = mean + delta / count.clamp(min=1)
        m2 = torch.where(ok, m2 + delta * (v - moved), m2)
        mean = torch.where(ok, moved, mean)
    while mean.shape[0] > 1:
        half = mean.shape[0] // 2
        (a, b), (ma, mb), (na, nb) = mean.split(half), m2.split(half), count.split(half)
        factor = 1.0 / (na + nb).clamp(min=1)
        m2 = ma + mb + (a - b) * (a - b) * na * nb * factor
        mean = (na * a + nb * b) * factor
        count = na + nb
    return mean[0], m2[0] / n


class CudaWelford(TorchDispatchMode):
    """Within ``with CudaWelford():``, ``torch.batch_norm_update_stats`` (without running
    statistics) computes as on CUDA: :func:`welford32`, results in the accumulation dtype."""

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (),
                           kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if func is torch.ops.aten.batch_norm_update_stats.default:
            input, running_mean, running_var, _ = args
            if running_mean is not None or running_var is not None:
                raise NotImplementedError("the emulation takes no running statistics")
            a = acc(input.dtype)
            values = input.to(a).transpose(0, 1).reshape(input.shape[1], -1).t()
            return welford32(values)
        return func(*args, **kwargs)
