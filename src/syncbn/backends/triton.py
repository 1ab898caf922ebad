"""The Triton compute backend: 3 kernel launches per direction, no host sync.

One synchronized direction is ``reduce -> ONE all_reduce -> apply`` (the core runs the
collective); this backend implements the four steps of the backend interface
(specified in ``syncbn.backends`` and ``syncbn._wire``) with six kernels (``triton_kernels.py``):

* forward:  ``fwd_tile`` (tile partials of shifted sums) -> ``fwd_pack`` (the partials summed in
  a fixed order into the WHOLE buffer) -> [all_reduce] -> ``fwd_apply`` (header check into the
  device error word, float64 mean/var/invstd, running statistics, ``stats``, normalize);
* backward: ``bwd_tile`` (partials of sum(dy), sum(dy*(x-mean))) -> ``bwd_pack`` (local
  grad_weight/grad_bias and the whole buffer) -> [all_reduce] -> ``bwd_apply`` (grad_input).

Nothing reads a device value on the host: the header check and the non-finite check land in the
int32 ``status`` word (the largest code wins), which the core reads later. An empty shard runs
the same launches (one tile of zeros). Every launch goes through :func:`_launch`, which counts
it (:func:`launches`).

Triton is imported on first use (:func:`_kernels`), never at import time. CUDA tensors take this
path; CPU tensors only when ``TRITON_INTERPRET=1`` is set (Triton's interpreter, ~10 ms per
program: how CI checks the kernels without a GPU). The variable must be set before the first
use; kernels built under the other setting are rebuilt on the next first use (after
``_kernels.cache_clear()``).
"""

from __future__ import annotations

import functools
import importlib
import os
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .. import _stats, _wire

__all__ = ["NAME", "STATUS_WORD", "applies", "backward_apply", "backward_reduce",
           "forward_apply", "forward_reduce", "launches"]

NAME = "triton"

NUM_FIELDS = len(_wire.FIELDS)  # header fields: the header is 2 * NUM_FIELDS numbers
STATUS_WORD = True  # its apply steps report into a device status word (no host sync)
ACTIVATES = True  # fuses the activation and in-place passes (issue 21)
_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_MAX_ROWS = 2**30  # rows (values per channel) are int32 inside the kernels, with headroom


@dataclass
class Tuning:
    """Tile sizes. ``elems``: values per ``[BLOCK_M, BLOCK_C]`` block; ``programs``: the tile
    count aimed at (None: 4 per SM on CUDA, 8 on CPU); ``num_warps`` per program. Tests shrink
    the maxima to get several tiles and channel blocks out of tiny tensors; the GPU check may
    sweep them."""

    elems: int = 2048
    max_block_m: int = 1024
    max_block_c: int = 64
    programs: int | None = None
    pack_block_c: int = 64
    block_z: int = 1024
    num_warps: int = 4


tuning = Tuning()
_launch_count = 0


def launches() -> int:
    """Kernel launches made by this backend in this process (a test counts them per pass)."""
    return _launch_count


def _launch(kernel: Any, grid: tuple[int], *args: Any, **constexprs: Any) -> None:
    """The one place a kernel is launched (and counted), on the device of its first tensor
    argument and that device's current stream (Triton launches on the *current* device: a
    tensor on another GPU needs the guard). FMA contraction is asked for explicitly (Triton
    3.9 warns when it is left to its default)."""
    global _launch_count
    _launch_count += 1
    device = args[0].device
    if device.type == "cuda" and device.index != torch.cuda.current_device():
        with torch.cuda.device(device):
            kernel[grid](*args, **constexprs, enable_fp_fusion=True, num_warps=tuning.num_warps)
        return
    kernel[grid](*args, **constexprs, enable_fp_fusion=True, num_warps=tuning.num_warps)


@functools.cache
def _triton() -> Any:
    """The triton module, or None when it cannot be imported."""
    try:
        return importlib.import_module("triton")
    except ImportError:
        return None


def _interpreting() -> bool:
    """TRITON_INTERPRET as Triton itself reads it (at call time)."""
    return bool(_triton().knobs.runtime.interpret)


@functools.cache
def _kernels() -> Any:
    """The kernel module, imported (or re-imported) under the current TRITON_INTERPRET."""
    module = importlib.import_module("syncbn.backends.triton_kernels")
    interpreted = type(module.fwd_tile).__name__ == "InterpretedFunction"
    if interpreted != _interpreting():  # imported earlier under the other setting
        module = importlib.reload(module)
    return module


