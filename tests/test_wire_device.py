"""The buffer's frame and header made on the buffer's device from cached templates
(``_wire.frame``, ``_wire.header_on``, ``_wire.tail_matches``): the same numbers as the host
construction they replace, one device op per pass and no host-to-device copy, and the lean
device check catching every field at 2-5 ranks.
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from syncbn import _stats, _wire

CHANNELS = 4
SIZE = _wire.length(_wire.width_for(CHANNELS))
COUNT_AT = 1 + 2 * CHANNELS


# A key whose both halves are away from 0, so that a field can step down by one as well as up.
TAG = _wire.LayerTag(0x0005_0009, "SyncBatchNorm1d(4) 'features.bn1'")


def _fields(direction: int, passes: int) -> list[int]:
    return _wire.fields(TAG, direction, CHANNELS, passes)


def _host_made(payload: torch.Tensor, fields: list[int], size: int) -> torch.Tensor:
    """The buffer as syncbn built it before (a host tensor of the header, padding, payload)."""
    head = torch.tensor([1.0] + [float(v) for f in fields for v in (f, f * f)] + [1.0],
                        dtype=torch.float64)
    padding = torch.zeros(size - payload.numel() - head.numel(), dtype=torch.float64)
    return torch.cat([head[:1], payload, padding, head[1:]])


@pytest.mark.parametrize("passes", [0, 1, 7, _wire.FIELD_LIMIT - 1])
@pytest.mark.parametrize("direction", [_wire.FORWARD, _wire.BACKWARD, _wire.WIDEN])
def test_device_made_buffers_equal_the_host_made_ones(passes, direction):
    fields = _fields(direction, passes)
    payload = _stats.local_moments(torch.randn(5, CHANNELS, dtype=torch.float64))
    for size in (SIZE, _wire.length(128)):
        expected = _host_made(payload, fields, size)
        assert torch.equal(_wire.pack(payload, fields, size), expected)  # bitwise
        framed = _wire.frame(torch.full((size,), math.pi, dtype=torch.float64), fields,
                             count_at=COUNT_AT, count=5)
        expected[1:COUNT_AT] = 0.0  # the frame leaves zeros where the sums go
        assert torch.equal(framed, expected)
    assert torch.equal(_wire.header_on(torch.device("cpu"), fields),
                       _host_made(payload[:0], fields, 2 * len(_wire.FIELDS) + 2))


def test_templates_are_not_changed_by_use():
    """Each pass writes its own pass number into its own buffer; the cached template stays."""
    empty = torch.zeros(0, dtype=torch.float64)
    first = _wire.pack(empty, _fields(_wire.FORWARD, 3), 20)
    _wire.pack(empty, _fields(_wire.FORWARD, 900), 20)
    again = _wire.pack(empty, _fields(_wire.FORWARD, 3), 20)
    assert torch.equal(first, again)


class _Ops(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if not func.is_view and func is not torch.ops.aten.empty.memory_format:
            self.ops.append(func.__name__)
        return func(*args, **(kwargs or {}))


def test_one_device_op_per_pass_and_nothing_from_the_host():
    """After the first use (which makes the template), a frame is one ``nan_to_num`` on the
    device: no tensor made from host numbers, no copy."""
    buffer = torch.empty(SIZE, dtype=torch.float64)
    _wire.frame(buffer, _fields(_wire.FORWARD, 1), COUNT_AT, 3)
    _wire.header_on(buffer.device, _fields(_wire.FORWARD, 1))
    for passes in (2, 3):
        with _Ops() as frame:
            _wire.frame(buffer, _fields(_wire.FORWARD, passes), COUNT_AT, 3)
        with _Ops() as head:
            _wire.header_on(buffer.device, _fields(_wire.FORWARD, passes))
        assert frame.ops == head.ops == ["nan_to_num.out"]
    fields = _fields(_wire.FORWARD, 3)
    _wire.tail_matches(buffer * 2, fields, 2, COUNT_AT, 2)
    with _Ops() as check:
        _wire.tail_matches(buffer * 2, fields, 2, COUNT_AT, 2)
    assert check.ops == ["mul.Tensor", "nan_to_num.default", "clamp.Tensor", "eq.Tensor",
                         "all.default"]  # (the first is the test's own * 2)


# Symmetric offsets (as in test_wire.py): the sums alone let the middle rank through.
OFFSETS = {2: [0, 1], 3: [-1, 0, 1], 5: [-2, -1, 0, 1, 2]}


def _reduced(world: int, field: int | None, counts: list[int] | None = None
             ) -> tuple[torch.Tensor, list[list[int]]]:
    base = _fields(_wire.FORWARD, 2)
    rank_fields, buffers = [], []
    for r in range(world):
        f = list(base)
        if field is not None:
            f[field] += OFFSETS[world][r]
        n = 3 if counts is None else counts[r]
        buffer = torch.empty(SIZE, dtype=torch.float64)
        _wire.frame(buffer, f, COUNT_AT, n)
        buffer[1:COUNT_AT] = torch.randn(2 * CHANNELS, dtype=torch.float64)
        buffers.append(buffer)
        rank_fields.append(f)
    return torch.stack(buffers).sum(0), rank_fields


@pytest.mark.parametrize("world", sorted(OFFSETS))
@pytest.mark.parametrize("field", _wire.FIELDS)
def test_lean_check_catches_every_rank(world, field):
    buffer, rank_fields = _reduced(world, _wire.FIELDS.index(field))
    for r, f in enumerate(rank_fields):
        assert not bool(_wire.tail_matches(buffer, f, world, COUNT_AT, 2)), (field, world, r)
        assert not bool(_wire.header_matches(buffer, f, world)), (field, world, r)


@pytest.mark.parametrize("world", sorted(OFFSETS))
def test_lean_check_passes_agreeing_ranks_whatever_the_payload(world):
    buffer, rank_fields = _reduced(world, None)
    buffer[1] = math.nan  # non-finite statistics are the policy's business, not the header's
    for f in rank_fields:
        assert bool(_wire.tail_matches(buffer, f, world, COUNT_AT, 2))
        assert bool(_wire.header_matches(buffer, f, world))


@pytest.mark.parametrize("counts,ok", [([1, 0], False), ([0, 0], False), ([1, 1], True),
                                       ([0, 2], True)])
def test_lean_check_wants_the_minimum_count(counts, ok):
    buffer, rank_fields = _reduced(2, None, counts)
    assert bool(_wire.tail_matches(buffer, rank_fields[0], 2, COUNT_AT, 2)) is ok


def test_lean_check_catches_a_partly_reduced_tail():
    buffer, rank_fields = _reduced(2, None)
    buffer[-1] = 1.0  # the last sentinel of one rank only
    assert not bool(_wire.tail_matches(buffer, rank_fields[0], 2, COUNT_AT, 2))
    buffer, rank_fields = _reduced(2, None)
    buffer[COUNT_AT + 1] = 1.0  # padding that is not zero: another layout met this one
    assert not bool(_wire.tail_matches(buffer, rank_fields[0], 2, COUNT_AT, 2))
