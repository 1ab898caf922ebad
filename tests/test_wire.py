"""The out-of-step header check at 3+ ranks, in one process (no spawning).

Each rank's buffer is built with ``_wire.pack`` and the buffers are summed (the all_reduce a
group would do). The check needs both ``sum(f) == W*f`` and ``sum(f**2) == W*f**2``: with ranks
that disagree symmetrically (pass numbers 1, 2, 3) the sums alone let the middle rank through,
and only the squares catch it. Every field, every rank, both twins of the check: the Python one
(``_wire.header_ok`` / ``_wire.mismatch_error``) and the C one (``csrc/wire.h``, reached through
the fused kernel's ``forward_apply`` / ``backward_apply``).
"""

from __future__ import annotations

import pytest
import torch

from syncbn import _stats, _wire, backends

CHANNELS = 4
# A key whose both halves are away from 0, so that a field can step down by one as well as up.
TAG = _wire.LayerTag(0x0005_0009, "SyncBatchNorm1d(4) 'features.bn1'")
PASS = 2
# ones, layer, layer-high, pass, channels, direction
BASE = _wire.fields(TAG, _wire.BACKWARD, CHANNELS, PASS)
SIZE = _wire.length(_wire.width_for(CHANNELS))
# Symmetric offsets: the sum over ranks is W * f on the ranks at offset 0.
OFFSETS = {3: [-1, 0, 1], 4: [-1, 0, 0, 1], 5: [-2, -1, 0, 1, 2]}


def _shards(world: int) -> list[torch.Tensor]:
    torch.manual_seed(world)
    return [torch.randn(2 + r, CHANNELS, dtype=torch.float64) for r in range(world)]


def _rank_fields(world: int, field: int | None) -> list[list[int]]:
    """Every rank's fields; ``field`` (an index into FIELDS) disagrees symmetrically (None: all
    agree)."""
    out = []
    for r in range(world):
        f = list(BASE)
        if field is not None:
            f[field] += OFFSETS[world][r]
        out.append(f)
    return out


def _reduced(shards: list[torch.Tensor], rank_fields: list[list[int]]) -> torch.Tensor:
    """The all_reduce of the ranks' forward buffers."""
    bufs = [_wire.pack(_stats.local_moments(x), f, SIZE) for x, f in zip(shards, rank_fields)]
    return torch.stack(bufs).sum(0)


def _middle_ranks(world: int) -> list[int]:
    return [r for r, o in enumerate(OFFSETS[world]) if o == 0]


def test_symmetric_disagreement_passes_the_sums_alone():
    """The premise: on the middle rank the sums agree for every field, only the squares differ."""
    for world in OFFSETS:
        for k in range(len(_wire.FIELDS)):
            rank_fields = _rank_fields(world, k)
            head = _wire.header(_reduced(_shards(world), rank_fields)).tolist()
            for r in _middle_ranks(world):
                own = rank_fields[r][k]
                assert head[1 + 2 * k] == world * own
                assert head[2 + 2 * k] != world * own * own


@pytest.mark.parametrize("world", sorted(OFFSETS))
@pytest.mark.parametrize("field", _wire.FIELDS)
def test_python_check_catches_every_rank(world, field):
    k = _wire.FIELDS.index(field)
    rank_fields = _rank_fields(world, k)
    buffer = _reduced(_shards(world), rank_fields)
    for r, f in enumerate(rank_fields):
        assert not _wire.header_ok(buffer, f, world), (field, world, r)
        assert not bool(_wire.header_matches(buffer, f, world)), (field, world, r)  # device twin
        error = _wire.mismatch_error(_wire.header(buffer), f, world, TAG, _wire.BACKWARD,
                                     PASS, f"rank {r}")
        assert error is not None, (field, world, r)
        text = str(error)
        assert f"ranks are out of step at {TAG.description}, backward pass #2 on rank {r}" in text
        if field in ("layer", "layer-high"):
            assert "the ranks are at different layers" in text, text
        else:
            assert f"{field}: this rank {f[k]}, the mean over ranks {BASE[k]:g}" in text, text
        # the torch backend's apply step uses the same check
        _, _, code = backends.aten.forward_apply(None, _shards(world)[r], buffer, world, f, None,
                                                  None, None, None, 1e-5, 0.1, 0)
        assert code == _wire.MISMATCH, (field, world, r)


