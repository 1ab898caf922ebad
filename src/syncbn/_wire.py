"""The collective's buffer: its layout, header fields, packing, checks and result codes.

The one owner of syncbn's wire format; ``csrc/wire.h`` mirrors it for the C kernel (same names,
same numbers). Every backend writes, and every rank sends, exactly this buffer::

    [1 | payload, zero-padded to 2*width + 1 | (f, f*f) for each header field | 1]
       forward payload:  sum(x) (C), sum(x**2) (C), n (1)         raw moments, float64
       backward payload: sum(dy) (C), sum(dy * xhat) (C)

``width`` is the group's current buffer width (``_comm`` keeps it, the same on every rank), so
every syncbn buffer of a group has the same length: buffers of different lengths must never meet
in one all_reduce (gloo then aborts the process or returns half-reduced data).

Out-of-step detection rides in the same buffer at no extra round trip. Each rank appends small
integer fields ``f`` (a ones-counter, the layer's key in two halves, its pass number, its channel
count, the direction) with ``f**2``; after the sum, ``sum(f) == W*f`` and ``sum(f**2) == W*f**2``
hold on a rank exactly when every rank sent the same ``f`` (zero spread: the sums alone miss
ranks at passes 1, 2 and 3, the squares catch them). Fields are below 2**20 and W <= 8192, so
the float64 sums are exact. The sentinel ones at both ends catch a partly reduced buffer.

>>> tag = LayerTag.for_layer("features.bn1", 0, "SyncBatchNorm2d(3) 'features.bn1'")
>>> f = fields(tag, FORWARD, 3, 1)  # pass #1
>>> buf = pack(torch.arange(7.0, dtype=torch.float64), f, length(64))
>>> two_ranks = buf * 2  # the all_reduce of two identical ranks
>>> header_ok(two_ranks, f, 2), header_ok(two_ranks, fields(tag, BACKWARD, 3, 1), 2)
(True, False)
"""

from __future__ import annotations

import functools
import math
import weakref
import zlib
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "BACKWARD", "CAUSES", "DIRECTIONS", "FIELDS", "FORWARD", "MIN_WIDTH", "MISMATCH",
    "NONFINITE", "NO_MEMORY", "OK", "POLICIES", "WIDEN", "LayerTag", "NonFiniteError",
    "OutOfStepError", "SyncBatchNormError", "describe_key", "fields", "frame", "header",
    "header_matches", "header_ok", "header_on", "length", "mismatch_error", "pack", "parts",
    "payload", "settings_buffer", "settings_problem", "settings_values", "tail_matches",
    "width_for",
]


class SyncBatchNormError(RuntimeError):
    """A synchronized pass failed across ranks (out of step, a timeout, a peer that exited,
    settings that differ, non-finite statistics under ``SYNCBN_NONFINITE=raise``): raised on
    every rank of the group, naming the layer. ``syncbn.SyncBatchNormError``."""

    __module__ = "syncbn"


class OutOfStepError(SyncBatchNormError):
    """The ranks were not at the same layer, pass and direction (or met another collective)."""

    __module__ = "syncbn"


class NonFiniteError(SyncBatchNormError):
    """Non-finite global statistics under ``SYNCBN_NONFINITE=raise`` (or seen in debug mode)."""

    __module__ = "syncbn"

# Directions (a header field). WIDEN: the group's buffers grow (see _comm.buffer_length).
FORWARD, BACKWARD, WIDEN = 1, 2, 3
DIRECTIONS = {FORWARD: "forward", BACKWARD: "backward", WIDEN: "widening"}
# The header fields, in order. The layer key is 32 bits, sent as two 16-bit fields: two layers
# collide with odds of 2**-32.
FIELDS = ("ones", "layer", "layer-high", "pass", "channels", "direction")
FIELD_LIMIT = 2**20  # fields are integers below this: f**2 * W stays exact in float64
MIN_WIDTH = 64  # channels every buffer is padded to at least