def _flat_strides(t: Tensor) -> tuple[int, int, int, int] | None:
    """``(S, s_n, s_c, s_s)`` of ``t (N, C, *)`` seen as ``(N, C, S)``, or None when the dims
    after C do not collapse into one stride."""
    sizes, strides = t.shape[2:], t.stride()[2:]
    kept = [(n, s) for n, s in zip(sizes, strides) if n != 1]
    spatial = 1
    for n in sizes:
        spatial *= n
    if not kept:
        return spatial, t.stride(0), t.stride(1), 0
    for (_, outer), (n, inner) in zip(kept, kept[1:]):
        if outer != inner * n:
            return None
    return spatial, t.stride(0), t.stride(1), kept[-1][1]


def _linear(t: Tensor, flat: tuple[int, int, int, int]) -> bool:
    """Row ``m = n*S + s`` sits at ``m * stride`` (no division needed)."""
    spatial, s_n, _, s_s = flat
    return t.shape[0] <= 1 or spatial <= 1 or s_n == spatial * s_s


def _strides(t: Tensor, flat: tuple[int, int, int, int], linear: bool) -> tuple[int, int, int]:
    """The ``(s_n, s_c, s_s)`` a kernel takes; when linear, ``s_n`` is the row stride."""
    spatial, s_n, s_c, s_s = flat
    if linear and spatial > 1:
        return s_s, s_c, s_s
    return s_n, s_c, s_s


def _pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


@dataclass(frozen=True)
class _Plan:
    block_m: int
    block_c: int
    n_cb: int  # channel blocks
    tile_rows: int
    tiles: int  # row tiles (>= 1, also for an empty shard)

    @property
    def grid(self) -> tuple[int]:
        return (self.tiles * self.n_cb,)


