"""``syncbn.DataParallel``: one process, several replicas, syncbn layers synchronized across them.

The seed's original mode: wrap the model, give it a batch, and the batch norms of the replicas
share the statistics of the whole batch, as if the model had run on it in one piece.
"""

from __future__ import annotations

import contextlib
import threading
import warnings
from collections.abc import Sequence
from itertools import chain
from typing import Any

import torch
from torch import Tensor, nn

from . import _comm
from ._replicas import ReplicaGroup
from ._wire import SyncBatchNormError
from .batchnorm import SyncBatchNorm

__all__ = ["DataParallel", "replica_devices"]


def replica_devices(n: int) -> list[torch.device]:
    """``n`` devices for :class:`DataParallel`: the first ``n`` GPUs when there are that many,
    else ``n`` times the CPU (replicas in threads).

    >>> import syncbn
    >>> len(syncbn.parallel.replica_devices(4))
    4
    """
    if torch.cuda.is_available() and torch.cuda.device_count() >= n:
        return [torch.device("cuda", i) for i in range(n)]
    return [torch.device("cpu")] * n


def _as_device(d: int | str | torch.device) -> torch.device:
    if isinstance(d, int):
        return torch.device("cuda", d)
    dev = torch.device(d)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    return dev


class DataParallel(nn.Module):
    r"""``torch.nn.DataParallel`` with the syncbn layers of its replicas synchronized exactly.

    Each forward splits the inputs along ``dim`` into one chunk per device (as torch does:
    ``tensor.chunk(len(device_ids), dim)``, so a batch of 7 over 3 devices gives 3, 3 and 1),
    runs a replica of ``module`` on each chunk in its own thread and gathers the outputs on
    ``output_device``. Every :class:`syncbn.SyncBatchNorm` layer in training mode normalizes with
    the mean and variance of the WHOLE batch (all chunks), and its gradients are those of the
    whole batch: outputs, every gradient and the running statistics equal those of ``module``
    run on the unsplit batch (up to float rounding). Per layer: one sum over the replicas in the
    forward (``N x (2C + 1)`` numbers) and one in the backward (``N x 2C``), without
    ``torch.distributed``. Eval mode is local, like ``torch.nn.BatchNorm*d``.

    ``device_ids`` may name GPUs (``[0, 1, 2, 3]``: replicas made by
    ``torch.nn.parallel.replicate``, sums between devices by device-to-device copies) or the
    same device several times (``["cpu"] * 4``, ``["cuda:0"] * 2``: replicas in threads sharing
    the wrapped module's parameters and buffers). ``None``: every GPU, or, without GPUs, the
    module runs as it is (as ``torch.nn.DataParallel`` does).

    The running statistics (and ``num_batches_tracked``) are kept on the wrapped module's
    layers, updated once per forward from the global statistics. Every replica must call the
    same syncbn layers in the same order: a replica at another layer, or one that skips a
    layer, is a ``RuntimeError`` naming the layers. When a replica raises, every other replica
    is ended and the error is raised once, here (with a note naming the replica and its last
    syncbn layer). Waits are bounded by ``timeout`` seconds.

    Not combined with ``torch.distributed``: when a syncbn layer's ``process_group`` (by default
    the world) has more than one rank, the first forward raises ``RuntimeError`` (use one
    process per device with ``DistributedDataParallel`` instead). Activation checkpointing of a
    syncbn layer inside this wrapper is not supported: its recompute runs in the backward,
    outside the replicas' threads, and raises ``RuntimeError`` naming the layer.

    Args:
        module: the model (its parameters and buffers on ``device_ids[0]``).
        device_ids: devices of the replicas. Default: ``None`` (every GPU).
        output_device: where the outputs are gathered. Default: ``device_ids[0]``.
        dim: the batch dim to split inputs along and to concatenate outputs along. Default: 0.
        timeout: seconds a replica waits for the others at a syncbn layer. Default: 300.

    Example (three replicas in threads on the CPU; the same as the unsplit batch)::

        >>> import torch, syncbn
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 3), syncbn.SyncBatchNorm1d(3)).double()
        >>> dp = syncbn.DataParallel(net, device_ids=["cpu", "cpu", "cpu"])
        >>> x = torch.randn(7, 4, dtype=torch.float64)
        >>> y = dp(x)                      # chunks of 3, 3 and 1 rows, normalized together
        >>> torch.allclose(y, net(x))      # one piece (and a second update of the running stats)
        True
        >>> int(net[1].num_batches_tracked)
        2
    """

    def __init__(self, module: nn.Module,
                 device_ids: Sequence[int | str | torch.device] | None = None,
                 output_device: int | str | torch.device | None = None, dim: int = 0, *,
                 timeout: float = 300.0) -> None:
        super().__init__()
        self.module = module
        self.dim = dim
        self.timeout = float(timeout)
        if device_ids is None:
            device_ids = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
        devices = [_as_device(d) for d in device_ids]
        self.devices = devices
        self.shared = len(set(devices)) <= 1  # one device, several replicas: threads, shared module
        if not self.shared and not all(d.type == "cuda" for d in devices):
            raise ValueError(
                "syncbn.DataParallel: expected device_ids naming distinct GPUs or one device "
                f"(repeated for several replicas: ['cpu'] * 4), got {list(device_ids)}")
        if not self.shared and len(set(devices)) != len(devices):
            raise ValueError(
                f"syncbn.DataParallel: expected distinct GPUs, got {list(device_ids)} (a GPU "
                "named twice among others)")
        # torch.nn.DataParallel's attributes: GPU indices as ints
        self.device_ids = [d.index if d.type == "cuda" else d for d in devices]
        self.output_device = _as_device(output_device) if output_device is not None else (
            devices[0] if devices else None)
        self.src_device_obj = devices[0] if devices else None
        if len(devices) == 1:
            self.module.to(devices[0])

    def forward(self, *inputs: Any, **kwargs: Any) -> Any:
        if not self.devices:
            return self.module(*inputs, **kwargs)
        src = self.devices[0]
        for t in chain(self.module.parameters(), self.module.buffers()):
            if t.device != src:
                raise RuntimeError(
                    f"syncbn.DataParallel: module must have its parameters and buffers on device "
                    f"{src} (device_ids[0]) but found one of them on device: {t.device}")
        names = _check_single_process(self.module)
        if self.shared:
            chunks, chunk_kwargs = _split(inputs, kwargs, len(self.devices), self.dim)
        else:
            chunks, chunk_kwargs = torch.nn.parallel.scatter_gather.scatter_kwargs(
                inputs, kwargs, self.device_ids, dim=self.dim)
        if not chunks and not chunk_kwargs:  # a forward without inputs: one replica
            chunks, chunk_kwargs = ((),), ({},)
        if len(self.devices) == 1:
            return self.module(*chunks[0], **chunk_kwargs[0])
        n = len(chunks)
        devices = self.devices[:n]
        if self.shared:
            replicas, originals = [self.module] * n, None
        else:
            replicas = torch.nn.parallel.replicate(self.module, self.device_ids[:n],
                                                   not torch.is_grad_enabled())
            wrapped = [m for m in self.module.modules() if isinstance(m, SyncBatchNorm)]
            originals = [{id(r): o for r, o in zip(
                [m for m in rep.modules() if isinstance(m, SyncBatchNorm)], wrapped)}
                for rep in replicas]
        group = ReplicaGroup(n, devices, self.timeout, names, originals)
        outputs = _run_replicas(group, replicas, chunks, chunk_kwargs, devices)
        if self.shared:
            return _gather(outputs, self.dim, self.output_device)
        return torch.nn.parallel.scatter_gather.gather(outputs, self.output_device, dim=self.dim)


