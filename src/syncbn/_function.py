"""The autograd Function: the math of one synchronized batch-norm pass.

forward:  local moments -> one all_reduce (2C + 1 float64, + header) -> global mean/var -> normalize
backward: local sum(dy), sum(dy * xhat) -> one all_reduce (2C float64, + header) -> grad_input

Two implementations of the same steps: the fused C kernel (``_kernel.py``: CPU float32/float64
input, contiguous or channels_last) and torch operators (``_stats.py``: everything else, GPU
included). ``SYNCBN_KERNEL=aten`` forces the second.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from . import _comm, _kernel, _settings, _stats

__all__ = ["SyncBatchNormFunction", "nonfinite_policy"]

NONFINITE_POLICIES = ("propagate", "skip", "raise")


def nonfinite_policy() -> str:
    """``SYNCBN_NONFINITE``: what a NaN/Inf in the global batch statistics does.

    ``propagate`` (default, like torch): it flows into the output and the running statistics.
    ``skip``: the output is what it is, but the running statistics of the affected channels keep
    their previous values (no device sync). ``raise``: a ``RuntimeError`` on every rank before
    anything is updated (costs a device sync per pass on GPU).
    """
    value = _settings.get("SYNCBN_NONFINITE", "propagate")
    if value not in NONFINITE_POLICIES:
        raise ValueError(f"SYNCBN_NONFINITE: expected one of {NONFINITE_POLICIES}, got {value!r}")
    return value


class SyncBatchNormFunction(torch.autograd.Function):
    """Training-mode batch norm with statistics over every rank of ``process_group``.

    Every rank must call it, in the same order as the others, even with an empty shard.
    Running statistics (when given) are updated in place with the global statistics.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        input: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        running_mean: Tensor | None,
        running_var: Tensor | None,
        eps: float,
        momentum: float,
        process_group: Any | None,
        tag: _comm.LayerTag,
    ) -> Tensor:
        if not _comm.compiling():  # compiled graphs trace torch operators: the ATen path
            geom = _kernel.geometry(input, weight, bias, running_mean, running_var)
            if geom is not None and _kernel.get() is not None:
                return _forward_fused(ctx, geom, input, weight, bias, running_mean, running_var,
                                      eps, momentum, process_group, tag)
        ctx.fused = None
        channels = input.shape[1]
        n_local = _stats.local_count(input)
        # Every rank calls the collective, even with an empty shard; counts travel with the sums.
        tag.forward += 1
        moments = _stats.local_moments(input)  # C, C, 1 -> (2C + 1) float64
        moments = _comm.synced_sum(moments, tag, _comm.FORWARD, channels, process_group,
                                   tuple(input.shape))
        mean, var, count = _stats.global_mean_var(moments, channels)

        # The global count is only needed on the host when this shard alone cannot prove it is
        # >= 2 (a shard of 0 or 1 values per channel): a rare device sync, and every rank of a
        # global batch of 1 value takes this branch, so all of them raise together.
        update = running_mean is not None or running_var is not None
        if n_local <= 1:
            total = int(count.item())
            if total == 1:
                raise _one_value_error(input, process_group)
            if total == 0:  # nothing to normalize and nothing to learn from
                update = False
        policy = nonfinite_policy()
        if policy == "raise" and not bool(torch.isfinite(moments).all()):  # a device sync on GPU
            raise _nonfinite_error(tag)
        if update:
            _stats.update_running_stats(running_mean, running_var, mean, var, count, momentum,
                                        keep_nonfinite=policy != "skip")

        acc = _stats.acc_dtype(input.dtype)
        # Fresh tensors (copy=True), not views of the reduced buffer: what is saved for backward
        # must not alias it (torch.compile traces this Function and refuses aliased saves).
        mean_acc, var_acc = mean.to(acc, copy=True), var.to(acc, copy=True)
        invstd = torch.rsqrt(var + eps).to(acc, copy=True)
        ctx.save_for_backward(input, weight, mean_acc, invstd, count.clone())
        ctx.process_group = process_group
        ctx.tag = tag
        ctx.bias_dtype = bias.dtype if bias is not None else input.dtype
        return _stats.normalize(input, mean_acc, var_acc, weight, bias, eps)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_output: Tensor) -> tuple[Tensor | None, ...]:
        if ctx.fused is not None:
            return _backward_fused(ctx, grad_output)
        input, weight, mean, invstd, count = ctx.saved_tensors
        need_input, need_weight, need_bias = ctx.needs_input_grad[:3]
        sum_dy, sum_dy_xhat = _stats.backward_reduce(grad_output, input, mean, invstd)
        # weight/bias gradients are this rank's share; DDP (or the user) sums them over ranks.
        grad_weight = sum_dy_xhat.to(weight.dtype) if need_weight else None
        grad_bias = sum_dy.to(ctx.bias_dtype) if need_bias else None
        grad_in = None
        if need_input:
            channels = input.shape[1]
            ctx.tag.backward += 1
            packed = torch.cat([sum_dy, sum_dy_xhat]).double()  # C, C -> (2C)
            packed = _comm.synced_sum(packed, ctx.tag, _comm.BACKWARD, channels, ctx.process_group,
                                      tuple(input.shape))
            packed = packed.to(sum_dy.dtype)
            grad_in = _stats.grad_input(
                grad_output, input, mean, invstd, weight,
                packed[:channels], packed[channels:], count,
            )
        return grad_in, grad_weight, grad_bias, None, None, None, None, None, None


