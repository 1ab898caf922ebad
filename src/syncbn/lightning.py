"""PyTorch Lightning integration: a ``LayerSync`` plugin that uses syncbn.

::

    import lightning as L
    from syncbn.lightning import SyncBatchNormPlugin

    trainer = L.Trainer(strategy="ddp", accelerator="cpu", devices=4, plugins=[SyncBatchNormPlugin()])

Lightning calls ``apply(model)`` when fitting starts (every ``BatchNorm*d`` becomes a syncbn layer,
:func:`syncbn.convert_sync_batchnorm`) and ``revert(model)`` at the end of fitting (back to
``torch.nn.BatchNorm*d``, :func:`syncbn.revert_sync_batchnorm`). Unlike
``Trainer(sync_batchnorm=True)`` (``torch.nn.SyncBatchNorm``: CUDA only), it also works on CPU
with gloo, and with uneven or empty per-rank batches. Do not pass both: Lightning refuses a second
``LayerSync`` next to ``sync_batchnorm=True``.

Lightning is an optional dependency (``pip install 'syncbn[lightning]'``): ``import syncbn`` never
imports it, and neither does importing this module; the plugin classes are created on first use.

* ``SyncBatchNormPlugin`` subclasses ``lightning.pytorch.plugins.LayerSync`` (the ``lightning``
  package), or ``pytorch_lightning.plugins.LayerSync`` when only ``pytorch_lightning`` is
  installed.
* ``PLSyncBatchNormPlugin`` always subclasses ``pytorch_lightning.plugins.LayerSync``, for code
  that uses ``pytorch_lightning.Trainer`` while ``lightning`` is installed too (the two packages'
  classes are distinct, and each Trainer accepts only its own).

Both take ``process_group=`` (default: the whole world), passed to
:func:`syncbn.convert_sync_batchnorm`.
"""

from __future__ import annotations

import importlib
from typing import Any

from torch import nn

from .convert import convert_sync_batchnorm, revert_sync_batchnorm

__all__ = ["PLSyncBatchNormPlugin", "SyncBatchNormPlugin"]

_CACHE: dict[str, type] = {}
_INSTALL = "pip install 'syncbn[lightning]' (or: pip install lightning)"


def _layer_sync(packages: tuple[str, ...]) -> type:
    errors = []
    for package in packages:
        try:
            return importlib.import_module(f"{package}.plugins").LayerSync  # type: ignore[no-any-return]
        except ImportError as e:
            errors.append(f"{package}: {e}")
    raise ImportError(f"syncbn.lightning needs PyTorch Lightning ({'; '.join(errors)}); {_INSTALL}")


def _make(name: str, packages: tuple[str, ...]) -> type:
    base = _layer_sync(packages)

    def __init__(self: Any, process_group: Any | None = None) -> None:
        self.process_group = process_group

    def apply(self: Any, model: nn.Module) -> nn.Module:
        """Every ``torch.nn.BatchNorm1d/2d/3d`` (and ``torch.nn.SyncBatchNorm``) -> syncbn."""
        return convert_sync_batchnorm(model, self.process_group)

    def revert(self: Any, model: nn.Module) -> nn.Module:
        """syncbn layers -> ``torch.nn.BatchNorm1d/2d/3d`` (the generic one -> ``BatchNormNd``)."""
        return revert_sync_batchnorm(model)

    def __repr__(self: Any) -> str:
        return f"{name}(process_group={self.process_group!r})"

    doc = (f"Lightning ``LayerSync`` plugin (base: ``{base.__module__}.{base.__qualname__}``) "
           "that synchronizes BatchNorm layers with syncbn; see :mod:`syncbn.lightning`.")
    return type(name, (base,), {
        "__init__": __init__, "apply": apply, "revert": revert, "__repr__": __repr__,
        "__doc__": doc, "__module__": __name__,
    })


_BASES = {
    "SyncBatchNormPlugin": ("lightning.pytorch", "pytorch_lightning"),
    "PLSyncBatchNormPlugin": ("pytorch_lightning",),
}


def __getattr__(name: str) -> Any:
    """Create the plugin classes on first access (PEP 562), importing Lightning only then."""
    if name not in _BASES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    if name not in _CACHE:
        _CACHE[name] = _make(name, _BASES[name])
    return _CACHE[name]


def __dir__() -> list[str]:
    return sorted([*globals(), *_BASES])
