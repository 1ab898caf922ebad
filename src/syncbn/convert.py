"""Conversion helpers, a pair: torch BatchNorm -> syncbn for training, and back for export."""

from __future__ import annotations

import gc
import warnings
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from . import _comm
from .batchnorm import BatchNormNd, SyncBatchNorm, SyncBatchNorm1d, SyncBatchNorm2d, SyncBatchNorm3d

__all__ = ["convert_sync_batchnorm", "revert_sync_batchnorm"]

_TO_SYNC: dict[type, type[SyncBatchNorm]] = {
    nn.BatchNorm1d: SyncBatchNorm1d,
    nn.BatchNorm2d: SyncBatchNorm2d,
    nn.BatchNorm3d: SyncBatchNorm3d,
    nn.SyncBatchNorm: SyncBatchNorm,
    BatchNormNd: SyncBatchNorm,
}

_TO_PLAIN: dict[type, type[_BatchNorm]] = {
    SyncBatchNorm1d: nn.BatchNorm1d,
    SyncBatchNorm2d: nn.BatchNorm2d,
    SyncBatchNorm3d: nn.BatchNorm3d,
    SyncBatchNorm: BatchNormNd,
    nn.SyncBatchNorm: BatchNormNd,
}


def convert_sync_batchnorm(module: nn.Module, process_group: Any | None = None) -> nn.Module:
    """Replace every ``torch.nn.BatchNorm1d/2d/3d`` and ``torch.nn.SyncBatchNorm`` in ``module``
    (recursively; ``module`` itself too) by the matching syncbn layer.

    Parameters and buffers are the very same tensors (so device, dtype, values and
    ``requires_grad`` are kept), and so are ``training`` and the ``state_dict`` keys. Each new layer
    records its qualified name in the model for error messages; its identity across ranks is
    that name in the n-th model this process converted (convert the same models in the same
    order on every rank). Subclasses of torch's batch norm
    (e.g. a BatchNorm fused with an activation) are left alone, with a warning: replacing them
    would silently drop what they add.

    Returns:
        The converted module: ``module`` itself with its children replaced, or a new layer when
        ``module`` is itself a batch norm. Use the return value.

    Example::

        >>> import torch, syncbn
        >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8))
        >>> net = syncbn.convert_sync_batchnorm(net)
        >>> type(net[1]).__name__, net[1].num_features
        ('SyncBatchNorm2d', 8)
        >>> net[1].layer_description()
        "SyncBatchNorm2d(8) '1'"
    """
    global _conversions
    _conversions += 1
    return _convert(module, process_group, "", _conversions)


# Conversions made in this process: a layer's identity is its conversion's number and its name
# in that model, the same on every rank of a program that converts the same models in the same
# order (two models converted apart, such as a generator and a discriminator, never collide).
_conversions = 0


def revert_sync_batchnorm(module: nn.Module) -> nn.Module:
    """The inverse of :func:`convert_sync_batchnorm`, for single-device inference and export.

    syncbn layers and ``torch.nn.SyncBatchNorm`` become ``torch.nn.BatchNorm1d/2d/3d`` (the
    generic :class:`~syncbn.SyncBatchNorm` and ``torch.nn.SyncBatchNorm`` become
    :class:`~syncbn.BatchNormNd`, which takes any input dim >= 2), keeping parameters, buffers,
    ``training`` and ``state_dict`` keys. ``revert_sync_batchnorm(convert_sync_batchnorm(m))`` has
    the same ``state_dict`` and outputs as ``m``.

    Like ``convert_sync_batchnorm`` (and torch's), it changes ``module`` in place: its
    synchronized layers are replaced. To export during training, revert a copy, or the rank that
    exports stops synchronizing for the rest of training while the others wait for it::

        plain = syncbn.revert_sync_batchnorm(copy.deepcopy(model.module))  # model: the DDP

    A one-time ``UserWarning`` says so when ``module`` contains synchronized layers and is (part
    of) a model that a live ``DistributedDataParallel`` wraps, in a process group of more than
    one rank.

    Returns:
        The reverted module (a new layer when ``module`` is itself a synchronized batch norm).

    Example::

        >>> import copy, torch, syncbn
        >>> net = syncbn.convert_sync_batchnorm(torch.nn.Sequential(torch.nn.BatchNorm1d(4)))
        >>> plain = syncbn.revert_sync_batchnorm(copy.deepcopy(net))  # net keeps its layers
        >>> type(plain[0]).__name__, type(net[0]).__name__
        ('BatchNorm1d', 'SyncBatchNorm1d')
        >>> type(syncbn.revert_sync_batchnorm(net)[0])  # in place: net itself is reverted
        <class 'torch.nn.modules.batchnorm.BatchNorm1d'>
        >>> type(net[0]).__name__
        'BatchNorm1d'
    """
    global _warned_in_place
    if not _warned_in_place and _in_live_ddp(module):
        _warned_in_place = True
        warnings.warn(
            "syncbn.revert_sync_batchnorm changes the module in place, and this one is part of a "
            "model that a live DistributedDataParallel wraps: its reverted layers no longer "
            "synchronize on this rank (the other ranks wait for it at their next synchronized "
            "layer). To export during training, revert a copy: "
            "syncbn.revert_sync_batchnorm(copy.deepcopy(model.module)).",
            UserWarning, stacklevel=2,
        )
    return _revert(module)