# Result codes of a backend's steps (csrc/wire.h: WIRE_OK ...).
OK, MISMATCH, NONFINITE, NO_MEMORY = 0, 1, 2, 3
# SYNCBN_NONFINITE policies as the backends take them (csrc/wire.h: POLICY_PROPAGATE ...).
POLICIES = {"propagate": 0, "skip": 1, "raise": 2}

CAUSES = (
    "Likely causes: a rank skipped this layer or ran layers in another order (a conditional "
    "branch, an unused head, a frozen part in eval mode on one rank), the ranks ran different "
    "numbers of steps (uneven data), or the models differ. Every rank must call every "
    "synchronized layer in training mode the same number of times, in the same order (with an "
    "empty batch if it has no data). See docs/troubleshooting.md."
)

# layer key -> its tag (held by the layer), to name the layer another rank was at
IDENTITY = (
    "(a layer's identity: its name in the n-th model this process converted with "
    "convert_sync_batchnorm, or for a layer built directly, the order in which it was built, so "
    "that a model converted or a layer built on one rank only shifts the identity of every later "
    "one; a functional call's: its file and line)")
_keys: weakref.WeakValueDictionary[int, LayerTag] = weakref.WeakValueDictionary()


@dataclass(frozen=True)
class LayerTag:
    """Who is synchronizing: a key identical on every rank for the same layer (its pass
    counters live with the process group: ``syncbn._comm.Group.passes``)."""

    key: int
    description: str

    @staticmethod
    def for_layer(name: str | None, index: int, description: str) -> LayerTag:
        """Key from ``name`` when known (a converted model's ``"<model>:<qualified name>"``,
        a functional call site: robust to extra layers built on one rank), else from the
        creation index (identical when every rank builds the same layers in the same order)."""
        key = (zlib.crc32(name.encode()) if name else index) % 2**32 or 1
        tag = LayerTag(key, description)
        _keys[key] = tag
        return tag


def describe_key(key: int) -> str:
    """The layer (of this process) another rank's key names; keys register as tags are made."""
    tag = _keys.get(key)
    return tag.description if tag is not None else f"an unknown layer (key {key})"


def width_for(channels: int) -> int:
    """The buffer width a layer of ``channels`` needs: a power of two, at least MIN_WIDTH (so
    that a model's layers share a few widths and the group widens rarely)."""
    width = MIN_WIDTH
    while width < channels:
        width *= 2
    return width


def length(width: int) -> int:
    """Numbers (float64) in a buffer of ``width``: 1, 2*width + 1, 2 per field, 1."""
    return 2 * width + 1 + 2 * len(FIELDS) + 2


def fields(tag: LayerTag, direction: int, channels: int, count: int) -> list[int]:
    """The integer fields of a pass's header: ones, layer key (low, high), pass ``count``,
    channels, direction."""
    return [1, tag.key & 0xFFFF, tag.key >> 16, count % FIELD_LIMIT, channels % FIELD_LIMIT,
            direction]


def pack(payload: Tensor, fields: list[int], size: int) -> Tensor:
    """The whole buffer (``size`` numbers, on the payload's device) around a float64 payload:
    the torch-operator way; the C kernel and the Triton backend write the same numbers."""
    return torch.cat(parts(payload, fields, size))


def parts(payload: Tensor, fields: list[int], size: int) -> list[Tensor]:
    """The pieces of :func:`pack`'s buffer, for ``torch.cat(..., out=buffer)``."""
    head = header_on(payload.device, fields)
    padding = payload.new_zeros(size - payload.numel() - head.numel())
    return [head[:1], payload, padding, head[1:]]  # 1, payload + padding, 2 * fields, 1 -> size


# Per-pass numbers reach the device without a host-to-device copy: each buffer is written from a
# template cached on the device, whose NaN (the count) and +inf/-inf (the pass number and its
# square) one ``torch.nan_to_num`` replaces with Python numbers. Under CUDA-graph capture those
# numbers are frozen at capture, like every Python argument.
_PASS = FIELDS.index("pass")
_COUNT_LIMIT = 2.0**53  # counts are integers below this (exact in float64)


