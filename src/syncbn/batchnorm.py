"""Drop-in synchronized BatchNorm modules.

The Module keeps the books (running statistics, ``num_batches_tracked``, momentum, train/eval) exactly
as ``torch.nn.BatchNorm*d`` does and makes the one decision "synchronize, or ``F.batch_norm``"
(like torch's ``need_sync``: training mode and a group of more than one rank);
:class:`~syncbn._pass.SyncBatchNormFunction` does the math.

The classes subclass torch's ``_BatchNorm`` (not ``torch.nn.SyncBatchNorm``, which DDP rejects in
CPU modules), so ``state_dict``s load both ways between these and ``torch.nn.BatchNorm*d`` /
``torch.nn.SyncBatchNorm``.
"""

from __future__ import annotations

import itertools
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.modules.batchnorm import _BatchNorm

from . import _pass, _replicas, _stats, _wire
from ._pass import check_input

_creation_index = itertools.count(1)

__all__ = [
    "BatchNormAct",
    "BatchNormNd",
    "SyncBatchNorm",
    "SyncBatchNorm1d",
    "SyncBatchNorm2d",
    "SyncBatchNorm3d",
]


class SyncBatchNorm(_BatchNorm):
    r"""Batch norm over the global batch of all ranks; input of any dim >= 2, like
    ``torch.nn.SyncBatchNorm``, but on any device and backend (CPU/gloo, CUDA/NCCL, MPI).

    .. math:: y = \frac{x - \mathrm{E}[x]}{\sqrt{\mathrm{Var}[x] + \epsilon}} * \gamma + \beta

    In training mode under an initialized ``torch.distributed`` with more than one rank in
    ``process_group``, ``E`` and ``Var`` are taken over the concatenation of every rank's batch
    (shards may differ in size and be empty) with one ``all_reduce`` forward (sums of ``x`` and
    ``x**2`` and the count: ``2C + 1`` numbers) and one backward (``2C``), each padded to the
    group's width and carrying a small header that detects ranks out of step. Otherwise (eval
    mode, one rank, no process group) it is exactly ``torch.nn.BatchNorm*d``, with no collective:
    in eval mode without running statistics (``track_running_stats=False``) each rank normalizes
    with its own batch's statistics, like ``torch.nn.SyncBatchNorm``. Running statistics use the global
    unbiased variance and are bitwise identical on every rank.

    Every rank of the group must call every synchronized layer in training mode, in the same
    order, the same number of times (with an empty batch if it has none).

    Args:
        num_features: ``C`` in an input of size ``(N, C, *)``.
        eps: added to the variance for stability. Default: 1e-5.
        momentum: factor of the running-statistics update; ``None`` for a cumulative average.
            Default: 0.1.
        affine: learnable per-channel ``weight`` and ``bias``. Default: ``True``.
        track_running_stats: keep running mean/var (used in eval mode). Default: ``True``.
        process_group: synchronize over this group only. Default: ``None`` (the world).
        device, dtype: of the parameters and buffers.
        activation: applied to the normalized output in the same pass: ``"identity"``,
            ``"relu"``, ``"leaky_relu"`` or ``"elu"`` (keyword only). Default: ``"identity"``.
        activation_param: leaky_relu's negative slope, elu's alpha (torch's ELU default is
            1.0: pass it). Default: 0.01.
        inplace: write the output over the input and keep only the output for the backward,
            which recovers the normalized input by inverting the activation and the affine
            transform (less memory: the input is not kept). Needs an invertible activation:
            identity, leaky_relu with a positive slope, elu with a positive alpha (``relu`` is
            a ``ValueError``). Autograd sees the write: the input must not be used again. A
            pass whose weights make the inverse ill-conditioned (a weight at or near 0) keeps
            a copy of its input instead (docs/how-it-works.md). Default: ``False``.

    Shape:
        - Input: ``(N, C, *)``, float16/bfloat16/float32/float64 (half inputs with float32
          parameters are fine: statistics are accumulated in float32 or better).
        - Output: same shape, dtype and memory format as the input.

    Example (one process: no synchronization; with ``torchrun`` the same code syncs)::

        >>> import torch, syncbn
        >>> bn = syncbn.SyncBatchNorm(3)
        >>> bn(torch.randn(4, 3, 5)).shape
        torch.Size([4, 3, 5])
    """

    _name: str | None = None
    _model: int = 0  # which conversion named it (syncbn.convert_sync_batchnorm counts them)
    # What a layer pickled before activations existed loads with (no new buffers: state_dicts
    # are unchanged either way).
    activation: str = "identity"
    activation_param: float = 0.01
    inplace: bool = False
    _act: int = _stats.IDENTITY

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        process_group: Any | None = None,
        device: Any = None,
        dtype: Any = None,
        *,
        activation: str = "identity",
        activation_param: float = 0.01,
        inplace: bool = False,
    ) -> None:
        act = _stats.activation_code(activation, activation_param, inplace, type(self).__name__)
        super().__init__(
            num_features, eps, momentum, affine, track_running_stats, device=device, dtype=dtype
        )
        self.activation, self.activation_param, self.inplace = activation, activation_param, inplace
        self._act = act  # the kind code the backends take (syncbn._stats.ACTIVATIONS)
        self._creation_index = next(_creation_index)
        self._sync = _pass.LayerState(self._make_tag(), self._check)
        self._layer_id = _pass.layer_id(self._sync)
        self.process_group = process_group

    @property
    def process_group(self) -> Any | None:
        """The group this layer synchronizes over (``None``: the default group)."""
        return self._process_group

    @process_group.setter
    def process_group(self, group: Any | None) -> None:
        # The integer the registered ops know the group by, looked up here rather than in
        # forward (a lookup that torch.compile would have to trace).
        self._process_group = group
        self._group_id = _pass.group_id(group)

    @property
    def _layer_name(self) -> str | None:
        """Qualified name in the model (set by ``convert_sync_batchnorm``), for errors and the tag."""
        return self._name

    @_layer_name.setter
    def _layer_name(self, name: str | None) -> None:
        self._name = name
        self._sync.tag = self._make_tag()
        self._sync.plan = None

    def _name_in(self, model: int, name: str | None) -> None:
        """Name the layer ``name`` in the ``model``-th converted model of this process."""
        self._model = model
        self._layer_name = name

    def _make_tag(self) -> _wire.LayerTag:
        """The layer's identity in the collective's header: its name in its converted model
        (the same on every rank of a correct program), else its creation index."""
        key = f"{self._model}:{self._name}" if self._name else None
        return _wire.LayerTag.for_layer(key, self._creation_index, self.layer_description())

    def __setstate__(self, state: dict[str, Any]) -> None:
        # A copy (copy.deepcopy, pickle, torch.load of a whole model) has state of its own: the
        # integer the registered ops know it by must name that state, not the original's.
        if "_process_group" not in state:  # pickled by syncbn 0.1: a plain attribute then
            state = {**state, "_process_group": state.get("process_group")}
            state.pop("process_group", None)
        state = dict(state)
        tag = state.pop("_tag", None)  # the copy's identity: the original's
        state.pop("_sync", None)
        super().__setstate__(state)
        self._sync = _pass.LayerState(tag or self._make_tag(), self._check)
        self._layer_id = _pass.layer_id(self._sync)
        self._group_id = _pass.group_id(self._process_group)

    def extra_repr(self) -> str:
        return super().extra_repr() + _activation_repr(self)

    def layer_description(self) -> str:
        """How error messages name this layer: ``SyncBatchNorm2d(64) 'layer1.0.bn1'``, or with
        its creation number when it has no name: ``SyncBatchNorm2d(64) #3``."""
        name = f" '{self._layer_name}'" if self._layer_name else f" #{self._creation_index}"
        return f"{type(self).__name__}({self.num_features}){name}"

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(
                f"{self.layer_description()}: expected at least 2D input (got {input.dim()}D input)"
            )

    def _check(self, input: Tensor) -> None:
        """Raise for input this layer cannot take (the dims its class takes, then the checks
        every batch norm makes), before any collective."""
        if isinstance(input, Tensor):
            self._check_input_dim(input)
        check_input(input, self.num_features, self._sync.tag.description)

    def forward(self, input: Tensor) -> Tensor:
        training = self.training
        compiling = torch.compiler.is_compiling()
        if training and not compiling and (  # a syncbn.DataParallel replica, or a replica
                _replicas.thread.replica is not None or "_is_replica" in self.__dict__
                or "_syncbn_replicated" in self.__dict__):  # of torch's (it warns)
            routed = _replicas.route(self, input)
            if routed is not None:
                return routed
        # An activation-checkpoint recompute runs the forward again inside the backward: it
        # must normalize the same way but not count the batch or update the statistics twice.
        recompute = training and not compiling and torch._C._current_graph_task_id() != -1
        update = training and self.track_running_stats and not recompute
        # The bookkeeping below is torch.nn.BatchNorm's, line for line, except that the batch
        # is counted after the pass: a batch that SYNCBN_NONFINITE skips or raises on is not.
        factor = 0.0 if self.momentum is None else self.momentum
        counted = update and self.num_batches_tracked is not None
        if counted and self.momentum is None:  # cumulative moving average
            factor = 1.0 / (float(self.num_batches_tracked) + 1.0)
        # Buffers are passed only when they are updated (training and tracked) or used (eval).
        keep = not training or update
        running_mean = self.running_mean if keep else None
        running_var = self.running_var if keep else None
        # The one decision: synchronize in training mode over a group of more than one rank
        # (the plan says). Eval mode never synchronizes (evaluating on one rank must not wait).
        act = self._act
        if not training:
            self._check(input)
            # Batch statistics in eval mode only when there are no buffers (like torch).
            return self._plain(input, running_mean, running_var,
                               running_mean is None and running_var is None, factor)
        if compiling:
            self._check(input)
            if not _pass.will_sync(self._process_group):
                out = self._plain(input, running_mean, running_var, True, factor)
            else:
                out = _pass.CompiledSyncBatchNorm.apply(
                    input, self.weight, self.bias, running_mean, running_var, self.eps, factor,
                    self._group_id, self._layer_id, act, self.activation_param)
            if counted:
                self.num_batches_tracked.add_(1)
            return out  # type: ignore[no-any-return]
        # An in-place layer takes the synchronized path on one rank too (its collective is
        # skipped there): that is where the input's memory is reused.
        plan = _pass.plan(self._sync, input, (self.weight, self.bias, running_mean, running_var),
                          self._process_group, self.inplace)
        if not plan.sync:
            out = self._plain(input, running_mean, running_var, True, factor)
        elif act or self.inplace:
            out = _pass.SyncBatchNormFunction.apply(
                input, self.weight, self.bias, running_mean, running_var, self.eps, factor, plan,
                act, self.activation_param, self.inplace)
        else:
            out = _pass.SyncBatchNormFunction.apply(
                input, self.weight, self.bias, running_mean, running_var, self.eps, factor, plan)
        if counted:
            self.num_batches_tracked.add_(1 if plan.used is None else plan.used)
        return out  # type: ignore[no-any-return]

    def _plain(self, input: Tensor, running_mean: Tensor | None, running_var: Tensor | None,
               batch_stats: bool, factor: float) -> Tensor:
        """The pass without synchronization: ``F.batch_norm`` (and the activation)."""
        if self._act:
            return _stats.batch_norm_act(input, running_mean, running_var, self.weight,
                                         self.bias, batch_stats, factor, self.eps, self._act,
                                         self.activation_param)
        return F.batch_norm(input, running_mean, running_var, self.weight, self.bias, batch_stats,
                            factor, self.eps)

    # ---------------------------------------------------------------- copies and pickles
    # A process group belongs to this process's torch.distributed and can be neither copied nor
    # pickled. A copy (copy.deepcopy, copy.copy) keeps the very same group: the documented
    # export recipe ``revert_sync_batchnorm(copy.deepcopy(model))`` works with an explicit group.
    # A pickle (torch.save of a whole model) leaves it out: the unpickled layer synchronizes
    # over the default group until ``process_group`` is set again (warned when pickling).

    def _portable_state(self) -> dict[str, Any]:
        """The layer's state for a copy or a pickle: its identity (tag) rather than its
        per-process state (plan, group), which the copy makes anew (``__setstate__``)."""
        state = dict(super().__getstate__())
        sync = state.pop("_sync", None)
        if sync is not None:
            state["_tag"] = sync.tag
        return state

    def __deepcopy__(self, memo: dict[int, Any]) -> SyncBatchNorm:
        import copy

        group = self._process_group
        if group is not None:
            memo[id(group)] = group  # deepcopy hands back the group itself
        new = type(self).__new__(type(self))
        memo[id(self)] = new
        new.__setstate__(copy.deepcopy(self._portable_state(), memo))
        return new

    def __copy__(self) -> SyncBatchNorm:
        new = type(self).__new__(type(self))
        new.__setstate__(self._portable_state())
        return new

    def __getstate__(self) -> dict[str, Any]:
        state = self._portable_state()
        if state.get("_process_group") is not None:
            import warnings

            warnings.warn(
                "syncbn: a SyncBatchNorm layer with an explicit process_group was pickled "
                "without it (a process group cannot be pickled); once unpickled it synchronizes "
                "over the default group: set its process_group again (or convert the model "
                "again with process_group=...) before training. state_dict() has no such "
                "limit.", UserWarning, stacklevel=2)
            state["_process_group"], state["_group_id"] = None, 0
        return state


