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

Activation. A layer may apply ``y = act(z)`` to its affine output ``z = xhat * weight + bias``
inside the same pass: ``identity``, ``relu``, ``leaky_relu`` (negative slope ``p``), ``elu``
(``alpha = p``). The backward needs ``dz = dy * act'(z)``; an in-place layer keeps only ``y``
and recovers ``z = act^-1(y)`` and ``xhat = (z - bias) / weight`` from it (invertible kinds
only: identity, leaky_relu with ``p > 0``, elu with ``p > 0``; :func:`inplace_invertible`
says when the weights allow it). The functions below are the reference the kernels follow.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "ACTIVATIONS",
    "ELU",
    "IDENTITY",
    "INPLACE_MAX_COND",
    "LEAKY_RELU",
    "RELU",
    "acc_dtype",
    "act_grad",
    "act_grad_from_output",
    "act_inverse",
    "activate",
    "activation_code",
    "backward_reduce",
    "batch_norm_act",
    "channel_view",
    "global_mean_var",
    "grad_input",
    "inplace_invertible",
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


# ------------------------------------------------------------------------------- activation
# Kinds, as the backends take them (csrc/kernel_body.h: ACT_IDENTITY ...).
IDENTITY, RELU, LEAKY_RELU, ELU = 0, 1, 2, 3
ACTIVATIONS = {"identity": IDENTITY, "relu": RELU, "leaky_relu": LEAKY_RELU, "elu": ELU}
_NAMES = {code: name for name, code in ACTIVATIONS.items()}
# An in-place pass inverts ``xhat = (z - bias) / weight``: the error of ``z`` (rounded to the
# data dtype) grows by ``(|bias| + tiny/eps) / |weight|``. Beyond this factor (or a weight of 0)
# the pass keeps a copy of its input instead (see inplace_invertible and docs/how-it-works.md).
INPLACE_MAX_COND = 32.0


def activation_code(name: str, param: float, inplace: bool, who: str) -> int:
    """The kind code (:data:`ACTIVATIONS`) of activation ``name`` with parameter ``param``,
    checked: a ``ValueError`` naming ``who`` for an unknown name, a non-finite parameter, or
    ``inplace`` with an activation whose input cannot be recovered from its output.

    >>> activation_code("leaky_relu", 0.01, True, "SyncBatchNorm2d")
    2
    >>> activation_code("relu", 0.0, True, "SyncBatchNorm2d")
    Traceback (most recent call last):
    ...
    ValueError: SyncBatchNorm2d: inplace=True needs an invertible activation (...), got relu:
    relu maps every negative input to 0, so the backward cannot recover the input from ...
    """
    if not isinstance(name, str) or name not in ACTIVATIONS:
        raise ValueError(f"{who}: expected activation to be one of {', '.join(map(repr, ACTIVATIONS))}, "
                         f"got {name!r}")
    if isinstance(param, bool) or not isinstance(param, (int, float)) or not math.isfinite(param):
        raise ValueError(f"{who}: expected activation_param to be a finite number, got {param!r}")
    code = ACTIVATIONS[name]
    if inplace:
        why = None
        if code == RELU:
            why = "relu maps every negative input to 0"
        elif code == LEAKY_RELU and param <= 0:
            why = f"leaky_relu with slope {param:g} <= 0 is not one-to-one"
        elif code == ELU and param <= 0:
            why = f"elu with alpha {param:g} <= 0 is not one-to-one"
        if why is not None:
            raise ValueError(
                f"{who}: inplace=True needs an invertible activation (identity, leaky_relu with "
                f"a positive slope, elu with a positive alpha), got {name}: {why}, so the "
                "backward cannot recover the input from the output; use inplace=False, or "
                "leaky_relu with a small positive slope")
    return code


def activate(z: Tensor, act: int, param: float, inplace: bool = False) -> Tensor:
    """``act(z)`` with torch's own operators (in place on ``z`` when ``inplace``).

    >>> z = torch.tensor([-2.0, 0.0, 3.0], dtype=torch.float64)
    >>> [activate(z, k, 0.5).tolist() for k in (IDENTITY, RELU, LEAKY_RELU)]
    [[-2.0, 0.0, 3.0], [0.0, 0.0, 3.0], [-1.0, 0.0, 3.0]]
    >>> round(activate(z, ELU, 0.5)[0].item(), 6)  # 0.5 * (exp(-2) - 1)
    -0.432332
    """
    if act == RELU:
        return F.relu(z, inplace=inplace)
    if act == LEAKY_RELU:
        return F.leaky_relu(z, param, inplace=inplace)
    if act == ELU:
        return F.elu(z, param, inplace=inplace)
    return z


def act_grad(z: Tensor, act: int, param: float) -> Tensor:
    """``act'(z)`` at the pre-activation ``z`` (torch's convention at ``z = 0``: the left
    derivative), in ``z``'s dtype.

    >>> z = torch.tensor([-2.0, 0.0, 3.0], dtype=torch.float64)
    >>> act_grad(z, LEAKY_RELU, 0.5).tolist(), act_grad(z, RELU, 0.0).tolist()
    ([0.5, 0.5, 1.0], [0.0, 0.0, 1.0])
    >>> [round(v, 6) for v in act_grad(z, ELU, 0.5).tolist()]  # 0.5 * exp(z) where z <= 0
    [0.067668, 0.5, 1.0]
    """
    if act == IDENTITY:
        return torch.ones_like(z)
    positive = z > 0
    if act == RELU:
        return positive.to(z.dtype)
    if act == LEAKY_RELU:
        return torch.where(positive, 1.0, torch.full_like(z, param))
    return torch.where(positive, 1.0, torch.exp(z) * param)


