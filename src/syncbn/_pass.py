"""One synchronized batch-norm pass: the layer's plan, the autograd Function, the registered ops.

Each direction is ``reduce -> one all_reduce -> apply``::

    forward:  backend.forward_reduce   local sum(x), sum(x**2), n      -> buffer (+ header)
              _comm.all_reduce         the one collective               (2C + 1 numbers + header)
              backend.forward_apply    header check, global mean/invstd, running statistics,
                                       normalize                        -> out, stats
    backward: backend.backward_reduce  local sum(dy), sum(dy * xhat)    -> buffer; local dw, db
              _comm.all_reduce         the one collective               (2C numbers + header)
              backend.backward_apply   header check, grad_input

A backend (``syncbn.backends``) implements those four steps; ``stats`` is ``[mean (C), invstd
(C), count (1)]`` in float64, whichever backend made it.

**The plan.** What does not change between passes of a layer is decided once, in a
:class:`Plan`: the backend and its geometry of the input, the group (:class:`syncbn._comm.Group`),
the buffer length and header template, the layer's pass counters in that group, the settings,
a reusable CPU buffer. :func:`plan` rebuilds it only when the input's shape, strides, dtype or
device, the per-channel tensors' dtypes, the layer's group, the group's width or the settings
change; a steady-state pass makes a handful of Python calls.

**Two doors.** Eagerly, :class:`SyncBatchNormFunction` runs a plan's passes directly (the fewest
Python steps). Under ``torch.compile``, :class:`CompiledSyncBatchNorm` calls the registered ops
``syncbn::forward`` / ``syncbn::backward``, which dynamo sees as opaque, known operators (with
fake implementations), so a synchronized model compiles with ``fullgraph=True`` and its checks
run at run time inside the ops. Ops take layers and groups as integers (:func:`layer_id`,
:func:`group_id`, looked up when a layer is built or its group set, never while dynamo traces).
A registered op costs ~14 us per call more than a direct call (benchmarks/RESULTS.md, section 0),
which is why eager does not use them.
"""

from __future__ import annotations

import threading
import weakref
from typing import Any, Optional  # Optional: custom_op reads the annotations at run time

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from . import _comm, _settings, _stats, _wire, backends

__all__ = ["CompiledSyncBatchNorm", "LayerState", "Plan", "SyncBatchNormFunction", "backward",
           "check_input", "forward", "grad_like", "group_id", "layer_id", "plan",
           "synchronized_plan", "will_sync"]


def check_input(input: Tensor, num_features: int | None, who: str) -> None:
    """Raise ``ValueError`` (before any collective) for input no batch norm can take.

    ``who`` names the caller in the message, e.g. ``"SyncBatchNorm2d(64) 'backbone.bn1'"``.
    """
    if not isinstance(input, Tensor):
        raise TypeError(f"{who}: expected a torch.Tensor input, got {type(input).__name__}")
    if input.dim() < 2:
        raise ValueError(f"{who}: expected at least 2D input (got {input.dim()}D input)")
    if not input.is_floating_point():
        raise ValueError(
            f"{who}: expected a floating-point input (float16, bfloat16, float32 or float64), "
            f"got {input.dtype}"
        )
    if num_features is not None and input.shape[1] != num_features:
        raise ValueError(
            f"{who}: expected input with {num_features} channels in dim 1, got {input.shape[1]} "
            f"(input size {tuple(input.shape)})"
        )


def will_sync(process_group: Any | None) -> bool:
    """Whether a training pass over ``process_group`` synchronizes: the group has more than one
    rank (or ``SYNCBN_FORCE_SYNC`` and a group of one). What torch.compile traces; eager passes
    ask their plan."""
    size = _comm.world_size(process_group)
    return size > 1 or (size == 1 and _settings.get().force_sync)


class LayerState:
    """What a synchronized layer (or a functional call site) keeps between passes: its tag
    (identity in the header and in messages), its current plan, and ``check``, which raises
    for input the layer cannot take (run whenever a plan is made)."""

    def __init__(self, tag: _wire.LayerTag, check: Any) -> None:
        self.tag = tag
        self.check = check
        self.plan: Plan | None = None


