"""The fused C backend: a synchronized pass's reduce and apply steps, one C call each
(``_native/csrc/kernel.c``, built and loaded by :mod:`syncbn._native.kernel`).

Takes CPU float32/float64 input, contiguous or channels_last, with contiguous float32/float64
per-channel tensors (:func:`applies`). Each step is one pass over the data, multi-threaded like
torch (``torch.get_num_threads()``); the header check, the per-channel float64 math and the
running statistics run in C too. The calls take one argument block packed with
``ARG_FORMATS`` and return a ``_wire`` result code.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import _stats, _wire
from .._native import kernel as _kernel

__all__ = ["NAME", "STATUS_WORD", "applies", "backward_apply", "backward_reduce", "forward_apply",
           "forward_reduce", "load"]

NAME = "fused"
STATUS_WORD = False
ACTIVATES = True  # fuses the activation and in-place passes (issue 21)
_REDUCE_FWD, _APPLY_FWD = _kernel.ARG_FORMATS["forward_reduce"], _kernel.ARG_FORMATS["forward_apply"]
_REDUCE_BWD, _APPLY_BWD = (_kernel.ARG_FORMATS["backward_reduce"],
                           _kernel.ARG_FORMATS["backward_apply"])
_NO_FIELDS = [0] * len(_wire.FIELDS)  # no header: a backward that sends nothing
# A per-channel tensor as the kernel takes it: its address and dtype code, (0, 0) when absent
# (written out inline at each call: a helper would be a Python call per tensor per pass).
_CODE = {torch.float32: 1, torch.float64: 2}
_NONE = (0, 0)


def applies(input: Tensor, *params: Tensor | None) -> tuple[int, int, int, int] | None:
    """``(N, C, S, nsc)`` (:func:`syncbn._native.kernel.geometry`) of a CPU float32/float64
    input in one of the kernel's layouts with contiguous float32/float64 per-channel tensors."""
    return _kernel.geometry(input, *params)


def load(required: bool) -> bool:
    """Whether the kernel is loaded (built on first use); ``required``: an error if it cannot be,
    else a one-time warning saying why."""
    return _kernel.get(required, warn=not required) is not None


def forward_reduce(geo: tuple[int, int, int, int], x: Tensor, buffer: Tensor,
                   fields: list[int]) -> int:
    n, c, s, nsc = geo
    # sum(x) (C), sum(x**2) (C), n (1) + padding + header -> len(buffer)
    return _kernel.CALLS[x.dtype][0](_REDUCE_FWD.pack(
        x.data_ptr(), n, c, s, nsc, torch.get_num_threads(), buffer.data_ptr(), buffer.numel(),
        *fields))


def _check_like(t: Tensor, x: Tensor, what: str) -> None:
    """``t`` (an output to write, or a saved output to read) lies in memory as ``x`` does."""
    if t.dtype != x.dtype or t.shape != x.shape or (t.numel() and t.stride() != x.stride()):
        raise ValueError(f"syncbn fused backend: expected {what} of the input's dtype, shape and "
                         f"strides ({x.dtype}, {tuple(x.shape)}, {x.stride()}), got {t.dtype}, "
                         f"{tuple(t.shape)}, {t.stride()}")


def forward_apply(geo: tuple[int, int, int, int], x: Tensor, buffer: Tensor, world: int,
                  fields: list[int], weight: Tensor | None, bias: Tensor | None,
                  running_mean: Tensor | None, running_var: Tensor | None, eps: float,
                  momentum: float, policy: int, status: Tensor | None = None, *,
                  act: int = _stats.IDENTITY, act_param: float = 0.0,
                  out: Tensor | None = None) -> tuple[Tensor, Tensor, int]:
    n, c, s, nsc = geo
    # Large tensors first, then the small ones that outlive them: freeing the large ones then
    # does not leave free memory at the top of the heap, which glibc would hand back to the OS
    # (and the next pass would page-fault on).
    if out is None:
        out = torch.empty_like(x)
    elif out is not x:
        _check_like(out, x, "out")
    stats = torch.empty(2 * c + 1, dtype=torch.float64)  # mean (C), invstd (C), count (1)
    # y = act((x - mean) * invstd * w + b) in one pass, written over x when out is x
    rm, rv, w, b = running_mean, running_var, weight, bias
    code = _kernel.CALLS[x.dtype][1](_APPLY_FWD.pack(
        float(world), eps, momentum, float(act_param), buffer.data_ptr(), buffer.numel(),
        *fields, *(_NONE if rm is None else (rm.data_ptr(), _CODE[rm.dtype])),
        *(_NONE if rv is None else (rv.data_ptr(), _CODE[rv.dtype])), policy, stats.data_ptr(),
        x.data_ptr(), out.data_ptr(), n, c, s, nsc, torch.get_num_threads(),
        *(_NONE if w is None else (w.data_ptr(), _CODE[w.dtype])),
        *(_NONE if b is None else (b.data_ptr(), _CODE[b.dtype])), int(act)))
    return out, stats, code


