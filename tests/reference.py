"""The float64 reference: plain batch norm over the concatenated global batch.

Every distributed test asserts "syncbn over shards == this on torch.cat(shards)".
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

DTYPES = {"float64": torch.float64, "float32": torch.float32,
          "float16": torch.float16, "bfloat16": torch.bfloat16}

# (rtol, atol relative to the largest |expected|): float64 to ~1e-10, float32 to ~1e-5; half
# types are compared on outputs rounded to their precision (eps 2**-11 and 2**-8).
TOLERANCES = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (1e-5, 1e-5),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (1.6e-2, 1.6e-2),
}


def assert_matches(actual: Tensor, expected: Tensor, dtype: torch.dtype, what: str,
                   floor: float = 0.0) -> None:
    """``actual`` (any dtype) equals the float64 ``expected`` to ``dtype``'s tolerance, or to
    twice ``floor`` where that is larger: ``floor`` is the error torch's own BatchNorm makes in
    ``dtype`` on the same global batch (see :func:`torch_grad_input_error`), for quantities that
    no ``dtype`` computation can get within the nominal tolerance."""
    rtol, atol = TOLERANCES[dtype]
    scale = float(expected.abs().max()) if expected.numel() else 1.0
    torch.testing.assert_close(
        actual.double(), expected.double(), rtol=rtol,
        atol=max(atol * max(scale, 1.0), 2.0 * floor),
        msg=lambda m: f"{what} ({dtype}; torch's own {dtype} error here: {floor:.2e}): {m}",
    )


def torch_grad_input_error(shards: list[Tensor], grads: list[Tensor], weight: Tensor | None,
                           bias: Tensor | None, eps: float, expected_dx: Tensor) -> float:
    """Max |grad_input - expected| of torch's own (unsynchronized) BatchNorm in the shards'
    dtype on ``torch.cat(shards)``: the drop-in standard syncbn is held to where the float64
    answer is ill-conditioned in that dtype. Example: a global batch of 2 values per channel
    with a small spread, where grad_input is a small difference of large terms; torch's float32
    BatchNorm is then off by ~2e-5 absolute (seen: 2.25e-5, and syncbn 2.27e-5)."""
    x = torch.cat(shards).detach().clone().requires_grad_()
    dtype = x.dtype
    w = None if weight is None else weight.to(dtype)
    b = None if bias is None else bias.to(dtype)
    y = F.batch_norm(x, None, None, w, b, training=True, eps=eps)
    y.backward(torch.cat(grads).to(dtype))
    assert x.grad is not None
    return float((x.grad.double() - expected_dx.double()).abs().max()) if x.numel() else 0.0


def make_data(sizes: list[int], tail: tuple[int, ...], dtype: torch.dtype, seed: int,
              mean: float = 0.0, std: float = 1.0) -> tuple[list[Tensor], list[Tensor]]:
    """Input shards of ``sizes[r]`` samples each, and upstream gradients of the same shapes.

    Per-channel offsets differ, so a bug that mixes channels shows. Made in float64 and then cast,
    so every rank builds the same global batch from the seed.
    """
    g = torch.Generator().manual_seed(seed)
    total = sum(sizes)
    channels = tail[0]
    offsets = torch.linspace(-1.0, 1.0, channels, dtype=torch.float64).view(1, -1, *([1] * (len(tail) - 1)))
    x = (torch.randn(total, *tail, generator=g, dtype=torch.float64) + offsets) * std + mean
    dy = torch.randn(total, *tail, generator=g, dtype=torch.float64)
    x, dy = x.to(dtype), dy.to(dtype)
    return list(x.split(sizes)), list(dy.split(sizes))


def make_params(channels: int, seed: int) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed + 1)
    weight = torch.rand(channels, generator=g, dtype=torch.float64) + 0.5
    bias = torch.randn(channels, generator=g, dtype=torch.float64)
    return weight, bias


def reference_steps(shards: list[Tensor], grads: list[Tensor], weight: Tensor | None,
                    bias: Tensor | None, steps: int, momentum: float | None, eps: float,
                    track: bool) -> list[dict[str, Any]]:
    """Float64 ``torch.nn`` batch norm on ``torch.cat(shards)``, ``steps`` times in training mode.

    Returns per step: output, grad_input (both split back per rank), grad_weight, grad_bias,
    running_mean, running_var, num_batches_tracked.
    """
    channels = shards[0].shape[1]
    bn = torch.nn.BatchNorm1d(channels, eps=eps, momentum=momentum, affine=weight is not None,
                              track_running_stats=track, dtype=torch.float64)
    if weight is not None:
        with torch.no_grad():
            bn.weight.copy_(weight)
            bn.bias.copy_(bias)
    bn._check_input_dim = lambda input: None  # any dim >= 2
    sizes = [s.shape[0] for s in shards]
    out = []
    for _ in range(steps):
        x = torch.cat([s.double() for s in shards]).requires_grad_()
        bn.zero_grad()
        y = bn(x)
        y.backward(torch.cat([g.double() for g in grads]))
        out.append({
            "y": list(y.detach().split(sizes)),
            "dx": list(x.grad.split(sizes)),
            "dw": None if weight is None else bn.weight.grad.clone(),
            "db": None if weight is None else bn.bias.grad.clone(),
            "running_mean": None if not track else bn.running_mean.clone(),
            "running_var": None if not track else bn.running_var.clone(),
            "num_batches_tracked": None if not track else int(bn.num_batches_tracked),
        })
    return out


def plain_bn_forward(x: Tensor, channels: int) -> Tensor:
    """Float64 batch-norm output of ``x`` with batch statistics (no affine), for quick checks."""
    return F.batch_norm(x.double(), None, None, training=True)