class Plan:
    """Everything a layer's pass needs that does not change between passes (see the module
    docstring); ``key`` is what it was made for."""

    def __init__(self, state: LayerState, key: tuple[Any, ...], group: _comm.Group,
                 input: Tensor, params: tuple[Tensor | None, ...],
                 settings: _settings.Settings, sync: bool) -> None:
        self.key, self.group, self.settings, self.tag = key, group, settings, state.tag
        self.sync = sync  # False: the pass is plain batch norm (one rank), nothing else is set
        self.used: Tensor | None = None  # SYNCBN_NONFINITE=skip: 1 if the last batch counted
        self.invertible: tuple[Any, bool] | None = None  # in-place: (weights' versions, verdict)
        self.epoch = group.epoch
        self.thread = threading.get_ident()  # (the group's, when it synchronizes)
        if not sync:
            return
        self.backend, self.geo = backends.select(input, *params)
        channels = self.channels = input.shape[1]
        self.counters = group.counters(state.tag.key)
        self.length = group.length(channels, state.tag, self.counters, input.device)
        self.epoch = group.epoch  # after a widening
        self.fwd = _wire.fields(state.tag, _wire.FORWARD, channels, 0)
        self.bwd = _wire.fields(state.tag, _wire.BACKWARD, channels, 0)
        self.policy = _wire.POLICIES[settings.nonfinite]
        self.status = self.backend.STATUS_WORD and not input.is_cpu
        self.device = input.device
        # A CPU buffer is reused from pass to pass (each pass is done with it before the next
        # starts); on a device each pass allocates its own (the caching allocator is cheap, and
        # a captured CUDA graph must own its memory).
        self.buffer = (torch.empty(self.length, dtype=torch.float64) if input.is_cpu else None)
        self.local_count = _stats.local_count(input)


def plan(state: LayerState, input: Tensor, params: tuple[Tensor | None, ...],
         process_group: Any | None, force: bool = False) -> Plan:
    """The layer's plan for a training pass on ``input`` with ``params`` (weight, bias, running
    mean, running var); ``plan.sync`` False: the pass does not synchronize (a group of one
    rank, unless ``SYNCBN_FORCE_SYNC``, or ``force``: the registered ops, which always take the
    synchronized path; its collective is skipped on one rank). Rebuilt only when what it was
    made for changed."""
    current = state.plan
    w, b, rm, rv = params
    key = (input.shape, input.stride(), input.dtype, input.device,
           None if w is None else w.dtype, None if b is None else b.dtype,
           None if rm is None else rm.dtype, None if rv is None else rv.dtype)
    if (current is not None and current.key == key and current.settings is _settings.current
            and (current.sync or not force)
            and current.group.ref() is _comm.resolve(process_group)
            and current.epoch == current.group.epoch and current.thread == threading.get_ident()):
        return current
    state.check(input)
    settings = _settings.get()
    group = _comm.group(process_group)
    sync = force or group.size > 1 or (settings.force_sync and group.ref() is not None)
    if sync and group.size > 1:
        thread = threading.get_ident()
        # A pass inside a backward (an activation-checkpoint recompute) runs in autograd's
        # thread, which on a GPU is not the caller's: that is the same program, in step.
        if (group.thread is not None and group.thread != thread
                and torch._C._current_graph_task_id() == -1):
            raise _wire.SyncBatchNormError(
                f"syncbn: {state.tag.description} runs in another thread than the synchronized "
                f"layers of its process group before it ({group.describe()}): the synchronized "
                "layers of one process group must run in one thread (the ranks' collectives "
                "would interleave). Use one process per device (or one process group per "
                "thread), or syncbn.DataParallel for replicas in threads.")
        if group.thread is None:
            group.thread = thread
    state.plan = Plan(state, key, group, input, params, settings, sync)
    return state.plan


def synchronized_plan(state: LayerState, input: Tensor, params: tuple[Tensor | None, ...],
                      process_group: Any | None = None) -> Plan:
    """A plan that takes the synchronized path even on a group of one rank (where the collective
    itself is skipped): what benchmarks time as that path's cost at one rank."""
    return Plan(state, (), _comm.group(process_group), input, params, _settings.get(), True)


