"""GPU specifics that a CPU cannot show: the Triton backend on a GPU that is not the current one,
syncbn.DataParallel on the caller's streams, no host sync in a synchronized pass. Each test skips
with its reason where the GPUs it needs are missing (``benchmarks/gpu_check.sh`` runs them)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import syncbn
from syncbn import _pass, _settings

pytestmark = pytest.mark.cuda


def _need_gpus(n: int) -> None:
    have = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if have < n:
        reason = f"needs {n} CUDA device(s), this machine has {have}"
        print(reason)
        pytest.skip(reason)


def _use_kernel(monkeypatch, kernel: str) -> None:
    """``SYNCBN_KERNEL=kernel`` for this test (Triton compiled, not interpreted)."""
    if kernel == "triton":
        pytest.importorskip("triton", reason="triton is not installed")
    monkeypatch.setenv("SYNCBN_KERNEL", kernel)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    _settings.reload()


def _synchronized_step(layer: syncbn.SyncBatchNorm, x: torch.Tensor, dy: torch.Tensor) -> None:
    """The layer's synchronized path on one rank (its collective skipped): forward, backward."""
    params = (layer.weight, layer.bias, layer.running_mean, layer.running_var)
    plan = _pass.synchronized_plan(layer._sync, x, params)
    y = _pass.SyncBatchNormFunction.apply(x, *params, layer.eps, 0.1, plan)
    y.backward(dy)
    return y


@pytest.mark.parametrize("kernel", ["triton", "aten"])
def test_a_layer_on_the_second_gpu_while_the_first_is_current(monkeypatch, kernel):
    """Triton launches on the current device unless told otherwise: the backend launches under
    the input's device (and that device's current stream)."""
    _need_gpus(2)
    _use_kernel(monkeypatch, kernel)
    torch.cuda.set_device(0)
    layer = syncbn.SyncBatchNorm2d(8).to("cuda:1", torch.float64)
    ref = torch.nn.BatchNorm2d(8).to("cuda:1", torch.float64)
    x = torch.randn(4, 8, 5, 5, device="cuda:1", dtype=torch.float64, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    dy = torch.randn_like(x)
    y = _synchronized_step(layer, x, dy)
    y_ref = F.batch_norm(x_ref, ref.running_mean, ref.running_var, ref.weight, ref.bias, True,
                         0.1, layer.eps)
    y_ref.backward(dy)
    torch.cuda.synchronize(1)
    assert torch.cuda.current_device() == 0
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(layer.running_var, ref.running_var, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("kernel", ["triton", "aten"])
def test_a_synchronized_pass_makes_no_host_sync(monkeypatch, kernel):
    """``torch.cuda.set_sync_debug_mode("error")`` around a forward and backward of a warm
    layer: no blocking host read (the header check is deferred, the buffer made on the device)."""
    _need_gpus(1)
    _use_kernel(monkeypatch, kernel)
    layer = syncbn.SyncBatchNorm2d(16).cuda()
    x = torch.randn(8, 16, 7, 7, device="cuda", requires_grad=True)
    dy = torch.randn_like(x)
    _synchronized_step(layer, x, dy)  # warm: plan, width, kernels
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        _synchronized_step(layer, x, dy)
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_data_parallel_runs_on_the_callers_streams():
    """The replicas' work goes to the stream that is current in the caller on each device (like
    torch's parallel_apply), not to each worker thread's default stream."""
    _need_gpus(2)
    model = syncbn.convert_sync_batchnorm(torch.nn.Sequential(torch.nn.BatchNorm1d(4))).cuda()
    net = syncbn.DataParallel(model, device_ids=[0, 1])
    streams = [torch.cuda.Stream(device=d) for d in (0, 1)]
    seen: list[torch.cuda.Stream] = []
    hook = model[0].register_forward_pre_hook(
        lambda m, args: seen.append(torch.cuda.current_stream(args[0].device)))
    try:
        with torch.cuda.stream(streams[0]), torch.cuda.device(1), torch.cuda.stream(streams[1]):
            net(torch.randn(8, 4, device="cuda:0")).sum().backward()
    finally:
        hook.remove()
    torch.cuda.synchronize()
    assert sorted(s.cuda_stream for s in seen) == sorted(s.cuda_stream for s in streams)
