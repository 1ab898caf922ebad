"""The batch-norm formulas as small pure functions (no communication here).

Notation, per channel ``c``: ``n`` values in the global batch, ``mean``, biased variance ``var``,
``invstd = 1 / sqrt(var + eps)``, ``xhat = (x - mean) * invstd``.

Forward (every rank):  local moments -> [one all_reduce] -> global mean/var -> normalize.
Backward (every rank): local sum(dy), sum(dy * xhat) -> [one all_reduce] -> grad_input.

Numerics. Each rank sums its values around a per-channel shift ``k`` (its own local mean, in the
input's accumulation precision): ``s1 = sum(x - k)``, ``s2 = sum((x - k)**2)``. Because ``k`` is
close to the data, both sums are accurate in float32 whatever ``mean / std`` is. The shifted sums
are then turned into raw moments ``sum(x) = n*k + s1`` and ``sum(x**2) = s2 + 2*k*s1 + n*k**2`` in
float64, on C numbers only, so that ranks with different shifts can simply be added together in
the collective. The only cancellation left is ``sum(x**2)/n - mean**2`` in float64, whose relative
error is about ``1e-16 * (mean/std)**2``: below the quantization of float32 data for any ratio,
and 1e-8 at ``mean/std = 1e4`` for float64 data.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "acc_dtype",
    "backward_reduce",
    "channel_view",
    "global_mean_var",
    "grad_input",
    "local_moments",
    "normalize",
    "reduction_dims",
    "update_running_stats",
]


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Dtype in which statistics of ``dtype`` data are accumulated: float32, or float64 for float64."""
    return torch.promote_types(dtype, torch.float32)


def reduction_dims(input: Tensor) -> list[int]:
    """All dims but the channel dim 1: ``(N, C, *) -> [0, 2, 3, ...]``."""
    return [0, *range(2, input.dim())]


def channel_view(t: Tensor, input: Tensor) -> Tensor:
    """A per-channel vector ``(C,)`` shaped to broadcast against ``input`` ``(N, C, *)``."""
    return t.view(1, -1, *([1] * (input.dim() - 2)))


def local_count(input: Tensor) -> int:
    """Values per channel in this shard (a host integer: shapes are known without a sync)."""
    channels = input.shape[1]
    return input.numel() // channels if channels else 0


def local_moments(input: Tensor) -> Tensor:
    """Raw per-channel moments of one shard, packed for one all_reduce.

    Returns a float64 tensor ``[sum(x) (C), sum(x**2) (C), n (1)]`` of length ``2C + 1``, computed
    from sums around the local mean (see the module docstring). An empty shard gives zeros, so it
    can join the collective and adds nothing.

    >>> x = torch.tensor([[1.0], [2.0], [4.0]], dtype=torch.float64)
    >>> local_moments(x).tolist()
    [7.0, 21.0, 3.0]
    """
    channels = input.shape[1]
    n = local_count(input)
    if n == 0:
        return input.new_zeros(2 * channels + 1, dtype=torch.float64)
    dims = reduction_dims(input)
    acc = acc_dtype(input.dtype)
    shift = input.mean(dims, dtype=acc)  # C
    centered = input - channel_view(shift, input)  # full size, in acc (float32 for half inputs)
    s1 = centered.sum(dims)
    s2 = centered.square_().sum(dims)
    k, s1, s2 = shift.double(), s1.double(), s2.double()
    sum_x = torch.addcmul(s1, k, torch.full_like(k, float(n)))  # n*k + s1
    sum_x2 = s2 + k * (2.0 * s1 + n * k)  # s2 + 2*k*s1 + n*k**2
    count = torch.full((1,), float(n), dtype=torch.float64, device=input.device)
    return torch.cat([sum_x, sum_x2, count])  # C, C, 1 -> (2C + 1)


def global_mean_var(moments: Tensor, channels: int) -> tuple[Tensor, Tensor, Tensor]:
    """Global ``(mean, biased var, count)`` in float64 from the all-reduced moments.

    >>> m = local_moments(torch.tensor([[1.0], [2.0], [4.0]], dtype=torch.float64))
    >>> [round(v, 12) for v in torch.cat(global_mean_var(m, 1)[:2]).tolist()]
    [2.333333333333, 1.555555555556]
    """
    sum_x, sum_x2, count = moments[:channels], moments[channels : 2 * channels], moments[-1]
    mean = sum_x / count
    var = (sum_x2 / count - mean * mean).clamp_min_(0.0)
    return mean, var, count


