"""Workers of tests/test_groups.py (top level, so spawned ranks import them)."""

from __future__ import annotations

import copy
import io
import warnings
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import syncbn
from reference import assert_matches


def _net() -> nn.Module:
    torch.manual_seed(0)  # the same weights on every rank
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4),
                         nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))).double()


def _global_forward(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Plain batch norm with the global batch's statistics, through ``model``'s weights."""
    with torch.no_grad():
        h = x
        for linear, bn in ((model[0], model[1]), (model[2][0], model[2][1])):
            h = F.batch_norm(linear(h), None, None, bn.weight, bn.bias, training=True)
    return h


def copied_with_group(rank: int, world_size: int, kind: str) -> dict[str, Any]:
    """A model converted with an explicit group (``kind``: "subgroup", a ``dist.new_group`` of
    every rank; "lightning", the world group passed to ``SyncBatchNormPlugin``): a step, then
    ``copy.deepcopy`` (same group), the export recipe, a synchronized step of the copy against
    the global batch, and ``torch.save`` of the whole model (the group left out, with a warning)."""
    if kind == "subgroup":
        group = dist.new_group(list(range(world_size)))  # every rank creates every subgroup
        model = syncbn.convert_sync_batchnorm(_net(), process_group=group)
    else:
        from syncbn.lightning import SyncBatchNormPlugin

        group = dist.group.WORLD
        model = SyncBatchNormPlugin(process_group=group).apply(_net())
    assert group is not None
    norms = [model[1], model[2][1]]
    assert all(m.process_group is group for m in norms)
    torch.manual_seed(1)
    shards = [torch.randn(2 + r, 3, dtype=torch.float64) for r in range(world_size)]
    steps = 0
    model(shards[rank]).sum().backward()
    steps += 1

    clone = copy.deepcopy(model)
    copies = [clone[1], clone[2][1]]
    for old, new in zip(norms, copies):
        assert new.process_group is group, (kind, new.process_group)
        assert new._group_id == old._group_id and new.weight is not old.weight
    plain = syncbn.revert_sync_batchnorm(copy.deepcopy(model))  # the export recipe
    assert [type(m).__name__ for m in (plain[1], plain[2][1])] == ["BatchNorm1d"] * 2
    assert all(isinstance(m, syncbn.SyncBatchNorm) for m in norms)  # the original is kept

    out = clone(shards[rank])  # the copy synchronizes over the same group
    out.sum().backward()
    steps += 1
    start = sum(len(s) for s in shards[:rank])
    expected = _global_forward(clone, torch.cat(shards))[start:start + len(shards[rank])]
    assert_matches(out.detach(), expected, torch.float64, f"rank {rank} ({kind}): the copy")

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        saved = io.BytesIO()
        torch.save(model, saved)
    assert any("pickled without it" in str(w.message) for w in caught), [
        str(w.message) for w in caught]
    saved.seek(0)
    loaded = torch.load(saved, weights_only=False)
    assert all(m.process_group is None for m in (loaded[1], loaded[2][1]))
    assert all(m.process_group is group for m in norms)  # saving did not touch the original
    return {"kind": kind, "steps": steps}
