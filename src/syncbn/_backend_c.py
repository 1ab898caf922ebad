"""The fused C backend: a synchronized pass's reduce and apply steps, one C call each
(``csrc/kernel.c``, built and loaded by ``_kernel.py``).

Takes CPU float32/float64 input, contiguous or channels_last, with contiguous float32/float64
per-channel tensors (:func:`applies`). Each step is one pass over the data, multi-threaded like
torch (``torch.get_num_threads()``); the header check, the per-channel float64 math and the
running statistics run in C too. The calls take one argument block packed with
``_kernel.ARG_FORMATS`` and return a ``_wire`` result code.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import _kernel, _wire

__all__ = ["applies", "backward_apply", "backward_reduce", "forward_apply", "forward_reduce"]

_REDUCE_FWD, _APPLY_FWD = _kernel.ARG_FORMATS["forward_reduce"], _kernel.ARG_FORMATS["forward_apply"]
_REDUCE_BWD, _APPLY_BWD = (_kernel.ARG_FORMATS["backward_reduce"],
                           _kernel.ARG_FORMATS["backward_apply"])
_NO_FIELDS = [0] * len(_wire.FIELDS)  # no header: a backward that sends nothing
_arg = _kernel.arg


def applies(input: Tensor, *params: Tensor | None) -> bool:
    """CPU float32/float64 input in one of the kernel's layouts, and the kernel is loaded."""
    return _kernel.geometry(input, *params) is not None and _kernel.get() is not None


def _geometry(x: Tensor) -> tuple[int, int, int, int]:
    """``(N, C, S, nsc)`` of an input :func:`applies` took (nsc: channels innermost)."""
    shape = x.shape
    s = 1
    for d in shape[2:]:
        s *= d
    return shape[0], shape[1], s, int(x.stride(1) == 1)


def forward_reduce(x: Tensor, buffer: Tensor, fields: list[int]) -> int:
    n, c, s, nsc = _geometry(x)
    calls = _kernel.calls(x.dtype)
    # sum(x) (C), sum(x**2) (C), n (1) + padding + header -> len(buffer)
    return calls[0](_REDUCE_FWD.pack(x.data_ptr(), n, c, s, nsc, torch.get_num_threads(),
                                     buffer.data_ptr(), buffer.numel(), *fields))


def forward_apply(x: Tensor, buffer: Tensor, world: int, fields: list[int],
                  weight: Tensor | None, bias: Tensor | None, running_mean: Tensor | None,
                  running_var: Tensor | None, eps: float, momentum: float, policy: int,
                  status: Tensor | None = None) -> tuple[Tensor, Tensor, int]:
    n, c, s, nsc = _geometry(x)
    # Large tensors first, then the small ones that outlive them: freeing the large ones then
    # does not leave free memory at the top of the heap, which glibc would hand back to the OS
    # (and the next pass would page-fault on).
    out = torch.empty_like(x)
    stats = torch.empty(2 * c + 1, dtype=torch.float64)  # mean (C), invstd (C), count (1)
    code = _kernel.calls(x.dtype)[1](_APPLY_FWD.pack(
        float(world), eps, momentum, buffer.data_ptr(), buffer.numel(), *fields,
        *_arg(running_mean), *_arg(running_var), policy, stats.data_ptr(), x.data_ptr(),
        out.data_ptr(), n, c, s, nsc, torch.get_num_threads(), *_arg(weight), *_arg(bias)))
    return out, stats, code


def backward_reduce(dy: Tensor, x: Tensor, stats: Tensor, buffer: Tensor | None,
                    fields: list[int], weight_dtype: torch.dtype | None,
                    bias_dtype: torch.dtype | None) -> tuple[Tensor | None, Tensor | None]:
    n, c, s, nsc = _geometry(x)  # dy: x's dtype and layout (the core makes it so)
    grad_weight = torch.empty(c, dtype=weight_dtype) if weight_dtype is not None else None
    grad_bias = torch.empty(c, dtype=bias_dtype) if bias_dtype is not None else None
    at, size = (buffer.data_ptr(), buffer.numel()) if buffer is not None else (0, 0)
    mean = stats.data_ptr()
    # sum(dy) (C), sum(dy * xhat) (C) + padding + header -> len(buffer); and the local
    # weight/bias gradients (this rank's share: DDP or the user sums them over ranks)
    code = _kernel.calls(x.dtype)[2](_REDUCE_BWD.pack(
        dy.data_ptr(), x.data_ptr(), n, c, s, nsc, torch.get_num_threads(), mean, mean + 8 * c,
        at, size, *(fields if buffer is not None else _NO_FIELDS), *_arg(grad_weight),
        *_arg(grad_bias)))
    if code != _wire.OK:
        raise MemoryError("syncbn: out of memory in the backward")
    return grad_weight, grad_bias


def backward_apply(dy: Tensor, x: Tensor, stats: Tensor, weight: Tensor | None, buffer: Tensor,
                   world: int, fields: list[int],
                   status: Tensor | None = None) -> tuple[Tensor, int]:
    n, c, s, nsc = _geometry(x)  # dy: x's dtype and layout (the core makes it so)
    grad_in = torch.empty_like(x)
    code = _kernel.calls(x.dtype)[3](_APPLY_BWD.pack(
        float(world), buffer.data_ptr(), buffer.numel(), *fields, dy.data_ptr(), x.data_ptr(),
        grad_in.data_ptr(), n, c, s, nsc, torch.get_num_threads(), stats.data_ptr(),
        *_arg(weight)))
    return grad_in, code