def forward(p: Plan, input: Tensor, weight: Tensor | None, bias: Tensor | None,
            running_mean: Tensor | None, running_var: Tensor | None, eps: float,
            momentum: float, act: int = 0, act_param: float = 0.0,
            inplace: bool = False) -> tuple[Tensor, Tensor, Tensor | None]:
    """Normalize ``input`` with the global batch statistics, then the activation ``act``
    (``_stats.ACTIVATIONS``); ``(out, stats, kept)``. Running statistics (when given) are
    updated in place from the reduced buffer, identically on every rank. Every rank must call
    it, in the same order as the others, even with an empty shard.

    ``inplace``: ``out`` is ``input`` itself, overwritten, and ``kept`` is what the backward
    reads instead of the input: None when the input is recovered from ``out`` (the activation
    and the affine transform inverted), or a copy of the input made before it was overwritten
    when this pass's weights make that inverse ill-conditioned (``_stats.inplace_invertible``)."""
    counters = p.counters
    counters[0] += 1
    count = counters[0]
    fields = p.fwd
    fields[3] = count % _wire.FIELD_LIMIT
    buffer = p.buffer if p.buffer is not None else torch.empty(
        p.length, dtype=torch.float64, device=p.device)
    backend = p.backend
    # sum(x) (C), sum(x**2) (C), n (1) + padding + header -> length
    code = backend.forward_reduce(p.geo, input, buffer, fields)
    if code:
        _raise(code, buffer, fields, p, _wire.FORWARD, count)
    _comm.all_reduce(buffer, p.group, p.tag, _wire.FORWARD, count, fields, 2 * p.channels + 1,
                     input.shape)
    if p.local_count <= 1:
        running_mean, running_var = _small_batch(p, input, buffer, fields, count, running_mean,
                                                 running_var)
    if p.policy == _wire.POLICIES["skip"] and not _comm.capturing(buffer):
        # A batch with non-finite global statistics leaves every statistic untouched (and is
        # not counted: p.used): a host read, on a device a sync, as for SYNCBN_NONFINITE=raise.
        p.used = torch.isfinite(_wire.payload(buffer, 2 * p.channels + 1)).all().long()
        if not p.used:
            running_mean = running_var = None
    status = _status_word(p) if p.status else None
    kept = None
    if act or inplace:
        if not backend.ACTIVATES:
            raise backends.BackendUnavailable(
                f"syncbn: {p.tag.description} has an activation or is in place, which the "
                f"{backend.NAME} backend does not fuse (SYNCBN_KERNEL): use another backend")
        if inplace and not _invertible(p, weight, bias, input.dtype):
            kept = input.clone()  # exact, without the memory saving, for this pass
        out, stats, code = backend.forward_apply(
            p.geo, input, buffer, p.group.size, fields, weight, bias, running_mean, running_var,
            eps, momentum, p.policy, status, act=act, act_param=act_param,
            out=input if inplace else None)
    else:
        out, stats, code = backend.forward_apply(p.geo, input, buffer, p.group.size, fields,
                                                 weight, bias, running_mean, running_var, eps,
                                                 momentum, p.policy, status)
    if status is not None and p.policy == _wire.POLICIES["raise"] and not _comm.capturing(input):
        code = int(status.item())  # a device sync on GPU, as documented for this policy
    if code:
        _raise(code, buffer, fields, p, _wire.FORWARD, count)
    return out, stats, kept


def _invertible(p: Plan, weight: Tensor | None, bias: Tensor | None, dtype: torch.dtype) -> bool:
    """``_stats.inplace_invertible``, remembered until the weight or bias changes (their
    ``_version``, bumped by every in-place update such as an optimizer step): on a GPU the check
    reads the weights on the host, a device sync that must not happen on every pass."""
    key = (None if weight is None else (weight.data_ptr(), weight._version),
           None if bias is None else (bias.data_ptr(), bias._version), dtype)
    if p.invertible is None or p.invertible[0] != key:
        p.invertible = (key, _stats.inplace_invertible(weight, bias, dtype))
    return p.invertible[1]


