"""Functional form of synchronized batch norm."""

from __future__ import annotations

from typing import Any

import torch.nn.functional as F
from torch import Tensor

from . import _comm, _pass, _wire

__all__ = ["check_input", "sync_batch_norm", "will_sync"]


def will_sync(training: bool, process_group: Any | None = None) -> bool:
    """True when a pass with these settings synchronizes: batch statistics are used and the
    group has more than one rank. Otherwise syncbn is exactly ``F.batch_norm`` with no collective.
    """
    return training and _comm.group_size(process_group) > 1


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


def sync_batch_norm(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
    process_group: Any | None = None,
) -> Tensor:
    r"""Batch norm whose training statistics are those of the global batch over all ranks.

    .. math:: y = \frac{x - \mathrm{E}[x]}{\sqrt{\mathrm{Var}[x] + \epsilon}} * \gamma + \beta

    with ``E`` and ``Var`` (biased) per channel over the batch of *every* rank of
    ``process_group`` when ``training`` and the group has more than one rank; otherwise exactly
    ``torch.nn.functional.batch_norm``. Same arguments as ``F.batch_norm`` plus ``process_group``.
    In training, ``running_mean``/``running_var`` (if given) are updated in place with the
    global mean and the global unbiased variance, identically on every rank.

    Args:
        input: ``(N, C, *)`` floating tensor; ``N`` may differ between ranks and may be 0.
        running_mean, running_var: ``(C,)`` buffers or ``None``.
        weight, bias: ``(C,)`` affine parameters or ``None``.
        training: use batch statistics (and synchronize). Default: ``False``.
        momentum: factor of the running-statistics update. Default: 0.1.
        eps: added to the variance. Default: 1e-5.
        process_group: group to synchronize over. Default: ``None`` (the world).

    Example (a single process: no synchronization, identical to ``F.batch_norm``)::

        >>> import torch, torch.nn.functional as F
        >>> from syncbn.functional import sync_batch_norm
        >>> x = torch.randn(8, 3, 4, 4)
        >>> rm, rv = torch.zeros(3), torch.ones(3)
        >>> y = sync_batch_norm(x, rm, rv, training=True)
        >>> torch.allclose(y, F.batch_norm(x, torch.zeros(3), torch.ones(3), training=True))
        True
    """
    check_input(input, None, "sync_batch_norm")
    if not will_sync(training, process_group):
        return F.batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps)
    for name, t in (("running_mean", running_mean), ("running_var", running_var),
                    ("weight", weight), ("bias", bias)):
        if t is not None and t.numel() != input.shape[1]:
            raise ValueError(
                f"sync_batch_norm: expected {name} with {input.shape[1]} elements (the input's "
                f"channels), got {t.numel()}"
            )
    out = _pass.SyncBatchNormFunction.apply(
        input, weight, bias, running_mean, running_var, eps, momentum,
        _pass.group_id(process_group), _FUNCTIONAL_LAYER)
    return out  # type: ignore[no-any-return]


_FUNCTIONAL_TAG = _wire.LayerTag.for_layer("syncbn.functional.sync_batch_norm", 0, "sync_batch_norm")
_FUNCTIONAL_LAYER = _pass.layer_id(_FUNCTIONAL_TAG)

