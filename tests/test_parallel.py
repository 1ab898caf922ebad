"""syncbn.DataParallel: the replicas of one process synchronized (issue 15).

The property: the wrapped model on the chunks of a batch == the same model on the whole batch,
against the float64 reference (plain BatchNorm on the concatenated batch). Here the replicas are
threads on the CPU (``device_ids=["cpu"] * k``); the GPU variants skip with a reason without GPUs.
"""

from __future__ import annotations

import copy
import threading
import time
import warnings

import pytest
import torch
from torch import nn

import harness
import parallel_workers
import syncbn
from reference import (assert_matches, make_data, make_params, reference_steps,
                       torch_grad_input_error)
from syncbn import _replicas

pytestmark = pytest.mark.timeout(120)

LAYERS = [
    (syncbn.SyncBatchNorm1d, (4,)),
    (syncbn.SyncBatchNorm1d, (4, 5)),
    (syncbn.SyncBatchNorm2d, (4, 3, 2)),
    (syncbn.SyncBatchNorm3d, (4, 2, 3, 2)),
    (syncbn.SyncBatchNorm, (4, 3, 2)),
]
GPUS = torch.cuda.device_count() if torch.cuda.is_available() else 0
NOTES = "exception notes (add_note, where the layer is named) need Python >= 3.11"


def _gpu_reason(needed: int) -> str:
    return f"needs {needed} CUDA device(s), this machine has {GPUS}"


def _layer_run(cls, tail, batch, replicas, dtype, steps=3, momentum=0.1, affine=True, track=True,
               device="cpu"):
    """``steps`` training passes of ``cls`` in ``syncbn.DataParallel`` over ``replicas`` copies of
    ``device``, each checked against the float64 reference on the whole batch."""
    chunk_sizes = [c.shape[0] for c in torch.empty(batch).chunk(replicas)]
    shards, grads = make_data(chunk_sizes, tail, dtype, seed=batch * 10 + replicas)
    weight, bias = make_params(tail[0], seed=3)
    # half inputs with float32 parameters, as in the distributed tests (workers.exactness)
    param_dtype = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    bn = cls(tail[0], momentum=momentum, affine=affine, track_running_stats=track,
             dtype=param_dtype)
    if affine:
        with torch.no_grad():
            bn.weight.copy_(weight)
            bn.bias.copy_(bias)
    bn.to(device)
    dp = syncbn.DataParallel(bn, device_ids=[device] * replicas)
    expected = reference_steps(shards, grads, weight if affine else None, bias if affine else None,
                               steps, momentum, bn.eps, track)
    floor = torch_grad_input_error(shards, grads, weight if affine else None,
                                   bias if affine else None, bn.eps, torch.cat(expected[0]["dx"]))
    for step, ref in enumerate(expected):
        x = torch.cat(shards).to(device).requires_grad_()
        bn.zero_grad()
        y = dp(x)
        y.backward(torch.cat(grads).to(device))
        assert y.dtype == dtype and y.shape == x.shape, (y.dtype, y.shape)
        what = f"step {step}, {cls.__name__}{tail}, {batch} over {replicas}"
        assert_matches(y.cpu(), torch.cat(ref["y"]), dtype, f"output, {what}")
        assert_matches(x.grad.cpu(), torch.cat(ref["dx"]), dtype, f"grad_input, {what}", floor)
        if affine:
            assert_matches(bn.weight.grad.cpu(), ref["dw"], dtype, f"grad_weight, {what}")
            assert_matches(bn.bias.grad.cpu(), ref["db"], dtype, f"grad_bias, {what}")
        if track:
            for name in ("running_mean", "running_var"):
                assert_matches(getattr(bn, name).cpu(), ref[name], dtype, f"{name}, {what}")
            assert int(bn.num_batches_tracked) == ref["num_batches_tracked"], what
    return shards, expected


@pytest.mark.parametrize("cls,tail", LAYERS, ids=lambda v: getattr(v, "__name__", str(v)))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("batch,replicas", [(7, 3), (8, 4), (5, 2)])
def test_layer_matches_whole_batch(cls, tail, dtype, batch, replicas):
    _layer_run(cls, tail, batch, replicas, dtype)


@pytest.mark.parametrize("momentum,affine,track", [(None, True, True), (0.1, False, True),
                                                   (0.1, True, False)])
def test_layer_options(momentum, affine, track):
    _layer_run(syncbn.SyncBatchNorm2d, (4, 3, 2), 7, 3, torch.float64, momentum=momentum,
               affine=affine, track=track)