def act_grad_from_output(y: Tensor, act: int, param: float) -> Tensor:
    """``act'(z)`` from the output ``y = act(z)``, without ``z``: relu, and the invertible kinds
    (leaky_relu and elu with ``param > 0``), where ``y > 0`` exactly when ``z > 0``; elu's
    ``alpha * exp(z)`` is ``y + alpha``.

    >>> y = torch.tensor([-1.0, 0.0, 3.0], dtype=torch.float64)
    >>> act_grad_from_output(y, LEAKY_RELU, 0.5).tolist(), act_grad_from_output(y, ELU, 2.0).tolist()
    ([0.5, 0.5, 1.0], [1.0, 2.0, 1.0])
    """
    if act == IDENTITY:
        return torch.ones_like(y)
    positive = y > 0
    if act == RELU:
        return positive.to(y.dtype)
    if act == LEAKY_RELU:
        return torch.where(positive, 1.0, torch.full_like(y, param))
    return torch.where(positive, 1.0, y + param)


def act_inverse(y: Tensor, act: int, param: float) -> Tensor:
    """The pre-activation ``z`` with ``act(z) == y``, for the invertible kinds (identity,
    leaky_relu and elu with ``param > 0``). elu's ``log1p(y / alpha)`` is clamped at the
    largest number below ``-1`` of ``y``'s dtype: an output that rounded to ``-alpha`` gives
    ``z = log(eps/2)`` (-16.6 in float32, -36.7 in float64), not ``-inf``.

    >>> z = torch.tensor([-3.0, -0.5, 0.0, 2.0], dtype=torch.float64)
    >>> [round(v, 12) for v in act_inverse(activate(z, ELU, 0.7), ELU, 0.7).tolist()]
    [-3.0, -0.5, 0.0, 2.0]
    >>> act_inverse(torch.tensor([-0.03, 2.0], dtype=torch.float64), LEAKY_RELU, 0.01).tolist()
    [-3.0, 2.0]
    >>> act_inverse(torch.tensor([-1.0]), ELU, 1.0).item()  # saturated: y rounded to -alpha
    -16.635532...
    """
    if act == LEAKY_RELU:
        return torch.where(y > 0, y, y / param)
    if act == ELU:
        lowest = -1.0 + torch.finfo(y.dtype).eps / 2
        return torch.where(y > 0, y, torch.log1p((y / param).clamp_min(lowest)))
    if act != IDENTITY:
        raise ValueError(f"syncbn: the {_NAMES.get(act, act)} activation has no inverse")
    return y


def inplace_invertible(weight: Tensor | None, bias: Tensor | None, dtype: torch.dtype) -> bool:
    """Whether an in-place pass on data of ``dtype`` can recover ``xhat = (z - bias) / weight``
    from its output to about the data's precision: for every channel,
    ``(|bias| + tiny/eps) / |weight| <= INPLACE_MAX_COND`` (``tiny/eps`` of ``dtype``: where
    ``z`` stops being a normal number, 2**-4 for float16, ~1e-31 for float32). A weight of 0
    never passes. A host read of ``C`` numbers (a device sync on GPU; the weights change only
    at optimizer steps, so a caller may cache it by the tensors' ``_version``).

    >>> w, b = torch.tensor([1.0, 0.5]), torch.tensor([0.0, 3.0])
    >>> inplace_invertible(w, b, torch.float32), inplace_invertible(w * 0, b, torch.float32)
    (True, False)
    >>> inplace_invertible(None, None, torch.float16)  # affine=False: weight 1, bias 0
    True
    """
    if weight is None:
        return True
    info = torch.finfo(dtype)
    floor = info.tiny / info.eps
    w = weight.detach().double().abs()
    b = bias.detach().double().abs() if bias is not None else torch.zeros_like(w)
    return bool(((b + floor) <= INPLACE_MAX_COND * w).all())


def batch_norm_act(input: Tensor, running_mean: Tensor | None, running_var: Tensor | None,
                   weight: Tensor | None, bias: Tensor | None, training: bool, momentum: float,
                   eps: float, act: int, act_param: float) -> Tensor:
    """``act(F.batch_norm(...))`` with torch's operators: an activated layer's unsynchronized
    pass (eval mode, one rank) and its exported form.

    The activation runs in place on batch norm's fresh output where torch's autograd can
    differentiate it from its output (relu, leaky_relu with a slope >= 0, elu with alpha >= 0):
    one tensor less than ``BatchNorm`` followed by an activation module, the same values. The
    input is never overwritten (``F.batch_norm``'s backward reads it).

    >>> x = torch.tensor([[-1.0], [1.0]], dtype=torch.float64)
    >>> y = batch_norm_act(x, None, None, None, None, True, 0.1, 1e-12, LEAKY_RELU, 0.1)
    >>> [round(v, 9) for v in y.flatten().tolist()]
    [-0.1, 1.0]
    """
    out = F.batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps)
    if act == IDENTITY:
        return out
    in_place = act == RELU or act_param >= 0
    return activate(out, act, act_param, inplace=in_place)