@pytest.mark.parametrize("world", sorted(OFFSETS))
def test_python_check_passes_agreeing_ranks(world):
    rank_fields = _rank_fields(world, None)
    buffer = _reduced(_shards(world), rank_fields)
    for f in rank_fields:
        assert _wire.header_ok(buffer, f, world)
        assert bool(_wire.header_matches(buffer, f, world))
        assert _wire.mismatch_error(_wire.header(buffer), f, world, TAG, _wire.BACKWARD,
                                    2, "rank 0") is None


def _c_kernel_or_skip(x: torch.Tensor, *params: torch.Tensor | None) -> None:
    if not backends.fused.applies(x, *params) or not backends.fused.load(required=False):
        from syncbn._native import kernel as _kernel

        reason = f"the fused C kernel is not loaded here: {_kernel.build_info()['error']}"
        print(reason)
        pytest.skip(reason)


def _c_forward(x, buffer, world, f, running_mean=None, running_var=None):
    return backends.fused.forward_apply(backends.fused.applies(x), x, buffer, world, f, None, None, running_mean, running_var,
                                    1e-5, 0.1, _wire.POLICIES["propagate"])


def _c_backward(x, buffer, world, f, stats):
    dy = torch.ones_like(x)
    return backends.fused.backward_apply(backends.fused.applies(x), dy, x, stats, None, buffer, world, f)


def _agreeing_stats(world: int) -> torch.Tensor:
    """mean, invstd, count from an agreeing forward: a valid ``stats`` for backward_apply."""
    shards = _shards(world)
    _, stats, code = _c_forward(shards[0], _reduced(shards, _rank_fields(world, None)), world, BASE)
    assert code == _wire.OK
    return stats


@pytest.mark.parametrize("world", sorted(OFFSETS))
@pytest.mark.parametrize("field", _wire.FIELDS)
def test_c_check_catches_every_rank(world, field):
    shards = _shards(world)
    _c_kernel_or_skip(shards[0])
    k = _wire.FIELDS.index(field)
    rank_fields = _rank_fields(world, k)
    buffer = _reduced(shards, rank_fields)
    stats = _agreeing_stats(world)
    for r, f in enumerate(rank_fields):
        running_mean, running_var = torch.zeros(CHANNELS), torch.ones(CHANNELS)
        _, _, code = _c_forward(shards[r], buffer, world, f, running_mean, running_var)
        assert code == _wire.MISMATCH, (field, world, r)
        # nothing was updated on a mismatch
        torch.testing.assert_close(running_mean, torch.zeros(CHANNELS), rtol=0, atol=0)
        torch.testing.assert_close(running_var, torch.ones(CHANNELS), rtol=0, atol=0)
        _, code = _c_backward(shards[r], buffer, world, f, stats)
        assert code == _wire.MISMATCH, (field, world, r)


@pytest.mark.parametrize("world", sorted(OFFSETS))
def test_c_check_passes_agreeing_ranks(world):
    shards = _shards(world)
    _c_kernel_or_skip(shards[0])
    rank_fields = _rank_fields(world, None)
    buffer = _reduced(shards, rank_fields)
    everything = torch.cat(shards)
    mean, var = everything.mean(0), everything.var(0, unbiased=False)
    stats = _agreeing_stats(world)
    for r, f in enumerate(rank_fields):
        out, _, code = _c_forward(shards[r], buffer, world, f)
        assert code == _wire.OK, r
        torch.testing.assert_close(out, (shards[r] - mean) / torch.sqrt(var + 1e-5))
        grad_in, code = _c_backward(shards[r], buffer, world, f, stats)
        assert code == _wire.OK, r
        assert grad_in.shape == shards[r].shape


def test_running_statistics_are_kept_where_the_header_does_not_match():
    """On a device the torch backend cannot read the header before the update: it passes the
    device-side check as ``valid``, and a False keeps every running value."""
    from syncbn import _stats

    rm, rv = torch.tensor([1.0, 2.0]), torch.tensor([3.0, 4.0])
    mean, var, count = torch.tensor([5.0, 6.0]), torch.tensor([7.0, 8.0]), torch.tensor(4.0)
    _stats.update_running_stats(rm, rv, mean, var, count, 0.5, valid=torch.tensor(False))
    assert rm.tolist() == [1.0, 2.0] and rv.tolist() == [3.0, 4.0]
    _stats.update_running_stats(rm, rv, mean, var, count, 0.5, valid=torch.tensor(True))
    assert rm.tolist() == [3.0, 4.0] and rv.tolist() == pytest.approx([(3 + 7 * 4 / 3) / 2,
                                                                       (4 + 8 * 4 / 3) / 2])
