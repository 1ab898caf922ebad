"""Functional form of synchronized batch norm."""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import Tensor

from . import _pass, _stats, _wire
from ._pass import check_input

__all__ = ["check_input", "sync_batch_norm", "will_sync"]


def will_sync(training: bool, process_group: Any | None = None) -> bool:
    """True when a pass with these settings synchronizes: batch statistics are used and the
    group has more than one rank. Otherwise syncbn is exactly ``F.batch_norm`` with no collective.
    """
    return training and _pass.will_sync(process_group)


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
    *,
    activation: str = "identity",
    activation_param: float = 0.01,
    inplace: bool = False,
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
        activation: applied to the output, fused into the pass: ``"identity"``, ``"relu"``,
            ``"leaky_relu"`` or ``"elu"``. Default: ``"identity"``.
        activation_param: leaky_relu's negative slope, elu's alpha. Default: 0.01.
        inplace: write the output over ``input`` (training: the backward keeps only the
            output); needs an invertible activation. Default: ``False``.

    Example (a single process: no synchronization, identical to ``F.batch_norm``)::

        >>> import torch, torch.nn.functional as F
        >>> from syncbn.functional import sync_batch_norm
        >>> x = torch.randn(8, 3, 4, 4)
        >>> rm, rv = torch.zeros(3), torch.ones(3)
        >>> y = sync_batch_norm(x, rm, rv, training=True)
        >>> torch.allclose(y, F.batch_norm(x, torch.zeros(3), torch.ones(3), training=True))
        True
    """
    act = _stats.activation_code(activation, activation_param, inplace,
                                 "syncbn.functional.sync_batch_norm") if (
        activation != "identity" or inplace) else 0
    if not training:
        check_input(input, None, "sync_batch_norm")
        return _stats.batch_norm_act(input, running_mean, running_var, weight, bias, False,
                                     momentum, eps, act, activation_param)
    state = _call_site(inspect.currentframe())
    params = (weight, bias, running_mean, running_var)
    if torch.compiler.is_compiling():
        check_input(input, None, "sync_batch_norm")
        _check_params(input, params)
        if not _pass.will_sync(process_group):
            return _stats.batch_norm_act(input, running_mean, running_var, weight, bias, True,
                                         momentum, eps, act, activation_param)
        return _pass.CompiledSyncBatchNorm.apply(  # type: ignore[no-any-return]
            input, weight, bias, running_mean, running_var, eps, momentum,
            _pass.group_id(process_group), _pass.layer_id(state), act, activation_param)
    plan = _pass.plan(state, input, params, process_group, inplace)
    if not plan.sync:
        return _stats.batch_norm_act(input, running_mean, running_var, weight, bias, True,
                                     momentum, eps, act, activation_param)
    _check_params(input, params)
    return _pass.SyncBatchNormFunction.apply(  # type: ignore[no-any-return]
        input, weight, bias, running_mean, running_var, eps, momentum, plan, act,
        activation_param, inplace)


def _check_params(input: Tensor, params: tuple[Tensor | None, ...]) -> None:
    for name, t in zip(("weight", "bias", "running_mean", "running_var"), params):
        if t is not None and t.numel() != input.shape[1]:
            raise ValueError(
                f"sync_batch_norm: expected {name} with {input.shape[1]} elements (the input's "
                f"channels), got {t.numel()}"
            )


# Each call site of sync_batch_norm is a layer of its own (its identity in the header: the
# file and line of the call, the same on every rank running the same code).
_sites: dict[tuple[str, int], _pass.LayerState] = {}


def _call_site(frame: Any) -> _pass.LayerState:
    caller = frame.f_back if frame is not None else None
    where = (caller.f_code.co_filename, caller.f_lineno) if caller is not None else ("?", 0)
    state = _sites.get(where)
    if state is None:
        name = f"{where[0]}:{where[1]}"
        tag = _wire.LayerTag.for_layer(f"sync_batch_norm:{name}", 0,
                                       f"sync_batch_norm at {name}")
        state = _sites[where] = _pass.LayerState(
            tag, lambda input: check_input(input, None, tag.description))
    return state