class SyncBatchNorm1d(SyncBatchNorm):
    """:class:`SyncBatchNorm` for ``(N, C)`` or ``(N, C, L)`` input, like ``torch.nn.BatchNorm1d``.

    >>> import torch, syncbn
    >>> syncbn.SyncBatchNorm1d(4)(torch.randn(8, 4)).shape
    torch.Size([8, 4])
    """

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() not in (2, 3):
            raise ValueError(
                f"{self.layer_description()}: expected 2D or 3D input (got {input.dim()}D input)"
            )


class SyncBatchNorm2d(SyncBatchNorm):
    """:class:`SyncBatchNorm` for ``(N, C, H, W)`` input, like ``torch.nn.BatchNorm2d``.

    >>> import torch, syncbn
    >>> syncbn.SyncBatchNorm2d(4)(torch.randn(2, 4, 3, 3)).shape
    torch.Size([2, 4, 3, 3])
    """

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() != 4:
            raise ValueError(
                f"{self.layer_description()}: expected 4D input (got {input.dim()}D input)"
            )


class SyncBatchNorm3d(SyncBatchNorm):
    """:class:`SyncBatchNorm` for ``(N, C, D, H, W)`` input, like ``torch.nn.BatchNorm3d``.

    >>> import torch, syncbn
    >>> syncbn.SyncBatchNorm3d(4)(torch.randn(2, 4, 2, 3, 3)).shape
    torch.Size([2, 4, 2, 3, 3])
    """

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() != 5:
            raise ValueError(
                f"{self.layer_description()}: expected 5D input (got {input.dim()}D input)"
            )


