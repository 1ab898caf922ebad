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

from . import _comm, _pass, _replicas, _stats, _wire
from .functional import check_input, will_sync

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
        self.process_group = process_group
        self._creation_index = next(_creation_index)
        self._tag = self._make_tag()

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
        self._tag = self._make_tag()

    def _make_tag(self) -> _wire.LayerTag:
        """The layer's identity and pass counters in the collective's header (and the integer
        the registered ops know it by)."""
        tag = _wire.LayerTag.for_layer(self._name, self._creation_index, self.layer_description())
        self._layer_id = _pass.layer_id(tag)
        return tag

    def __setstate__(self, state: dict[str, Any]) -> None:
        # A copy (copy.deepcopy, pickle, torch.load of a whole model) has a tag of its own: the
        # integer the registered ops know it by must name that tag, not the original's.
        if "_process_group" not in state:  # pickled by syncbn 0.1: a plain attribute then
            state = {**state, "_process_group": state.get("process_group")}
            state.pop("process_group", None)
        super().__setstate__(state)
        self._layer_id = _pass.layer_id(self._tag)
        self._group_id = _pass.group_id(self._process_group)

    def extra_repr(self) -> str:
        return super().extra_repr() + _activation_repr(self)

    def layer_description(self) -> str:
        """How error messages name this layer: ``SyncBatchNorm2d(64) 'layer1.0.bn1'``."""
        name = f" '{self._layer_name}'" if self._layer_name else ""
        return f"{type(self).__name__}({self.num_features}){name}"

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(
                f"{self.layer_description()}: expected at least 2D input (got {input.dim()}D input)"
            )

    def forward(self, input: Tensor) -> Tensor:
        if self.training and not _comm.compiling():  # a syncbn.DataParallel replica: synchronized
            # over the replicas (torch.compile does not trace DataParallel's threads)
            routed = _replicas.route(self, input)
            if routed is not None:
                return routed
        self._check_input_dim(input)
        check_input(input, self.num_features, self._tag.description)
        # An activation-checkpoint recompute runs the forward again inside the backward: it
        # must normalize the same way but not count the batch or update the statistics twice.
        recompute = self.training and not _comm.compiling() and torch._C._current_graph_task_id() != -1
        update = self.training and self.track_running_stats and not recompute
        # The bookkeeping below is torch.nn.BatchNorm's, line for line.
        factor = 0.0 if self.momentum is None else self.momentum
        if update and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:  # cumulative moving average
                factor = 1.0 / float(self.num_batches_tracked)
        # Batch statistics in training mode, and in eval mode when there are no buffers.
        use_batch_stats = self.training or (self.running_mean is None and self.running_var is None)
        # Buffers are passed only when they are updated (training and tracked) or used (eval).
        keep = not self.training or update
        running_mean = self.running_mean if keep else None
        running_var = self.running_var if keep else None
        # The one decision: synchronize in training mode over a group of more than one rank.
        # Eval mode never synchronizes (evaluating on one rank must not wait for the others).
        if not will_sync(self.training, self.process_group):
            return F.batch_norm(input, running_mean, running_var, self.weight, self.bias,
                                use_batch_stats, factor, self.eps)
        out = _pass.SyncBatchNormFunction.apply(
            input, self.weight, self.bias, running_mean, running_var, self.eps, factor,
            self._group_id, self._layer_id)
        return out  # type: ignore[no-any-return]


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