def test_chunk_statistics_would_fail_the_check():
    """The comparison can fail: per-chunk statistics (what torch.nn.DataParallel's replicas use)
    are far from the whole batch's for 7 over 3."""
    shards, expected = _layer_run(syncbn.SyncBatchNorm1d, (4, 5), 7, 3, torch.float64, steps=1)
    weight, bias = make_params(4, seed=3)
    local = torch.cat([torch.nn.functional.batch_norm(s, None, None, weight, bias, training=True)
                       for s in shards])
    with pytest.raises(AssertionError):
        assert_matches(local, torch.cat(expected[0]["y"]), torch.float64, "per-chunk output")


def _model(dtype=torch.float64):
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1), syncbn.SyncBatchNorm2d(4), nn.SiLU(),
        nn.Conv2d(4, 3, 3, padding=1), syncbn.SyncBatchNorm2d(3), nn.Flatten(),
        nn.Linear(3 * 16, 2),
    ).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_training_steps_match_whole_batch(dtype, monkeypatch):
    """A conv model with two syncbn layers, SGD with momentum, 4 steps, batch 7 over 3 replicas:
    parameters, running statistics and losses equal the plain model's on the whole batch, and
    each syncbn layer runs ONE synchronized pass per forward (not one per replica)."""
    model = _model(dtype)
    plain = syncbn.revert_sync_batchnorm(copy.deepcopy(model))
    dp = syncbn.DataParallel(model, device_ids=["cpu"] * 3)
    opts = [torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9) for m in (model, plain)]
    passes = []
    original = _replicas._synchronized_pass

    def counted(arrivals, description):
        passes.append(len(arrivals))
        return original(arrivals, description)

    monkeypatch.setattr(_replicas, "_synchronized_pass", counted)
    g = torch.Generator().manual_seed(1)
    for step in range(4):
        x = torch.randn(7, 2, 4, 4, generator=g, dtype=torch.float64).to(dtype)
        target = torch.randn(7, 2, generator=g, dtype=torch.float64).to(dtype)
        losses = []
        for net, opt in zip((dp, plain), opts):
            opt.zero_grad()
            loss = torch.nn.functional.mse_loss(net(x), target)
            loss.backward()
            opt.step()
            losses.append(loss.detach())
        assert_matches(losses[0], losses[1].double(), dtype, f"loss at step {step}")
        for (name, a), b in zip(model.state_dict().items(), plain.state_dict().values()):
            if a.is_floating_point():
                assert_matches(a, b.double(), dtype, f"{name} after step {step}", floor=1e-12)
            else:
                assert torch.equal(a, b), name
    assert passes == [3] * 8  # 2 layers x 4 steps, each pass over the 3 replicas at once


def test_eval_is_local_and_matches_plain():
    model = _model()
    plain = syncbn.revert_sync_batchnorm(copy.deepcopy(model))
    dp = syncbn.DataParallel(model, device_ids=["cpu"] * 3)
    x = torch.randn(7, 2, 4, 4, dtype=torch.float64)
    dp(x)
    plain(x)
    model.eval()
    plain.eval()
    torch.testing.assert_close(dp(x), plain(x), rtol=1e-12, atol=1e-12)


def test_kwargs_and_containers_are_split_and_gathered():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn = syncbn.SyncBatchNorm1d(3, dtype=torch.float64)

        def forward(self, x, *, shift):
            return {"y": self.bn(x + shift), "n": [x.shape[0]]}

    net = Net()
    x, shift = torch.randn(7, 3, dtype=torch.float64), torch.randn(7, 3, dtype=torch.float64)
    out = syncbn.DataParallel(net, device_ids=["cpu"] * 3)(x, shift=shift)
    torch.testing.assert_close(out["y"], torch.nn.functional.batch_norm(
        x + shift, None, None, net.bn.weight, net.bn.bias, training=True), rtol=1e-12, atol=1e-12)
    assert out["n"] == [[3, 3, 1]]  # non-tensors gathered as torch's gather does: per element


def test_fewer_chunks_than_devices():
    """A batch of 2 over 4 devices makes 2 chunks (torch's chunk), so 2 replicas take part."""
    bn = syncbn.SyncBatchNorm1d(3, dtype=torch.float64)
    x = torch.randn(2, 3, 4, dtype=torch.float64)
    y = syncbn.DataParallel(bn, device_ids=["cpu"] * 4)(x)
    torch.testing.assert_close(y, torch.nn.functional.batch_norm(x, None, None, training=True))


class _Raises(nn.Module):
    """Raises ValueError on the replica that gets a chunk of one sample."""

    def forward(self, x):
        if x.shape[0] == 1:
            raise ValueError("replica with one sample refuses")
        return x


