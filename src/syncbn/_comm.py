"""The collective: one all_reduce of a packed buffer (``_wire.py``) per pass, and the groups it
runs over. With ``_shm.py`` (same-machine set-up), the only code that talks to
``torch.distributed``.

Distributed invariants enforced here and by the callers:

* every rank of the group calls :func:`all_reduce` the same number of times, in the same order,
  even with an empty shard (an empty shard contributes zeros);
* counts differ across ranks, so they travel inside the buffer with the sums;
* the reduced buffer is bitwise identical on every rank (the backends compute each element once
  and broadcast it; the shared-memory transport adds the ranks' buffers in rank order on every
  rank), so everything derived from it (running statistics, checks) is too;
* every syncbn buffer of a group has the same length (:func:`buffer_length`): the group's width
  starts at ``_wire.MIN_WIDTH`` and grows only when a layer wider than it is *called*, through a
  widening message of the old length that every rank in step sends at the same pass. Layers that
  are built but never called change nothing, and ranks out of step still exchange buffers of one
  length, whose headers then disagree.

Transport: a CPU group whose ranks are all on this machine sums the buffers in shared memory
(``_shm.py``; ``SYNCBN_SHM=off`` turns it off), every other group through the backend's
``all_reduce`` (polled on CPU, ``SYNCBN_POLL_US``). Same buffer, same checks, same error
messages; waits bounded by the group's timeout either way. On CUDA the header check runs on the
host as soon as the (non-blocking) copy of the header has landed, at the next pass, so the
forward never waits for the device: the error comes one pass late there.
"""

from __future__ import annotations

import collections
import logging
import os
import time
import weakref
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from . import _settings, _shm, _wire

__all__ = [
    "all_reduce", "buffer_length", "capturing", "check_pending",
    "collective_seconds",
    "compiling", "defer_check", "describe_group", "group_size", "resolve", "transport",
    "verify",
]

log = logging.getLogger("syncbn")

_ProcessGroup = getattr(dist, "ProcessGroup", ())  # () when torch.distributed is not built
_widths: weakref.WeakKeyDictionary[Any, int] = weakref.WeakKeyDictionary()  # per group


class _NoGroup:
    """The key of the width of passes without a process group (one rank)."""


_NO_GROUP = _NoGroup()
_yield = getattr(os, "sched_yield", None) or (lambda: time.sleep(0))
_pending: collections.deque[tuple[Any, Tensor, list[int], _wire.LayerTag, int, int, Any]] = (
    collections.deque())
_waited = [0.0]  # seconds this process spent inside syncbn's all_reduce calls


def collective_seconds() -> float:
    """Seconds this process has spent inside syncbn's collectives so far (host wall time of the
    ``all_reduce`` calls: the wait for the other ranks and the transfer; on GPU, the launch)."""
    return _waited[0]


def capturing(t: Tensor) -> bool:
    """True while a CUDA graph is captured on ``t``'s device (no host reads, no event queries:
    the replays run without the host)."""
    return t.is_cuda and torch.cuda.is_current_stream_capturing()


def compiling() -> bool:
    """True while torch.compile traces."""
    return torch.compiler.is_compiling()


def resolve(process_group: Any | None) -> Any | None:
    """The process group a pass synchronizes over (``None`` means the world), or ``None`` when
    ``torch.distributed`` is not initialized."""
    if process_group is not None:
        return process_group
    return dist.GroupMember.WORLD if _ProcessGroup else None  # None before init


def group_size(process_group: Any | None = None) -> int:
    """Number of ranks syncbn would synchronize over; 1 when ``torch.distributed`` is not in use."""
    pg = resolve(process_group)
    if pg is None:
        return 1
    if isinstance(pg, _ProcessGroup):  # asked on every pass: the direct question
        return pg.size()  # type: ignore[no-any-return]
    return dist.get_world_size(pg)


def describe_group(process_group: Any | None = None) -> str:
    """``"rank r (rank i of W in its group)"`` for error messages."""
    if not (dist.is_available() and dist.is_initialized()):
        return "no process group"
    return (f"rank {dist.get_rank()} (rank {dist.get_rank(process_group)} of "
            f"{group_size(process_group)} in its group)")