def _small_batch(p: Plan, input: Tensor, buffer: Tensor, fields: list[int], count: int,
                 running_mean: Tensor | None, running_var: Tensor | None,
                 ) -> tuple[Tensor | None, Tensor | None]:
    """A shard of 0 or 1 values per channel cannot prove the global count is >= 2: read it
    (a rare device sync; every rank of a global batch of 1 value takes this branch, so all of
    them raise together). Under CUDA-graph capture there is no host: the backends then skip
    the running statistics of a global count below 2 on the device."""
    if _comm.capturing(buffer):
        return running_mean, running_var
    _comm.verify(buffer, fields, p.tag, _wire.FORWARD, count, p.group)
    total = int(buffer[2 * p.channels + 1].item())
    if total == 1:
        raise ValueError(
            "Expected more than 1 value per channel when training, got input size "
            f"{input.size()} on {p.group.describe()} and 1 value per channel in the global "
            "batch")
    if total == 0:  # nothing to normalize and nothing to learn from
        return None, None
    return running_mean, running_var


def _status_word(p: Plan) -> Tensor:
    """Where a backend that says ``STATUS_WORD = True`` (Triton) puts its result code without a
    host sync. Read by the host only under ``SYNCBN_NONFINITE=raise`` (a fresh word: one fill
    kernel); otherwise the header is checked later (``syncbn._comm``) and the word is a
    per-device scratch that nobody reads."""
    if p.policy == _wire.POLICIES["raise"]:
        return torch.zeros(1, dtype=torch.int32, device=p.device)
    word = _scratch_words.get(p.device)
    if word is None:
        word = _scratch_words[p.device] = torch.zeros(1, dtype=torch.int32, device=p.device)
    return word


_scratch_words: dict[torch.device, Tensor] = {}


def backward(p: Plan, grad_output: Tensor, input: Tensor | None, weight: Tensor | None,
             stats: Tensor, need_input: bool, weight_dtype: torch.dtype | None,
             bias_dtype: torch.dtype | None, act: int = 0, act_param: float = 0.0,
             output: Tensor | None = None,
             bias: Tensor | None = None) -> tuple[Tensor | None, ...]:
    """``(grad_input, grad_weight, grad_bias)``; the weight/bias gradients are this rank's
    share (DDP, or the user, sums them over ranks). The collective runs only when the input
    needs a gradient: decided by the model's structure, the same on every rank. ``output``
    (with ``input`` None): an in-place pass's output, from which the input is recovered."""
    read = input if input is not None else output
    dy = grad_output
    if dy.dtype != read.dtype or dy.stride() != read.stride():
        dy = grad_like(grad_output, read)
    buffer = fields = None
    count = 0
    if need_input:
        p.counters[1] += 1
        count = p.counters[1]
        fields = p.bwd
        fields[3] = count % _wire.FIELD_LIMIT
        buffer = p.buffer if p.buffer is not None else torch.empty(
            p.length, dtype=torch.float64, device=p.device)
    backend = p.backend
    # sum(dy) (C), sum(dy * xhat) (C) + padding + header -> length
    activated = act or output is not None
    if activated:
        grad_weight, grad_bias, code = backend.backward_reduce(
            p.geo, dy, input, stats, buffer, fields or p.bwd, weight_dtype, bias_dtype, act=act,
            act_param=act_param, saved_output=output, weight=weight, bias=bias)
    else:
        grad_weight, grad_bias, code = backend.backward_reduce(p.geo, dy, input, stats, buffer,
                                                               fields or p.bwd, weight_dtype,
                                                               bias_dtype)
    if code:
        _raise(code, buffer, p.bwd, p, _wire.BACKWARD, count)
    grad_input = None
    if buffer is not None and fields is not None:
        _comm.all_reduce(buffer, p.group, p.tag, _wire.BACKWARD, count, fields, 2 * p.channels,
                         read.shape)
        status = _status_word(p) if p.status else None
        if activated:
            grad_input, code = backend.backward_apply(
                p.geo, dy, input, stats, weight, buffer, p.group.size, fields, status, act=act,
                act_param=act_param, saved_output=output, bias=bias)
        else:
            grad_input, code = backend.backward_apply(p.geo, dy, input, stats, weight, buffer,
                                                      p.group.size, fields, status)
        if code:
            _raise(code, buffer, fields, p, _wire.BACKWARD, count)
    return grad_input, grad_weight, grad_bias