def update_running_stats(
    running_mean: Tensor | None,
    running_var: Tensor | None,
    mean: Tensor,
    var: Tensor,
    count: Tensor,
    momentum: float,
    keep_nonfinite: bool = True,
    valid: Tensor | None = None,
) -> None:
    """In place: ``running = (1 - momentum) * running + momentum * batch``, with the unbiased var.

    Computed in float64 from identical inputs, so every rank gets bitwise identical buffers.
    ``count`` must be at least 2. With ``keep_nonfinite=False`` a channel whose new value is not
    finite keeps its old value; with a boolean tensor ``valid`` that is False, every value is
    kept (both decided on the device, no sync).
    """
    for running, batch in ((running_mean, mean), (running_var, var * (count / (count - 1.0)))):
        if running is None:
            continue
        new = running.to(torch.float64, copy=True).mul_(1.0 - momentum).add_(batch, alpha=momentum)
        if not keep_nonfinite:
            new = torch.where(torch.isfinite(new), new, running.double())
        if valid is not None:
            new = torch.where(valid, new, running.double())
        running.copy_(new)


def normalize(
    input: Tensor,
    mean: Tensor,
    var: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
) -> Tensor:
    """``(x - mean) / sqrt(var + eps) * weight + bias`` with given per-channel statistics.

    One fused pass (torch's inference kernel), in the input's dtype and memory format. Inputs
    of more than 5 dims (which cuDNN refuses) are normalized as ``(N, C, -1)``. The per-channel
    tensors may each have any floating dtype (``model.half()`` gives float16 ``weight``/``bias``
    with float32 statistics; float32 parameters may meet float64 input): they are taken in the
    accumulation dtype, the one combination torch's kernel accepts for every input dtype.
    """
    if input.dim() > 5:
        flat = normalize(input.flatten(2), mean, var, weight, bias, eps)
        return flat.view(input.shape)
    acc = acc_dtype(input.dtype)
    weight = weight.to(acc) if weight is not None else None
    bias = bias.to(acc) if bias is not None else None
    return torch.batch_norm(
        input, weight, bias, mean.to(acc), var.to(acc), False, 0.0, eps,
        torch.backends.cudnn.enabled
    )


def backward_reduce(grad_out: Tensor, input: Tensor, mean: Tensor, invstd: Tensor) -> tuple[Tensor, Tensor]:
    """Local ``(sum(dy), sum(dy * xhat))`` per channel, in the accumulation dtype.

    >>> x = torch.tensor([[0.0], [2.0]]); dy = torch.tensor([[1.0], [3.0]])
    >>> [t.tolist() for t in backward_reduce(dy, x, torch.tensor([1.0]), torch.tensor([1.0]))]
    [[4.0], [2.0]]
    """
    channels = input.shape[1]
    acc = acc_dtype(input.dtype)
    if input.numel() == 0:
        zeros = input.new_zeros(channels, dtype=acc)
        return zeros, zeros.clone()
    if input.device.type == "cuda":
        sum_dy, sum_dy_xmu, _, _ = torch.batch_norm_backward_reduce(
            grad_out, input, mean, invstd, None, True, False, False
        )
        return sum_dy.to(acc), (sum_dy_xmu * invstd).to(acc)
    # torch's inference-mode backward computes exactly these two reductions in one fused pass:
    # grad_weight = sum(dy * (x - mean) * invstd), grad_bias = sum(dy), with invstd from "var".
    var = (invstd.double().reciprocal().square_()).to(acc)  # so that 1/sqrt(var + 0) == invstd
    _, sum_dy_xhat, sum_dy = torch.ops.aten.native_batch_norm_backward(
        grad_out, input, None, mean, var, None, None, False, 0.0, [False, True, True]
    )
    return sum_dy.to(acc), sum_dy_xhat.to(acc)


def grad_input(
    grad_out: Tensor,
    input: Tensor,
    mean: Tensor,
    invstd: Tensor,
    weight: Tensor | None,
    sum_dy: Tensor,
    sum_dy_xhat: Tensor,
    count: Tensor,
) -> Tensor:
    """``dx = weight * invstd * (dy - sum(dy)/n - xhat * sum(dy*xhat)/n)`` with global sums.

    Written as ``dx = dy * a + (x - mean) * b + c`` (per-channel a, b, c). Subtracting the mean
    first matters: the folded ``x * b + (c - mean * b)`` cancels catastrophically when
    ``|mean| >> std`` (a relative error of ~eps * mean/std).

    >>> x = torch.tensor([[0.0], [2.0]]); dy = torch.tensor([[1.0], [3.0]])
    >>> one = torch.tensor([1.0])
    >>> grad_input(dy, x, one, one, None, torch.tensor([4.0]), torch.tensor([2.0]), torch.tensor(2.0))
    tensor([[0.], [0.]])
    """
    acc = mean.dtype
    w_invstd = invstd if weight is None else invstd * weight.to(acc)
    count = count.to(acc)
    mean_dy = sum_dy / count
    mean_dy_xhat = sum_dy_xhat / count
    a = w_invstd
    b = -w_invstd * invstd * mean_dy_xhat
    c = -w_invstd * mean_dy
    centered = input - channel_view(mean, input)  # in the accumulation dtype
    out = torch.addcmul(channel_view(c, input), centered, channel_view(b, input))
    out.addcmul_(grad_out, channel_view(a, input))
    return out.to(input.dtype)
