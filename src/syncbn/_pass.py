"""The math of one synchronized batch-norm pass, and the two ways it is called.

Each direction is ``reduce -> one all_reduce -> apply``::

    forward:  backend.forward_reduce   local sum(x), sum(x**2), n      -> buffer (+ header)
              _comm.all_reduce         the one collective               (2C + 1 numbers + header)
              backend.forward_apply    header check, global mean/invstd, running statistics,
                                       normalize                        -> out, stats
    backward: backend.backward_reduce  local sum(dy), sum(dy * xhat)    -> buffer; local dw, db
              _comm.all_reduce         the one collective               (2C numbers + header)
              backend.backward_apply   header check, grad_input

A backend (``_backend_c.py`` the fused C kernel, ``_backend_torch.py`` torch operators,
``_backend_triton.py`` Triton) implements those four steps and nothing else; all of them write
and read the same buffer (``_wire.py``), so ranks on different backends can meet in one group.
``stats`` is ``[mean (C), invstd (C), count (1)]`` in float64, whichever backend made it.

Two doors to the same passes: eagerly, :class:`SyncBatchNormFunction` calls them directly (the
fewest Python steps); under ``torch.compile`` it calls them through the registered ops
``syncbn::forward`` and ``syncbn::backward``, which dynamo sees as opaque, known operators (with
fake implementations for tracing), so a synchronized model compiles with ``fullgraph=True`` and
its checks still run, at run time, inside the ops. Registered ops cost ~14 us per call more than
a direct call in eager mode (benchmarks/RESULTS.md, section 0), which is why eager does not use
them.
"""

from __future__ import annotations

import weakref
from typing import Any, Optional  # Optional: custom_op reads the annotations at run time

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from . import _comm, _settings, _stats, _wire, backends

__all__ = ["SyncBatchNormFunction", "backend_for", "backward_pass", "forward_pass",
           "group_id", "layer_id"]

# Layers and groups as registered ops take them: integers (an op cannot take Python objects),
# held weakly: a layer holds its tag, and the caller its group, while a pass runs.
_groups: weakref.WeakValueDictionary[int, Any] = weakref.WeakValueDictionary()
_tags: weakref.WeakValueDictionary[int, _wire.LayerTag] = weakref.WeakValueDictionary()


def group_id(process_group: Any | None) -> int:
    """The integer a registered op takes for a process group (0: the default group)."""
    if process_group is None:
        return 0
    key = id(process_group)
    if key not in _groups and key not in _strong_groups:
        try:
            _groups[key] = process_group
        except TypeError:  # an object that cannot be weakly referenced: kept
            _strong_groups[key] = process_group
    return key


_strong_groups: dict[int, Any] = {}


def _group(key: int) -> Any | None:
    if key == 0:
        return None
    group = _groups.get(key)
    return group if group is not None else _strong_groups[key]


def layer_id(tag: _wire.LayerTag) -> int:
    """The integer a registered op takes for a layer's tag (which the caller keeps alive)."""
    key = id(tag)
    _tags[key] = tag
    return key


def backend_for(input: Tensor, *params: Tensor | None) -> Any:
    """The backend and geometry of a pass on this input (``backends.select``)."""
    return backends.select(input, *params)


def _like(grad_output: Tensor, input: Tensor) -> Tensor:
    """``grad_output`` in the input's dtype and memory layout (what the backends read; the
    caller skips this in the usual case: autograd hands back the output's layout)."""
    if input.is_contiguous():
        layout = torch.contiguous_format
    elif input.dim() == 4 and input.is_contiguous(memory_format=torch.channels_last):
        layout = torch.channels_last
    elif input.dim() == 5 and input.is_contiguous(memory_format=torch.channels_last_3d):
        layout = torch.channels_last_3d
    else:
        return grad_output.to(input.dtype)
    if grad_output.dtype != input.dtype or not grad_output.is_contiguous(memory_format=layout):
        grad_output = grad_output.to(input.dtype).contiguous(memory_format=layout)
    return grad_output


