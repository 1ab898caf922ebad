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
from syncbn.check import shard_sizes


def _check(*args: str, timeout: float = 150) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "syncbn", "check", "--iters", "3", *args],
                          capture_output=True, text=True, timeout=timeout,
                          env=harness.child_env())


def _rows(stdout: str) -> dict[int, list[str]]:
    """Table rows by rank: ``rank host device backend shard out dx dwb running result ...``."""
    rows = {}
    for line in stdout.splitlines():
        fields = line.split()
        if len(fields) >= 10 and fields[0].isdigit() and fields[9] in ("PASS", "FAIL"):
            rows[int(fields[0])] = fields
    return rows


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
    for rank, f in rows.items():
        assert f[2:5] == ["cpu", "gloo", str(sizes[rank])], f
        errors = [float(e) for e in f[5:9]]
        assert all(0 <= e <= tol for e in errors), f
        assert f[9] == "PASS"
        assert re.fullmatch(r"\d+", f[10]) and f[11] == "us", f  # all_reduce latency
        assert float(f[12]) > 0 and f[13] == "ms", f  # layer forward+backward
        assert f[14] == "fused", f  # CPU float32: the fused kernel
        assert f[15] == "shm", f  # ranks of one machine: shared memory
    if world_size >= 3:
        assert rows[1][4] == "0", "rank 1's shard should be empty"
    assert f"PASS: all {world_size} ranks match the float64 reference" in proc.stdout


@pytest.mark.timeout(200)
def test_check_fails_on_a_mismatch():
    proc = _check("--world-size", "2", "--inject-error", "1")
    assert proc.returncode == 1, _explain(proc)
    rows = _rows(proc.stdout)
    assert sorted(rows) == [0, 1], _explain(proc)
    # Rank 1's wrong data shifts the global statistics: every rank disagrees with the reference.
    assert all(f[9] == "FAIL" and float(f[5]) > 1e-3 for f in rows.values()), _explain(proc)
    assert "FAIL: ranks [0, 1] do not match" in proc.stdout


@pytest.mark.timeout(60)
def test_check_bad_options_exit_2():
    proc = _check("--world-size", "1")
    assert proc.returncode == 2, _explain(proc)
    assert "must be at least 2" in proc.stderr
