"""The only module that talks to ``torch.distributed``.

Distributed invariants enforced here and by the callers:

* every rank of the group calls :func:`all_reduce_sum` the same number of times, in the same
  order, even with an empty shard (an empty shard contributes zeros);
* counts differ across ranks, so they travel inside the buffer with the sums;
* the reduced buffer is bitwise identical on every rank (the backends compute each element once
  and broadcast it), so everything derived from it (running statistics) is identical too.
"""

from __future__ import annotations

from typing import Any

import torch.distributed as dist
from torch import Tensor

__all__ = ["all_reduce_sum", "backend_name", "describe_group", "group_size"]


def group_size(process_group: Any | None = None) -> int:
    """Number of ranks syncbn would synchronize over; 1 when ``torch.distributed`` is not in use."""
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(process_group)


def describe_group(process_group: Any | None = None) -> str:
    """``"rank r of W"`` for error messages (global rank when the group is a subgroup)."""
    if not (dist.is_available() and dist.is_initialized()):
        return "no process group"
    return f"rank {dist.get_rank()} (rank {dist.get_rank(process_group)} of {group_size(process_group)} in its group)"


def all_reduce_sum(buffer: Tensor, process_group: Any | None = None) -> Tensor:
    """Sum ``buffer`` over the group in place and return it: the one collective of a pass.

    Synchronous from the host's view on CPU backends; on NCCL it is queued on the communication
    stream and the current stream waits for it, so no device-to-host synchronization happens.
    """
    dist.all_reduce(buffer, op=dist.ReduceOp.SUM, group=process_group)
    return buffer


def backend_name(process_group: Any | None = None) -> str:
    """Backend of the group (``"gloo"``, ``"nccl"``, ...), or ``"none"``."""
    if not (dist.is_available() and dist.is_initialized()):
        return "none"
    return str(dist.get_backend(process_group))
