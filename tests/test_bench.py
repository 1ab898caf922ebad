"""``syncbn bench --quick`` as a user runs it (a subprocess): exit 0, tables, a JSON with every section."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import harness


def _bench(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "syncbn", "bench", *args],
                          check=False, capture_output=True, text=True, timeout=timeout,
                          env=harness.child_env())


@pytest.mark.timeout(150)
def test_quick_bench_writes_all_sections(tmp_path: Path) -> None:
    proc = _bench("--quick", "--out", str(tmp_path), "--shapes", "2x64x28x28,16x128,cl:2x32x14x14",
                  "--iters", "3", "--warmup", "1", "--e2e-input", "2x3x16x16", "--e2e-steps", "2",
                  "--device", "cpu", "--threads", "1")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for title in ("1. Per layer", "2. End to end", "3. Memory"):
        assert title in proc.stdout
    report = json.loads((tmp_path / "syncbn-bench.json").read_text())
    for key in ("torch", "machine", "date", "threads", "command", "layers", "e2e", "allocator"):
        assert key in report
    assert "memory allocator settings: " in proc.stdout
    assert report["threads"] == [1] and report["machine"]["cpu_count"] >= 1
    kernel = report["kernel"]
    assert kernel["available"] and kernel["cold_build_s"] > 0, kernel
    assert "fused CPU kernel (SYNCBN_KERNEL=auto): cold build" in proc.stdout
    layers = report["layers"]
    assert [(r["shape"], r["world_size"]) for r in layers] == [
        (s, w) for w in (1, 2) for s in ("2x64x28x28", "16x128", "cl:2x32x14x14")]
    for row in layers:
        for key in ("torch_bn_ms", "syncbn_ms", "syncbn_aten_ms", "textbook_ms", "all_reduce_ms"):
            assert row[key] > 0, (key, row)
        if row["world_size"] > 1:
            # compute is the total minus the time inside syncbn's two collectives
            assert row["syncbn_collective_ms"] > 0, row
            assert 0 < row["syncbn_compute_ms"] < row["syncbn_ms"], row
        else:  # a 1-rank group has nothing to sum: no collective, compute is the total
            assert row["syncbn_collective_ms"] == 0, row
            assert row["syncbn_compute_ms"] == row["syncbn_ms"], row
        assert row["fused"] and row["threads"] == 1, row
        assert row["buffer_numbers"] > 0
        assert ("syncbn_fallback_ms" in row) == (row["world_size"] == 1)
        assert row["syncbn_fallback_ms"] > 0 if row["world_size"] == 1 else True
    e2e = report["e2e"]
    for contender in ("torch_bn", "syncbn", "syncbn_own_group"):
        assert len(e2e[contender]) == 2
        for rank in e2e[contender]:
            assert rank["step_median_ms"] > 0 and rank["peak_bytes"] > 0
    assert e2e["step_ratio"] > 0 and e2e["own_group_step_ratio"] > 0
    assert all(r["collective_median_ms"] > 0 for r in e2e["syncbn"])


@pytest.mark.timeout(60)
def test_bad_shape_is_exit_2(tmp_path: Path) -> None:
    proc = _bench("--out", str(tmp_path), "--shapes", "2x64x5", timeout=50)
    assert proc.returncode == 2
    assert "bad shape" in proc.stderr
    assert not (tmp_path / "syncbn-bench.json").exists()


@pytest.mark.timeout(30)
def test_textbook_matches_torch_batchnorm() -> None:
    """The textbook contender computes batch norm (1-rank gloo group), so timing it is fair."""
    import tempfile

    import torch
    import torch.distributed as dist

    from syncbn.bench import textbook_sync_bn

    if dist.is_initialized():
        pytest.skip("a process group is already initialized in this process")
    store = dist.FileStore(os.path.join(tempfile.mkdtemp(), "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        x = torch.randn(4, 8, 5, 5, dtype=torch.float64, requires_grad=True)
        bn = torch.nn.BatchNorm2d(8, dtype=torch.float64)
        w = torch.nn.Parameter(torch.rand(8, dtype=torch.float64) + 0.5)
        b = torch.nn.Parameter(torch.randn(8, dtype=torch.float64))
        with torch.no_grad():
            bn.weight.copy_(w)
            bn.bias.copy_(b)
        rm, rv = torch.zeros(8, dtype=torch.float64), torch.ones(8, dtype=torch.float64)
        dy = torch.randn_like(x)
        y = textbook_sync_bn(x, w, b, rm, rv, 1e-5, 0.1, dist.group.WORLD)
        (gx,) = torch.autograd.grad(y, x, dy)
        x2 = x.detach().clone().requires_grad_()
        y2 = bn(x2)
        y2.backward(dy)
        torch.testing.assert_close(y, y2)
        torch.testing.assert_close(gx, x2.grad)
        torch.testing.assert_close(rm, bn.running_mean)
        torch.testing.assert_close(rv, bn.running_var)
    finally:
        dist.destroy_process_group()
