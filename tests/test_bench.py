"""``syncbn bench --quick`` as a user runs it (a subprocess): exit 0, tables, a JSON with every
section whose numbers agree with each other and with the tables; bad input: one line, exit 2."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import harness
from tables import read_table


def _bench(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "syncbn", "bench", *args],
                          check=False, capture_output=True, text=True, timeout=timeout,
                          env=harness.child_env())


@pytest.mark.timeout(150)
def test_quick_bench_writes_all_sections(tmp_path: Path) -> None:
    proc = _bench("--quick", "--out", str(tmp_path), "--shapes", "2x64x28x28,16x128,cl:2x32x14x14",
                  "--iters", "3", "--warmup", "1", "--e2e-input", "2x3x16x16", "--e2e-steps", "2",
                  "--device", "cpu", "--threads", "1", "--no-act")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for title in ("1. Per layer", "2. End to end", "3. Memory"):
        assert title in proc.stdout
    report = json.loads((tmp_path / "syncbn-bench.json").read_text())
    for key in ("torch", "machine", "date", "threads", "command", "layers", "e2e", "allocator"):
        assert key in report
    assert "memory allocator settings: " in proc.stdout
    assert report["threads"] == [1] and report["machine"]["cpu_count"] >= 1
    kernel = report["kernel"]
    assert kernel["available"], kernel
    # loading a cached kernel is far cheaper than the cold build measured in a subprocess
    assert kernel["this_run"] == "built" or kernel["this_run_s"] < kernel["cold_build_s"], kernel
    assert "fused CPU kernel (SYNCBN_KERNEL=auto): cold build" in proc.stdout
    layers = report["layers"]
    assert [(r["shape"], r["world_size"]) for r in layers] == [
        (s, w) for w in (1, 2) for s in ("2x64x28x28", "16x128", "cl:2x32x14x14")]
    approx = pytest.approx
    for row in layers:
        for key in ("torch_bn_ms", "syncbn_ms", "syncbn_aten_ms", "textbook_ms", "all_reduce_ms"):
            # the slowest rank's median, and every rank's alongside
            assert row[key] == max(row[key.replace("_ms", "_ms_per_rank")]), (key, row)
        if row["world_size"] > 1:
            # compute is the total minus the time inside syncbn's two collectives
            assert 0 < row["syncbn_compute_ms"] < row["syncbn_ms"], row
        else:  # a 1-rank group has nothing to sum: no collective, compute is the total
            assert row["syncbn_collective_ms"] == 0, row
            assert row["syncbn_compute_ms"] == row["syncbn_ms"], row
        assert row["syncbn_over_bn"] == approx(row["syncbn_ms"] / row["torch_bn_ms"])
        assert row["compute_over_bn"] == approx(row["syncbn_compute_ms"] / row["torch_bn_ms"])
        assert row["textbook_over_syncbn"] == approx(row["textbook_ms"] / row["syncbn_ms"])
        assert row["syncbn_minus_bn_plus_2ar_ms"] == approx(
            row["syncbn_ms"] - row["torch_bn_ms"] - 2 * row["all_reduce_ms"])
        assert row["fused"] and row["threads"] == 1, row
        c = int(row["shape"].removeprefix("cl:").split("x")[1])
        assert row["buffer_numbers"] >= 2 * c + 1, row  # Σx and Σx² per channel, and the count
        assert ("syncbn_fallback_ms" in row) == (row["world_size"] == 1)
    # The printed table shows the JSON's numbers, by column name, in at most 120 columns.
    printed = read_table(proc.stdout, "shape")
    assert len(printed) == len(layers)
    for cells, row in zip(printed, layers):
        assert (cells["shape"], cells["W"], cells["T"]) == (
            row["shape"], str(row["world_size"]), "1")
        assert cells["syncbn ms"] == f"{row['syncbn_ms']:.3f}"
        assert cells["syncbn/BN"] == f"{row['syncbn_over_bn']:.2f}"
        assert cells["BN+2AR ms"] == f"{row['torch_bn_ms'] + 2 * row['all_reduce_ms']:.3f}"
        assert cells["textbook/syncbn"] == f"{row['textbook_over_syncbn']:.2f}"
    e2e = report["e2e"]
    for contender in ("torch_bn", "syncbn", "syncbn_own_group"):
        assert [r["rank"] for r in e2e[contender]] == [0, 1]
        for rank in e2e[contender]:
            assert rank["step_min_ms"] <= rank["step_median_ms"], rank
            assert 0 <= rank["peak_growth_bytes"] <= rank["peak_bytes"], rank
    slowest = {k: max(r["step_median_ms"] for r in e2e[k]) for k in ("torch_bn", "syncbn",
                                                                       "syncbn_own_group")}
    assert e2e["step_ratio"] == approx(slowest["syncbn"] / slowest["torch_bn"])
    assert e2e["own_group_step_ratio"] == approx(slowest["syncbn_own_group"] / slowest["torch_bn"])
    for r in e2e["syncbn"]:  # syncbn's collectives are part of its step
        assert 0 < r["collective_median_ms"] < r["step_median_ms"], r
    assert all(r["collective_median_ms"] == 0 for r in e2e["torch_bn"])  # no syncbn layer
    step = read_table(proc.stdout, "syncbn's group")
    assert [c["syncbn's group"] for c in step] == ["default group", "own group"]
    assert step[0]["syncbn/BN"] == f"{e2e['step_ratio']:.3f}"
    memory = read_table(proc.stdout, "rank")
    assert [c["rank"] for c in memory] == ["0", "1"]


@pytest.mark.timeout(150)
def test_activated_section_at_a_tiny_size(tmp_path: Path) -> None:
    """Section 4 alone: its table shows the JSON's numbers; the fused and in-place variants
    compute the same loss, and the unfused one too once the layers honour the activation."""
    proc = _bench("--quick", "--no-layers", "--no-e2e", "--out", str(tmp_path), "--warmup", "1",
                  "--e2e-input", "2x3x8x8", "--e2e-steps", "2", "--device", "cpu", "--threads",
                  "1")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "4. Activated layers" in proc.stdout and "1. Per layer" not in proc.stdout
    act = json.loads((tmp_path / "syncbn-bench.json").read_text())["act"]
    approx = pytest.approx
    slowest = {v: max(r["step_median_ms"] for r in act[v]) for v in ("unfused", "fused",
                                                                       "inplace")}
    saved = {v: max(r["saved_for_backward_bytes"] for r in act[v]) for v in slowest}
    for variant in ("unfused", "fused", "inplace"):
        assert [r["rank"] for r in act[variant]] == [0, 1]
        for r in act[variant]:
            assert r["variant"] == variant and r["steps"] == 2
            assert r["step_min_ms"] <= r["step_median_ms"] and r["saved_for_backward_bytes"] > 0
            assert 0 <= r["peak_growth_bytes"] <= r["peak_bytes"]
            assert set(r["honoured"]) == {"activation", "inplace"}
        if variant != "unfused":
            assert act[f"{variant}_step_ratio"] == approx(slowest[variant] / slowest["unfused"])
            assert act[f"{variant}_saved_ratio"] == approx(saved[variant] / saved["unfused"])
    # the same weights and input: the same first loss on every rank pair of variants
    assert act["fused"][0]["first_loss"] == approx(act["inplace"][0]["first_loss"], rel=1e-5)
    if act["honoured"]:
        assert act["unfused"][0]["first_loss"] == approx(act["fused"][0]["first_loss"],
                                                         rel=1e-5)
        assert saved["inplace"] < saved["fused"] < saved["unfused"]
    else:
        assert "do not honour activation/inplace yet" in proc.stdout
    rows = read_table(proc.stdout, "variant")
    assert [r["variant"] for r in rows] == ["unfused", "fused", "inplace"]
    assert rows[0]["honoured"] == "-" and rows[0]["step/unfused"] == "1.000"
    assert rows[2]["step ms"] == f"{slowest['inplace']:.1f}"
    assert rows[2]["saved/unfused"] == f"{act['inplace_saved_ratio']:.3f}"
    assert rows[2]["honoured"] == ("yes" if act["honoured"] else "NO")


@pytest.mark.timeout(60)
def test_bad_shape_is_exit_2(tmp_path: Path) -> None:
    proc = _bench("--out", str(tmp_path), "--shapes", "2x64x5", timeout=50)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "syncbn bench: error: argument --shapes: bad shape '2x64x5': expected NxC, NxCxHxW or "
        "cl:NxCxHxW, every size >= 1 (see syncbn bench --help)"]
    assert not (tmp_path / "syncbn-bench.json").exists()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("args,message", [
    (["--out", "/proc/forbidden/x"], "--out '/proc/forbidden/x': cannot create the directory"),
    (["--timeout", "-1"], "argument --timeout: expected a number > 0, got -1"),
    (["--threads", "0"], "argument --threads: expected integers >= 1, got '0'"),
    (["--iters", "x"], "argument --iters: expected an integer >= 1, got 'x'"),
    (["--e2e-input", "2x3"], "--e2e-input 2x3: expected NxCxHxW"),
])
def test_bad_input_is_one_line_and_exit_2(args: list[str], message: str) -> None:
    proc = _bench(*args, timeout=50)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("syncbn bench: error: "), proc.stderr
    assert message in lines[0]
    assert not proc.stdout


@pytest.mark.timeout(30)
def test_textbook_matches_torch_batchnorm() -> None:
    """The textbook contender computes batch norm (1-rank gloo group), so timing it is fair."""
    import tempfile

    import torch
    import torch.distributed as dist

    from syncbn.cli._bench_models import textbook_sync_bn

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