def _source(x: Tensor | None, saved_output: Tensor | None) -> tuple[int, int, Tensor]:
    """``(x address, y address, the tensor the geometry is of)``: the backward reads the saved
    output when it is given (x then unread), else x."""
    if saved_output is not None:
        if x is not None:
            _check_like(saved_output, x, "saved_output")
        return 0, saved_output.data_ptr(), saved_output
    if x is None:
        raise ValueError("syncbn fused backend: the backward needs x or saved_output")
    return x.data_ptr(), 0, x


def backward_reduce(geo: tuple[int, int, int, int], dy: Tensor, x: Tensor | None, stats: Tensor,
                    buffer: Tensor | None, fields: list[int], weight_dtype: torch.dtype | None,
                    bias_dtype: torch.dtype | None, *, act: int = _stats.IDENTITY,
                    act_param: float = 0.0, saved_output: Tensor | None = None,
                    weight: Tensor | None = None, bias: Tensor | None = None,
                    ) -> tuple[Tensor | None, Tensor | None, int]:
    n, c, s, nsc = geo  # dy: x's dtype and layout (the core makes it so)
    xp, yp, ref = (x.data_ptr(), 0, x) if saved_output is None else _source(x, saved_output)
    gw = torch.empty(c, dtype=weight_dtype) if weight_dtype is not None else None
    gb = torch.empty(c, dtype=bias_dtype) if bias_dtype is not None else None
    at, size = (buffer.data_ptr(), buffer.numel()) if buffer is not None else (0, 0)
    mean = stats.data_ptr()
    # sum(dz) (C), sum(dz * xhat) (C) + padding + header -> len(buffer), dz = dy * act'(z);
    # and the local weight/bias gradients (this rank's share: DDP or the user sums them)
    code = _kernel.CALLS[ref.dtype][2](_REDUCE_BWD.pack(
        float(act_param), dy.data_ptr(), xp, n, c, s, nsc, torch.get_num_threads(), mean,
        mean + 8 * c, at, size, *(fields if buffer is not None else _NO_FIELDS),
        *(_NONE if gw is None else (gw.data_ptr(), _CODE[gw.dtype])),
        *(_NONE if gb is None else (gb.data_ptr(), _CODE[gb.dtype])), int(act), yp,
        *(_NONE if weight is None else (weight.data_ptr(), _CODE[weight.dtype])),
        *(_NONE if bias is None else (bias.data_ptr(), _CODE[bias.dtype]))))
    return gw, gb, code


def backward_apply(geo: tuple[int, int, int, int], dy: Tensor, x: Tensor | None, stats: Tensor,
                   weight: Tensor | None, buffer: Tensor, world: int, fields: list[int],
                   status: Tensor | None = None, *, act: int = _stats.IDENTITY,
                   act_param: float = 0.0, saved_output: Tensor | None = None,
                   bias: Tensor | None = None) -> tuple[Tensor, int]:
    n, c, s, nsc = geo  # dy: x's dtype and layout (the core makes it so)
    xp, yp, ref = (x.data_ptr(), 0, x) if saved_output is None else _source(x, saved_output)
    grad_in = torch.empty_like(ref)
    code = _kernel.CALLS[ref.dtype][3](_APPLY_BWD.pack(
        float(world), float(act_param), buffer.data_ptr(), buffer.numel(), *fields,
        dy.data_ptr(), xp, grad_in.data_ptr(), n, c, s, nsc, torch.get_num_threads(),
        stats.data_ptr(), *(_NONE if weight is None else (weight.data_ptr(), _CODE[weight.dtype])),
        int(act), yp, *(_NONE if bias is None else (bias.data_ptr(), _CODE[bias.dtype]))))
    return grad_in, code
