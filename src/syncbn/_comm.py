"""The only module that talks to ``torch.distributed``: pack -> one all_reduce -> check -> unpack.

Distributed invariants enforced here and by the callers:

* every rank of the group calls :func:`synced_sum` the same number of times, in the same order,
  even with an empty shard (an empty shard contributes zeros);
* counts differ across ranks, so they travel inside the buffer with the sums;
* the reduced buffer is bitwise identical on every rank (the backends compute each element once
  and broadcast it; the shared-memory transport adds the ranks' buffers in rank order on every
  rank), so everything derived from it (running statistics, checks) is too;
* every syncbn buffer in a process has the same length and dtype (payload padded to the widest
  syncbn layer, float64), because buffers of different lengths must never meet in one
  all_reduce: gloo then returns half-reduced data on one rank or aborts the process (seen here);
  for NCCL the behaviour is undefined (not tested: it needs two GPUs).

Transport: a CPU group whose ranks are all on this machine sums the buffers in shared memory
(``_local.py``, ``csrc/local.h``; ``SYNCBN_SHM=off`` turns it off), every other group through the
backend's ``all_reduce`` (polled on CPU, ``SYNCBN_POLL_US``). Same buffer, same checks, same
error messages; waits bounded by the group's timeout either way.

Mismatch detection rides in the same buffer, at no extra round trip. Each rank appends small
integer fields ``f`` (a ones-counter, the layer's key, its pass number, its channel count, the
direction) together with ``f**2``; after the sum, ``sum(f) == W*f`` and ``sum(f**2) == W*f**2``
hold on a rank exactly when every rank sent the same ``f`` (zero spread). The fields are below
2**20 and W <= 8192, so the float64 sums are exact. Sentinel ones at both ends of the buffer
catch a partly reduced buffer. On CUDA the check runs on the host as soon as the (non-blocking)
copy of the header has landed, at the next pass, so the forward never waits for the device: the
error comes one pass late there.
"""

from __future__ import annotations

import logging
import os
import socket
import time
import weakref
import zlib
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from . import _local, _settings

__all__ = [
    "BACKWARD",
    "FORWARD",
    "LayerTag",
    "all_reduce_buffer",
    "backend_name",
    "buffer_length",
    "check_pending",
    "collective_seconds",
    "compiling",
    "debug_level",
    "describe_group",
    "group_size",
    "header_fields",
    "poll_microseconds",
    "register_layer",
    "shm_mode",
    "synced_sum",
    "transport",
    "verify_buffer",
]

log = logging.getLogger("syncbn")

FORWARD, BACKWARD = 1, 2
_DIRECTIONS = {FORWARD: "forward", BACKWARD: "backward"}
_FIELD_LIMIT = 2**20  # fields are integers below this: f**2 * W stays exact in float64
# The layer key is 32 bits, sent as two 16-bit fields: two layers collide with odds of 2**-32.
_FIELDS = ("ones", "layer", "layer-high", "pass", "channels", "direction")
_MIN_WIDTH = 64  # channels every buffer is padded to at least
_widest = _MIN_WIDTH
_keys: dict[int, str] = {}  # layer key -> description, to name the layer another rank was at
_pending: list[tuple[Any, Tensor, list[int], LayerTag, int, int, Any]] = []
_waited = [0.0]  # seconds this process spent inside syncbn's all_reduce calls


def collective_seconds() -> float:
    """Seconds this process has spent inside syncbn's collectives so far (host wall time of the
    ``all_reduce`` calls: the wait for the other ranks and the transfer; on GPU, the launch)."""
    return _waited[0]


def debug_level() -> int:
    """``SYNCBN_DEBUG``: 0 off, 1 extra checks (one more collective per pass), 2 also log each sync."""
    try:
        return int(_settings.get("SYNCBN_DEBUG", "0"))
    except ValueError:
        return 1


@dataclass
class LayerTag:
    """Who is synchronizing: a key identical on every rank for the same layer, and pass counters."""

    key: int
    description: str
    forward: int = 0
    backward: int = 0

    @staticmethod
    def for_layer(name: str | None, index: int, description: str) -> LayerTag:
        """Key from the qualified name when known (robust to extra layers built on one rank),
        else from the creation index (identical when every rank builds the same model)."""
        key = (zlib.crc32(name.encode()) if name else index) % 2**32 or 1
        _keys.setdefault(key, description)
        return LayerTag(key, description)

    def passes(self, direction: int) -> int:
        """The pass counter of ``direction`` (FORWARD or BACKWARD)."""
        return self.forward if direction == FORWARD else self.backward


