"""The autograd Function: the math of one synchronized batch-norm pass.

forward:  local moments -> one all_reduce (2C + 1 float64, + header) -> global mean/var -> normalize
backward: local sum(dy), sum(dy * xhat) -> one all_reduce (2C float64, + header) -> grad_input
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from . import _comm, _stats

__all__ = ["SyncBatchNormFunction", "nonfinite_policy"]

NONFINITE_POLICIES = ("propagate", "skip", "raise")


def nonfinite_policy() -> str:
    """``SYNCBN_NONFINITE``: what a NaN/Inf in the global batch statistics does.

    ``propagate`` (default, like torch): it flows into the output and the running statistics.
    ``skip``: the output is what it is, but the running statistics of the affected channels keep
    their previous values (no device sync). ``raise``: a ``RuntimeError`` on every rank before
    anything is updated (costs a device sync per pass on GPU).
    """
    value = os.environ.get("SYNCBN_NONFINITE", "propagate") or "propagate"
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
                raise ValueError(
                    "Expected more than 1 value per channel when training, got input size "
                    f"{input.size()} on {_comm.describe_group(process_group)} and 1 value per "
                    "channel in the global batch"
                )
            if total == 0:  # nothing to normalize and nothing to learn from
                update = False
        policy = nonfinite_policy()
        if policy == "raise" and not bool(torch.isfinite(moments).all()):  # a device sync on GPU
            raise RuntimeError(
                f"syncbn: non-finite values (NaN or Inf) in the global batch statistics of "
                f"{tag.description}, forward pass #{tag.forward} (SYNCBN_NONFINITE=raise), raised on "
                "every rank. Run with SYNCBN_DEBUG=1 to see which rank's data produced them."
            )
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