def _nonfinite_error(tag: _comm.LayerTag) -> RuntimeError:
    return RuntimeError(
        f"syncbn: non-finite values (NaN or Inf) in the global batch statistics of "
        f"{tag.description}, forward pass #{tag.forward} (SYNCBN_NONFINITE=raise), raised on "
        "every rank. Run with SYNCBN_DEBUG=1 to see which rank's data produced them."
    )


def _one_value_error(input: Tensor, process_group: Any | None) -> ValueError:
    return ValueError(
        "Expected more than 1 value per channel when training, got input size "
        f"{input.size()} on {_comm.describe_group(process_group)} and 1 value per "
        "channel in the global batch"
    )


_POLICY_CODES = {"propagate": 0, "skip": 1, "raise": 2}


def _forward_fused(ctx: Any, geom: tuple[int, int, int, int], input: Tensor,
                   weight: Tensor | None, bias: Tensor | None, running_mean: Tensor | None,
                   running_var: Tensor | None, eps: float, momentum: float,
                   process_group: Any | None, tag: _comm.LayerTag) -> Tensor:
    """The forward in the fused kernel: the same steps as the ATen path, one C call each."""
    n, channels, s, nsc = geom
    forward_reduce, forward_apply = _kernel.calls(input.dtype)[:2]
    threads = torch.get_num_threads()
    tag.forward += 1
    fields = _comm.header_fields(tag, _comm.FORWARD, channels)
    length = _comm.buffer_length(channels)
    # Large tensors first, then the small ones that outlive them: freeing the large ones then
    # does not leave free memory at the top of the heap, which glibc would hand back to the OS
    # (and the next pass would page-fault on).
    out = torch.empty_like(input)
    # the collective's buffer (length), then mean (C) and invstd (C): saved for backward
    scratch = torch.empty(length + 2 * channels, dtype=torch.float64)
    buffer = scratch[:length]
    x, at = input.data_ptr(), scratch.data_ptr()
    # sum(x) (C), sum(x**2) (C), n (1) + padding + header -> buffer_length(C)
    if forward_reduce(_REDUCE_FWD.pack(x, n, channels, s, nsc, threads, at, length, *fields)):
        raise MemoryError(f"syncbn: {tag.description}: out of memory in the forward")
    world = float(_comm.all_reduce_buffer(buffer, 2 * channels + 1, tag, _comm.FORWARD,
                                          channels, process_group, input.shape))
    # Header check, global mean/invstd and (when the global count is >= 2) the running
    # statistics, in float64 from the identical reduced buffer (bitwise equal on every rank),
    # then the normalization.
    count = forward_apply(_APPLY_FWD.pack(
        world, eps, momentum, at, length, *fields, *_kernel.arg(running_mean),
        *_kernel.arg(running_var), _POLICY_CODES[nonfinite_policy()], at + 8 * length, x,
        out.data_ptr(), n, channels, s, nsc, threads, *_kernel.arg(weight), *_kernel.arg(bias)))
    if count == -2.0:
        _comm.verify_buffer(buffer, fields, tag, _comm.FORWARD, process_group)  # raises
    if count == -1.0:
        raise _nonfinite_error(tag)
    if count == 1.0:  # every rank reads the same count: all of them raise together
        raise _one_value_error(input, process_group)
    if count == -3.0:
        raise MemoryError(f"syncbn: {tag.description}: out of memory in the forward")
    ctx.save_for_backward(input, weight, scratch)
    ctx.fused = (geom, count, world, 8 * length)  # stats: bytes into scratch
    ctx.process_group = process_group
    ctx.tag = tag
    ctx.bias_dtype = bias.dtype if bias is not None else input.dtype
    return out