def _plan(rows: int, channels: int, s_c: int, device: torch.device) -> _Plan:
    """Block and tile sizes: channels across a block's fast axis when they are adjacent in
    memory (channels_last, (N, C)), rows otherwise; about ``programs`` tiles in all."""
    tune = tuning
    if s_c == 1:
        block_c = min(_pow2(channels), tune.max_block_c)
        block_m = max(1, min(tune.elems // block_c, tune.max_block_m, _pow2(max(rows, 1))))
    else:
        block_m = min(_pow2(max(rows, 1)), tune.max_block_m)
        block_c = max(1, min(tune.elems // block_m, tune.max_block_c, _pow2(channels)))
    n_cb = -(-channels // block_c)
    programs = tune.programs
    if programs is None:
        programs = 8
        if device.type == "cuda":
            programs = 4 * _sm_count(device.index)
    row_blocks = max(1, -(-rows // block_m))
    per_cb = max(1, min(row_blocks, -(-programs // n_cb)))
    tile_rows = -(-row_blocks // per_cb) * block_m
    tiles = max(1, -(-rows // tile_rows))
    return _Plan(block_m, block_c, n_cb, tile_rows, tiles)


@functools.cache
def _sm_count(index: int | None) -> int:
    return torch.cuda.get_device_properties(index or 0).multi_processor_count


def _acc(dtype: torch.dtype) -> Any:
    tl = importlib.import_module("triton.language")
    return tl.float64 if dtype == torch.float64 else tl.float32


def _pack_sizes(channels: int, tiles: int) -> tuple[int, int, int]:
    """``(BLOCK_C, BLOCK_T, programs)`` of a pack kernel."""
    block_c = min(_pow2(channels), tuning.pack_block_c)
    block_t = max(1, min(_pow2(tiles), 2048 // block_c))
    return block_c, block_t, -(-channels // block_c)


def _check_buffer(buffer: Tensor, channels: int, who: str) -> int:
    length = buffer.numel()
    if (buffer.dtype != torch.float64 or not buffer.is_contiguous()
            or length < 2 * channels + 3 + 2 * NUM_FIELDS):
        raise ValueError(
            f"syncbn triton backend {who}: expected a contiguous float64 buffer of at least "
            f"{2 * channels + 3 + 2 * NUM_FIELDS} numbers for {channels} channels, got "
            f"{buffer.dtype} of {length}")
    return length


def _fields(fields: list[int] | tuple[int, ...]) -> list[int]:
    if len(fields) != NUM_FIELDS:
        raise ValueError(f"syncbn triton backend: expected {NUM_FIELDS} header fields, got "
                         f"{len(fields)}")
    return [int(f) for f in fields]


def _channel_ok(t: Tensor | None, channels: int, device: torch.device) -> bool:
    return t is None or (t.dim() == 1 and t.numel() == channels and t.is_contiguous()
                         and t.dtype in _DTYPES and t.device == device)


Geometry = tuple[int, int, int, tuple[int, int, int, int]]  # channels, rows, S, flat strides


def applies(input: Tensor, *params: Tensor | None) -> Geometry | None:
    """``(C, rows, S, flat strides)`` when this backend can take the pass: CUDA tensors (CPU
    ones under ``TRITON_INTERPRET=1``) of float16/bfloat16/float32/float64 whose dims after C
    collapse into one stride, 1-D contiguous per-channel tensors (weight, bias, running
    statistics) on the input's device; triton importable. Else None."""
    device = input.device
    if device.type == "cpu":
        if not os.environ.get("TRITON_INTERPRET"):
            return None
    elif device.type != "cuda":
        return None
    if _triton() is None or (device.type == "cpu" and not _interpreting()):
        return None
    if input.dim() < 2 or input.dtype not in _DTYPES or input.shape[1] == 0:
        return None
    channels = input.shape[1]
    flat = _flat_strides(input)
    if input.numel() // channels >= _MAX_ROWS or flat is None:
        return None
    for t in params:
        if not _channel_ok(t, channels, device):
            return None
    return channels, input.shape[0] * flat[0], flat[0], flat


def _like(t: Tensor, x: Tensor) -> tuple[Tensor, tuple[int, int, int, int]]:
    """``t`` with collapsible strides (a copy in x's memory format when it has none)."""
    flat = _flat_strides(t)
    if flat is None:
        t = torch.empty_like(x, dtype=t.dtype).copy_(t)
        flat = _flat_strides(t)
    return t, flat


def forward_reduce(geo: Geometry, x: Tensor, buffer: Tensor, fields: list[int]) -> int:
    """Write the WHOLE forward buffer for this shard: ``[1 | sum(x) (C) | sum(x**2) (C) | n |
    zeros | header | 1]`` (2 launches)."""
    kernels = _kernels()
    channels, rows, spatial, flat = geo
    length = _check_buffer(buffer, channels, "forward_reduce")
    f = _fields(fields)
    linear = _linear(x, flat)
    plan = _plan(rows, channels, flat[2], x.device)
    part = torch.empty((2, plan.tiles, channels), dtype=torch.float64, device=x.device)
    _launch(kernels.fwd_tile, plan.grid, x, part, rows, channels, spatial,
            *_strides(x, flat, linear), plan.tile_rows, plan.n_cb,
            LINEAR=linear, ACC=_acc(x.dtype), BLOCK_M=plan.block_m, BLOCK_C=plan.block_c)
    block_c, block_t, programs = _pack_sizes(channels, plan.tiles)
    _launch(kernels.fwd_pack, (programs,), part, buffer, plan.tiles, channels, rows, length, *f,
            BLOCK_C=block_c, BLOCK_T=block_t, BLOCK_Z=tuning.block_z)
    return _wire.OK


def _status_word(status: Tensor | None, device: torch.device) -> Tensor:
    if status is None:
        return torch.zeros(1, dtype=torch.int32, device=device)
    if status.dtype != torch.int32 or status.numel() != 1 or status.device != device:
        raise ValueError("syncbn triton backend: expected the status word as a 1-element int32 "
                         f"tensor on {device}, got {status.dtype} of {status.numel()} on "
                         f"{status.device}")
    return status


def forward_apply(geo: Geometry, x: Tensor, buffer: Tensor, world: int, fields: list[int],
                  weight: Tensor | None, bias: Tensor | None, running_mean: Tensor | None,
                  running_var: Tensor | None, eps: float, momentum: float, policy: int,
                  status: Tensor | None = None, *, act: int = _stats.IDENTITY,
                  act_param: float = 0.0, out: Tensor | None = None,
                  ) -> tuple[Tensor, Tensor, int]:
    """From the reduced buffer, one launch: header check, ``stats = [mean | invstd | count]``
    (float64, 2C+1), running statistics, ``out = act(normalized x)`` in x's dtype and memory
    format (``out`` given: written there; it may be x itself).

    ``code`` is OK when ``status`` is given (the codes land in it, no host sync); without
    ``status`` a word is made here and its value returned (a host read: CPU callers)."""
    kernels = _kernels()
    channels, rows, spatial, flat = geo
    length = _check_buffer(buffer, channels, "forward_apply")
    f = _fields(fields)
    word = _status_word(status, x.device)
    if out is not None:
        out_flat = _flat_strides(out)
        if (out_flat is None or out.dtype != x.dtype or out.shape != x.shape
                or out.device != x.device):
            raise ValueError(
                f"syncbn triton backend forward_apply: expected out of the input's dtype, "
                f"shape and device with dims after C that collapse into one stride, got "
                f"{out.dtype} {tuple(out.shape)} {out.stride()} on {out.device}")
    else:
        out = torch.empty_like(x)
        out_flat = _flat_strides(out)
        if out_flat is None:  # x has no dense layout to preserve: a contiguous output
            out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
            out_flat = _flat_strides(out)
    linear = _linear(x, flat) and _linear(out, out_flat)
    stats = torch.empty(2 * channels + 1, dtype=torch.float64, device=x.device)
    plan = _plan(rows, channels, flat[2], x.device)
    _launch(kernels.fwd_apply, plan.grid, x, out, buffer, stats,
            _or(weight, buffer), _or(bias, buffer), _or(running_mean, buffer),
            _or(running_var, buffer), word, rows, channels, spatial, length,
            *_strides(x, flat, linear), *_strides(out, out_flat, linear), plan.tile_rows,
            plan.n_cb, int(world), *f, float(eps), float(momentum), float(act_param),
            HAS_W=weight is not None, HAS_B=bias is not None, HAS_RM=running_mean is not None,
            HAS_RV=running_var is not None, POLICY=int(policy), LINEAR=linear,
            ACC=_acc(x.dtype), BLOCK_M=plan.block_m, BLOCK_C=plan.block_c, ACT=int(act))
    code = _wire.OK if status is not None else int(word.item())
    return out, stats, code


def _or(t: Tensor | None, dummy: Tensor) -> Tensor:
    """A pointer argument for an optional tensor (the kernel does not touch the dummy)."""
    return dummy if t is None else t


def _lowest(dtype: torch.dtype) -> float:
    """The smallest number above -1 in the element math's dtype (elu's inverse clamps there)."""
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    return -1.0 + torch.finfo(acc).eps / 2


def _source(x: Tensor | None, saved_output: Tensor | None,
            ) -> tuple[Tensor, tuple[int, int, int, int] | None]:
    """The tensor the backward reads (the saved output when given: x is then not read) and its
    flat strides."""
    src = saved_output if saved_output is not None else x
    if src is None:
        raise ValueError("syncbn triton backend: the backward needs x or saved_output")
    return src, _flat_strides(src)


def backward_reduce(geo: Geometry, dy: Tensor, x: Tensor | None, stats: Tensor,
                    buffer: Tensor | None, fields: list[int],
                    grad_weight_dtype: torch.dtype | None, grad_bias_dtype: torch.dtype | None,
                    *, act: int = _stats.IDENTITY, act_param: float = 0.0,
                    saved_output: Tensor | None = None, weight: Tensor | None = None,
                    bias: Tensor | None = None,
                    ) -> tuple[Tensor | None, Tensor | None, int]:
    """Local ``grad_weight = sum(dz * xhat)`` and ``grad_bias = sum(dz)`` (this rank's share,
    in the given dtypes, None when not asked for), ``dz = dy * act'(z)``, and, when ``buffer``
    is given, the whole backward buffer ``[1 | sum(dz) (C) | sum(dz * xhat) (C) | zeros |
    header | 1]`` (2 launches; none when nothing is asked for). ``saved_output``: ``z`` and
    ``xhat`` from the output alone (x not read); else from x."""
    channels, rows, spatial, flat = geo
    src, src_flat = _source(x, saved_output)
    device = src.device
    grad_weight = (None if grad_weight_dtype is None
                   else torch.empty(channels, dtype=grad_weight_dtype, device=device))
    grad_bias = (None if grad_bias_dtype is None
                 else torch.empty(channels, dtype=grad_bias_dtype, device=device))
    if buffer is None and grad_weight is None and grad_bias is None:
        return None, None, _wire.OK
    kernels = _kernels()
    length = 0 if buffer is None else _check_buffer(buffer, channels, "backward_reduce")
    f = _fields(fields) if buffer is not None else [0] * NUM_FIELDS
    if src_flat is None:
        raise ValueError("syncbn triton backend: the saved output has no dense layout")
    dy, dy_flat = _like(dy, src)
    linear = _linear(src, src_flat) and _linear(dy, dy_flat)
    plan = _plan(rows, channels, flat[2], device)
    part = torch.empty((2, plan.tiles, channels), dtype=torch.float64, device=device)
    from_y = saved_output is not None
    _launch(kernels.bwd_tile, plan.grid, dy, src, stats, _or(weight, stats), _or(bias, stats),
            part, rows, channels, spatial, *_strides(dy, dy_flat, linear),
            *_strides(src, src_flat, linear), plan.tile_rows, plan.n_cb, float(act_param),
            _lowest(src.dtype), LINEAR=linear, ACC=_acc(src.dtype), BLOCK_M=plan.block_m,
            BLOCK_C=plan.block_c, ACT=int(act), FROM_Y=from_y, HAS_W=weight is not None,
            HAS_B=bias is not None)
    block_c, block_t, programs = _pack_sizes(channels, plan.tiles)
    _launch(kernels.bwd_pack, (programs,), part, stats, _or(buffer, stats),
            _or(grad_weight, stats), _or(grad_bias, stats), plan.tiles, channels, rows, length, *f,
            HAS_BUF=buffer is not None, HAS_GW=grad_weight is not None,
            HAS_GB=grad_bias is not None, BLOCK_C=block_c, BLOCK_T=block_t,
            BLOCK_Z=tuning.block_z, XHAT=from_y)
    return grad_weight, grad_bias, _wire.OK


def backward_apply(geo: Geometry, dy: Tensor, x: Tensor | None, stats: Tensor,
                   weight: Tensor | None, buffer: Tensor, world: int, fields: list[int],
                   status: Tensor | None = None, *, act: int = _stats.IDENTITY,
                   act_param: float = 0.0, saved_output: Tensor | None = None,
                   bias: Tensor | None = None) -> tuple[Tensor, int]:
    """From the reduced backward buffer, one launch: header check, then
    ``grad_input = w*invstd*(dz - S_dz/n - xhat*S_dzxhat/n)`` (mean-first from x; from the
    output alone with ``saved_output``), in the input's dtype and memory format. ``code`` as
    in :func:`forward_apply`."""
    kernels = _kernels()
    channels, rows, spatial, flat = geo
    length = _check_buffer(buffer, channels, "backward_apply")
    f = _fields(fields)
    src, src_flat = _source(x, saved_output)
    if src_flat is None:
        raise ValueError("syncbn triton backend: the saved output has no dense layout")
    word = _status_word(status, src.device)
    dy, dy_flat = _like(dy, src)
    grad_in = torch.empty_like(src)
    g_flat = _flat_strides(grad_in)
    if g_flat is None:
        grad_in = torch.empty(src.shape, dtype=src.dtype, device=src.device)
        g_flat = _flat_strides(grad_in)
    linear = _linear(src, src_flat) and _linear(dy, dy_flat) and _linear(grad_in, g_flat)
    plan = _plan(rows, channels, flat[2], src.device)
    _launch(kernels.bwd_apply, plan.grid, dy, src, grad_in, stats, _or(weight, stats),
            _or(bias, stats), buffer, word, rows, channels, spatial, length,
            *_strides(dy, dy_flat, linear), *_strides(src, src_flat, linear),
            *_strides(grad_in, g_flat, linear), plan.tile_rows, plan.n_cb, int(world), *f,
            float(act_param), _lowest(src.dtype), HAS_W=weight is not None, LINEAR=linear,
            ACC=_acc(src.dtype), BLOCK_M=plan.block_m, BLOCK_C=plan.block_c, ACT=int(act),
            FROM_Y=saved_output is not None, HAS_B=bias is not None)
    code = _wire.OK if status is not None else int(word.item())
    return grad_in, code
