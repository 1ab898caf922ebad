"""What only ``syncbn bench`` needs: the textbook SyncBN it races, and the ResNets it trains.

They live with the command, not in the library, and here rather than in ``benchmarks/``:
``syncbn bench`` must run from an installed package (``pip install .`` copies ``src/syncbn``
only), and its spawned ranks import these by module name.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

__all__ = ["ACT_VARIANTS", "make_act_resnet", "make_resnet18", "textbook_sync_bn"]


def textbook_sync_bn(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                     running_mean: torch.Tensor, running_var: torch.Tensor, eps: float,
                     momentum: float, group: Any) -> torch.Tensor:
    """The SyncBN most pure-Python versions write: per-channel sum and sum of squares, one
    autograd-aware ``all_reduce`` of ``[sum, sum_sq, count]``, ``E[x^2] - E[x]^2``, autograd for
    the backward (a second collective), running statistics updated under ``no_grad``."""
    import warnings

    import torch.distributed.nn.functional as dnn

    c = x.shape[1]
    dims = [0] + list(range(2, x.dim()))
    n = x.numel() // c
    packed = torch.cat([x.sum(dims), (x * x).sum(dims), x.new_full((1,), float(n))])
    with warnings.catch_warnings():  # "deprecated": it is still what such code calls
        warnings.simplefilter("ignore", FutureWarning)
        packed = dnn.all_reduce(packed, group=group)
    count = packed[-1]
    mean = packed[:c] / count
    var = packed[c:2 * c] / count - mean * mean
    with torch.no_grad():
        running_mean.mul_(1 - momentum).add_(mean.detach(), alpha=momentum)
        running_var.mul_(1 - momentum).add_(var.detach() * count / (count - 1), alpha=momentum)
    shape = [1, c] + [1] * (x.dim() - 2)
    return ((x - mean.view(shape)) * torch.rsqrt(var.view(shape) + eps) * weight.view(shape)
            + bias.view(shape))


class _BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.down = None
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                      nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + (x if self.down is None else self.down(x)))


def make_resnet18(width: int = 64, num_classes: int = 10) -> nn.Sequential:
    """A ResNet-18-style network: 3x3 stem, 4 stages x 2 BasicBlocks, BN after every conv.

    >>> net = make_resnet18(8)
    >>> net(torch.zeros(2, 3, 16, 16)).shape, sum(isinstance(m, nn.BatchNorm2d) for m in net.modules())
    (torch.Size([2, 10]), 20)
    """
    layers: list[nn.Module] = [nn.Conv2d(3, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width),
                               nn.ReLU()]
    cin = width
    for i, mult in enumerate((1, 2, 4, 8)):
        cout = width * mult
        layers += [_BasicBlock(cin, cout, 1 if i == 0 else 2), _BasicBlock(cout, cout, 1)]
        cin = cout
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, num_classes)]
    return nn.Sequential(*layers)


# The activated-layer section's variants of one network: how a batch norm followed by
# leaky_relu(0.01) is written.
ACT_VARIANTS = ("unfused", "fused", "inplace")
SLOPE = 0.01


def _norm(c: int, variant: str, act: bool) -> nn.Module:
    """A synchronized batch norm of ``c`` channels, followed by leaky_relu(0.01) when ``act``:
    ``unfused``: ``syncbn.SyncBatchNorm2d`` then ``nn.LeakyReLU``; ``fused``: the activation
    in the layer; ``inplace``: in the layer and in place (also without an activation: the batch
    norm's output over its input, a convolution's output that nothing else reads)."""
    import syncbn

    if variant == "unfused":
        bn = syncbn.SyncBatchNorm2d(c)
        return nn.Sequential(bn, nn.LeakyReLU(SLOPE)) if act else bn
    kwargs: dict[str, Any] = {"inplace": variant == "inplace"}
    if act:
        kwargs.update(activation="leaky_relu", activation_param=SLOPE)
    return syncbn.SyncBatchNorm2d(c, **kwargs)


class _ActBlock(nn.Module):
    """A BasicBlock: conv-BN-act, conv-BN, + shortcut (conv-BN when it downsamples), act."""

    def __init__(self, cin: int, cout: int, stride: int, variant: str) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = _norm(cout, variant, True)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = _norm(cout, variant, False)
        self.down = None
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                      _norm(cout, variant, False))
        self.act = nn.LeakyReLU(SLOPE)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.conv2(self.bn1(self.conv1(x))))
        return self.act(out + (x if self.down is None else self.down(x)))


def make_act_resnet(variant: str, width: int = 64, num_classes: int = 10) -> nn.Sequential:
    """:func:`make_resnet18` with leaky_relu(0.01) activations and synchronized batch norms
    written as ``variant`` (:data:`ACT_VARIANTS`); the same parameters, initialized alike
    from the same seed, in every variant.

    >>> import syncbn
    >>> net = make_act_resnet("inplace", 8)
    >>> net(torch.zeros(2, 3, 16, 16)).shape
    torch.Size([2, 10])
    >>> sum(isinstance(m, syncbn.SyncBatchNorm) and m.inplace for m in net.modules())
    20
    """
    if variant not in ACT_VARIANTS:
        raise ValueError(f"expected a variant in {ACT_VARIANTS}, got {variant!r}")
    layers: list[nn.Module] = [nn.Conv2d(3, width, 3, 1, 1, bias=False),
                               _norm(width, variant, True)]
    cin = width
    for i, mult in enumerate((1, 2, 4, 8)):
        cout = width * mult
        layers += [_ActBlock(cin, cout, 1 if i == 0 else 2, variant),
                   _ActBlock(cout, cout, 1, variant)]
        cin = cout
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, num_classes)]
    return nn.Sequential(*layers)
