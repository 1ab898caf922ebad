"""Layers with an explicit process group: conversion keeps it on every nested layer, a copy
keeps the very same group, a pickle leaves it out (documented: the default group after loading).

Fast tests use a stand-in group (an object that, like a ``ProcessGroup``, cannot be copied or
pickled; the layers run in eval mode, where no group is asked anything). The real ones run on 2
gloo ranks: a subgroup from ``dist.new_group``, and the world group passed explicitly through
the Lightning plugin (``SyncBatchNormPlugin(process_group=...)``).
"""

from __future__ import annotations

import copy
import pickle
import warnings

import pytest
import torch
from torch import nn

import group_workers
import harness
import syncbn
from syncbn import _pass


class StandInGroup:
    """Like a ``ProcessGroup``: copy.deepcopy and pickle refuse it."""

    def __reduce_ex__(self, protocol):  # type: ignore[no-untyped-def]
        raise TypeError("cannot pickle 'StandInGroup' object")


class Unreferenceable:
    """A group that cannot be weakly referenced (``_pass.group_id`` keeps it)."""

    __slots__ = ()


def _nested() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4),
        nn.Sequential(nn.BatchNorm2d(4), nn.Sequential(nn.SyncBatchNorm(4), nn.BatchNorm2d(4))),
        nn.Flatten(), nn.Sequential(nn.Sequential(nn.Sequential(nn.BatchNorm1d(36)))),
    )


def _norms(model: nn.Module) -> list[syncbn.SyncBatchNorm]:
    return [m for m in model.modules() if isinstance(m, syncbn.SyncBatchNorm)]


@pytest.mark.parametrize("group", [StandInGroup(), Unreferenceable()], ids=["weakref", "strong"])
def test_every_nested_layer_keeps_the_given_group(group):
    model = syncbn.convert_sync_batchnorm(_nested(), process_group=group)
    norms = _norms(model)
    assert len(norms) == 5, [type(m).__name__ for m in model.modules()]
    for layer in norms:
        assert layer.process_group is group, layer.layer_description()
        assert _pass._group(layer._group_id) is group, layer.layer_description()


@pytest.mark.parametrize("root", [nn.BatchNorm2d(4), nn.BatchNorm1d(4), nn.SyncBatchNorm(4)],
                         ids=["BatchNorm2d", "BatchNorm1d", "torch-SyncBatchNorm"])
def test_a_converted_root_batch_norm_keeps_the_given_group(root):
    group = StandInGroup()
    layer = syncbn.convert_sync_batchnorm(root, process_group=group)
    assert isinstance(layer, syncbn.SyncBatchNorm) and layer is not root
    assert layer.process_group is group and _pass._group(layer._group_id) is group


def test_default_group_is_none():
    for layer in _norms(syncbn.convert_sync_batchnorm(_nested())):
        assert layer.process_group is None and layer._group_id == 0


def test_a_copy_keeps_the_very_same_group():
    """copy.deepcopy (the export recipe) and copy.copy share the group; parameters are copied
    by deepcopy; each copy's tag is registered with the ops."""
    group = StandInGroup()
    model = syncbn.convert_sync_batchnorm(_nested(), process_group=group)
    with pytest.raises(TypeError, match="cannot pickle"):
        copy.deepcopy(group)  # the premise: the group itself cannot be copied
    clone = copy.deepcopy(model)
    for old, new in zip(_norms(model), _norms(clone)):
        assert new.process_group is group and new._group_id == old._group_id
        assert new.weight is not old.weight and torch.equal(new.weight, old.weight)
        assert new._sync is not old._sync and _pass._layers[new._layer_id] is new._sync
        assert new._sync.tag == old._sync.tag  # the same layer identity
    plain = syncbn.revert_sync_batchnorm(copy.deepcopy(model))
    assert not _norms(plain) and len(_norms(model)) == 5
    x = torch.randn(2, 3, 3, 3)
    model.eval()
    plain.eval()
    torch.testing.assert_close(plain(x), model(x))
    shallow = copy.copy(_norms(model)[0])
    assert shallow.process_group is group and shallow.weight is _norms(model)[0].weight


def test_a_pickle_leaves_the_group_out_and_says_so():
    """The unpickled layer synchronizes over the default group (documented); the original keeps
    its group; one UserWarning says so; a layer without an explicit group pickles silently."""
    group = StandInGroup()
    model = syncbn.convert_sync_batchnorm(_nested(), process_group=group)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = pickle.loads(pickle.dumps(model))
    texts = {str(w.message) for w in caught if w.category is UserWarning}
    assert len(texts) == 1 and "pickled without it" in texts.pop(), caught
    assert all(m.process_group is group for m in _norms(model))
    for m in _norms(loaded):
        assert m.process_group is None and m._group_id == 0
        assert _pass._layers[m._layer_id] is m._sync
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pickle.loads(pickle.dumps(syncbn.convert_sync_batchnorm(_nested())))


@pytest.mark.timeout(200)
def test_deepcopy_keeps_a_gloo_subgroup(tmp_path):
    """2 ranks, a subgroup from dist.new_group: the copy shares it, reverts for export, trains
    synchronized like the original; torch.save of the whole model leaves it out."""
    out = harness.run(group_workers.copied_with_group, 2, tmp_path, "subgroup", timeout=180)
    assert out == [{"kind": "subgroup", "steps": 2}] * 2, out


@pytest.mark.timeout(200)
def test_deepcopy_of_a_model_converted_by_the_lightning_plugin(tmp_path):
    """The plugin's ``apply`` with an explicit group (the world group, passed as an object)."""
    pytest.importorskip("lightning", reason="lightning is not installed: pip install "
                                            "'syncbn[lightning]'")
    out = harness.run(group_workers.copied_with_group, 2, tmp_path, "lightning", timeout=180)
    assert out == [{"kind": "lightning", "steps": 2}] * 2, out