def register_layer(channels: int) -> None:
    """Record a syncbn layer's channel count: buffers are padded to the widest one."""
    global _widest
    _widest = max(_widest, channels)


def buffer_length(channels: int) -> int:
    """Numbers (float64) in the all_reduce a layer of ``channels`` sends per pass."""
    return 2 * max(_widest, channels) + 1 + 2 * len(_FIELDS) + 2


def _describe_key(key: int) -> str:
    """The layer (of this process) another rank's key names; keys register as tags are made."""
    return _keys.get(key, f"an unknown layer (key {key})")


_ProcessGroup = getattr(dist, "ProcessGroup", ())  # () when torch.distributed is not built


def group_size(process_group: Any | None = None) -> int:
    """Number of ranks syncbn would synchronize over; 1 when ``torch.distributed`` is not in use."""
    if process_group is None and _ProcessGroup:
        process_group = dist.GroupMember.WORLD  # the default group; None before init
        if process_group is None:
            return 1
    if isinstance(process_group, _ProcessGroup):  # asked on every pass: the direct question
        return process_group.size()  # type: ignore[no-any-return]
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(process_group)


def describe_group(process_group: Any | None = None) -> str:
    """``"rank r (rank i of W in its group)"`` for error messages."""
    if not (dist.is_available() and dist.is_initialized()):
        return "no process group"
    return (f"rank {dist.get_rank()} (rank {dist.get_rank(process_group)} of "
            f"{group_size(process_group)} in its group)")


def backend_name(process_group: Any | None = None) -> str:
    """Backend of the group (``"gloo"``, ``"nccl"``, ...), or ``"none"``."""
    if not (dist.is_available() and dist.is_initialized()):
        return "none"
    return str(dist.get_backend(process_group))


_CAUSES = (
    "Likely causes: a rank skipped this layer or ran layers in another order (a conditional "
    "branch, an unused head, a frozen part in eval mode on one rank), the ranks ran different "
    "numbers of steps (uneven data), or the models differ. Every rank must call every "
    "synchronized layer in training mode the same number of times, in the same order (with an "
    "empty batch if it has no data). See docs/troubleshooting.md."
)


def header_fields(tag: LayerTag, direction: int, channels: int) -> list[int]:
    """The integer fields of a pass's header: ones, layer key (low, high), pass, channels, direction."""
    count = tag.passes(direction)
    return [1, tag.key & 0xFFFF, tag.key >> 16, count % _FIELD_LIMIT, channels % _FIELD_LIMIT,
            direction]


