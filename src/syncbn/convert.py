"""Conversion helpers, a pair: torch BatchNorm -> syncbn for training, and back for export.

Besides torch's classes, a batch norm that runs ``drop`` and ``act`` submodules after itself
(timm's ``BatchNormAct2d`` and ``SyncBatchNormAct``, recognized by that structure, without
importing timm) is converted too: its statistics become global, and the activation is fused
into the synchronized layer when it is one syncbn computes (``nn.Identity``, ``nn.ReLU``,
``nn.LeakyReLU``, ``nn.ELU``, with ``drop`` an ``nn.Identity``), else ``drop`` and ``act``
keep running after it. ``revert_sync_batchnorm`` gives back an instance of the original class.
"""

from __future__ import annotations

import gc
import warnings
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from . import _comm, _stats
from .batchnorm import (
    BatchNormAct,
    BatchNormNd,
    SyncBatchNorm,
    SyncBatchNorm1d,
    SyncBatchNorm2d,
    SyncBatchNorm3d,
)

__all__ = ["convert_sync_batchnorm", "revert_sync_batchnorm"]


class _DropAct:
    """After the synchronized batch norm, the converted layer's own ``drop`` and ``act``
    submodules (an activation syncbn does not fuse, or a ``drop`` that is not an identity)."""

    drop: nn.Module
    act: nn.Module

    def forward(self, input: Tensor) -> Tensor:
        return self.act(self.drop(super().forward(input)))  # type: ignore[misc]


class SyncBatchNormDropAct(_DropAct, SyncBatchNorm):
    """:class:`~syncbn.SyncBatchNorm`, then ``drop``, then ``act`` (from a converted layer)."""


class SyncBatchNorm1dDropAct(_DropAct, SyncBatchNorm1d):
    """:class:`~syncbn.SyncBatchNorm1d`, then ``drop``, then ``act``."""


class SyncBatchNorm2dDropAct(_DropAct, SyncBatchNorm2d):
    """:class:`~syncbn.SyncBatchNorm2d`, then ``drop``, then ``act``."""


class SyncBatchNorm3dDropAct(_DropAct, SyncBatchNorm3d):
    """:class:`~syncbn.SyncBatchNorm3d`, then ``drop``, then ``act``."""


# torch's classes a batch norm with drop/act may subclass -> (fused, drop/act) syncbn classes
_BY_BASE: tuple[tuple[type, type[SyncBatchNorm], type[SyncBatchNorm]], ...] = (
    (nn.BatchNorm1d, SyncBatchNorm1d, SyncBatchNorm1dDropAct),
    (nn.BatchNorm2d, SyncBatchNorm2d, SyncBatchNorm2dDropAct),
    (nn.BatchNorm3d, SyncBatchNorm3d, SyncBatchNorm3dDropAct),
)
# activation modules syncbn fuses: kind, and the attribute holding its parameter
_FUSED: dict[type, tuple[str, str | None]] = {
    nn.Identity: ("identity", None),
    nn.ReLU: ("relu", None),
    nn.LeakyReLU: ("leaky_relu", "negative_slope"),
    nn.ELU: ("elu", "alpha"),
}
# the parts of a module that a converted layer holds itself (the rest is kept to restore it)
_OWN = ("_parameters", "_buffers", "_modules")

