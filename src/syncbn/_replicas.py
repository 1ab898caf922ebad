"""Synchronized batch norm across the replicas of ONE process (what ``syncbn.DataParallel`` runs).

The replicas of a module run in threads, one per device (several may share the CPU). A syncbn
layer in training mode does not go through ``torch.distributed`` there. Each replica thread
deposits its shard at a rendezvous for that layer and waits; the last replica to arrive runs the
layer for ALL replicas with one autograd Function:

forward:  local moments per replica -> ONE sum over replicas (N x (2C + 1) -> 2C + 1) -> global
          mean/var -> running statistics (once, on the wrapped module's layer)
          -> per-replica normalize
backward: (called ONCE by autograd with every replica's grad_output; an unused one is zeros)
          local sum(dy), sum(dy * xhat) per replica -> ONE sum over replicas (N x 2C -> 2C)
          -> per-replica grad_input

Each thread then takes its own output and goes on. Nothing waits in the backward, on purpose:
torch's autograd engine runs all CPU backward work on the single thread that called
``backward()`` (only CUDA devices get a thread each), so a backward that waited for the other
replicas would deadlock on the CPU.

Invariants enforced here:

* every replica calls the same syncbn layers, in the same order, in one forward (checked at each
  rendezvous: a replica at another layer, or one that finished its forward while others wait, is a
  ``RuntimeError`` naming the layers);
* a replica that raises marks the group failed and wakes every waiter: every replica ends, and the
  first error surfaces once, in the thread that called ``DataParallel.forward``;
* every wait is bounded (the group's ``timeout``);
* the running statistics (and ``num_batches_tracked``) are updated once per pass, on the wrapped
  module's layer, from the global statistics.
"""

from __future__ import annotations

import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from . import _settings, _stats, _wire, backends
from ._pass import check_input, grad_like

__all__ = ["ReplicaGroup", "route", "thread"]

class _ThreadState(threading.local):
    replica: tuple[ReplicaGroup, int] | None = None  # (group, index) while a replica thread runs


thread = _ThreadState()  # which replica this thread runs, if any
_warned_torch_dp = [False]


class _Aborted(BaseException):
    """Ends a waiting replica after another one failed (a BaseException, so that a model's own
    ``except Exception`` cannot swallow it); the group surfaces the first error, once."""


def route(layer: Any, input: Tensor) -> Tensor | None:
    """The Module's hook, called at the top of ``SyncBatchNorm.forward`` in training mode.

    In a replica thread of :class:`syncbn.DataParallel`: the synchronized output. Otherwise
    ``None`` (the Module goes on as usual), after a one-time warning when the layer is a replica
    made by ``torch.nn.DataParallel`` (``torch.nn.parallel.replicate`` marks those with
    ``_is_replica = True``), whose replicas each normalize their own chunk.
    """
    replica = thread.replica
    if replica is not None:
        group, index = replica
        return group.batch_norm(index, layer, input)
    if vars(layer).get("_syncbn_replicated"):  # its last training pass was over replicas
        if torch._C._current_graph_task_id() != -1:  # as the Module itself tells a recompute
            raise _wire.SyncBatchNormError(
                f"syncbn: {layer.layer_description()} is run again inside the backward "
                "(activation checkpointing) after a synchronized pass in syncbn.DataParallel: "
                "the recompute runs outside the replicas' threads and cannot be synchronized. "
                "Checkpointing a syncbn layer inside syncbn.DataParallel is not supported; "
                "leave the syncbn layers out of the checkpointed segments.")
        layer._syncbn_replicated = False  # an ordinary pass now
    if vars(layer).get("_is_replica", False) and not _warned_torch_dp[0]:  # set by torch
        _warned_torch_dp[0] = True
        warnings.warn(
            f"syncbn: {layer.layer_description()} runs in a replica made by "
            "torch.nn.DataParallel: syncbn layers are NOT synchronized across the replicas of "
            "torch.nn.DataParallel (each replica normalizes its own chunk of the batch). Use "
            "syncbn.DataParallel (same arguments) to synchronize them. (warned once)",
            UserWarning, stacklevel=3,
        )
    return None