def grad_like(grad_output: Tensor, input: Tensor) -> Tensor:
    """``grad_output`` in the input's dtype and memory layout (what the backends read; skipped
    in the usual case: autograd hands back the output's layout)."""
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


def _raise(code: int, buffer: Tensor | None, fields: list[int], p: Plan, direction: int,
           count: int) -> None:
    """The error of a backend's result code."""
    if code == _wire.MISMATCH and buffer is not None:
        _comm.verify(buffer, fields, p.tag, direction, count, p.group)  # raises, explaining
    if code == _wire.NONFINITE:
        raise _wire.NonFiniteError(
            f"syncbn: non-finite values (NaN or Inf) in the global batch statistics of "
            f"{p.tag.description}, forward pass #{count} (SYNCBN_NONFINITE=raise), raised on "
            "every rank. Run with SYNCBN_DEBUG=1 to see which rank's data produced them.")
    raise MemoryError(f"syncbn: {p.tag.description}: out of memory in the "
                      f"{_wire.DIRECTIONS[direction]} pass (result code {code})")


class SyncBatchNormFunction(torch.autograd.Function):
    """Training-mode batch norm with statistics over every rank of a process group, eagerly:
    ``apply(input, weight, bias, running_mean, running_var, eps, momentum, plan, act=0,
    act_param=0.0, inplace=False)``; ``inplace`` overwrites ``input`` with the output (autograd
    is told: a later use of the input's old value is an error, as for torch's in-place ops)."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, input: Tensor, weight: Tensor | None, bias: Tensor | None,
        running_mean: Tensor | None, running_var: Tensor | None, eps: float, momentum: float,
        p: Plan, act: int = 0, act_param: float = 0.0, inplace: bool = False,
    ) -> Tensor:
        out, stats, kept = forward(p, input, weight, bias, running_mean, running_var, eps,
                                   momentum, act, act_param, inplace)
        if inplace:
            ctx.mark_dirty(input)
            # only the output is kept (the input recovered from it), or a copy of the input
            ctx.save_for_backward(kept, weight, bias, stats, out if kept is None else None)
        else:
            ctx.save_for_backward(input, weight, bias, stats, None)
        ctx.plan = p  # the backward takes the forward's plan as it is
        ctx.act, ctx.act_param = act, act_param
        ctx.bias_dtype = bias.dtype if bias is not None else None
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_output: Tensor) -> tuple[Tensor | None, ...]:
        input, weight, bias, stats, output = ctx.saved_tensors
        need_input, need_weight, need_bias = ctx.needs_input_grad[:3]
        grads = backward(ctx.plan, grad_output, input, weight, stats, need_input,
                         weight.dtype if need_weight else None,
                         ctx.bias_dtype if need_bias else None, ctx.act, ctx.act_param, output,
                         bias)
        return (*grads, None, None, None, None, None, None, None, None)


class CompiledSyncBatchNorm(torch.autograd.Function):
    """The same pass under ``torch.compile``, through the registered ops: ``apply(input, weight,
    bias, running_mean, running_var, eps, momentum, group, layer, act=0, act_param=0.0)`` with
    the integers of :func:`group_id` and :func:`layer_id`. Out of place always (under
    ``torch.compile`` an ``inplace=True`` layer computes out of place: the compiler plans the
    memory)."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, input: Tensor, weight: Tensor | None, bias: Tensor | None,
        running_mean: Tensor | None, running_var: Tensor | None, eps: float, momentum: float,
        group: int, layer: int, act: int = 0, act_param: float = 0.0,
    ) -> Tensor:
        out, stats = torch.ops.syncbn.forward(input, weight, bias, running_mean, running_var,
                                              eps, momentum, group, layer, act, act_param)
        ctx.save_for_backward(input, weight, bias, stats)
        ctx.group, ctx.layer, ctx.act, ctx.act_param = group, layer, act, act_param
        ctx.bias_dtype = bias.dtype if bias is not None else None
        return out  # type: ignore[no-any-return]

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_output: Tensor) -> tuple[Tensor | None, ...]:
        input, weight, bias, stats = ctx.saved_tensors
        need_input, need_weight, need_bias = ctx.needs_input_grad[:3]
        gi, gw, gb = torch.ops.syncbn.backward(grad_output, input, weight, stats, ctx.group,
                                               ctx.layer, need_input, need_weight, need_bias,
                                               ctx.bias_dtype or input.dtype, ctx.act,
                                               ctx.act_param, bias)
        return (gi if need_input else None, gw if need_weight else None,
                gb if need_bias else None, None, None, None, None, None, None, None, None)


