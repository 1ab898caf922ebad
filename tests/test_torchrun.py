"""torchrun, multi-node style: two ``torchrun`` launchers ("nodes") on loopback, c10d rendezvous.

Node 0 runs 2 processes and node 1 runs 1, so the world has 3 ranks over 2 nodes with uneven
shards, one of them empty. Each rank (``tests/torchrun_worker.py``) initializes gloo from
``env://`` and checks syncbn against the float64 reference, DDP training against one process, and
``syncbn check`` under torchrun. The only port is a free one found by binding port 0.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

import harness

TESTS = Path(__file__).parent
NPROC = [2, 1]  # processes per node
SIZES = [3, 0, 5]  # samples per global rank (node 0: ranks 0-1, node 1: rank 2)
TIMEOUT_S = 150


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _launcher(node: int, port: int, out_dir: Path) -> list[str]:
    return [
        sys.executable, "-m", "torch.distributed.run",
        "--nnodes", "2", "--node-rank", str(node), "--nproc-per-node", str(NPROC[node]),
        "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}",
        "--rdzv-id", f"syncbn-test-{port}", "--rdzv-conf", f"is_host={int(node == 0)}",
        "--local-addr", "127.0.0.1", "--max-restarts", "0", "--monitor-interval", "0.2",
        str(TESTS / "torchrun_worker.py"), str(out_dir), json.dumps(SIZES),
    ]


def _output(logs: list[tuple[Path, Path]]) -> str:
    text = []
    for node, (out, err) in enumerate(logs):
        text.append(f"\n===== node {node} stdout =====\n{out.read_text(errors='replace')}")
        text.append(f"\n===== node {node} stderr =====\n{err.read_text(errors='replace')}")
    return "".join(text)


@pytest.mark.timeout(TIMEOUT_S + 30)
def test_two_torchrun_nodes_on_loopback(tmp_path):
    out_dir = tmp_path / "ranks"
    out_dir.mkdir()
    port = _free_port()
    env = harness.child_env(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    logs, procs = [], []
    for node in (0, 1):
        out, err = tmp_path / f"node{node}.out", tmp_path / f"node{node}.err"
        logs.append((out, err))
        with out.open("wb") as fo, err.open("wb") as fe:
            # A session of its own, so that a hung launcher and its workers can be stopped together.
            procs.append(subprocess.Popen(_launcher(node, port, out_dir), stdout=fo, stderr=fe,
                                          env=env, cwd=tmp_path, start_new_session=True))
    deadline = time.monotonic() + TIMEOUT_S
    codes = []
    try:
        for p in procs:
            try:
                codes.append(p.wait(timeout=max(1.0, deadline - time.monotonic())))
            except subprocess.TimeoutExpired:
                codes.append(None)
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait(timeout=10)
    assert codes == [0, 0], f"launcher exit codes {codes} (None: killed after {TIMEOUT_S}s)" + _output(logs)

    ranks = sorted((json.loads(f.read_text()) for f in out_dir.glob("rank-*.json")),
                   key=lambda r: r["rank"])
    assert [r["rank"] for r in ranks] == [0, 1, 2], f"rank reports: {ranks}" + _output(logs)
    assert all(r["world_size"] == 3 and r["check_status"] == 0 for r in ranks), ranks
    nodes = {r["node_rank"] for r in ranks}
    assert nodes == {0, 1}, f"ranks did not span both nodes: {ranks}"
    # The rendezvous numbers the nodes in the order they join, so either launcher may be node 0.
    per_node = sorted(sorted(r["local_rank"] for r in ranks if r["node_rank"] == n) for n in nodes)
    assert per_node == sorted(list(range(n)) for n in NPROC), f"local ranks per node: {ranks}"
    assert len({r["pid"] for r in ranks}) == 3
    stdout = "".join(out.read_text() for out, _ in logs)
    assert "PASS: all 3 ranks match the float64 reference" in stdout, _output(logs)