_TO_SYNC: dict[type, type[SyncBatchNorm]] = {
    nn.BatchNorm1d: SyncBatchNorm1d,
    nn.BatchNorm2d: SyncBatchNorm2d,
    nn.BatchNorm3d: SyncBatchNorm3d,
    nn.SyncBatchNorm: SyncBatchNorm,
    BatchNormNd: SyncBatchNorm,
    BatchNormAct: SyncBatchNorm,  # or the class it was reverted from (_syncbn_class)
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
    order on every rank).

    A subclass of torch's batch norm with ``drop`` and ``act`` submodules run after it (timm's
    ``BatchNormAct2d`` and ``SyncBatchNormAct``) becomes a synchronized layer too: with the
    activation fused (``activation=...``) when ``act`` is an ``nn.Identity``, ``nn.ReLU``,
    ``nn.LeakyReLU`` or ``nn.ELU`` and ``drop`` an ``nn.Identity``; else a
    ``SyncBatchNorm*DropAct`` that runs its ``drop`` and ``act`` after the synchronized batch
    norm (their ``state_dict`` keys stay). It is never made in-place (that would overwrite the
    layer's input, which the model may use again). Other subclasses of torch's batch norm are
    left alone, with a warning: replacing them would silently drop what they add. An
    :class:`~syncbn.BatchNormAct` becomes a synchronized layer with its activation.

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
    the same ``state_dict`` and outputs as ``m``. A layer converted from a batch norm with
    ``drop`` and ``act`` (timm's) becomes an instance of its original class again; an activated
    syncbn layer built directly (``activation=...``, ``inplace=True``) becomes a
    :class:`~syncbn.BatchNormAct`, which computes the same without synchronization.

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
    if not any(isinstance(m, (SyncBatchNorm, nn.SyncBatchNorm)) for m in module.modules()
               if m is not module):
        return False  # nothing would be replaced in place (a layer alone gives a new layer)
    ddp = nn.parallel.DistributedDataParallel
    if isinstance(module, ddp):
        return True
    # type(), not isinstance(): that reads __class__, which some of torch's objects warn on
    return any(issubclass(type(obj), ddp) and any(m is module for m in obj.module.modules())
               for obj in gc.get_objects())


def _revert(module: nn.Module) -> nn.Module:
    origin = getattr(module, "_syncbn_origin", None)
    if isinstance(module, SyncBatchNorm) and origin is not None:
        out = _restore(module, origin)
        parts = {} if origin[2] is None else origin[2]  # a fused layer's drop and act
        children = {**parts, **dict(module.named_children())}
    else:
        target = _TO_PLAIN.get(type(module))
        kwargs: dict[str, Any] = {}
        if isinstance(module, SyncBatchNorm) and (module._act != _stats.IDENTITY or module.inplace):
            target = BatchNormAct
            kwargs = {"activation": module.activation,
                      "activation_param": module.activation_param, "inplace": module.inplace}
        out = module
        if target is not None:
            out = _rebuild(module, target, **kwargs)  # type: ignore[arg-type]
        if target is BatchNormAct:
            out._syncbn_class = type(module)  # what converting it again gives
        children = dict(module.named_children())
    for name, child in children.items():
        out.add_module(name, _revert(child))
    return out


def _restore(layer: SyncBatchNorm, origin: tuple[type, dict[str, Any], Any]) -> nn.Module:
    """An instance of the class a layer was converted from: its attributes as they were, the
    layer's own parameters, buffers and ``training``."""
    cls, attrs, _ = origin
    out = cls.__new__(cls)
    for key, value in attrs.items():  # containers (hooks, ...) copied: not shared with the layer
        out.__dict__[key] = type(value)(value) if isinstance(value, (dict, set, list)) else value
    for key in _OWN:
        out.__dict__[key] = {}
    for name in ("weight", "bias"):
        out.register_parameter(name, getattr(layer, name))
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        out.register_buffer(name, getattr(layer, name))
    out.train(layer.training)
    return out


def _drop_act(module: nn.Module) -> tuple[nn.Module, nn.Module] | None:
    """``(drop, act)`` of a batch norm that runs them after itself (timm's layers), else None."""
    children = dict(module.named_children())
    drop, act = children.get("drop"), children.get("act")
    if isinstance(drop, nn.Module) and isinstance(act, nn.Module):
        return drop, act
    return None


def _fusable(drop: nn.Module, act: nn.Module) -> tuple[str, float] | None:
    """``(activation, activation_param)`` when syncbn computes ``act(drop(y))`` itself."""
    kind = _FUSED.get(type(act))
    if type(drop) is not nn.Identity or kind is None:
        return None
    name, attr = kind
    param = 0.01 if attr is None else float(getattr(act, attr))
    try:
        _stats.activation_code(name, param, False, "")
    except ValueError:  # a non-finite parameter: left to the module itself
        return None
    return name, param


def _convert(module: nn.Module, process_group: Any | None, prefix: str, model: int) -> nn.Module:
    target = _TO_SYNC.get(type(module))
    out: nn.Module = module
    parts = _drop_act(module) if target is None else None
    skip: tuple[str, ...] = ()
    if target is not None:
        kwargs: dict[str, Any] = {}
        if isinstance(module, BatchNormAct):
            target = getattr(module, "_syncbn_class", SyncBatchNorm)
            kwargs = {"activation": module.activation,
                      "activation_param": module.activation_param, "inplace": module.inplace}
        out = _rebuild(module, target, process_group=process_group, **kwargs)  # type: ignore[arg-type]
    elif (parts is not None and isinstance(module, _BatchNorm)
          and not isinstance(module, SyncBatchNorm)):
        out = _convert_drop_act(module, process_group, *parts)
        if not isinstance(out, _DropAct):
            skip = ("drop", "act")  # fused: kept to restore the original, not run
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
        if name in skip:
            continue
        out.add_module(name, _convert(child, process_group, f"{prefix}.{name}" if prefix else name,
                                      model))
    return out


def _convert_drop_act(module: _BatchNorm, process_group: Any | None, drop: nn.Module,
                      act: nn.Module) -> SyncBatchNorm:
    """The synchronized layer of a batch norm followed by its ``drop`` and ``act`` (timm's):
    fused when syncbn computes the activation, else one that runs them after itself. It
    remembers the original class and attributes (``revert_sync_batchnorm`` restores them)."""
    fused, unfused = SyncBatchNorm, SyncBatchNormDropAct
    for base, sync, drop_act in _BY_BASE:
        if isinstance(module, base):
            fused, unfused = sync, drop_act
    kind = _fusable(drop, act)
    if kind is not None:
        out = _rebuild(module, fused, process_group=process_group, activation=kind[0],
                       activation_param=kind[1])
    else:
        out = _rebuild(module, unfused, process_group=process_group)
    attrs = {k: v for k, v in vars(module).items() if k not in _OWN}
    out._syncbn_origin = (type(module), attrs, None if kind is None else {"drop": drop, "act": act})
    return out  # type: ignore[return-value]


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