def forward_pass(input: Tensor, weight: Tensor | None, bias: Tensor | None,
                 running_mean: Tensor | None, running_var: Tensor | None, eps: float,
                 momentum: float, process_group: Any | None, tag: _wire.LayerTag,
                 backend: Any = None) -> tuple[Tensor, Tensor]:
    """Normalize ``input`` with the global batch statistics; ``(out, stats)``. Running
    statistics (when given) are updated in place from the reduced buffer, identically on every
    rank. Every rank must call it, in the same order as the others, even with an empty shard."""
    if backend is None:
        backend = backend_for(input, weight, bias, running_mean, running_var)
    backend, geo = backend
    channels = input.shape[1]
    size = _comm.buffer_length(process_group, channels, tag, input.device)
    tag.forward += 1
    fields = _wire.fields(tag, _wire.FORWARD, channels)
    buffer = torch.empty(size, dtype=torch.float64, device=input.device)
    # sum(x) (C), sum(x**2) (C), n (1) + padding + header -> size
    if backend.forward_reduce(geo, input, buffer, fields):  # a result code; None or OK: done
        raise MemoryError(f"syncbn: {tag.description}: out of memory in the forward")
    world = _comm.all_reduce(buffer, process_group, tag, _wire.FORWARD, 2 * channels + 1,
                             tuple(input.shape))
    # The global count is read on the host only when this shard alone cannot prove it is >= 2
    # (a shard of 0 or 1 values per channel): a rare device sync, and every rank of a global
    # batch of 1 value takes this branch, so all of them raise together. Under CUDA-graph
    # capture there is no host: the backends then skip the running statistics of a global
    # count below 2 on the device (a global batch of 1 value is not an error there).
    capturing = _comm.capturing(buffer)
    if _stats.local_count(input) <= 1 and not capturing:
        _comm.verify(buffer, fields, tag, _wire.FORWARD, process_group)
        total = int(buffer[2 * channels + 1].item())
        if total == 1:
            raise ValueError(
                "Expected more than 1 value per channel when training, got input size "
                f"{input.size()} on {_comm.describe_group(process_group)} and 1 value per "
                "channel in the global batch")
        if total == 0:  # nothing to normalize and nothing to learn from
            running_mean = running_var = None
    policy = _wire.POLICIES[_settings.get().nonfinite]
    status = (_status_word(input, fresh=policy == _wire.POLICIES["raise"])
              if _wants_status(backend, input) else None)
    out, stats, code = backend.forward_apply(geo, input, buffer, world, fields, weight, bias,
                                             running_mean, running_var, eps, momentum, policy,
                                             status)
    if status is not None and not capturing and (
            policy == _wire.POLICIES["raise"]):
        code = int(status.item())  # a device sync on GPU, as documented for this policy
    if code:
        _raise(code, buffer, fields, tag, _wire.FORWARD, process_group)
    if buffer.is_cuda and not capturing:
        _comm.defer_check(buffer, fields, tag, _wire.FORWARD, process_group)
    return out, stats


def _wants_status(backend: Any, input: Tensor) -> bool:
    """A device status word for a backend that takes one (``STATUS_WORD``), off the CPU; on the
    CPU (Triton's interpreter) the backend returns its code, which costs no device sync."""
    return getattr(backend, "STATUS_WORD", False) and not input.is_cpu


def _status_word(input: Tensor, fresh: bool) -> Tensor:
    """Where a backend that says ``STATUS_WORD = True`` (Triton) puts its result code without
    a host sync; the other backends return their codes directly. The host reads it only under
    ``SYNCBN_NONFINITE=raise`` (``fresh``: a zeroed word, one fill kernel); otherwise the header
    is checked one pass late (:func:`_comm.defer_check`) and the word is a per-device scratch
    that nobody reads (no kernel per pass)."""
    if fresh:
        return torch.zeros(1, dtype=torch.int32, device=input.device)
    word = _scratch_words.get(input.device)
    if word is None:
        word = _scratch_words[input.device] = torch.zeros(1, dtype=torch.int32,
                                                          device=input.device)
    return word


_scratch_words: dict[torch.device, Tensor] = {}


def backward_pass(grad_output: Tensor, input: Tensor, weight: Tensor | None, stats: Tensor,
                  process_group: Any | None, tag: _wire.LayerTag, need_input: bool,
                  weight_dtype: torch.dtype | None, bias_dtype: torch.dtype | None,
                  backend: Any = None) -> tuple[Tensor | None, ...]:
    """``(grad_input, grad_weight, grad_bias)``; the weight/bias gradients are this rank's
    share (DDP, or the user, sums them over ranks). The collective runs only when the input
    needs a gradient: decided by the model's structure, the same on every rank. ``backend``:
    the forward's (eagerly known), else chosen again."""
    if backend is None:
        backend = backend_for(input, weight, None, None, None)
    backend, geo = backend
    dy = grad_output
    if dy.dtype != input.dtype or dy.stride() != input.stride():
        dy = _like(grad_output, input)
    buffer, fields = None, None
    channels = input.shape[1]
    if need_input:
        size = _comm.buffer_length(process_group, channels, tag, input.device)
        tag.backward += 1
        fields = _wire.fields(tag, _wire.BACKWARD, channels)
        buffer = torch.empty(size, dtype=torch.float64, device=input.device)
    # sum(dy) (C), sum(dy * xhat) (C) + padding + header -> size
    grad_weight, grad_bias, code = backend.backward_reduce(geo, dy, input, stats, buffer, fields,
                                                     weight_dtype, bias_dtype)
    grad_input = None
    if buffer is not None and fields is not None:
        world = _comm.all_reduce(buffer, process_group, tag, _wire.BACKWARD, 2 * channels,
                                 tuple(input.shape))
        grad_input, code = backend.backward_apply(geo, dy, input, stats, weight, buffer, world, fields,
                                                  _status_word(input, fresh=False)
                                                  if _wants_status(backend, input) else None)
        if code:
            _raise(code, buffer, fields, tag, _wire.BACKWARD, process_group)
        if buffer.is_cuda and not _comm.capturing(buffer):
            _comm.defer_check(buffer, fields, tag, _wire.BACKWARD, process_group)
    return grad_input, grad_weight, grad_bias