def synced_sum(payload: Tensor, tag: LayerTag, direction: int, channels: int,
               process_group: Any | None = None, shape: tuple[int, ...] = ()) -> Tensor:
    """Sum the float64 ``payload`` over the group in ONE all_reduce and return the summed payload.

    The buffer is ``[1 | payload, zero-padded to 2*width + 1 | (f, f**2) per field | 1]``, the same
    length on every rank and for every syncbn layer of the process. ``shape`` (the input's) is
    only reported, in debug mode.
    """
    fields = header_fields(tag, direction, channels)
    length = 2 * max(_widest, channels) + 1
    head = torch.tensor([v for f in fields for v in (f, f * f)], dtype=torch.float64)
    if payload.device.type == "cuda":  # an asynchronous copy: the host does not wait
        head = head.pin_memory().to(payload.device, non_blocking=True)
    elif payload.device.type != "cpu":
        head = head.to(payload.device)
    one = payload.new_ones(1)
    buffer = torch.cat([one, payload, payload.new_zeros(length - payload.numel()), head, one])
    # 1, payload + padding, 2 * fields, 1 -> (2 * width + 2 * len(fields) + 3)
    all_reduce_buffer(buffer, payload.numel(), tag, direction, channels, process_group, shape)
    if compiling():
        pass  # no host read inside a compiled graph: compiled code does not check the header
    elif buffer.device.type != "cuda":
        verify_buffer(buffer, fields, tag, direction, process_group)
    else:
        checks = _header_of(buffer)
        host = torch.empty(checks.shape, dtype=checks.dtype, pin_memory=True)
        host.copy_(checks, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        count = tag.passes(direction)
        _pending.append((event, host, fields, tag, direction, count, process_group))
    return buffer[1:1 + payload.numel()]


def all_reduce_buffer(buffer: Tensor, payload_size: int, tag: LayerTag, direction: int,
                      channels: int, process_group: Any | None = None,
                      shape: tuple[int, ...] = ()) -> int:
    """The one all_reduce (sum, in place) of a packed buffer of :func:`buffer_length` numbers
    whose payload is ``buffer[1:1 + payload_size]``; errors are rewrapped naming the layer.
    Returns the group's size (the header check needs it)."""
    traced = compiling()
    if not traced:
        check_pending()
    world = group_size(process_group)
    if world == 1:
        return world  # a group of one rank: the sum is the buffer itself, nothing to wait for
    count = tag.passes(direction)
    debug = debug_level()
    if debug:
        _debug_gather(buffer[1:1 + payload_size], tag, direction, channels, count,
                      process_group, shape)
    start = time.perf_counter()
    try:
        local = None if traced else _local_group(process_group, buffer)
        if local is not None:
            local.all_reduce(buffer, spin_us=poll_microseconds())
        elif traced:  # the backend's all_reduce, the way torch.compile knows it
            dist.all_reduce(buffer, op=dist.ReduceOp.SUM, group=process_group)
        else:
            work = dist.all_reduce(buffer, op=dist.ReduceOp.SUM, group=process_group,
                                   async_op=True)
            if buffer.device.type == "cpu":
                _poll(work, start)
            work.wait()
    except RuntimeError as e:  # a timeout, a peer that exited, a backend error
        raise RuntimeError(
            f"syncbn: {tag.description} failed in the all_reduce of its {_DIRECTIONS[direction]} "
            f"pass #{count} on {describe_group(process_group)}: {e}\nIf it timed out, another rank "
            "never reached this layer. " + _CAUSES + " The wait is bounded by the process group's "
            "timeout: init_process_group(..., timeout=datetime.timedelta(seconds=...))."
        ) from e
    finally:
        _waited[0] += time.perf_counter() - start
    if debug >= 2:
        log.info("syncbn: %s %s pass #%d synced over %d ranks (%d numbers)",
                 tag.description, _DIRECTIONS[direction], count, world, buffer.numel())
    return world


# ------------------------------------------------------------------ same-machine transport
# The ranks of a CPU group that all run on this machine sum syncbn's buffers in shared memory
# (csrc/local.h) instead of through the backend: one memcpy and one sum of a few KB, no thread
# hand-offs. Set up once per group, at the group's first syncbn collective (which every rank
# reaches at the same point: the invariant above), with three small collectives of the group.
_local_groups: weakref.WeakKeyDictionary[Any, _local.LocalGroup | None] = (
    weakref.WeakKeyDictionary())  # per process group, gone with it
SHM_MODES = ("auto", "off")


def shm_mode() -> str:
    """``SYNCBN_SHM``: ``auto`` (default: shared memory for a CPU group whose ranks are all on
    one machine) or ``off`` (always the process group's all_reduce). Must be the same on every
    rank of a group."""
    value = _settings.get("SYNCBN_SHM", "auto")
    if value not in SHM_MODES:
        raise ValueError(f"SYNCBN_SHM: expected one of {SHM_MODES}, got {value!r}")
    return value


def transport(process_group: Any | None = None) -> str:
    """How syncbn's CPU collectives on this group travel: ``"shm"`` (shared memory) once set
    up, else the backend's name (before the group's first syncbn collective: the backend's)."""
    if not (dist.is_available() and dist.is_initialized()):
        return "none"
    pg = process_group if process_group is not None else dist.GroupMember.WORLD
    if _local_groups.get(pg) is not None:
        return "shm"
    return backend_name(process_group)


def _local_group(process_group: Any | None, buffer: Tensor) -> _local.LocalGroup | None:
    """The group's shared-memory segment, set up on first use; None: use the backend."""
    if buffer.device.type != "cpu" or shm_mode() == "off":
        return None
    pg = process_group if process_group is not None else dist.GroupMember.WORLD
    if pg in _local_groups:
        group = _local_groups[pg]
        if group is None or buffer.numel() <= group.slot_len:
            return group
        group.close()  # a wider layer than at set-up (every rank reaches this pass alike)
    group = _local_groups[pg] = _setup_local(pg, buffer.numel())
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


def _setup_local(pg: Any, length: int) -> _local.LocalGroup | None:
    """Three small collectives of the group: who is where (and can), the segment's name, and
    whether every rank mapped it. Every rank returns a segment, or every rank returns None."""
    world, rank = pg.size(), pg.rank()
    able = _local.available()
    infos: list[Any] = [None] * world
    me = (socket.gethostname(), _boot_id(), able, length, _pid_namespace())
    dist.all_gather_object(infos, me, group=pg)
    if not all(i[2] for i in infos) or len({i[:2] for i in infos}) != 1:
        log.info("syncbn: %s: the backend's all_reduce (ranks on %d machines, kernel on %d of %d)",
                 describe_group(pg), len({i[:2] for i in infos}), sum(i[2] for i in infos), world)
        return None
    slot_len = max(i[3] for i in infos)
    timeout = _group_timeout(pg)
    # A peer's exit is seen from its pid, which means something only in a shared pid namespace
    # (containers may share /dev/shm but not pids): elsewhere only the timeout bounds a wait.
    pid = os.getpid() if len({i[4] for i in infos}) == 1 else 0
    group, path = None, None
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
    if rank == 0 and group is not None:
        group.unlink()  # every rank has mapped it (or failed to): the name is not needed
    if not all(oks):
        if group is not None:
            group.close()
        return None
    log.info("syncbn: %s: shared-memory all_reduce (%d ranks on this machine)",
             describe_group(pg), world)
    return group


_POLL_DEFAULT_US = 2000
_yield = getattr(os, "sched_yield", None) or (lambda: time.sleep(0))


def poll_microseconds() -> float:
    """``SYNCBN_POLL_US``: how long (microseconds) a CPU collective is waited for by polling
    before blocking; 0 blocks at once. Default 2000."""
    raw = _settings.get("SYNCBN_POLL_US", "")
    if not raw:
        return _POLL_DEFAULT_US
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value >= 0:
        raise ValueError(f"SYNCBN_POLL_US: expected a number of microseconds >= 0, got {raw!r}")
    return value


def _poll(work: Any, start: float) -> None:
    """Wait for a CPU collective by polling it (yielding the core between polls) for up to
    :func:`poll_microseconds`, then let the caller block in ``work.wait()``.

    A blocked rank's core can go idle while the peers' data is on its way, and waking an idle
    core (a virtual CPU above all) costs far more than the small all_reduce itself (measured in
    benchmarks/RESULTS.md, "The collective alone"). Yielding lets the process group's own threads, which do the transfer,
    run on the same core. A failed or timed-out collective completes too, and ``wait()`` then
    raises its error."""
    budget = poll_microseconds() * 1e-6
    if budget <= 0:
        return
    deadline = start + budget
    while not work.is_completed():
        if time.perf_counter() > deadline:
            return
        _yield()


def verify_buffer(buffer: Tensor, fields: list[int], tag: LayerTag, direction: int,
                  process_group: Any | None = None) -> None:
    """Raise the out-of-step error if the reduced (host) buffer's header shows that the ranks
    were not all at the same layer, pass and direction."""
    count = tag.passes(direction)
    _verify(_header_of(buffer), fields, group_size(process_group), tag, direction, count, process_group)


def _header_of(buffer: Tensor) -> Tensor:
    """``[first sentinel, (f, f**2) per field..., last sentinel]`` of a (reduced) buffer."""
    return torch.cat([buffer[:1], buffer[-2 * len(_FIELDS) - 1:]])


def compiling() -> bool:
    """True while torch.compile traces: no host reads or autograd-engine queries then."""
    is_compiling = getattr(getattr(torch, "compiler", None), "is_compiling", None)
    return bool(is_compiling and is_compiling())


def check_pending(wait: bool = False) -> None:
    """Verify the headers of earlier CUDA passes whose copy to the host has landed (all of them
    with ``wait=True``); raise the mismatch error if any pass met another layer."""
    while _pending and (wait or _pending[0][0].query()):
        event, host, fields, tag, direction, count, group = _pending.pop(0)
        event.synchronize()
        _verify(host, fields, group_size(group), tag, direction, count, group)


def _verify(checks: Tensor, fields: list[int], world: int, tag: LayerTag, direction: int,
            count: int, process_group: Any | None) -> None:
    values = checks.tolist()
    first, last, pairs = values[0], values[-1], values[1:-1]
    problems = []
    if first != world or last != world:
        problems.append(
            f"the buffer came back partly unreduced (sentinels {first:g} and {last:g}, expected "
            f"{world}): the ranks' buffers differ in length, i.e. this rank met a different "
            "collective (not a syncbn layer of this process's kind)")
    differ = {name: pairs[2 * i] for i, (name, own) in enumerate(zip(_FIELDS, fields))
              if not (pairs[2 * i] == world * own and pairs[2 * i + 1] == world * own * own)}
    if "layer" in differ or "layer-high" in differ:
        if world == 2:  # the other rank's key, from the sums
            lo, hi = (int(differ.get(n, 2 * own)) - own for n, own in zip(_FIELDS[1:3], fields[1:3]))
            problems.append(f"the other rank was at {_describe_key(lo + (hi << 16))}")
        else:
            problems.append("the ranks are at different layers")
    for name, own in zip(_FIELDS, fields):
        if name not in differ or name in ("layer", "layer-high"):
            continue
        total = differ[name]
        if world == 2:
            other = total - own
            if name == "direction":
                problems.append(f"the other rank was in a {_DIRECTIONS.get(int(other), '?')} pass")
            else:
                problems.append(f"{name}: this rank {own}, the other rank {other:g}")
        else:
            problems.append(f"{name}: this rank {own}, the mean over ranks {total / world:g}")
    if problems:
        raise RuntimeError(
            f"syncbn: ranks are out of step at {tag.description}, {_DIRECTIONS[direction]} pass "
            f"#{count} on {describe_group(process_group)}: " + "; ".join(problems) + ". " + _CAUSES
            + " Run with SYNCBN_DEBUG=1 to see every rank's view."
        )


_MAX_DIMS = 8  # input dims reported in debug mode


def _debug_gather(payload: Tensor, tag: LayerTag, direction: int, channels: int, count: int,
                  process_group: Any | None, shape: tuple[int, ...]) -> None:
    """Debug mode: every rank's view (fixed size, so safe to gather), compared before the sum."""
    finite = bool(torch.isfinite(payload).all())
    dims = list(shape[:_MAX_DIMS]) + [-1] * (_MAX_DIMS - len(shape[:_MAX_DIMS]))
    view = torch.tensor([tag.key, count, channels, direction, float(finite), *dims],
                        dtype=torch.float64)
    view = view.to(payload.device)
    world = group_size(process_group)
    views = [torch.empty_like(view) for _ in range(world)]
    dist.all_gather(views, view, group=process_group)
    rows = [v.tolist() for v in views]
    ranks = (dist.get_process_group_ranks(process_group) if process_group is not None
             else list(range(world)))
    same = all(r[:4] == rows[0][:4] for r in rows)
    bad = [ranks[i] for i, r in enumerate(rows) if not r[4]]
    if same and not bad:
        return
    table = "\n".join(
        f"  rank {ranks[i]}: {_describe_key(int(r[0]))}, "
        f"{_DIRECTIONS.get(int(r[3]), '?')} pass #{int(r[1])}, {int(r[2])} channels, "
        f"input {tuple(int(d) for d in r[5:] if d >= 0)}, "
        f"local statistics {'finite' if r[4] else 'NOT FINITE'}"
        for i, r in enumerate(rows)
    )
    if not same:
        raise RuntimeError(f"syncbn (SYNCBN_DEBUG): ranks are out of step at {tag.description}:\n"
                           f"{table}\n{_CAUSES}")
    raise RuntimeError(f"syncbn (SYNCBN_DEBUG): non-finite values in the local statistics of "
                       f"{tag.description} on rank(s) {bad}:\n{table}")