def _values(size: int, fields: tuple[int | None, ...], count_at: int | None) -> list[float]:
    """``[1 | 0... | (f, f*f) per field | 1]`` with the pass pair as (+inf, -inf) and a NaN at
    ``count_at``."""
    values = [0.0] * size
    values[0] = values[-1] = 1.0
    head = size - 1 - 2 * len(FIELDS)
    for i, f in enumerate(fields):
        values[head + 2 * i: head + 2 * i + 2] = ((math.inf, -math.inf) if f is None
                                                   else (float(f), float(f * f)))
    if count_at is not None:
        values[count_at] = math.nan
    return values


def _passless(fields: list[int]) -> tuple[int | None, ...]:
    return tuple(None if i == _PASS else int(f) for i, f in enumerate(fields))


@functools.lru_cache(maxsize=4096)
def _template(device: torch.device, size: int, fields: tuple[int | None, ...],
              count_at: int | None) -> Tensor:
    # one host-to-device copy per (device, length, layer, direction): never per pass
    return torch.tensor(_values(size, fields, count_at), dtype=torch.float64).to(device)


def frame(buffer: Tensor, fields: list[int], count_at: int | None = None, count: int = 0) -> Tensor:
    """Write ``[1 | 0... | (f, f*f) per field | 1]`` over the whole float64 ``buffer``, and
    ``count`` at ``count_at`` when given: one device op (``nan_to_num`` of a cached template),
    no host-to-device copy. The caller then writes the payload sums over the zeros."""
    p = fields[_PASS]
    template = _template(buffer.device, buffer.numel(), _passless(fields), count_at)
    return torch.nan_to_num(template, nan=float(count), posinf=float(p), neginf=float(p * p),
                            out=buffer)


def header_on(device: torch.device, fields: list[int]) -> Tensor:
    """``[1 | (f, f*f) per field | 1]`` on ``device`` (a new tensor, one device op)."""
    return frame(torch.empty(2 * len(FIELDS) + 2, dtype=torch.float64, device=device), fields)


def payload(buffer: Tensor, numbers: int) -> Tensor:
    """The (reduced) payload: the ``numbers`` after the first sentinel."""
    return buffer[1:1 + numbers]


def header(buffer: Tensor) -> Tensor:
    """``[first sentinel, (f, f**2) per field..., last sentinel]`` of a (reduced) buffer."""
    return torch.cat([buffer[:1], buffer[-2 * len(FIELDS) - 1:]])


def header_matches(buffer: Tensor, fields: list[int], world: int) -> Tensor:
    """:func:`header_ok` as a boolean tensor on the buffer's device (no host read, no
    host-to-device copy)."""
    return (header(buffer) == header_on(buffer.device, fields) * world).all()


@functools.lru_cache(maxsize=4096)
def _bounds(device: torch.device, size: int, fields: tuple[int | None, ...], world: int,
            count_at: int, min_count: int) -> Tensor:
    tail = [v * world for v in _values(size, fields, count_at)[count_at:]]
    low, high = list(tail), list(tail)
    low[0], high[0] = float(min_count), _COUNT_LIMIT  # in place of the NaN
    return torch.tensor([low, high], dtype=torch.float64).to(device)


def tail_matches(buffer: Tensor, fields: list[int], world: int, count_at: int,
                 min_count: int) -> Tensor:
    """A boolean tensor on the buffer's device, in four device ops: every one of ``world``
    ranks sent these ``fields`` (as :func:`header_matches`, but for the first sentinel), the
    padding is zero and the count at ``count_at`` (just before the padding) is at least
    ``min_count``. The lean CUDA backend's guard on the running statistics; the core checks
    the whole header on the host, one pass late."""
    p = fields[_PASS]
    bounds = _bounds(buffer.device, buffer.numel(), _passless(fields), world, count_at, min_count)
    low, high = torch.nan_to_num(bounds, posinf=float(world * p), neginf=float(world * p * p))
    tail = buffer[count_at:]  # count, padding, header, last sentinel
    return (torch.clamp(tail, low, high) == tail).all()


