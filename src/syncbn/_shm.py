"""Setting up the same-machine transport of a CPU group (the segment itself: ``_local.py``).

The ranks of a CPU group that all run on this machine sum syncbn's buffers in shared memory
(``csrc/local.h``) instead of through the backend: one memcpy and one sum of a few KB, no thread
hand-offs. A group's segment is set up at the group's first syncbn collective (which every rank
reaches at the same point), with three small collectives of the group: who is where (and what
each rank's ``SYNCBN_SHM`` says), the segment's name, and whether every rank mapped it. Every rank
of a CPU group takes part, whatever its own setting, so that ranks whose settings differ get an
error at once instead of meeting different collectives.
"""

from __future__ import annotations

import logging
import os
import socket
import weakref
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from . import _local, _settings

__all__ = ["local_group", "transport"]

log = logging.getLogger("syncbn")

# per process group (gone with it): its segment, or None for the backend's all_reduce
_groups: weakref.WeakKeyDictionary[Any, _local.LocalGroup | None] = weakref.WeakKeyDictionary()


def transport(pg: Any) -> str:
    """``"shm"`` once the group's segment is set up, else the group's backend name."""
    if _groups.get(pg) is not None:
        return "shm"
    return str(dist.get_backend(pg))


def local_group(pg: Any, buffer: Tensor) -> _local.LocalGroup | None:
    """The group's shared-memory segment, set up on first use (and again, wider, for a longer
    buffer: every rank reaches that pass alike); None: use the backend."""
    if buffer.device.type != "cpu":
        return None
    if pg in _groups:
        group = _groups[pg]
        if group is None or buffer.numel() <= group.slot_len:
            return group
        group.close()
    group = _groups[pg] = _setup(pg, buffer.numel())
    return group


def _group_timeout(pg: Any) -> float:
    """The process group's timeout in seconds (the bound on every wait)."""
    try:
        return float(pg._get_backend(torch.device("cpu")).options._timeout.total_seconds())
    except (AttributeError, RuntimeError, TypeError, ValueError):  # not gloo, or another torch
        return float(dist.default_pg_timeout.total_seconds())


def _boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return ""


def _pid_namespace() -> str:
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return ""


def _setup(pg: Any, length: int) -> _local.LocalGroup | None:
    """Every rank returns a segment, or every rank returns None (or raises the same error)."""
    world, rank = pg.size(), pg.rank()
    where = f"rank {dist.get_rank()} (rank {rank} of {world} in its group)"
    mode = _settings.get().shm
    able = mode != "off" and _local.available()
    infos: list[Any] = [None] * world
    me = (socket.gethostname(), _boot_id(), able, length, _pid_namespace(), mode)
    dist.all_gather_object(infos, me, group=pg)
    modes = [i[5] for i in infos]
    if len(set(modes)) != 1:
        raise RuntimeError(
            f"syncbn: {where}: SYNCBN_SHM differs between the ranks of the group "
            f"({', '.join(f'rank {r}: {m}' for r, m in enumerate(modes))}); it must be the same "
            "on every rank (unset it everywhere for the default, 'auto').")
    if mode == "off":
        return None
    machines = len({i[:2] for i in infos})
    if not all(i[2] for i in infos) or machines != 1:
        log.info("syncbn: %s: the backend's all_reduce (ranks on %d machines, kernel on %d of %d)",
                 where, machines, sum(i[2] for i in infos), world)
        return None
    slot_len = max(i[3] for i in infos)
    timeout = _group_timeout(pg)
    # A peer's exit is seen from its pid, which means something only in a shared pid namespace
    # (containers may share /dev/shm but not pids): elsewhere only the timeout bounds a wait.
    pid = os.getpid() if len({i[4] for i in infos}) == 1 else 0
    group, path = None, None
    try:
        if rank == 0:
            path = _local.new_path()
            try:
                group = _local.LocalGroup(path, world, rank, slot_len, timeout, pid, create=True)
            except OSError as e:
                log.info("syncbn: cannot make %s: %s", path, e)
                path = None
        paths: list[Any] = [None] * world
        dist.all_gather_object(paths, path, group=pg)
        if rank != 0 and paths[0] is not None:
            try:
                group = _local.LocalGroup(paths[0], world, rank, slot_len, timeout, pid,
                                         create=False)
            except OSError as e:
                log.info("syncbn: cannot map %s: %s", paths[0], e)
        oks: list[Any] = [None] * world
        dist.all_gather_object(oks, group is not None, group=pg)
    except BaseException:  # a rank died or raised between the collectives: leave nothing behind
        if group is not None:
            group.unlink()
            group.close()
        raise
    if rank == 0 and group is not None:
        group.unlink()  # every rank has mapped it (or failed to): the name is not needed
    if not all(oks):
        if group is not None:
            group.close()
        return None
    log.info("syncbn: %s: shared-memory all_reduce (%d ranks on this machine)", where, world)
    return group