def _check_single_process(module: nn.Module) -> dict[int, str]:
    """Raise when a syncbn layer would also synchronize across processes; the layers' names."""
    names = {}
    for name, m in module.named_modules():
        if isinstance(m, SyncBatchNorm):
            names[id(m)] = name
            if m.training and _comm.group_size(m.process_group) > 1:
                raise SyncBatchNormError(
                    f"syncbn.DataParallel: {type(m).__name__}({m.num_features}) '{name}' is in a "
                    "process that "
                    f"belongs to a torch.distributed group of {_comm.group_size(m.process_group)} "
                    "ranks (its process_group). syncbn.DataParallel synchronizes the replicas of "
                    "one process only and does not combine that with other processes. Use one "
                    "process per device with DistributedDataParallel instead, or give the layers "
                    "a process_group of one rank.")
    return names


def _run_replicas(group: ReplicaGroup, replicas: Sequence[nn.Module], chunks: Sequence[Any],
                  chunk_kwargs: Sequence[dict[str, Any]], devices: list[torch.device]) -> list[Any]:
    """Every replica in its own thread (like torch's ``parallel_apply``: grad mode and autocast
    carried over, each GPU's current stream); the first error raised once, after all ended."""
    grad_enabled = torch.is_grad_enabled()
    autocast = {t: (torch.is_autocast_enabled(t), torch.get_autocast_dtype(t))
                for t in {d.type for d in devices}} if hasattr(torch, "get_autocast_dtype") else {}
    results: list[Any] = [None] * len(replicas)
    # The caller's current stream on each GPU (read here: a worker thread's own current stream
    # is the device's default stream, not the caller's).
    streams = {d: torch.cuda.current_stream(d) for d in set(devices) if d.type == "cuda"}

    def work(i: int) -> None:
        try:
            run(i)
        except BaseException as exc:  # noqa: BLE001  (outside the replica's forward: still once)
            group.fail(i, exc)

    def run(i: int) -> None:
        torch.set_grad_enabled(grad_enabled)
        dev = devices[i]
        with contextlib.ExitStack() as stack:
            if dev.type == "cuda":
                stack.enter_context(torch.cuda.device(dev))
                stack.enter_context(torch.cuda.stream(streams[dev]))
            if dev.type in autocast:
                enabled, dtype = autocast[dev.type]
                stack.enter_context(torch.autocast(dev.type, dtype=dtype, enabled=enabled))
            args = chunks[i] if isinstance(chunks[i], (list, tuple)) else (chunks[i],)
            results[i] = group.run(i, lambda: replicas[i](*args, **chunk_kwargs[i]))

    threads = [threading.Thread(target=work, args=(i,), name=f"syncbn-replica-{i}", daemon=True)
               for i in range(len(replicas))]
    for t in threads:
        t.start()
    group.wait_all()
    group.raise_failure()  # a failure surfaces now, not when the slowest replica is done
    for t in threads:
        t.join()
    return results