def header_ok(buffer: Tensor, fields: list[int], world: int) -> bool:
    """Whether every one of ``world`` ranks sent these fields (a host read of the buffer)."""
    return not _problems(header(buffer).tolist(), fields, world)


def _problems(values: list[float], fields: list[int], world: int) -> list[str]:
    first, last, pairs = values[0], values[-1], values[1:-1]
    problems = []
    if first != world or last != world:
        problems.append(
            f"the buffer came back partly unreduced (sentinels {first:g} and {last:g}, expected "
            f"{world}): the ranks' buffers differ in length, i.e. this rank met a different "
            "collective (not a syncbn layer of this process's kind)")
    differ = {name: pairs[2 * i] for i, (name, own) in enumerate(zip(FIELDS, fields))
              if not (pairs[2 * i] == world * own and pairs[2 * i + 1] == world * own * own)}
    if "layer" in differ or "layer-high" in differ:
        if world == 2:  # the other rank's key, from the sums
            lo, hi = (int(differ.get(n, 2 * own)) - own for n, own in zip(FIELDS[1:3], fields[1:3]))
            problems.append(f"the other rank was at {describe_key(lo + (hi << 16))}")
        else:
            problems.append("the ranks are at different layers")
        problems.append(IDENTITY)
    for name, own in zip(FIELDS, fields):
        if name not in differ or name in ("layer", "layer-high"):
            continue
        total = differ[name]
        if world == 2:
            other = total - own
            if name == "direction":
                problems.append(f"the other rank was in a {DIRECTIONS.get(int(other), '?')} pass")
            else:
                problems.append(f"{name}: this rank {own}, the other rank {other:g}")
        else:
            problems.append(f"{name}: this rank {own}, the mean over ranks {total / world:g}")
    return problems


def mismatch_error(checks: Tensor, fields: list[int], world: int, tag: LayerTag,
                   direction: int, count: int, where: str) -> OutOfStepError | None:
    """The out-of-step error for a reduced header (:func:`header`), or None when it is fine.
    ``where`` names this rank and group for the message."""
    problems = _problems(checks.tolist(), fields, world)
    if not problems:
        return None
    return OutOfStepError(
        f"syncbn: ranks are out of step at {tag.description}, {DIRECTIONS[direction]} pass "
        f"#{count} on {where}: " + "; ".join(problems) + ". " + CAUSES
        + " Run with SYNCBN_DEBUG=1 to see every rank's view."
    )


# ------------------------------------------------------------------- settings across the ranks
_SETTINGS = ("SYNCBN_DEBUG", "SYNCBN_NONFINITE", "SYNCBN_SHM")


def settings_values(settings: Any) -> list[int]:
    """The settings that change what a rank sends, as small integers (``Settings.wire()``)."""
    debug, nonfinite, shm = settings.wire()
    return [debug, POLICIES[nonfinite], 0 if shm == "auto" else 1]


def settings_buffer(values: list[int]) -> list[float]:
    """``[1, (v, v*v) per setting, 1]``: summed over the ranks, it tells whether they agree."""
    return [1.0, *(float(x) for v in values for x in (v, v * v)), 1.0]


def settings_problem(summed: list[float], values: list[int], world: int) -> str | None:
    """What differs between the ranks, from the summed :func:`settings_buffer` (None: they
    agree). With two ranks the other rank's value is named."""
    names = {0: ("0", "1", "2"), 1: tuple(POLICIES), 2: ("auto", "off")}
    differ = []
    for i, (name, own) in enumerate(zip(_SETTINGS, values)):
        total, squares = summed[1 + 2 * i], summed[2 + 2 * i]
        if total == world * own and squares == world * own * own:
            continue
        if world == 2 and 0 <= int(total) - own < len(names[i]):
            other = names[i][int(total) - own]
            differ.append(f"{name} differs between the ranks of the group (this rank: "
                          f"{names[i][own]}, the other rank: {other})")
        else:
            differ.append(f"{name} differs between the ranks of the group (this rank: "
                          f"{names[i][own]})")
    return "; ".join(differ) or None