@dataclass
class _Arrival:
    original: Any  # the wrapped module's layer (identity, books, running statistics)
    layer: Any  # the layer as this replica called it (its weight/bias: shared or broadcast)
    input: Tensor


@dataclass
class _Slot:
    arrivals: dict[int, _Arrival] = field(default_factory=dict)
    outputs: tuple[Tensor, ...] | None = None


class ReplicaGroup:
    """The rendezvous of the ``size`` replica threads of one ``DataParallel.forward``.

    ``originals[i]`` maps ``id(layer)`` of replica ``i``'s syncbn layers to the wrapped module's
    layer (``None``: replica ``i`` calls the wrapped module's layers themselves, as CPU replicas
    do); ``names`` maps ``id(wrapped layer)`` to its qualified name, for messages.
    """

    def __init__(self, size: int, devices: list[torch.device], timeout: float,
                 names: dict[int, str], originals: list[dict[int, Any]] | None = None) -> None:
        self.size = size
        self.devices = devices
        self.timeout = timeout
        self._names = names
        self._originals = originals
        self._cond = threading.Condition()
        self._slots: dict[int, _Slot] = {}
        self._calls = [0] * size  # syncbn layer calls each replica has made in this forward
        self._last: list[Any] = [None] * size  # the wrapped layer of each replica's last call
        self._finished: dict[int, int] = {}  # replica -> its calls when its forward returned
        self._failure: tuple[int, BaseException] | None = None

    # -- the replica threads ----------------------------------------------------------------
    def run(self, index: int, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` (replica ``index``'s forward) in this thread as that replica; its output,
        or ``None`` when it failed or was ended (see :meth:`raise_failure`)."""
        thread.replica = (self, index)
        try:
            out = fn()
        except _Aborted:
            return None
        except BaseException as exc:  # noqa: BLE001  (recorded, surfaced once by the caller)
            self.fail(index, exc)
            return None
        finally:
            thread.replica = None
        with self._cond:
            self._finished[index] = self._calls[index]
            self._cond.notify_all()  # a replica waiting for this one learns it will not come
        return out

    def wait_all(self, timeout: float | None = None) -> None:
        """Until every replica's forward has returned, or one has failed (then at once: a
        replica still busy in its own code is not waited for; it ends at its next syncbn layer,
        and :meth:`raise_failure` reports the first error now, within the group's timeout)."""
        with self._cond:
            self._cond.wait_for(lambda: self._failure is not None
                                or len(self._finished) == self.size, timeout)

    def raise_failure(self) -> None:
        """After every replica thread has ended: raise the first error, once (the original
        exception, with a note naming the replica, its device and the syncbn layers)."""
        if self._failure is None:
            return
        index, exc = self._failure
        if not getattr(exc, "_syncbn_named", False) and hasattr(exc, "add_note"):
            exc.add_note(self._where(index))
        raise exc

    def batch_norm(self, index: int, layer: Any, input: Tensor) -> Tensor:
        """Replica ``index``'s output of ``layer`` on ``input``, synchronized over all replicas."""
        original = layer
        if self._originals is not None:
            original = self._originals[index].get(id(layer), layer)
        layer._check_input_dim(input)
        check_input(input, layer.num_features, self._describe(original))
        with self._cond:
            slot_index = self._calls[index]
            self._calls[index] += 1
            self._last[index] = original
            slot = self._slots.setdefault(slot_index, _Slot())
            slot.arrivals[index] = _Arrival(original, layer, input)
            for other, arrival in slot.arrivals.items():
                if arrival.original is not original:  # out of step: name both layers
                    raise self.fail(index, self._named(_wire.OutOfStepError(
                        f"syncbn.DataParallel: replicas out of step at their syncbn layer call "
                        f"#{slot_index + 1} of this forward: replica {index} is at "
                        f"{self._describe(original)}, replica {other} at "
                        f"{self._describe(arrival.original)}. Every replica must call the same "
                        "syncbn layers in the same order (no data-dependent branches around "
                        "them); every replica has been ended.")))
            last = len(slot.arrivals) == self.size
            if not last:
                self._wait(index, slot_index, slot)
                assert slot.outputs is not None
                return slot.outputs[index]
        description = self._describe(original)
        try:  # the last replica to arrive runs the layer for all of them
            arrivals = [slot.arrivals[r] for r in range(self.size)]
            outputs = _synchronized_pass(arrivals, description)
        except BaseException as exc:
            if description in str(exc):  # syncbn's own errors name the layer already
                self._named(exc)
            elif hasattr(exc, "add_note"):
                exc.add_note(f"syncbn.DataParallel: in the synchronized pass of {description} "
                             f"over its {self.size} replicas; every replica has been ended")
                self._named(exc)
            raise self.fail(index, exc) from None
        with self._cond:
            slot.outputs = outputs
            del self._slots[slot_index]
            self._cond.notify_all()
        return outputs[index]

    # -- helpers (called with the lock held, except _describe/_named/_where) ----------------
    def _wait(self, index: int, slot_index: int, slot: _Slot) -> None:
        deadline = time.monotonic() + self.timeout
        while slot.outputs is None:
            if self._failure is not None:
                raise _Aborted()
            for other, calls in self._finished.items():
                if calls <= slot_index:
                    raise self.fail(index, self._named(_wire.OutOfStepError(
                        f"syncbn.DataParallel: replicas out of step: replica {index} is at "
                        f"{self._describe(self._last[index])} (its syncbn layer call "
                        f"#{slot_index + 1} of this forward), but replica {other} finished its "
                        f"forward after {calls} syncbn layer call(s). Every replica must call "
                        "the same syncbn layers the same number of times; every replica has "
                        "been ended.")))
            left = deadline - time.monotonic()
            if left <= 0:
                missing = [r for r in range(self.size) if r not in slot.arrivals]
                raise self.fail(index, self._named(_wire.SyncBatchNormError(
                    f"syncbn.DataParallel: replica {index} waited {self.timeout:g} s at "
                    f"{self._describe(self._last[index])} (its syncbn layer call "
                    f"#{slot_index + 1} of this forward) for replica(s) {missing}, which did "
                    "not arrive. Every replica has been ended; raise the timeout "
                    "(DataParallel(..., timeout=...)) if a replica's forward is that slow.")))
            self._cond.wait(min(left, 1.0))

    def fail(self, index: int, exc: BaseException) -> BaseException:
        """Record the first failure and wake every waiter; returns ``exc`` to raise."""
        with self._cond:  # may be held already: a Condition's default lock is an RLock
            if self._failure is None:
                self._failure = (index, exc)
            self._cond.notify_all()
        return exc

    def _describe(self, original: Any) -> str:
        if original is None:
            return "(no syncbn layer yet)"
        name = self._names.get(id(original))
        if name and not getattr(original, "_layer_name", None):  # its name in the wrapped model
            return f"{type(original).__name__}({original.num_features}) '{name}'"
        return str(original.layer_description())

    def _named(self, exc: BaseException) -> BaseException:
        exc._syncbn_named = True  # type: ignore[attr-defined]  # already names its layer
        return exc

    def _where(self, index: int) -> str:
        device = self.devices[index] if index < len(self.devices) else "?"
        last = self._last[index]
        layer = (f"after {self._calls[index]} syncbn layer call(s), the last at "
                 f"{self._describe(last)}") if last is not None else "before any syncbn layer"
        return (f"syncbn.DataParallel: raised in replica {index} of {self.size} (device "
                f"{device}), {layer}; every other replica has been ended")


def _synchronized_pass(arrivals: list[_Arrival], description: str) -> tuple[Tensor, ...]:
    """The Module's bookkeeping (``torch.nn.BatchNorm``'s, on the wrapped layer, once per pass),
    then the one Function over all replicas."""
    bn = arrivals[0].original
    update = bn.track_running_stats
    factor = 0.0 if bn.momentum is None else bn.momentum
    if update and bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)
        if bn.momentum is None:  # cumulative moving average
            factor = 1.0 / float(bn.num_batches_tracked)
    bn._replica_passes = getattr(bn, "_replica_passes", 0) + 1
    meta = _Meta(len(arrivals), float(bn.eps), factor,
                 bn.running_mean if update else None, bn.running_var if update else None,
                 _settings.get().nonfinite, description, bn._sync.tag, bn._replica_passes,
                 bn._act, bn.activation_param)
    for a in arrivals:  # so that a recompute outside the replicas is refused (see route)
        a.layer._syncbn_replicated = True
    bn._syncbn_replicated = True
    weights = [a.layer.weight for a in arrivals]
    biases = [a.layer.bias for a in arrivals]
    inputs = [a.input for a in arrivals]
    outputs = ReplicaBatchNormFunction.apply(meta, *inputs, *weights, *biases)
    return outputs  # type: ignore[no-any-return]


@dataclass
class _Meta:
    size: int
    eps: float
    momentum: float
    running_mean: Tensor | None
    running_var: Tensor | None
    policy: str
    description: str
    tag: _wire.LayerTag
    count: int
    act: int  # the layer's activation (_stats.ACTIVATIONS); in-place layers run out of place here
    act_param: float


class ReplicaBatchNormFunction(torch.autograd.Function):
    """Training-mode batch norm of N replicas' shards at once: ``apply(meta, *inputs, *weights,
    *biases)`` -> N outputs, with the backends' four steps and the buffer of the distributed
    path: each replica's reduce step writes its buffer, the buffers are summed in replica order
    (the one reduction per direction), and each replica's apply step reads the sum with a world
    of N. Shards may be on different devices; the sums meet on the device of the running
    statistics (or of the first shard)."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, meta: _Meta, *tensors: Tensor | None
    ) -> tuple[Tensor, ...]:
        n = meta.size
        inputs: list[Tensor] = list(tensors[:n])  # type: ignore[arg-type]
        weights, biases = tensors[n:2 * n], tensors[2 * n:]
        channels = inputs[0].shape[1]
        home = meta.running_mean.device if meta.running_mean is not None else inputs[0].device
        # Counts are known on the host from the shapes: no device sync to learn the total.
        total = 0
        for x in inputs:
            total += _stats.local_count(x)
        if total == 1:
            raise ValueError(
                f"{meta.description}: Expected more than 1 value per channel when training, got "
                f"input sizes {[tuple(x.shape) for x in inputs]} on the replicas of "
                "syncbn.DataParallel and 1 value per channel in the global batch")
        length = _wire.length(_wire.width_for(channels))
        fields = _wire.fields(meta.tag, _wire.FORWARD, channels, meta.count)
        chosen = [backends.select(x, w, b) for x, w, b in zip(inputs, weights, biases)]
        buffers = []
        for (backend, geo), x in zip(chosen, inputs):
            buffer = torch.empty(length, dtype=torch.float64, device=x.device)
            # sum(x) (C), sum(x**2) (C), n (1) + padding + header -> length
            _check(backend.forward_reduce(geo, x, buffer, fields), meta, "forward")
            buffers.append(buffer.to(home))
        summed = torch.stack(buffers).sum(0)  # N x length -> length, in replica order
        outputs, stats = [], []
        policy = _wire.POLICIES[meta.policy]
        for i, ((backend, geo), x, w, b) in enumerate(zip(chosen, inputs, weights, biases)):
            # the running statistics once, on the wrapped layer's (replica 0 computes on them
            # when they are on its device; otherwise from the stats below)
            here = i == 0 and total >= 2 and meta.running_mean is not None and (
                meta.running_mean.device == x.device)
            status = (torch.zeros(1, dtype=torch.int32, device=x.device)
                      if backend.STATUS_WORD and not x.is_cpu else None)
            out, st, code = backend.forward_apply(
                geo, x, summed.to(x.device), n, fields, w, b,
                meta.running_mean if here else None, meta.running_var if here else None,
                meta.eps, meta.momentum, policy, status, **_activation(meta))
            if status is not None and policy == _wire.POLICIES["raise"]:
                code = int(status.item())  # a device sync, as documented for this policy
            _check(code, meta, "forward")
            outputs.append(out)
            stats.append(st)
        if total >= 2 and meta.running_mean is not None and (
                meta.running_mean.device != inputs[0].device):
            _update_from(meta, summed, channels)
        ctx.save_for_backward(*inputs, *weights, *biases, *stats)
        ctx.meta, ctx.chosen, ctx.home, ctx.length = meta, chosen, home, length
        ctx.bias_dtypes = [b.dtype if b is not None else x.dtype for x, b in zip(inputs, biases)]
        return tuple(outputs)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, *grads: Tensor) -> tuple[Tensor | None, ...]:
        meta = ctx.meta
        n = meta.size
        saved = ctx.saved_tensors
        inputs, weights = saved[:n], saved[n:2 * n]
        biases, stats = saved[2 * n:3 * n], saved[3 * n:]
        needs = ctx.needs_input_grad[1:]  # after meta
        need_x, need_w, need_b = needs[:n], needs[n:2 * n], needs[2 * n:]
        channels = inputs[0].shape[1]
        fields = _wire.fields(meta.tag, _wire.BACKWARD, channels, meta.count)
        send = any(need_x)
        grad_w: list[Tensor | None] = []
        grad_b: list[Tensor | None] = []
        buffers = []
        dys = []
        for i, ((backend, geo), x) in enumerate(zip(ctx.chosen, inputs)):
            dy = grads[i]  # a replica whose output was not used has dy = 0
            if dy.dtype != x.dtype or dy.stride() != x.stride():
                dy = grad_like(dy, x)
            dys.append(dy)
            buffer = (torch.empty(ctx.length, dtype=torch.float64, device=x.device) if send
                      else None)
            # weight/bias gradients are each replica's share; autograd (shared parameters) or
            # torch's Broadcast (replicas on several GPUs) adds them up.
            extra = _activation(meta)
            if extra:
                extra.update(weight=weights[i], bias=biases[i])
            gw, gb, code = backend.backward_reduce(
                geo, dy, x, stats[i], buffer, fields,
                weights[i].dtype if need_w[i] and weights[i] is not None else None,
                ctx.bias_dtypes[i] if need_b[i] else None, **extra)
            _check(code, meta, "backward")
            grad_w.append(gw)
            grad_b.append(gb)
            if buffer is not None:
                buffers.append(buffer.to(ctx.home))
        grad_x: list[Tensor | None] = [None] * n
        if send:
            summed = torch.stack(buffers).sum(0)  # N x length -> length, in replica order
            for i, ((backend, geo), x) in enumerate(zip(ctx.chosen, inputs)):
                if not need_x[i]:
                    continue
                status = (torch.zeros(1, dtype=torch.int32, device=x.device)
                          if backend.STATUS_WORD and not x.is_cpu else None)
                extra = _activation(meta)
                if extra:
                    extra["bias"] = biases[i]
                gi, code = backend.backward_apply(geo, dys[i], x, stats[i], weights[i],
                                                  summed.to(x.device), n, fields, status, **extra)
                _check(code, meta, "backward")
                grad_x[i] = gi
        return (None, *grad_x, *grad_w, *grad_b)


def _activation(meta: _Meta) -> dict[str, Any]:
    """The activation's keyword arguments of the backends' steps (none for identity)."""
    return {"act": meta.act, "act_param": meta.act_param} if meta.act else {}


def _check(code: int, meta: _Meta, direction: str) -> None:
    """The error of a backend's result code (the replicas' headers always agree: one process)."""
    if code == _wire.NONFINITE:
        raise _wire.NonFiniteError(
            f"syncbn: non-finite values (NaN or Inf) in the global batch statistics of "
            f"{meta.description} (SYNCBN_NONFINITE=raise), over the replicas of "
            "syncbn.DataParallel")
    if code:
        raise _wire.SyncBatchNormError(f"syncbn: {meta.description}: result code {code} in the "
                                       f"{direction} pass over the replicas of syncbn.DataParallel")


def _update_from(meta: _Meta, summed: Tensor, channels: int) -> None:
    """The running statistics from the summed buffer, where they live on another device than
    the first replica's."""
    moments = _wire.payload(summed, 2 * channels + 1).to(meta.running_mean.device)
    mean, var, count = _stats.global_mean_var(moments, channels)
    _stats.update_running_stats(meta.running_mean, meta.running_var, mean, var, count,
                                meta.momentum, keep_nonfinite=meta.policy != "skip")
