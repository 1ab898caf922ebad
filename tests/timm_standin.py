"""A stand-in for timm's batch norm + activation layers (``timm/layers/norm_act.py``), written
from their public behaviour: timm itself needs torchvision, which is not installable here.

``BatchNormAct2d`` subclasses ``nn.BatchNorm2d`` with its own forward (torch's batch-norm
bookkeeping, ``F.batch_norm``, then ``self.drop``, then ``self.act``), built from
``act_layer`` / ``act_kwargs`` / ``inplace`` / ``apply_act`` / ``drop_layer``.
``SyncBatchNormAct`` subclasses ``nn.SyncBatchNorm`` and runs ``drop`` and ``act`` after it
when it has them; :func:`timm_convert_sync_batchnorm` makes it from a ``BatchNormAct2d`` the
way timm's own conversion does (the ``act`` and ``drop`` modules moved over).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


def make_act(act_layer: Any, act_kwargs: dict | None, inplace: bool, apply_act: bool) -> nn.Module:
    if act_layer is None or not apply_act:
        return nn.Identity()
    kwargs = dict(act_kwargs or {})
    if inplace:
        kwargs["inplace"] = True
    return act_layer(**kwargs)


class BatchNormAct2d(nn.BatchNorm2d):
    """BatchNorm2d, then ``drop``, then ``act``; the state_dict of a BatchNorm2d (plus whatever
    ``drop`` and ``act`` hold)."""

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1,
                 affine: bool = True, track_running_stats: bool = True, apply_act: bool = True,
                 act_layer: Any = nn.ReLU, act_kwargs: dict | None = None, inplace: bool = True,
                 drop_layer: Any = None, device: Any = None, dtype: Any = None) -> None:
        super().__init__(num_features, eps=eps, momentum=momentum, affine=affine,
                         track_running_stats=track_running_stats, device=device, dtype=dtype)
        self.drop = drop_layer() if drop_layer is not None else nn.Identity()
        self.act = make_act(act_layer, act_kwargs, inplace, apply_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4:
            raise ValueError(f"expected 4D input (got {x.ndim}D input)")
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            factor = (1.0 / float(self.num_batches_tracked) if self.momentum is None
                      else self.momentum)
        use_batch = self.training or (self.running_mean is None and self.running_var is None)
        keep = not self.training or self.track_running_stats
        x = F.batch_norm(x, self.running_mean if keep else None,
                         self.running_var if keep else None, self.weight, self.bias, use_batch,
                         factor, self.eps)
        return self.act(self.drop(x))


class SyncBatchNormAct(nn.SyncBatchNorm):
    """torch's SyncBatchNorm, then ``drop`` and ``act`` when the layer has them."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = super().forward(x)
        if hasattr(self, "drop"):
            x = self.drop(x)
        if hasattr(self, "act"):
            x = self.act(x)
        return x


def timm_convert_sync_batchnorm(module: nn.Module) -> nn.Module:
    """timm's conversion: BatchNormAct2d -> SyncBatchNormAct (same tensors, act and drop moved)."""
    out = module
    if isinstance(module, BatchNormAct2d):
        out = SyncBatchNormAct(module.num_features, module.eps, module.momentum, module.affine,
                               module.track_running_stats)
        out.act = module.act
        out.drop = module.drop
        if module.affine:
            out.weight, out.bias = module.weight, module.bias
        out.running_mean, out.running_var = module.running_mean, module.running_var
        out.num_batches_tracked = module.num_batches_tracked
        out.train(module.training)
    for name, child in module.named_children():
        out.add_module(name, timm_convert_sync_batchnorm(child))
    return out


class NoisyAct(nn.Module):
    """An activation with a parameter and a buffer (its state_dict keys must survive)."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(1.5))
        self.register_buffer("shift", torch.tensor(0.25))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(x) * self.scale + self.shift