def transport(process_group: Any | None = None) -> str:
    """How syncbn's CPU collectives on this group travel: ``"shm"`` (shared memory) once set
    up, else the backend's name (before the group's first syncbn collective: the backend's)."""
    pg = resolve(process_group)
    return "none" if pg is None else _shm.transport(pg)


def buffer_length(process_group: Any | None, channels: int, tag: _wire.LayerTag,
                  device: torch.device) -> int:
    """The length of the group's buffers for a layer of ``channels``; when the layer is wider
    than the group's width, the group first widens (one collective of the old length, the same
    on every rank in step; out-of-step ranks get the mismatch error instead)."""
    pg = resolve(process_group)
    key = pg if pg is not None else _NO_GROUP
    width = _widths.get(key, _wire.MIN_WIDTH)
    if channels > width:
        new = _wire.width_for(channels)
        if group_size(pg) > 1:
            fields = _wire.fields(tag, _wire.WIDEN, new)
            buffer = _wire.pack(torch.zeros(0, dtype=torch.float64, device=device), fields,
                                _wire.length(width))
            all_reduce(buffer, pg, tag, _wire.WIDEN, 0)
            verify(buffer, fields, tag, _wire.WIDEN, pg)  # on CUDA a host sync: once per widening
        width = _widths[key] = new
    return _wire.length(width)


def all_reduce(buffer: Tensor, process_group: Any | None, tag: _wire.LayerTag, direction: int,
               payload_size: int, shape: tuple[int, ...] = ()) -> int:
    """THE collective: sum ``buffer`` (a packed float64 buffer of :func:`buffer_length`) over the
    group, in place; errors are rewrapped naming the layer. Returns the group's size (the header
    check needs it). ``payload_size`` and ``shape`` are only reported, in debug mode."""
    if _pending and not capturing(buffer):  # earlier CUDA passes' headers (this runs eagerly,
        check_pending()  # also inside registered ops; not while a CUDA graph is captured)
    pg = resolve(process_group)
    world = pg.size() if isinstance(pg, _ProcessGroup) else group_size(pg)
    if world == 1:
        return world  # a group of one rank: the sum is the buffer itself, nothing to wait for
    count = tag.passes(direction)
    settings = _settings.get()
    if settings.debug:
        _debug_gather(_wire.payload(buffer, payload_size), tag, direction, count, pg, shape)
    start = time.perf_counter()
    try:
        local = _shm.local_group(pg, buffer)
        if local is not None:
            local.all_reduce(buffer, spin_us=settings.poll_us)
        else:
            work = dist.all_reduce(buffer, op=dist.ReduceOp.SUM, group=pg, async_op=True)
            if buffer.device.type == "cpu":
                _poll(work, start, settings.poll_us)
            work.wait()
    except RuntimeError as e:  # a timeout, a peer that exited, a backend error
        raise RuntimeError(
            f"syncbn: {tag.description} failed in the all_reduce of its "
            f"{_wire.DIRECTIONS[direction]} pass #{count} on {describe_group(pg)}: {e}\n"
            f"{_hint(str(e))}"
        ) from e
    finally:
        _waited[0] += time.perf_counter() - start
    if settings.debug >= 2:
        log.info("syncbn: %s %s pass #%d synced over %d ranks (%d numbers)",
                 tag.description, _wire.DIRECTIONS[direction], count, world, buffer.numel())
    return world


_TIMEOUT_HINT = (
    "It timed out: another rank never reached this layer (or is still busy, e.g. saving a "
    "checkpoint or evaluating, for longer than the timeout). " + _wire.CAUSES + " The wait is "
    "bounded by the process group's timeout: init_process_group(..., "
    "timeout=datetime.timedelta(seconds=...)).")
_EXIT_HINT = ("Another rank's process ended while this rank waited for it: it crashed, raised or "
              "was killed (its own error or log says why), or it finished without ever reaching "
              "this layer. " + _wire.CAUSES)
_LENGTH_HINT = ("The ranks met different collectives: another rank was not in a syncbn layer of "
                "this kind (e.g. a collective of its own, or another syncbn version). "
                + _wire.CAUSES)