class BatchNormNd(_BatchNorm):
    """Plain (unsynchronized) batch norm for input of any dim >= 2.

    What :func:`syncbn.revert_sync_batchnorm` turns the generic :class:`SyncBatchNorm` (and
    ``torch.nn.SyncBatchNorm``) into: same parameters, buffers and ``state_dict`` keys, exactly
    ``F.batch_norm`` in its forward, so it exports like ``torch.nn.BatchNorm*d``.

    >>> import torch, syncbn
    >>> syncbn.BatchNormNd(3)(torch.randn(4, 3, 2, 2, 2, 2)).shape
    torch.Size([4, 3, 2, 2, 2, 2])
    """

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")


def _activation_repr(layer: Any) -> str:
    """``, activation=leaky_relu, activation_param=0.01, inplace=True`` (nothing for identity
    out of place: the repr of a plain layer does not change)."""
    if layer.activation == "identity" and not layer.inplace:
        return ""
    text = f", activation={layer.activation}"
    if layer.activation in ("leaky_relu", "elu"):
        text += f", activation_param={layer.activation_param}"
    return text + (", inplace=True" if layer.inplace else "")


class BatchNormAct(_BatchNorm):
    """Plain (unsynchronized) batch norm followed by an activation, for input of any dim >= 2.

    What :func:`syncbn.revert_sync_batchnorm` turns an activated syncbn layer into: the same
    parameters, buffers and ``state_dict`` keys, and a forward that is exactly
    ``torch.nn.BatchNorm*d`` followed by ``F.relu`` / ``F.leaky_relu`` / ``F.elu`` (the
    activation in place on batch norm's fresh output; the input is never overwritten), so it
    exports with ``torch.export`` and ONNX. ``activation``, ``activation_param`` and
    ``inplace`` are kept (``inplace`` only for the way back: converted again, the layer is
    in-place again).

    >>> import torch, syncbn
    >>> bn = syncbn.BatchNormAct(3, activation="leaky_relu", activation_param=0.1).eval()
    >>> bn(torch.full((2, 3, 4), -1.0)).flatten().unique().tolist()  # (-1 - 0) / 1 * 0.1
    [-0.09999950230121613]
    >>> bn
    BatchNormAct(3, eps=1e-05, momentum=0.1, affine=True, ..., activation=leaky_relu, activation_param=0.1)
    """

    activation: str = "identity"
    activation_param: float = 0.01
    inplace: bool = False
    _act: int = _stats.IDENTITY

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1,
                 affine: bool = True, track_running_stats: bool = True, device: Any = None,
                 dtype: Any = None, *, activation: str = "identity",
                 activation_param: float = 0.01, inplace: bool = False) -> None:
        act = _stats.activation_code(activation, activation_param, inplace, type(self).__name__)
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device=device,
                         dtype=dtype)
        self.activation, self.activation_param, self.inplace = activation, activation_param, inplace
        self._act = act

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def forward(self, input: Tensor) -> Tensor:
        out = super().forward(input)  # torch's BatchNorm, bookkeeping included
        if self._act == _stats.IDENTITY:
            return out
        in_place = self._act == _stats.RELU or self.activation_param >= 0  # autograd allows it
        return _stats.activate(out, self._act, self.activation_param, inplace=in_place)

    def extra_repr(self) -> str:
        return super().extra_repr() + _activation_repr(self)
