"""The same-machine transport: the ranks of a CPU group that all run on this machine sum syncbn's
buffers in a shared-memory segment (``_native/csrc/local.h``) instead of through the backend: one
memcpy and one sum of a few KB, no thread hand-offs.

A group's segment is set up at the group's first syncbn collective (which every rank reaches at
the same point; ``syncbn._comm`` calls :func:`setup`), with three small collectives of the group:
who is where, the segment's name, and whether every rank mapped it. Every rank of a CPU group
takes part, so that all ranks use the segment or none does. ``SYNCBN_SHM=off`` turns it off (it
must be the same on every rank: ``syncbn._comm`` checks that first).

Who can touch a segment: it is a file ``syncbn-<pid>-<random>`` in ``/dev/shm`` (or the temp
dir), created 0600 with ``O_EXCL`` (never an existing file), and the other ranks map it only if
it is a regular file of their own user with mode 0600 (opened with ``O_NOFOLLOW`` and checked on
the descriptor). Another local user can therefore neither read, write nor substitute it; they can
see its name during set-up, and fill ``/dev/shm`` so that a group falls back to the backend.
Segments whose creator died before removing the name are swept by :func:`sweep_stale`.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import mmap
import os
import re
import socket
import stat
import tempfile
import time
import uuid
from typing import Any

import torch
import torch.distributed as dist

from ._native import cache as _cache
from ._native import kernel as _kernel

__all__ = ["LocalError", "LocalGroup", "available", "directory", "group_timeout", "new_path",
           "segment_bytes", "setup", "sweep_stale"]

log = logging.getLogger("syncbn")

_CONTROL = 64  # bytes of one rank's control line (seq, pid, len[2], sleepers)


class LocalError(RuntimeError):
    """The shared-memory all_reduce failed: a rank timed out, exited, or sent another length."""


def available() -> bool:
    """Whether this process can take part (the kernel that holds the all_reduce is loaded)."""
    return _kernel.local_allreduce() is not None


def segment_bytes(world: int, slot_len: int) -> int:
    """Size of the segment: W control lines, then two slots of ``slot_len`` float64 per rank."""
    return world * _CONTROL + world * 2 * slot_len * 8


def directory() -> str:
    """Where segments are made: ``/dev/shm`` (memory) when there is one, else the temp dir."""
    return "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()


def new_path() -> str:
    """A fresh, unguessable segment name (made by the group's first rank); first sweeps the
    segments of creators that died (:func:`sweep_stale`)."""
    with contextlib.suppress(OSError):
        sweep_stale()
    return os.path.join(directory(), f"syncbn-{os.getpid()}-{uuid.uuid4().hex}")


_SEGMENT_NAME = re.compile(r"syncbn-(\d+)-[0-9a-f]{32}")


def sweep_stale(where: str | None = None, min_age_s: float = 60.0) -> list[str]:
    """Remove the segments (``syncbn-<pid>-<hex>`` in :func:`directory`, or ``where``) of this
    user whose creator's pid is gone and which are older than ``min_age_s`` (a creator in another
    pid namespace may look gone: the age spares a set-up in progress there). Returns them."""
    uid = os.getuid() if hasattr(os, "getuid") else -1
    removed = []
    for entry in os.scandir(where or directory()):
        m = _SEGMENT_NAME.fullmatch(entry.name)
        if m is None:
            continue
        try:
            st = entry.stat(follow_symlinks=False)
            if (not stat.S_ISREG(st.st_mode) or st.st_uid != uid
                    or time.time() - st.st_mtime < min_age_s or _cache.pid_alive(int(m[1]))):
                continue
            os.unlink(entry.path)
        except OSError:
            continue
        removed.append(entry.path)
    return removed


def _check_segment(fd: int, path: str) -> None:
    """A segment made by another rank must be a regular file of this user, mode 0600."""
    st, uid = os.fstat(fd), os.getuid() if hasattr(os, "getuid") else -1
    problem = None
    if not stat.S_ISREG(st.st_mode):
        problem = "it is not a regular file"
    elif uid >= 0 and st.st_uid != uid:
        problem = (f"it is owned by {_cache.describe_owner(st.st_uid)}, not by "
                   f"{_cache.describe_owner(uid)}")
    elif stat.S_IMODE(st.st_mode) != 0o600:
        problem = f"its mode is {stat.S_IMODE(st.st_mode):o}, not 600"
    if problem:
        raise OSError(f"{path}: not mapped, {problem} (syncbn makes segments 0600 as the "
                      "ranks' own user; another user may have planted this file)")


class LocalGroup:
    """One group's mapped segment; this rank's pass counter; the kernel's all_reduce on it.

    The group's first rank creates the file (``create=True``), every rank maps it and writes its
    pid (0 where pids are not comparable: then only the timeout ends a wait for a rank that has
    exited), and the first rank unlinks it once all have mapped it (:meth:`unlink`): the memory
    lives as long as a mapping does, and nothing is left behind when a process dies.
    """

    def __init__(self, path: str, world: int, rank: int, slot_len: int, timeout_s: float,
                 pid: int, create: bool) -> None:
        self.path, self.world, self.rank, self.slot_len = path, world, rank, slot_len
        self.timeout_ns = int(timeout_s * 1e9)
        self.seq = 0
        self.broken: str | None = None
        fn = _kernel.local_allreduce()
        if fn is None:
            raise OSError("the syncbn kernel (which holds the shared-memory all_reduce) is not loaded")
        self._fn: Any = fn
        size = segment_bytes(world, slot_len)
        flags = os.O_RDWR | _NOFOLLOW | (os.O_CREAT | os.O_EXCL if create else 0)
        self._map: mmap.mmap | None = None
        self.created = create
        fd = os.open(path, flags, 0o600)
        try:
            if create:
                os.fchmod(fd, 0o600)  # exactly, whatever the umask
                os.ftruncate(fd, size)
                if hasattr(os, "posix_fallocate"):  # reserve it now: a full /dev/shm is an
                    os.posix_fallocate(fd, 0, size)  # OSError here, not a SIGBUS on a write
            else:
                _check_segment(fd, path)
            if not create and os.fstat(fd).st_size != size:
                raise OSError(f"{path}: {os.fstat(fd).st_size} bytes, expected {size}")
            mapped = mmap.mmap(fd, size)
        except OSError:
            if create:  # made here, not usable: leave nothing behind
                self.unlink()
            raise
        finally:
            os.close(fd)
        self._map = mapped
        self._anchor = ctypes.c_char.from_buffer(mapped)  # keeps the mapping's address
        self.base = ctypes.addressof(self._anchor)
        self._detail = (ctypes.c_int64 * 2)()
        pid_at = rank * _CONTROL + 8
        mapped[pid_at:pid_at + 8] = pid.to_bytes(8, "little", signed=True)  # 0: not known

    def unlink(self) -> None:
        """Remove the file's name (the first rank, once every rank has mapped it, or on any
        failure of the set-up). Idempotent; a no-op on a rank that did not create the file."""
        if not self.created:
            return
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass

    def all_reduce(self, buffer: torch.Tensor, spin_us: float = 2000.0) -> None:
        """Sum the contiguous CPU float64 ``buffer`` over the group, in place.

        Raises :class:`LocalError` when a rank does not arrive within the timeout, has exited,
        or sent a buffer of another length; the segment is unusable after that."""
        if self.broken:
            raise LocalError(f"the group's shared-memory all_reduce failed earlier ({self.broken})")
        self.seq += 1
        timeout_ns = self.timeout_ns
        start, resume, code = time.monotonic_ns(), 0, _AGAIN
        try:
            # The kernel returns every 100 ms of waiting, so that signals (Ctrl-C) get handled
            # here; it then resumes the same wait (its buffer is already published).
            while code == _AGAIN:
                left = max(timeout_ns - (time.monotonic_ns() - start), 0)
                code = self._fn(_LOCAL_ARGS.pack(
                    self.base, self.world, self.rank, self.seq, buffer.data_ptr(),
                    buffer.numel(), self.slot_len, left, 0 if resume else int(spin_us * 1e3),
                    ctypes.addressof(self._detail), resume))
                resume = 1
        except BaseException:  # interrupted mid-wait: this rank is a pass ahead of the others
            self.broken = "interrupted while waiting"
            raise
        if code == _OK:
            return
        who = int(self._detail[0])
        if code == _TIMEOUT:
            why = (f"timed out after {timeout_ns / 1e9:g} s waiting for rank {who} of the group "
                   f"(shared-memory all_reduce, pass {self.seq} of this group)")
        elif code == _EXITED:
            why = (f"rank {who} of the group exited while this rank waited for it "
                   f"(shared-memory all_reduce, pass {self.seq} of this group)")
        elif code == _LENGTH:
            why = (f"rank {who} of the group sent {int(self._detail[1])} numbers, this rank "
                   f"{buffer.numel()}: the ranks met different collectives")
        else:
            why = (f"{buffer.numel()} numbers do not fit the group's shared-memory slots of "
                   f"{self.slot_len}")
        self.broken = why
        raise LocalError(why)

    def close(self) -> None:
        """Unmap the segment (idempotent); the group is unusable afterwards."""
        if self._map is None:
            return
        self.broken = self.broken or "closed"
        del self._anchor
        self._map.close()
        self._map = None


_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
_LOCAL_ARGS = _kernel.ARG_FORMATS["local_allreduce"]
# The wait's result codes, as local.h names them (LOCAL_OK ...; LOCAL_TOO_LONG = 4 is the rest).
_OK, _TIMEOUT, _EXITED, _LENGTH, _AGAIN = 0, 1, 2, 3, 5


# ---------------------------------------------------------------------------------- set-up
def group_timeout(pg: Any) -> float:
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


def setup(pg: Any, length: int, where: str) -> LocalGroup | None:
    """The group's segment for buffers of up to ``length`` numbers: every rank returns one, or
    every rank returns None (or raises the same error). ``SYNCBN_SHM`` is the same on every
    rank (checked before), and so is ``length``. ``where`` names this rank for the log."""
    world, rank = pg.size(), pg.rank()
    able = _kernel.local_allreduce() is not None
    infos: list[Any] = [None] * world
    me = (socket.gethostname(), _boot_id(), able, length, _pid_namespace())
    dist.all_gather_object(infos, me, group=pg)
    machines = len({i[:2] for i in infos})
    if not all(i[2] for i in infos) or machines != 1:
        log.info("syncbn: %s: the backend's all_reduce (ranks on %d machines, kernel on %d of %d)",
                 where, machines, sum(i[2] for i in infos), world)
        return None
    slot_len = max(i[3] for i in infos)
    timeout = group_timeout(pg)
    # A peer's exit is seen from its pid, which means something only in a shared pid namespace
    # (containers may share /dev/shm but not pids): elsewhere only the timeout bounds a wait.
    pid = os.getpid() if len({i[4] for i in infos}) == 1 else 0
    group, path = None, None
    try:
        if rank == 0:
            path = new_path()
            try:
                group = LocalGroup(path, world, rank, slot_len, timeout, pid, create=True)
            except OSError as e:
                log.info("syncbn: cannot make %s: %s", path, e)
                path = None
        paths: list[Any] = [None] * world
        dist.all_gather_object(paths, path, group=pg)
        if rank != 0 and paths[0] is not None:
            try:
                group = LocalGroup(paths[0], world, rank, slot_len, timeout, pid,
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