_warned_in_place = False


def _in_live_ddp(module: nn.Module) -> bool:
    """Whether reverting ``module`` in place would stop a running distributed training from
    synchronizing: the default group has more than one rank, ``module`` contains synchronized
    layers (below itself), and it is (part of) the model of a live DistributedDataParallel.
    The module cannot see its wrapper, so the live DDP objects are looked up: a scan of the
    garbage collector's objects (a fraction of a second), made only in a process group of more
    than one rank and for a module with synchronized layers."""
    if _comm.group_size() <= 1:
        return False
    if not any(type(m) in _TO_PLAIN for m in module.modules() if m is not module):
        return False  # nothing would be replaced in place (a layer alone gives a new layer)
    ddp = nn.parallel.DistributedDataParallel
    if isinstance(module, ddp):
        return True
    # type(), not isinstance(): that reads __class__, which some of torch's objects warn on
    return any(issubclass(type(obj), ddp) and any(m is module for m in obj.module.modules())
               for obj in gc.get_objects())


def _revert(module: nn.Module) -> nn.Module:
    target = _TO_PLAIN.get(type(module))
    out = _rebuild(module, target) if target is not None else module  # type: ignore[arg-type]
    for name, child in module.named_children():
        out.add_module(name, _revert(child))
    return out


def _convert(module: nn.Module, process_group: Any | None, prefix: str, model: int) -> nn.Module:
    target = _TO_SYNC.get(type(module))
    out: nn.Module = module
    if target is not None:
        out = _rebuild(module, target, process_group=process_group)  # type: ignore[arg-type]
    elif isinstance(module, _BatchNorm) and not isinstance(module, SyncBatchNorm):
        warnings.warn(
            f"syncbn.convert_sync_batchnorm: left {type(module).__name__} '{prefix or '<root>'}' "
            "unsynchronized: it subclasses torch's batch norm, and replacing it would drop what the "
            "subclass adds. Convert it yourself if its forward is plain batch norm.",
            stacklevel=3,
        )
    if isinstance(out, SyncBatchNorm):
        out._name_in(model, prefix or None)
    for name, child in module.named_children():
        out.add_module(name, _convert(child, process_group, f"{prefix}.{name}" if prefix else name,
                                      model))
    return out


def _rebuild(module: _BatchNorm, cls: type[_BatchNorm], **kwargs: Any) -> nn.Module:
    """A ``cls`` layer holding ``module``'s own parameters and buffers (not copies)."""
    with torch.device("meta"):  # placeholders only: every tensor is replaced below
        out = cls(
            module.num_features, module.eps, module.momentum, module.affine,
            module.track_running_stats, **kwargs,
        )
    for name in ("weight", "bias"):
        setattr(out, name, getattr(module, name))
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        out.register_buffer(name, getattr(module, name))
    out.train(module.training)
    if hasattr(module, "qconfig"):
        out.qconfig = module.qconfig  # type: ignore[assignment]
    return out
