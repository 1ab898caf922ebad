"""``syncbn check`` on the CPU: spawned gloo ranks, as a user runs it (a subprocess).

It must pass on 2 and 3 ranks (3: one empty shard), print one row per rank, and fail (exit 1,
FAIL rows) when one rank's data is wrong -- the hidden ``--inject-error RANK`` shifts that rank's
input, so the check itself is shown to be able to fail. The torchrun path of ``syncbn check``
runs in ``test_torchrun.py``.
"""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

import harness
from syncbn.cli.check import shard_sizes
from tables import read_table


def _check(*args: str, timeout: float = 150) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "syncbn", "check", "--iters", "3", *args],
                          capture_output=True, text=True, timeout=timeout,
                          env=harness.child_env())


def _rows(stdout: str) -> dict[int, dict[str, str]]:
    """The table's rows by rank, each by column name."""
    return {int(row["rank"]): row for row in read_table(stdout, "rank")}


def _explain(proc: subprocess.CompletedProcess) -> str:
    return f"exit {proc.returncode}\n--- stdout ---\n{proc.stdout}\n--- stderr ---\n{proc.stderr}"


@pytest.mark.timeout(200)
@pytest.mark.parametrize("world_size,dtype,tol", [(2, "float32", 1e-5), (3, "float64", 1e-10)])
def test_check_passes(world_size, dtype, tol):
    proc = _check("--world-size", str(world_size), "--dtype", dtype)
    assert proc.returncode == 0, _explain(proc)
    rows = _rows(proc.stdout)
    assert sorted(rows) == list(range(world_size)), _explain(proc)
    sizes = shard_sizes(world_size, 4)
    errors = ("output", "grad_in", "grad_w/b", "running")
    for rank, row in rows.items():
        assert (row["device"], row["backend"], row["shard"]) == ("cpu", "gloo", str(sizes[rank]))
        assert all(0 <= float(row[e]) <= tol for e in errors), row
        assert row["result"] == "PASS"
        assert re.fullmatch(r"\d+", row["AR us"]) and float(row["layer ms"]) > 0, row
        assert row["path"] == "fused", row  # CPU float32/float64: the fused kernel
        assert row["transport"] == "shm", row  # ranks of one machine: shared memory
    if world_size >= 3:
        assert rows[1]["shard"] == "0", "rank 1's shard should be empty"
    assert f"PASS: all {world_size} ranks match the float64 reference" in proc.stdout


@pytest.mark.timeout(200)
def test_check_fails_on_a_mismatch():
    proc = _check("--world-size", "2", "--inject-error", "1")
    assert proc.returncode == 1, _explain(proc)
    rows = _rows(proc.stdout)
    assert sorted(rows) == [0, 1], _explain(proc)
    # Rank 1's wrong data shifts the global statistics: every rank disagrees with the reference.
    assert all(r["result"] == "FAIL" and float(r["output"]) > 1e-3 for r in rows.values()), \
        _explain(proc)
    assert "FAIL: ranks [0, 1] do not match" in proc.stdout


@pytest.mark.timeout(60)
def test_check_bad_options_exit_2():
    proc = _check("--world-size", "1")
    assert proc.returncode == 2, _explain(proc)
    assert proc.stderr.strip().splitlines() == [
        "syncbn check: error: argument -W/--world-size: expected an integer >= 2, got 1 "
        "(see syncbn check --help)"]
    proc = _check("--backend", "nccl", "--device", "cpu")
    assert proc.returncode == 2, _explain(proc)
    assert proc.stderr.strip().splitlines() == [
        "syncbn check: error: --backend nccl needs CUDA devices (--device cuda, or auto on a "
        "machine with a GPU per rank)"]
