"""The collective: one all_reduce of a packed buffer (``_wire.py``) per pass, and the groups it runs
over. With ``_shm.py`` (the same-machine transport), the only code that talks to
``torch.distributed``.

Distributed invariants enforced here and by the callers:

* every rank of the group calls :func:`all_reduce` the same number of times, in the same order,
  even with an empty shard (an empty shard contributes zeros);
* counts differ across ranks, so they travel inside the buffer with the sums;
* the reduced buffer is bitwise identical on every rank (the backends compute each element once
  and broadcast it; the shared-memory transport adds the ranks' buffers in rank order on every
  rank), so everything derived from it (running statistics, checks) is too;
* every syncbn buffer of a group has the same length (:meth:`Group.length`): the group's width
  starts at ``_wire.MIN_WIDTH`` and grows only when a layer wider than it is *called*, through a
  widening message of the old length that every rank in step sends at the same pass. Layers that
  are built but never called change nothing, and ranks out of step still exchange buffers of one
  length, whose headers then disagree;
* the settings that change what a rank sends (``SYNCBN_DEBUG``, ``SYNCBN_NONFINITE``,
  ``SYNCBN_SHM``) agree on every rank: checked at the group's first syncbn collective, by a
  collective every rank makes whatever its settings.

One :class:`Group` per process group holds what syncbn keeps about it (size, width, transport,
pass counters, pending header checks); it lives as long as the process group does, so an
in-process restart (a new group) starts from pass 0.

Transport: a CPU group whose ranks are all on this machine sums the buffers in shared memory
(``_shm.py``; ``SYNCBN_SHM=off`` turns it off), every other group through the backend's
``all_reduce`` (polled on CPU, ``SYNCBN_POLL_US``). Same buffer, same checks, same error
messages; waits bounded by the group's timeout either way. On CUDA the header is checked on the
host without stalling the device: each pass's reduced header is copied (non-blocking, into a
pinned ring made once per group) and checked ``CHECK_LAG`` collectives later, at the same
collective on every rank, so that ranks out of step all raise together.
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
    "CHECK_LAG", "Group", "all_reduce", "capturing", "check_pending", "collective_seconds",
    "compiling", "describe_group", "group", "group_size", "transport", "verify", "world_size",
]

log = logging.getLogger("syncbn")

_ProcessGroup = getattr(dist, "ProcessGroup", ())  # () when torch.distributed is not built
_yield = getattr(os, "sched_yield", None) or (lambda: time.sleep(0))
_waited = [0.0]  # seconds this process spent inside syncbn's all_reduce calls
CHECK_LAG = 4  # CUDA: a pass's header is checked this many collectives of its group later


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


class Group:
    """What syncbn keeps about one process group (or about passes without one: ``pg`` None).

    ``size``/``rank``: of this process in the group; ``width``: of its buffers (grows, never
    shrinks; ``epoch`` counts the changes, so that plans made for an older width are rebuilt);
    ``passes``: each layer's ``[forward, backward]`` pass counters in this group's life;
    ``shm``: the same-machine transport, decided at the group's first collective (``ready``).
    """

    def __init__(self, pg: Any | None) -> None:
        self.ref: Any = _reference(pg)
        if pg is None:
            self.size, self.rank = 1, 0
        elif isinstance(pg, _ProcessGroup):
            self.size, self.rank = pg.size(), pg.rank()
        else:
            self.size, self.rank = dist.get_world_size(pg), dist.get_rank(pg)
        self.width, self.epoch = _wire.MIN_WIDTH, 0
        self.ready = False
        self.thread: int | None = None  # the thread that runs its synchronized layers
        self.shm: _shm.LocalGroup | None = None
        self.passes: dict[int, list[int]] = {}
        self.collectives = 0  # this group's syncbn collectives so far (the CUDA check's clock)
        self.pending: collections.deque[tuple[int, Any, Tensor, list[int], _wire.LayerTag, int,
                                               int]] = collections.deque()
        self._ring: dict[torch.device, Tensor] = {}

    @property
    def pg(self) -> Any | None:
        return self.ref()

    def counters(self, key: int) -> list[int]:
        """The ``[forward, backward]`` pass counters of the layer ``key`` in this group."""
        return self.passes.setdefault(key, [0, 0])

    def length(self, channels: int, tag: _wire.LayerTag, counters: list[int],
               device: torch.device) -> int:
        """The length of the group's buffers for a layer of ``channels``; when the layer is
        wider than the group's width, the group first widens (one collective of the old length,
        the same on every rank in step; out-of-step ranks get the mismatch error instead)."""
        if channels > self.width:
            new = _wire.width_for(channels)
            if self.size > 1:
                fields = _wire.fields(tag, _wire.WIDEN, new, counters[0])
                buffer = _wire.pack(torch.zeros(0, dtype=torch.float64, device=device), fields,
                                    _wire.length(self.width))
                all_reduce(buffer, self, tag, _wire.WIDEN, counters[0], fields)
                verify(buffer, fields, tag, _wire.WIDEN, counters[0], self)  # CUDA: a host sync,
            self.width, self.epoch = new, self.epoch + 1  # once per widening
        return _wire.length(self.width)

    def describe(self) -> str:
        """``"rank r (rank i of W in its group)"`` for error messages."""
        if not (dist.is_available() and dist.is_initialized()):
            return "no process group"
        return f"rank {dist.get_rank()} (rank {self.rank} of {self.size} in its group)"

    def ring(self, device: torch.device) -> Tensor:
        """Pinned host slots for the CUDA header checks (made once per group and device)."""
        ring = self._ring.get(device)
        if ring is None:
            ring = self._ring[device] = torch.empty(
                (CHECK_LAG + 2, 2 * len(_wire.FIELDS) + 2), dtype=torch.float64, pin_memory=True)
        return ring


def _reference(pg: Any | None) -> Any:
    """A weak reference to ``pg`` (a Group must not keep its group alive), or a strong one
    for objects that cannot be weakly referenced (stand-ins)."""
    try:
        return weakref.ref(pg)  # type: ignore[arg-type]
    except TypeError:
        return lambda: pg


_groups: weakref.WeakKeyDictionary[Any, Group] = weakref.WeakKeyDictionary()
_strong: dict[int, Group] = {}
_no_group = Group(None)


def group(process_group: Any | None) -> Group:
    """The :class:`Group` of ``process_group`` (``None``: the default group; without
    ``torch.distributed``, a group of one rank)."""
    pg = resolve(process_group)
    if pg is None:
        return _no_group
    try:
        found = _groups.get(pg)
        if found is None:
            found = _groups[pg] = Group(pg)
    except TypeError:  # cannot be weakly referenced (a stand-in): kept
        found = _strong.get(id(pg))
        if found is None:
            found = _strong[id(pg)] = Group(pg)
    return found


def world_size(process_group: Any | None) -> int:
    """The group's size asked directly (0 without torch.distributed): what torch.compile
    traces, where :func:`group`'s lookup cannot be."""
    pg = resolve(process_group)
    if pg is None:
        return 0
    return pg.size() if isinstance(pg, _ProcessGroup) else dist.get_world_size(pg)  # type: ignore[no-any-return]