def _no_replica_threads_left():
    deadline = time.monotonic() + 5
    while any(t.name.startswith("syncbn-replica") for t in threading.enumerate()):
        assert time.monotonic() < deadline, "replica threads still running"
        time.sleep(0.01)


def _thread_errors(monkeypatch):
    seen = []
    monkeypatch.setattr(threading, "excepthook", lambda args: seen.append(args))
    return seen


@pytest.mark.skipif(not hasattr(BaseException, "add_note"), reason=NOTES)
def test_a_replica_that_raises_ends_every_replica_and_surfaces_once(monkeypatch):
    seen = _thread_errors(monkeypatch)
    net = nn.Sequential(syncbn.SyncBatchNorm1d(3), _Raises(), syncbn.SyncBatchNorm1d(3))
    dp = syncbn.DataParallel(net, device_ids=["cpu"] * 3, timeout=60)
    t0 = time.monotonic()
    with pytest.raises(ValueError, match="replica with one sample refuses") as info:
        dp(torch.randn(7, 3))
    assert time.monotonic() - t0 < 10  # nobody waited for the timeout
    notes = "\n".join(getattr(info.value, "__notes__", []))
    assert "replica 2 of 3 (device cpu)" in notes
    assert "SyncBatchNorm1d(3) '0'" in notes  # its last syncbn layer, by name
    assert seen == []  # raised once, in the caller: no thread died with it
    _no_replica_threads_left()
    dp(torch.randn(6, 3))  # the wrapper is usable again afterwards
    assert int(net[0].num_batches_tracked) == 2 and int(net[2].num_batches_tracked) == 1


def test_an_error_in_the_synchronized_pass_names_the_layer(monkeypatch):
    seen = _thread_errors(monkeypatch)
    monkeypatch.setenv("SYNCBN_NONFINITE", "raise")
    net = nn.Sequential(nn.Identity(), syncbn.SyncBatchNorm1d(3))
    x = torch.randn(7, 3)
    x[6, 1] = float("nan")
    with pytest.raises(RuntimeError, match=r"non-finite .* SyncBatchNorm1d\(3\) '1'"):
        syncbn.DataParallel(net, device_ids=["cpu"] * 3)(x)
    assert seen == []
    assert int(net[1].num_batches_tracked) == 1  # counted, but the statistics were not touched
    torch.testing.assert_close(net[1].running_mean, torch.zeros(3))
    _no_replica_threads_left()


class _Branchy(nn.Module):
    """The replica with a one-sample chunk takes another path through the syncbn layers."""

    def __init__(self, skip: bool):
        super().__init__()
        self.skip = skip
        self.a, self.b = syncbn.SyncBatchNorm1d(3), syncbn.SyncBatchNorm1d(3)

    def forward(self, x):
        x = self.a(x)
        if x.shape[0] == 1:
            return x if self.skip else self.a(x)  # skips b, or calls a a second time
        return self.b(x)


@pytest.mark.parametrize("skip", [False, True], ids=["other-layer", "skipped-layer"])
def test_replicas_out_of_step(skip, monkeypatch):
    seen = _thread_errors(monkeypatch)
    dp = syncbn.DataParallel(_Branchy(skip), device_ids=["cpu"] * 3, timeout=60)
    t0 = time.monotonic()
    with pytest.raises(RuntimeError, match="out of step") as info:
        dp(torch.randn(7, 3))
    assert time.monotonic() - t0 < 10
    message = str(info.value)
    if skip:
        assert "SyncBatchNorm1d(3) 'b'" in message and "finished its forward after 1" in message
    else:
        assert "SyncBatchNorm1d(3) 'a'" in message and "SyncBatchNorm1d(3) 'b'" in message
        assert "call #2" in message
    assert seen == []
    _no_replica_threads_left()


class _Slow(nn.Module):
    """A syncbn layer behind ``sleep`` seconds of the replica's own work on a chunk of 1."""

    def __init__(self, sleep: float):
        super().__init__()
        self.sleep = sleep
        self.bn = syncbn.SyncBatchNorm1d(3)

    def forward(self, x):
        if x.shape[0] == 1:
            time.sleep(self.sleep)
        return self.bn(x)


def test_a_replica_that_never_arrives_times_out():
    with pytest.raises(RuntimeError, match=r"waited 0.3 s at SyncBatchNorm1d\(3\) 'bn'.*\[2\]"):
        syncbn.DataParallel(_Slow(1.5), device_ids=["cpu"] * 3, timeout=0.3)(torch.randn(7, 3))
    _no_replica_threads_left()