_REDUCE_FWD, _APPLY_FWD = _kernel.ARG_FORMATS["forward_reduce"], _kernel.ARG_FORMATS["forward_apply"]
_REDUCE_BWD, _APPLY_BWD = (_kernel.ARG_FORMATS["backward_reduce"],
                           _kernel.ARG_FORMATS["backward_apply"])
_NO_FIELDS = [0] * 6  # no header: a backward that sends nothing


def _backward_fused(ctx: Any, grad_output: Tensor) -> tuple[Tensor | None, ...]:
    """The backward in the fused kernel (see :meth:`SyncBatchNormFunction.backward`)."""
    input, weight, scratch = ctx.saved_tensors
    (n, channels, s, nsc), count, world, offset = ctx.fused
    mean = scratch.data_ptr() + offset
    invstd = mean + 8 * channels  # stats: mean (C), invstd (C)
    need_input, need_weight, need_bias = ctx.needs_input_grad[:3]
    backward_reduce, backward_apply = _kernel.calls(input.dtype)[2:]
    threads = torch.get_num_threads()
    tag = ctx.tag
    dy, layout = grad_output, _kernel.layout_of(input, nsc)
    if dy.dtype != input.dtype or not dy.is_contiguous(memory_format=layout):
        dy = dy.to(input.dtype).contiguous(memory_format=layout)
    grad_in = torch.empty_like(input) if need_input else None  # large first: see the forward
    grad_weight = torch.empty(channels, dtype=weight.dtype) if need_weight else None
    grad_bias = torch.empty(channels, dtype=ctx.bias_dtype) if need_bias else None
    fields, length, buffer, at = _NO_FIELDS, 0, None, 0
    if need_input:
        tag.backward += 1
        fields = _comm.header_fields(tag, _comm.BACKWARD, channels)
        length = _comm.buffer_length(channels)
        buffer = torch.empty(length, dtype=torch.float64)
        at = buffer.data_ptr()
    d, x = dy.data_ptr(), input.data_ptr()
    # sum(dy) (C), sum(dy * xhat) (C) + padding + header -> buffer_length(C); and the local
    # weight/bias gradients (this rank's share: DDP or the user sums them over ranks)
    if backward_reduce(_REDUCE_BWD.pack(
            d, x, n, channels, s, nsc, threads, mean, invstd, at, length, *fields,
            *_kernel.arg(grad_weight), *_kernel.arg(grad_bias))):
        raise MemoryError(f"syncbn: {tag.description}: out of memory in the backward")
    if buffer is not None and grad_in is not None:  # both exactly when need_input
        _comm.all_reduce_buffer(buffer, 2 * channels, tag, _comm.BACKWARD, channels,
                                ctx.process_group, input.shape)
        # header check, then grad_input from the global sums
        done = backward_apply(_APPLY_BWD.pack(
            world, count, at, length, *fields, d, x, grad_in.data_ptr(), n, channels, s, nsc,
            threads, mean, *_kernel.arg(weight)))
        if done == 0:
            _comm.verify_buffer(buffer, fields, tag, _comm.BACKWARD, ctx.process_group)  # raises
        if done < 0:
            raise MemoryError(f"syncbn: {tag.description}: out of memory in the backward")
    return grad_in, grad_weight, grad_bias, None, None, None, None, None, None