def group_size(process_group: Any | None = None) -> int:
    """Number of ranks syncbn would synchronize over; 1 when ``torch.distributed`` is not in use."""
    return group(process_group).size


def describe_group(process_group: Any | None = None) -> str:
    """``"rank r (rank i of W in its group)"`` for error messages."""
    return group(process_group).describe()


def transport(process_group: Any | None = None) -> str:
    """How syncbn's collectives on this group travel: ``"shm"`` (shared memory) once set up,
    else the backend's name (``"none"`` without a process group)."""
    g = group(process_group)
    if g.pg is None:
        return "none"
    return "shm" if g.shm is not None else str(dist.get_backend(g.pg))


def all_reduce(buffer: Tensor, group: Group, tag: _wire.LayerTag, direction: int, count: int,
               fields: list[int], payload_size: int = 0, shape: tuple[int, ...] = ()) -> None:
    """THE collective: sum ``buffer`` (a packed float64 buffer of :meth:`Group.length`) over the
    group, in place; errors are rewrapped naming the layer. ``count`` is the pass number and
    ``fields`` the header the buffer carries (for messages and the CUDA check);
    ``payload_size`` and ``shape`` are only reported, in debug mode."""
    if group.pending and not capturing(buffer):  # earlier CUDA passes' headers, at the same
        check_pending(group)  # collective on every rank (not while a CUDA graph is captured)
    group.collectives += 1
    settings = _settings.current or _settings.get()
    if group.size == 1 and not settings.force_sync:
        return  # a group of one rank: the sum is the buffer itself, nothing to wait for
    pg = group.ref()
    start = time.perf_counter()
    try:
        if not group.ready or (group.shm is not None and buffer.numel() > group.shm.slot_len):
            _setup(group, buffer)  # the first collective, or a wider one (the same pass everywhere)
        if settings.debug:
            _debug_gather(_wire.payload(buffer, payload_size), tag, direction, count, group,
                          shape)
        if group.shm is not None and buffer.is_cpu:
            group.shm.all_reduce(buffer, spin_us=settings.poll_us)
        else:
            work = dist.all_reduce(buffer, op=dist.ReduceOp.SUM, group=pg, async_op=True)
            if buffer.is_cpu:
                _poll(work, start, settings.poll_us)
            work.wait()
    except _wire.SyncBatchNormError:
        raise
    except RuntimeError as e:  # a timeout, a peer that exited, a backend error
        raise _wire.SyncBatchNormError(
            f"syncbn: {tag.description} failed in the all_reduce of its "
            f"{_wire.DIRECTIONS[direction]} pass #{count} on {group.describe()}: {e}\n"
            f"{_hint(str(e))}"
        ) from e
    finally:
        _waited[0] += time.perf_counter() - start
    if settings.debug >= 2:
        log.info("syncbn: %s %s pass #%d synced over %d ranks (%d numbers)",
                 tag.description, _wire.DIRECTIONS[direction], count, group.size, buffer.numel())
    if buffer.is_cuda and not capturing(buffer):
        _defer_check(buffer, group, tag, direction, count, fields)