# ------------------------------------------------------------------------------ registered ops
# Layers and groups as registered ops take them: integers (an op cannot take Python objects),
# held weakly: a layer holds its state, and the caller its group, while a pass runs.
_groups: weakref.WeakValueDictionary[int, Any] = weakref.WeakValueDictionary()
_strong_groups: dict[int, Any] = {}
_layers: weakref.WeakValueDictionary[int, LayerState] = weakref.WeakValueDictionary()


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


def _group(key: int) -> Any | None:
    if key == 0:
        return None
    group = _groups.get(key)
    return group if group is not None else _strong_groups[key]


def layer_id(state: LayerState) -> int:
    """The integer a registered op takes for a layer's state (which the layer keeps alive)."""
    key = id(state)
    _layers[key] = state
    return key


def _op_plan(layer: int, group: int, input: Tensor, params: tuple[Tensor | None, ...]) -> Plan:
    return plan(_layers[layer], input, params, _group(group), force=True)


@torch.library.custom_op("syncbn::forward", mutates_args=("running_mean", "running_var"))
def _forward_op(input: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                running_mean: Optional[Tensor], running_var: Optional[Tensor], eps: float,
                momentum: float, group: int, layer: int, act: int = 0,
                act_param: float = 0.0) -> tuple[Tensor, Tensor]:
    """The forward pass as an opaque op: ``(out, stats)``; running statistics mutated."""
    p = _op_plan(layer, group, input, (weight, bias, running_mean, running_var))
    out, stats, _ = forward(p, input, weight, bias, running_mean, running_var, eps, momentum,
                            act, act_param)
    return out, stats


@_forward_op.register_fake
def _(input, weight, bias, running_mean, running_var, eps, momentum, group, layer, act=0,  # type: ignore[no-untyped-def]
      act_param=0.0):
    return (torch.empty_like(input),
            input.new_empty(2 * input.shape[1] + 1, dtype=torch.float64))


@torch.library.custom_op("syncbn::backward", mutates_args=())
def _backward_op(grad_output: Tensor, input: Tensor, weight: Optional[Tensor], stats: Tensor,
                 group: int, layer: int, need_input: bool, need_weight: bool, need_bias: bool,
                 bias_dtype: torch.dtype, act: int = 0, act_param: float = 0.0,
                 bias: Optional[Tensor] = None) -> tuple[Tensor, Tensor, Tensor]:
    """The backward pass as an opaque op; a gradient not needed comes back empty."""
    p = _layers[layer].plan  # the forward's, in the usual case
    if p is None or not p.sync or p.key[0] != input.shape:
        p = _op_plan(layer, group, input, (weight, None, None, None))
    gi, gw, gb = backward(p, grad_output, input, weight, stats, need_input,
                          weight.dtype if need_weight and weight is not None else None,
                          bias_dtype if need_bias else None, act, act_param, None, bias)
    empty = input.new_empty(0)
    return (gi if gi is not None else empty, gw if gw is not None else empty.clone(),
            gb if gb is not None else empty.clone())


@_backward_op.register_fake
def _(grad_output, input, weight, stats, group, layer, need_input, need_weight, need_bias,  # type: ignore[no-untyped-def]
      bias_dtype, act=0, act_param=0.0, bias=None):
    channels = input.shape[1]
    gi = torch.empty_like(input) if need_input else input.new_empty(0)
    gw = input.new_empty(channels, dtype=weight.dtype) if need_weight else input.new_empty(0)
    gb = input.new_empty(channels, dtype=bias_dtype) if need_bias else input.new_empty(0)
    return gi, gw, gb