def _chunks(obj: Any, n: int, dim: int) -> list[Any]:
    """``obj`` split for ``n`` replicas, like torch's scatter: tensors chunked along ``dim``,
    containers split element-wise (to the fewest chunks), anything else passed to each."""
    if isinstance(obj, Tensor):
        return list(obj.chunk(n, dim))
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):  # namedtuple
        return [type(obj)(*parts) for parts in zip(*(_chunks(v, n, dim) for v in obj))]
    if isinstance(obj, (tuple, list)) and obj:
        return [type(obj)(parts) for parts in zip(*(_chunks(v, n, dim) for v in obj))]
    if isinstance(obj, dict) and obj:
        return [type(obj)(zip(obj.keys(), parts))
                for parts in zip(*(_chunks(v, n, dim) for v in obj.values()))]
    return [obj] * n


def _split(inputs: tuple[Any, ...], kwargs: dict[str, Any], n: int,
           dim: int) -> tuple[list[tuple[Any, ...]], list[dict[str, Any]]]:
    """torch's ``scatter_kwargs`` for replicas on one device: the chunks are views (no copy)."""
    chunks = _chunks(inputs, n, dim) if inputs else []
    chunk_kwargs = _chunks(kwargs, n, dim) if kwargs else []
    if len(chunks) < len(chunk_kwargs):
        chunks.extend(() for _ in range(len(chunk_kwargs) - len(chunks)))
    elif len(chunk_kwargs) < len(chunks):
        chunk_kwargs.extend({} for _ in range(len(chunks) - len(chunk_kwargs)))
    return [tuple(c) for c in chunks], [dict(k) for k in chunk_kwargs]


def _gather(outputs: list[Any], dim: int, device: torch.device | None) -> Any:
    """torch's ``gather`` for replicas on one device: tensors concatenated along ``dim`` (0-dim
    tensors stacked, with torch's warning), containers element-wise."""
    out = outputs[0]
    if isinstance(out, Tensor):
        if all(o.dim() == 0 for o in outputs):
            warnings.warn("Was asked to gather along dimension 0, but all input tensors were "
                          "scalars; will instead unsqueeze and return a vector.", stacklevel=3)
            result = torch.stack(outputs)
        else:
            result = torch.cat(outputs, dim)
        return result if device is None else result.to(device)
    if out is None:
        return None
    if isinstance(out, dict):
        return type(out)((k, _gather([o[k] for o in outputs], dim, device)) for k in out)
    if isinstance(out, tuple) and hasattr(out, "_fields"):
        return type(out)(*(_gather(list(parts), dim, device) for parts in zip(*outputs)))
    if isinstance(out, (list, tuple)):
        return type(out)(_gather(list(parts), dim, device) for parts in zip(*outputs))
    return outputs