def _raise(code: int, buffer: Tensor, fields: list[int], tag: _wire.LayerTag, direction: int,
           process_group: Any | None) -> None:
    """The error of a backend's result code."""
    if code == _wire.MISMATCH:
        _comm.verify(buffer, fields, tag, direction, process_group)  # raises, explaining
    if code == _wire.NONFINITE:
        raise RuntimeError(
            f"syncbn: non-finite values (NaN or Inf) in the global batch statistics of "
            f"{tag.description}, forward pass #{tag.forward} (SYNCBN_NONFINITE=raise), raised on "
            "every rank. Run with SYNCBN_DEBUG=1 to see which rank's data produced them.")
    raise MemoryError(f"syncbn: {tag.description}: out of memory in the "
                      f"{_wire.DIRECTIONS[direction]} pass (result code {code})")


class SyncBatchNormFunction(torch.autograd.Function):
    """Training-mode batch norm with statistics over every rank of a process group.

    ``group`` and ``layer`` are the integers of :func:`group_id` and :func:`layer_id`.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, input: Tensor, weight: Tensor | None, bias: Tensor | None,
        running_mean: Tensor | None, running_var: Tensor | None, eps: float, momentum: float,
        group: int, layer: int,
    ) -> Tensor:
        if _comm.compiling():
            out, stats = torch.ops.syncbn.forward(input, weight, bias, running_mean, running_var,
                                                  eps, momentum, group, layer)
            ctx.backend = ctx.process_group = ctx.tag = None
        else:  # eager: the backward takes the forward's backend, group and tag as they are
            ctx.backend = backend_for(input, weight, bias, running_mean, running_var)
            ctx.process_group, ctx.tag = _group(group), _tags[layer]
            out, stats = forward_pass(input, weight, bias, running_mean, running_var, eps,
                                      momentum, ctx.process_group, ctx.tag, ctx.backend)
        ctx.save_for_backward(input, weight, stats)
        ctx.group, ctx.layer = group, layer
        ctx.bias_dtype = bias.dtype if bias is not None else None
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_output: Tensor) -> tuple[Tensor | None, ...]:
        input, weight, stats = ctx.saved_tensors
        need_input, need_weight, need_bias = ctx.needs_input_grad[:3]
        weight_dtype = weight.dtype if need_weight else None
        bias_dtype = ctx.bias_dtype if need_bias else None
        if _comm.compiling():
            gi, gw, gb = torch.ops.syncbn.backward(grad_output, input, weight, stats, ctx.group,
                                                   ctx.layer, need_input, need_weight, need_bias,
                                                   bias_dtype or input.dtype)
            grads: tuple[Tensor | None, ...] = (gi if need_input else None,
                                                gw if need_weight else None,
                                                gb if need_bias else None)
        else:
            grads = backward_pass(grad_output, input, weight, stats, ctx.process_group, ctx.tag,
                                  need_input, weight_dtype, bias_dtype, ctx.backend)
        return (*grads, None, None, None, None, None, None)


# ------------------------------------------------------------------------------ registered ops
@torch.library.custom_op("syncbn::forward", mutates_args=("running_mean", "running_var"))
def _forward_op(input: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                running_mean: Optional[Tensor], running_var: Optional[Tensor], eps: float,
                momentum: float, group: int, layer: int) -> tuple[Tensor, Tensor]:
    """The forward pass as an opaque op: ``(out, stats)``; running statistics mutated."""
    return forward_pass(input, weight, bias, running_mean, running_var, eps, momentum,
                        _group(group), _tags[layer])


@_forward_op.register_fake
def _(input, weight, bias, running_mean, running_var, eps, momentum, group, layer):  # type: ignore[no-untyped-def]
    return (torch.empty_like(input),
            input.new_empty(2 * input.shape[1] + 1, dtype=torch.float64))


@torch.library.custom_op("syncbn::backward", mutates_args=())
def _backward_op(grad_output: Tensor, input: Tensor, weight: Optional[Tensor], stats: Tensor,
                 group: int, layer: int, need_input: bool, need_weight: bool, need_bias: bool,
                 bias_dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
    """The backward pass as an opaque op; a gradient not needed comes back empty."""
    gi, gw, gb = backward_pass(grad_output, input, weight, stats, _group(group), _tags[layer],
                               need_input, weight.dtype if need_weight and weight is not None
                               else None, bias_dtype if need_bias else None)
    empty = input.new_empty(0)
    return (gi if gi is not None else empty, gw if gw is not None else empty.clone(),
            gb if gb is not None else empty.clone())


@_backward_op.register_fake
def _(grad_output, input, weight, stats, group, layer, need_input, need_weight, need_bias,  # type: ignore[no-untyped-def]
      bias_dtype):
    channels = input.shape[1]
    gi = torch.empty_like(input) if need_input else input.new_empty(0)
    gw = input.new_empty(channels, dtype=weight.dtype) if need_weight else input.new_empty(0)
    gb = input.new_empty(channels, dtype=bias_dtype) if need_bias else input.new_empty(0)
    return gi, gw, gb
