"""``torch.compile`` with syncbn layers.

* One process (no process group, syncbn is ``F.batch_norm``): the default compile (inductor; a C++
  compiler is needed on CPU) trains exactly like eager. The fallback path should compile with
  ``fullgraph=True`` (no graph break).
* Two gloo ranks (the synchronized path): ``torch.compile`` with graph breaks allowed trains like
  plain BatchNorm on the concatenated batch. The ranks use the ``aot_eager`` backend (Dynamo +
  AOTAutograd, where an ``autograd.Function`` with collectives meets the compiler); the same test
  with inductor is opt-in (``SYNCBN_SLOW_TESTS=1``): its cold compile takes minutes on 2 cores.
* ``fullgraph=True`` on the synchronized path (registered ops ``syncbn::forward`` and
  ``syncbn::backward``): no graph break, training equal to eager and to the float64 reference at
  2 and 3 ranks (one of them empty), on both transports; a rank out of step still gets the
  layer-named error from inside the op.
"""

from __future__ import annotations

import os

import pytest
import torch

import compile_workers as cw
import harness
import syncbn

SIZES = [3, 2]
STEPS = 2


def _train_single(backend: str | None, fullgraph: bool = False) -> tuple[torch.nn.Module, list[float]]:
    import torch._dynamo

    torch._dynamo.reset()
    model = syncbn.convert_sync_batchnorm(cw.make_net())
    net = model if backend is None else torch.compile(model, backend=backend, fullgraph=fullgraph)
    try:
        losses = cw.train(net, cw.global_batches([5], STEPS), 1.0 / 5)
    finally:
        torch._dynamo.reset()
    return model, losses


def _assert_same_state(a: torch.nn.Module, b: dict[str, torch.Tensor], what: str) -> None:
    for key, value in b.items():
        torch.testing.assert_close(a.state_dict()[key], value, rtol=1e-10, atol=1e-10,
                                   msg=lambda m, key=key: f"{what} {key}: {m}")


@pytest.mark.timeout(300)
def test_compile_single_process_equals_eager():
    eager, eager_losses = _train_single(None)
    compiled, losses = _train_single("inductor")
    assert losses == pytest.approx(eager_losses, rel=1e-10, abs=1e-10)
    _assert_same_state(compiled, eager.state_dict(), "compiled vs eager")
    _assert_same_state(compiled, cw.reference([5], STEPS), "compiled vs plain BatchNorm")
    # The running statistics were updated (the compiled graph kept the in-place buffer updates).
    assert int(compiled[1].num_batches_tracked) == STEPS
    assert not torch.equal(compiled[1].running_mean, torch.zeros(4, dtype=torch.float64))


@pytest.mark.timeout(120)
def test_compile_single_process_fullgraph():
    """No process group: a syncbn layer is F.batch_norm, and should not break the graph."""
    compiled, _ = _train_single("aot_eager", fullgraph=True)
    _assert_same_state(compiled, cw.reference([5], STEPS), "fullgraph vs plain BatchNorm")


def _sync(tmp_path, cfg, fresh=False, timeout=240):
    return harness.run(cw.compiled_sync_training, len(SIZES), tmp_path,
                       {"sizes": SIZES, "steps": STEPS, **cfg}, fresh=fresh, timeout=timeout)


@pytest.mark.timeout(300)
def test_compile_sync_path_equals_reference(tmp_path):
    out = _sync(tmp_path, {"backend": "aot_eager"})
    assert [r["error"] for r in out] == [None, None], out


@pytest.mark.timeout(600)
@pytest.mark.skipif(os.environ.get("SYNCBN_SLOW_TESTS") != "1",
                    reason="inductor on 2 CPU ranks compiles for minutes: set SYNCBN_SLOW_TESTS=1")
def test_compile_inductor_sync_path_equals_reference(tmp_path):
    out = _sync(tmp_path, {"backend": "inductor"}, fresh=True, timeout=560)
    assert [r["error"] for r in out] == [None, None], out


@pytest.mark.timeout(300)
@pytest.mark.cuda
def test_compile_fullgraph_sync_path_on_cuda(tmp_path):
    """The same on CUDA tensors (NCCL with a GPU per rank, else gloo reducing CUDA tensors)."""
    reason = harness.cuda_skip_reason(2)
    if reason:
        pytest.skip(reason)
    out = harness.run(cw.fullgraph_training, 2, tmp_path, [3, 2], STEPS, "aot_eager", "cuda",
                      device="cuda", backend=harness.cuda_backend(2), fresh=True, timeout=240)
    for rank in out:
        assert rank["graph_breaks"] == 0 and rank["graphs"] == 1, out


@pytest.mark.timeout(300)
@pytest.mark.parametrize("sizes", [[3, 2], [3, 0, 2]], ids=["2-ranks", "3-ranks-one-empty"])
@pytest.mark.parametrize("shm", ["auto", "off"], ids=["shm", "gloo"])
def test_compile_fullgraph_sync_path_equals_eager_and_reference(tmp_path, sizes, shm):
    """``fullgraph=True`` on the synchronized path: no graph break, training equal to eager and
    to plain BatchNorm on the concatenated batch, on both transports."""
    out = harness.run(cw.fullgraph_training, len(sizes), tmp_path, sizes, STEPS, "aot_eager",
                      env={"SYNCBN_SHM": shm}, fresh=True, timeout=240)
    for rank in out:
        assert rank["graph_breaks"] == 0 and rank["graphs"] == 1, out


@pytest.mark.timeout(300)
def test_compile_fullgraph_with_an_explicit_process_group(tmp_path):
    """convert_sync_batchnorm(model, group): the group reaches the registered ops as an integer
    looked up when it is set, not while dynamo traces (which could not trace the lookup)."""
    out = harness.run(cw.fullgraph_training, 2, tmp_path, [3, 2], STEPS, "aot_eager", "cpu", True,
                      fresh=True, timeout=240)
    for rank in out:
        assert rank["graph_breaks"] == 0 and rank["graphs"] == 1, out


@pytest.mark.timeout(300)
def test_compile_fullgraph_activated_layers(tmp_path):
    """Layers with a fused activation (leaky_relu) under ``fullgraph=True``: no graph break,
    equal to eager and to plain BatchNorm + LeakyReLU on the concatenated batch."""
    out = harness.run(cw.fullgraph_training, 3, tmp_path, [3, 0, 2], STEPS, "aot_eager", "cpu",
                      False, True, fresh=True, timeout=240)
    for rank in out:
        assert rank["graph_breaks"] == 0 and rank["graphs"] == 1, out


@pytest.mark.timeout(200)
def test_compile_fullgraph_out_of_step_raises_on_every_rank(tmp_path):
    errors = harness.run(cw.fullgraph_out_of_step, 2, tmp_path, 1, fresh=True, timeout=180)
    for e in errors:
        assert "syncbn: ranks are out of step at SyncBatchNorm1d(4)" in e, errors
    assert "SyncBatchNorm1d(4) 'bn1', forward pass #1" in errors[0], errors
    assert "the other rank was at SyncBatchNorm1d(4) 'bn2'" in errors[0], errors
