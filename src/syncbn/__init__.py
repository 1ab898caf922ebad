"""syncbn: exact synchronized BatchNorm for PyTorch on any torch.distributed backend.

>>> import torch, syncbn
>>> net = syncbn.convert_sync_batchnorm(torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4)))
>>> type(net[1]).__name__
'SyncBatchNorm2d'
"""

from . import functional, parallel
from ._wire import NonFiniteError, OutOfStepError, SyncBatchNormError
from .batchnorm import (
    BatchNormAct,
    BatchNormNd,
    SyncBatchNorm,
    SyncBatchNorm1d,
    SyncBatchNorm2d,
    SyncBatchNorm3d,
)
from .convert import convert_sync_batchnorm, revert_sync_batchnorm
from .parallel import DataParallel

__version__ = "0.1.0"

__all__ = [
    "BatchNormAct",
    "BatchNormNd",
    "DataParallel",
    "NonFiniteError",
    "OutOfStepError",
    "SyncBatchNorm",
    "SyncBatchNorm1d",
    "SyncBatchNorm2d",
    "SyncBatchNorm3d",
    "SyncBatchNormError",
    "__version__",
    "convert_sync_batchnorm",
    "functional",
    "parallel",
    "revert_sync_batchnorm",
]
