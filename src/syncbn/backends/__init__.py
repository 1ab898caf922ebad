"""The backends: who computes a synchronized pass's four steps, and :func:`select`, which picks one.

A synchronized direction is ``reduce -> one all_reduce -> apply`` (``syncbn._pass`` runs it);
a backend implements the steps and nothing else, on the buffer ``syncbn._wire`` defines, so
ranks on different backends can meet in one group:

============  ===============================================  ==============================
backend       takes                                            module
============  ===============================================  ==============================
``fused``     CPU float32/float64, contiguous/channels_last    :mod:`.fused` (C kernel)
``aten``      every input (any device, dtype, layout)          :mod:`.aten` (torch operators)
``triton``    CUDA tensors (CPU under ``TRITON_INTERPRET=1``)  :mod:`.triton`
``cuda``      CUDA tensors (CPU where torch's SyncBatchNorm    :mod:`.cuda` (torch's SyncBN
              operators have CPU kernels: tests' stand-ins)    kernels + small float64 ops)
============  ===============================================  ==============================

Per-channel tensors (weight, bias, running statistics) may each have their own floating dtype,
whatever the input's (``model.half()``, autocast, a float32 layer fed float64): ``aten``,
``triton`` and ``cuda`` take every combination, ``fused`` float32/float64 ones (the others go to
``aten``).
Statistics are kept in float32 or better; each tensor keeps its dtype, the output the input's.

``SYNCBN_KERNEL`` (read here, and only here) names one (``cuda-welford``: the ``cuda`` backend
without its shift, torch's numerics); ``auto``, the default, takes ``fused`` where it applies
and ``aten`` elsewhere (on CUDA too, until a GPU run has measured the others). Every backend is
a module with the functions of :class:`Backend`.
"""

from __future__ import annotations

from typing import Any, Protocol

from torch import Tensor

from .. import _settings
from . import aten, cuda, fused, triton

__all__ = ["Backend", "BackendUnavailable", "aten", "cuda", "describe", "fused", "select",
           "triton"]


class BackendUnavailable(RuntimeError):
    """``SYNCBN_KERNEL`` names a backend that cannot take this pass."""


class Backend(Protocol):
    """The four steps of a synchronized pass, and :meth:`applies`.

    One result convention: every step returns a ``syncbn._wire`` result code (``OK``,
    ``MISMATCH``, ``NONFINITE``, ``NO_MEMORY``) as its last value; the caller raises. ``geo`` is
    what :meth:`applies` returned for this input (computed once per plan, never per pass).
    ``stats`` is ``[mean (C) | invstd (C) | count (1)]`` in float64, whichever backend made it.
    ``status``: a device int32 word a backend with ``STATUS_WORD = True`` writes its code to
    (no host sync); the others return it.

    Activated layers (keyword-only, with defaults that are the plain steps): ``act`` (a
    ``syncbn._stats`` kind: IDENTITY, RELU, LEAKY_RELU, ELU) and ``act_param`` (leaky_relu's
    slope, elu's alpha) make the forward write ``act(z)``, ``z = xhat * weight + bias``, and
    the backward use ``dz = dy * act'(z)`` in place of ``dy`` (the buffer's layout does not
    change: ``sum(dz)``, ``sum(dz * xhat)``). ``out``: the forward writes there (``x`` itself
    for an in-place layer). ``saved_output``: the backward recovers ``z = act^-1(y)`` and
    ``xhat = (z - bias) / weight`` from the output alone and does not read ``x`` (which may be
    None): invertible kinds only, and weights that ``_stats.inplace_invertible`` accepts.
    Without it, ``x`` is read and ``z`` recomputed from it (``weight`` and ``bias`` needed).
    """

    NAME: str
    STATUS_WORD: bool
    ACTIVATES: bool  # takes act/act_param/out/saved_output (activated and in-place layers)

    def applies(self, input: Tensor, *params: Tensor | None) -> Any | None:
        """This backend's geometry of ``input`` (truthy) when it takes the pass with these
        per-channel tensors (weight, bias, running statistics), else ``None``."""

    def forward_reduce(self, geo: Any, x: Tensor, buffer: Tensor, fields: list[int]) -> int:
        """``[1 | sum(x), sum(x**2), n | 0... | header | 1]`` of this shard into ``buffer``."""

    def forward_apply(self, geo: Any, x: Tensor, buffer: Tensor, world: int, fields: list[int],
                      weight: Tensor | None, bias: Tensor | None, running_mean: Tensor | None,
                      running_var: Tensor | None, eps: float, momentum: float, policy: int,
                      status: Tensor | None = None, *, act: int = 0, act_param: float = 0.0,
                      out: Tensor | None = None) -> tuple[Tensor | None, Tensor | None, int]:
        """Header check, global mean/invstd, running statistics, normalize and activate:
        ``(out, stats, code)``."""

    def backward_reduce(self, geo: Any, dy: Tensor, x: Tensor | None, stats: Tensor,
                        buffer: Tensor | None, fields: list[int],
                        weight_dtype: Any, bias_dtype: Any, *, act: int = 0,
                        act_param: float = 0.0, saved_output: Tensor | None = None,
                        weight: Tensor | None = None, bias: Tensor | None = None,
                        ) -> tuple[Tensor | None, Tensor | None, int]:
        """Local sum(dz), sum(dz * xhat) into ``buffer`` (when given); ``(grad_weight,
        grad_bias, code)``, this rank's share."""

    def backward_apply(self, geo: Any, dy: Tensor, x: Tensor | None, stats: Tensor,
                       weight: Tensor | None, buffer: Tensor, world: int, fields: list[int],
                       status: Tensor | None = None, *, act: int = 0, act_param: float = 0.0,
                       saved_output: Tensor | None = None, bias: Tensor | None = None,
                       ) -> tuple[Tensor | None, int]:
        """Header check, grad_input from the global sums: ``(grad_input, code)``."""