def _hint(message: str) -> str:
    """What to tell the user about a failed all_reduce, from the transport's or backend's words."""
    text = message.lower()
    if "exited" in text or "closed by peer" in text or "connection reset" in text:
        return _EXIT_HINT
    if "numbers, this rank" in text or "do not fit" in text:
        return _LENGTH_HINT
    if "timed out" in text or "timeout" in text:
        return _TIMEOUT_HINT
    return _wire.CAUSES


def _poll(work: Any, start: float, budget_us: float) -> None:
    """Wait for a CPU collective by polling it (yielding the core between polls) for up to
    ``SYNCBN_POLL_US``, then let the caller block in ``work.wait()``.

    A blocked rank's core can go idle while the peers' data is on its way, and waking an idle
    core (a virtual CPU above all) costs far more than the small all_reduce itself (measured in
    benchmarks/RESULTS.md, "The collective alone"). Yielding lets the process group's own
    threads, which do the transfer, run on the same core. A failed or timed-out collective
    completes too, and ``wait()`` then raises its error."""
    if budget_us <= 0:
        return
    deadline = start + budget_us * 1e-6
    while not work.is_completed():
        if time.perf_counter() > deadline:
            return
        _yield()


def verify(buffer: Tensor, fields: list[int], tag: _wire.LayerTag, direction: int,
           process_group: Any | None = None) -> None:
    """Raise the out-of-step error if the reduced buffer's header shows that the ranks were not
    all at the same layer, pass and direction (a host read of the header)."""
    error = _wire.mismatch_error(_wire.header(buffer), fields, group_size(process_group), tag,
                                 direction, tag.passes(direction), describe_group(process_group))
    if error is not None:
        raise error


def defer_check(buffer: Tensor, fields: list[int], tag: _wire.LayerTag, direction: int,
                process_group: Any | None) -> None:
    """CUDA: copy the reduced header to the host without waiting; :func:`check_pending` (at the
    next collective) verifies it once it has landed."""
    checks = _wire.header(buffer)
    host = torch.empty(checks.shape, dtype=checks.dtype, pin_memory=True)
    host.copy_(checks, non_blocking=True)
    event = torch.cuda.Event()
    event.record(torch.cuda.current_stream(buffer.device))  # the stream the copy went on
    _pending.append((event, host, fields, tag, direction, tag.passes(direction), process_group))


def check_pending(wait: bool = False) -> None:
    """Verify the headers of earlier CUDA passes whose copy to the host has landed (all of them
    with ``wait=True``); raise the mismatch error if any pass met another layer."""
    while _pending and (wait or _pending[0][0].query()):
        event, host, fields, tag, direction, count, group = _pending.popleft()
        event.synchronize()
        error = _wire.mismatch_error(host, fields, group_size(group), tag, direction, count,
                                     describe_group(group))
        if error is not None:
            raise error


_MAX_DIMS = 8  # input dims reported in debug mode


def _debug_gather(payload: Tensor, tag: _wire.LayerTag, direction: int, count: int,
                  process_group: Any | None, shape: tuple[int, ...]) -> None:
    """Debug mode: every rank's view (fixed size, so safe to gather), compared before the sum."""
    finite = bool(torch.isfinite(payload).all())
    channels = shape[1] if len(shape) > 1 else 0
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
        f"  rank {ranks[i]}: {_wire.describe_key(int(r[0]))}, "
        f"{_wire.DIRECTIONS.get(int(r[3]), '?')} pass #{int(r[1])}, {int(r[2])} channels, "
        f"input {tuple(int(d) for d in r[5:] if d >= 0)}, "
        f"local statistics {'finite' if r[4] else 'NOT FINITE'}"
        for i, r in enumerate(rows)
    )
    if not same:
        raise RuntimeError(f"syncbn (SYNCBN_DEBUG): ranks are out of step at {tag.description}:\n"
                           f"{table}\n{_wire.CAUSES}")
    raise RuntimeError(f"syncbn (SYNCBN_DEBUG): non-finite values in the local statistics of "
                       f"{tag.description} on rank(s) {bad}:\n{table}")