def _setup(group: Group, buffer: Tensor) -> None:
    """At the group's first syncbn collective, on every rank: the settings that change what a
    rank sends must agree (one small all_reduce on the buffer's device); then a CPU group
    decides its transport (``_shm.setup``), again when a wider buffer outgrows its segment."""
    settings = _settings.get()
    if not group.ready:
        values = _wire.settings_values(settings)
        check = torch.tensor(_wire.settings_buffer(values), dtype=torch.float64)
        check = check.to(buffer.device)
        dist.all_reduce(check, op=dist.ReduceOp.SUM, group=group.pg)
        problem = _wire.settings_problem(check.tolist(), values, group.size)
        if problem:
            raise _wire.SyncBatchNormError(
                f"syncbn: {group.describe()}: {problem}. These settings must be the same on "
                "every rank of a group (unset them everywhere for the defaults).")
    if group.shm is not None:  # too narrow for this buffer: a wider one replaces it
        group.shm.close()
        group.shm = None
    if buffer.is_cpu and settings.shm != "off":
        group.shm = _shm.setup(group.pg, buffer.numel(), group.describe())
    group.ready = True


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


def verify(buffer: Tensor, fields: list[int], tag: _wire.LayerTag, direction: int, count: int,
           group: Group) -> None:
    """Raise the out-of-step error if the reduced buffer's header shows that the ranks were not
    all at the same layer, pass and direction (a host read of the header)."""
    error = _wire.mismatch_error(_wire.header(buffer), fields, group.size, tag, direction, count,
                                 group.describe())
    if error is not None:
        raise error


def _defer_check(buffer: Tensor, group: Group, tag: _wire.LayerTag, direction: int,
                 count: int, fields: list[int]) -> None:
    """CUDA: copy the reduced header into a slot of the group's pinned ring without waiting;
    :func:`check_pending` verifies it ``CHECK_LAG`` collectives later."""
    ring = group.ring(buffer.device)
    slot = ring[group.collectives % ring.shape[0]]
    slot.copy_(_wire.header(buffer), non_blocking=True)
    event = torch.cuda.Event()
    event.record(torch.cuda.current_stream(buffer.device))  # the stream the copy went on
    group.pending.append((group.collectives, event, slot, list(fields), tag, direction, count))


def check_pending(group: Group | None = None, wait: bool = False) -> None:
    """Verify the headers of earlier CUDA passes of ``group`` (every group when None) whose turn
    has come (``CHECK_LAG`` collectives later; all of them with ``wait=True``); raise the
    out-of-step error if a pass met another layer. The turn depends only on the group's count of
    collectives, the same on every rank: every rank raises at the same collective."""
    groups = [group] if group is not None else [*_groups.values(), *_strong.values()]
    for g in groups:
        while g.pending and (wait or g.pending[0][0] <= g.collectives - CHECK_LAG):
            _, event, slot, fields, tag, direction, count = g.pending.popleft()
            event.synchronize()  # long done, usually: CHECK_LAG collectives ago
            error = _wire.mismatch_error(slot.clone(), fields, g.size, tag, direction, count,
                                         g.describe())
            if error is not None:
                g.pending.clear()
                raise error


_MAX_DIMS = 8  # input dims reported in debug mode


def _debug_gather(payload: Tensor, tag: _wire.LayerTag, direction: int, count: int,
                  group: Group, shape: tuple[int, ...]) -> None:
    """Debug mode: every rank's view (fixed size, so safe to gather), compared before the sum."""
    finite = bool(torch.isfinite(payload).all())
    channels = shape[1] if len(shape) > 1 else 0
    dims = list(shape[:_MAX_DIMS]) + [-1] * (_MAX_DIMS - len(shape[:_MAX_DIMS]))
    view = torch.tensor([tag.key, count, channels, direction, float(finite), *dims],
                        dtype=torch.float64)
    view = view.to(payload.device)
    pg = group.pg
    views = [torch.empty_like(view) for _ in range(group.size)]
    dist.all_gather(views, view, group=pg)
    rows = [v.tolist() for v in views]
    ranks = dist.get_process_group_ranks(pg)
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
        raise _wire.OutOfStepError(
            f"syncbn (SYNCBN_DEBUG): ranks are out of step at {tag.description}:\n"
            f"{table}\n{_wire.CAUSES}")
    raise _wire.NonFiniteError(f"syncbn (SYNCBN_DEBUG): non-finite values in the local "
                               f"statistics of {tag.description} on rank(s) {bad}:\n{table}")
