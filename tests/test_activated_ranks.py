"""Activated and in-place layers on several ranks: exact against float64 ``F.batch_norm`` +
the activation over the concatenated batch (outputs, every gradient, running statistics)."""

from __future__ import annotations

import pytest

import act_workers
import harness

pytestmark = pytest.mark.timeout(240)
Case = act_workers.Case


@pytest.mark.parametrize("activation,param,inplace", [
    ("identity", 0.0, True), ("relu", 0.0, False), ("leaky_relu", 0.01, False),
    ("leaky_relu", 0.01, True), ("leaky_relu", 0.2, True), ("elu", 1.0, False),
    ("elu", 1.0, True)])  # relu in place is refused at construction (test_activated_layers)
def test_activations_are_exact(tmp_path, activation, param, inplace, kernel):
    case = Case(sizes=[3, 0, 5], tail=(4, 3, 3), activation=activation, param=param,
                inplace=inplace)
    assert harness.run(act_workers.exact, 3, tmp_path, case) == [{"ok": True}] * 3


@pytest.mark.parametrize("tail", [(4,), (4, 5), (4, 2, 3, 3)], ids=["1d-NC", "1d-NCL", "3d"])
def test_every_dim(tmp_path, tail, kernel):
    case = Case(sizes=[2, 5], tail=tail, activation="elu", param=0.5, inplace=True)
    assert harness.run(act_workers.exact, 2, tmp_path, case) == [{"ok": True}] * 2


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_half_and_float32_channels_last(tmp_path, dtype, kernel):
    case = Case(sizes=[4, 3], tail=(4, 3, 3), dtype=dtype, inplace=True, channels_last=True)
    assert harness.run(act_workers.exact, 2, tmp_path, case) == [{"ok": True}] * 2


def test_functional_form(tmp_path, kernel):
    case = Case(sizes=[4, 3], tail=(4, 3, 3), activation="leaky_relu", param=0.05,
                inplace=True, functional=True)
    assert harness.run(act_workers.exact, 2, tmp_path, case) == [{"ok": True}] * 2


def test_an_ill_conditioned_inverse_keeps_a_copy_and_stays_exact(tmp_path, kernel):
    """A zero weight: the output does not determine the input; that pass keeps a copy."""
    case = Case(sizes=[4, 3], tail=(4, 3, 3), inplace=True, zero_weight=True)
    assert harness.run(act_workers.exact, 2, tmp_path, case) == [{"ok": True}] * 2


def test_autograd_sees_the_in_place_write():
    """A value saved for the backward before an in-place layer overwrote it is an error in
    the backward, as for torch's own in-place operations (one process: an in-place layer takes
    the synchronized path there too)."""
    import torch

    import syncbn

    layer = syncbn.SyncBatchNorm2d(3, activation="leaky_relu", inplace=True)
    leaf = torch.randn(2, 3, 4, 4, requires_grad=True)
    h = leaf * 2.0
    saved = h.pow(2)  # saves h
    y = layer(h)
    assert y.data_ptr() == h.data_ptr()
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        (y.sum() + saved.sum()).backward()