def select(input: Tensor, *params: Tensor | None) -> tuple[Backend, Any]:
    """The backend of a pass on ``input`` with these per-channel tensors, and its geometry.

    ``SYNCBN_KERNEL``: ``auto`` (fused where it applies and builds, else aten), ``fused`` (an
    error where the kernel cannot be built; aten for inputs it does not take), ``aten``,
    ``triton``, ``cuda``, ``cuda-welford`` (an error where they cannot take the pass)."""
    kernel = _settings.get().kernel
    if kernel == "aten":
        return aten, aten.applies(input, *params)
    if kernel in ("cuda", "cuda-welford"):
        lean = cuda.applies(input, *params, welford=kernel == "cuda-welford")
        if lean is None:
            raise BackendUnavailable(
                f"syncbn: SYNCBN_KERNEL={kernel}, but the lean CUDA backend cannot take this "
                f"pass (input {input.dtype} on {input.device}; it needs a float16/bfloat16/"
                "float32/float64 CUDA tensor with per-channel tensors of those dtypes on its "
                "device; CPU tensors only where torch's SyncBatchNorm operators have CPU "
                "kernels, as in syncbn's tests)")
        return cuda, lean
    if kernel == "triton":
        geo = triton.applies(input, *params)
        if geo is None:
            raise BackendUnavailable(
                f"syncbn: SYNCBN_KERNEL=triton, but the Triton backend cannot take this pass "
                f"(input {input.dtype} on {input.device}; it needs triton and a CUDA tensor, or "
                "TRITON_INTERPRET=1 set before syncbn's first pass for CPU tensors)")
        return triton, geo
    geo = fused.applies(input, *params)
    if geo is not None and fused.load(required=kernel == "fused"):
        return fused, geo
    return aten, aten.applies(input, *params)


def describe(input: Tensor, *params: Tensor | None) -> str:
    """Which backend a pass on this input takes, and why (for reports: ``syncbn check``)."""
    kernel = _settings.get().kernel
    try:
        backend, _ = select(input, *params)
    except RuntimeError as e:
        return f"none ({e})"
    if backend is not aten or kernel == "aten":
        return backend.NAME if kernel == "auto" else f"{backend.NAME} (SYNCBN_KERNEL={kernel})"
    if fused.applies(input, *params) is None:
        return ("aten (not a CPU float32/float64 contiguous or channels_last input with "
                "float32/float64 per-channel tensors)")
    return "aten (kernel unavailable)"