def test_device_ids_validation():
    with pytest.raises(ValueError, match="distinct GPUs or one device"):
        syncbn.DataParallel(nn.Identity(), device_ids=["cpu", "cuda:0"])
    with pytest.raises(ValueError, match="expected distinct GPUs"):
        syncbn.DataParallel(nn.Identity(), device_ids=[0, 1, 0])
    if GPUS == 0:
        return  # parameters away from device_ids[0] (torch's wording): needs a GPU to place them
    bn = syncbn.SyncBatchNorm1d(3).cuda()
    with pytest.raises(RuntimeError, match="must have its parameters and buffers on device"):
        syncbn.DataParallel(bn, device_ids=["cpu"] * 2)(torch.randn(4, 3))


def test_torch_data_parallel_on_cpu_runs_the_module_unreplicated():
    """Without GPUs torch.nn.DataParallel runs the module as it is (no replicas, so no warning
    and nothing to synchronize); what it does with replicas is tested through the replica
    torch makes (below)."""
    bn = syncbn.SyncBatchNorm1d(3, dtype=torch.float64)
    dp = nn.DataParallel(bn)
    if dp.device_ids:
        pytest.skip(f"torch.nn.DataParallel replicates here (devices {dp.device_ids})")
    x = torch.randn(7, 3, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        y = dp(x)
    torch.testing.assert_close(y, torch.nn.functional.batch_norm(x, None, None, bn.weight, bn.bias,
                                                                 training=True))


def test_torch_data_parallel_replica_warns_once(monkeypatch):
    """torch.nn.parallel.replicate makes each replica with ``_replicate_for_data_parallel``
    (which sets ``_is_replica``), then gives it broadcast parameters: the same here on CPU."""
    monkeypatch.setattr(_replicas, "_warned_torch_dp", [False])
    bn = syncbn.SyncBatchNorm1d(3)
    replica = bn._replicate_for_data_parallel()
    replica.weight, replica.bias = bn.weight * 1, bn.bias * 1
    with pytest.warns(UserWarning, match=r"NOT synchronized across the replicas of "
                                         r"torch.nn.DataParallel.*syncbn.DataParallel"):
        replica(torch.randn(4, 3))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        replica(torch.randn(4, 3))  # once only
        bn(torch.randn(4, 3))  # the original is no replica


@pytest.mark.skipif(GPUS < 1, reason=_gpu_reason(1))
def test_torch_data_parallel_replica_warns_cuda(monkeypatch):
    monkeypatch.setattr(_replicas, "_warned_torch_dp", [False])
    bn = syncbn.SyncBatchNorm1d(3).cuda()
    replica = torch.nn.parallel.replicate(bn, [0])[0]
    with pytest.warns(UserWarning, match="NOT synchronized"):
        replica(torch.randn(4, 3, device="cuda"))


def test_in_a_multi_process_group_it_raises(tmp_path):
    messages = harness.run(parallel_workers.data_parallel_in_a_group, 2, tmp_path)
    for message in messages:
        assert "syncbn.DataParallel: SyncBatchNorm1d(4) '1'" in message
        assert "torch.distributed group of 2 ranks" in message


@pytest.mark.skipif(GPUS < 1, reason=_gpu_reason(1))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_replicas_on_one_gpu(dtype):
    _layer_run(syncbn.SyncBatchNorm2d, (4, 3, 2), 7, 3, dtype, device="cuda:0")


@pytest.mark.skipif(GPUS < 2, reason=_gpu_reason(2))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_replicas_on_several_gpus(dtype):
    replicas = min(GPUS, 3)
    model = _model(dtype).cuda()
    plain = syncbn.revert_sync_batchnorm(copy.deepcopy(model))
    dp = syncbn.DataParallel(model, device_ids=list(range(replicas)))
    x = torch.randn(7, 2, 4, 4, dtype=dtype, device="cuda")
    ys = [net(x) for net in (dp, plain)]
    for y in ys:
        y.square().sum().backward()
    assert_matches(ys[0].cpu(), ys[1].double().cpu(), dtype, "output")
    for (name, a), b in zip(model.named_parameters(), plain.parameters()):
        assert_matches(a.grad.cpu(), b.grad.double().cpu(), dtype, f"{name}.grad", floor=1e-12)
    for (name, a), b in zip(model.named_buffers(), plain.buffers()):
        if a.is_floating_point():
            assert_matches(a.cpu(), b.double().cpu(), dtype, name)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_half_precision_layer(dtype):
    _layer_run(syncbn.SyncBatchNorm2d, (4, 3, 2), 7, 3, dtype, steps=2)


@pytest.mark.parametrize("reentrant", [False, True], ids=["non-reentrant", "reentrant"])
def test_checkpointed_syncbn_layer_is_refused(reentrant):
    """The recompute of a checkpointed syncbn layer runs in the backward, outside the replicas'
    threads: refused with an error naming the layer (not silently normalized per chunk)."""
    from torch.utils.checkpoint import checkpoint

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin, self.bn = nn.Linear(3, 3), syncbn.SyncBatchNorm1d(3)
            self.reentrant = reentrant

        def forward(self, x):
            return checkpoint(self.bn, self.lin(x), use_reentrant=self.reentrant)

    net = Net()
    y = syncbn.DataParallel(net, device_ids=["cpu"] * 3)(torch.randn(7, 3))
    # Non-reentrant checkpointing may instead stop at its own check first: the replicas' shared
    # Function saved its tensors under the hooks of the thread that ran it (torch's
    # CheckpointError, a RuntimeError); loud either way.
    words = r"SyncBatchNorm1d\(3\) #\d+ is run again inside the backward"
    if not reentrant:
        words += "|A different number of tensors was saved"
    with pytest.raises(RuntimeError, match=words):
        y.sum().backward()
    # Outside the wrapper the layer is an ordinary one again (reentrant checkpointing here: the
    # non-reentrant kind of a syncbn layer without a process group fails on main too, a
    # CheckpointError about the number of saved tensors, reported to the lead).
    net.reentrant = True
    x = torch.randn(6, 3, requires_grad=True)
    net(x).sum().backward()
    assert x.grad is not None


@pytest.mark.skipif(not hasattr(BaseException, "add_note"), reason=NOTES)
def test_an_unexpected_error_in_the_synchronized_pass_gets_the_layer_in_a_note(monkeypatch):
    seen = _thread_errors(monkeypatch)
    calls = []

    def broken(geo, x, buffer, fields):
        calls.append(x.shape[0])
        raise MemoryError("no memory for the moments")

    monkeypatch.setattr(syncbn.backends.fused, "forward_reduce", broken)
    net = nn.Sequential(nn.Identity(), syncbn.SyncBatchNorm1d(3))
    with pytest.raises(MemoryError, match="no memory for the moments") as info:
        syncbn.DataParallel(net, device_ids=["cpu"] * 3)(torch.randn(7, 3))
    assert info.value.__notes__ == ["syncbn.DataParallel: in the synchronized pass of "
                                    "SyncBatchNorm1d(3) '1' over its 3 replicas; every replica "
                                    "has been ended"]
    assert calls == [3] and seen == []  # one pass for all replicas, stopped at the first
    _no_replica_threads_left()


def test_the_timeout_is_kept_with_a_slow_replica():
    """A replica busy in its own code for longer than the timeout: the error comes after the
    timeout (within 10 %), not when the slow replica is done."""
    t0 = time.monotonic()
    with pytest.raises(RuntimeError, match=r"waited 1.5 s at SyncBatchNorm1d\(3\) 'bn'"):
        syncbn.DataParallel(_Slow(4.0), device_ids=["cpu"] * 3, timeout=1.5)(torch.randn(7, 3))
    took = time.monotonic() - t0
    print(f"raised after {took:.2f} s (timeout 1.5 s)")
    assert took < 1.65, took
    time.sleep(3.0)  # the slow replica reaches its layer and ends there
    _no_replica_threads_left()


@pytest.mark.parametrize("activation,param", [("relu", 0.0), ("leaky_relu", 0.2), ("elu", 0.5)])
def test_activated_layers_over_the_replicas(activation, param):
    """A layer with a fused activation in syncbn.DataParallel: the same as the unsplit batch
    through plain BatchNorm + the activation (outputs, every gradient, running statistics)."""
    import torch.nn.functional as F

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), syncbn.SyncBatchNorm2d(
        4, activation=activation, activation_param=param)).double()
    ref = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).double()
    ref.load_state_dict(net.state_dict())
    act = {"relu": lambda z: F.relu(z), "leaky_relu": lambda z: F.leaky_relu(z, param),
           "elu": lambda z: F.elu(z, param)}[activation]
    x = torch.randn(7, 3, 6, 6, dtype=torch.float64)
    y = syncbn.DataParallel(net, device_ids=["cpu"] * 3)(x)
    y.pow(2).sum().backward()
    z = act(ref(x))
    z.pow(2).sum().backward()
    torch.testing.assert_close(y, z, rtol=1e-10, atol=1e-10)
    for (name, a), b in zip(net.named_parameters(), ref.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-10, atol=1e-10, msg=name)
    torch.testing.assert_close(net[1].running_var, ref[1].running_var, rtol=1e-12, atol=1e-12)
