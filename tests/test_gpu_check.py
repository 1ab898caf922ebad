"""``benchmarks/gpu_check.sh`` and its driver ``benchmarks/gpu_check.py`` without a GPU.

On a machine without CUDA the script must stop at once, saying so, with a non-zero status and at
most 8 files in ``$OUT`` (what a device run can bring back); the driver's ``--cpu-smoke`` runs
the sections' code on CPU (Triton through its interpreter) and writes the summary JSON the GPU
run will write; ``--mark-*`` and ``--finish`` turn a killed step into a verdict and an exit
status.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import harness

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"
DRIVER = ROOT / "benchmarks" / "gpu_check.py"


def _env(**overrides: str) -> dict[str, str]:
    """This interpreter first on PATH as ``python3`` (the script calls python3), syncbn from
    this checkout, no settings from the outer environment."""
    env = harness.child_env(SYNCBN_KERNEL=None, SYNCBN_FORCE_SYNC=None, TRITON_INTERPRET=None,
                            GPU_CHECK_SMOKE=None, **overrides)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    return env


def _driver(out: Path, *args: str, timeout: float = 100) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(DRIVER), "--out", str(out), *args], check=False,
                          cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=timeout)


@pytest.mark.timeout(90)
@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device")
def test_without_cuda_the_script_stops_at_once(tmp_path: Path) -> None:
    out = tmp_path / "out"
    t0 = time.perf_counter()
    run = subprocess.run(["bash", str(SCRIPT)], check=False, cwd=ROOT, env=_env(OUT=str(out)),
                         capture_output=True, text=True, timeout=80)
    seconds = time.perf_counter() - t0
    assert run.returncode == 2, run.stdout + run.stderr
    assert seconds < 30, seconds  # an import of torch, nothing else
    assert "no CUDA device" in run.stdout, run.stdout
    files = [p for p in out.rglob("*") if p.is_file()]
    assert {p.name for p in files} == {"summary.json", "gpu_check.log"}, files
    summary = json.loads((out / "summary.json").read_text())
    assert summary["exit_status"] == 2
    assert summary["steps"]["env"]["status"] == "failed"
    assert "no CUDA device" in summary["steps"]["env"]["reason"]
    assert summary["steps"]["timing"]["status"] == "skipped"


@pytest.mark.timeout(150)
def test_cpu_smoke_writes_every_number_and_verdict(tmp_path: Path) -> None:
    out = tmp_path / "out"
    run = _driver(out, "--cpu-smoke", "--only", "env,gradients,numerics,timing", timeout=140)
    assert run.returncode == 0, run.stdout + run.stderr
    summary = json.loads((out / "summary.json").read_text())
    steps = summary["steps"]
    assert steps["env"]["status"] == "passed"
    assert steps["gradients"]["status"] == "passed", steps["gradients"]
    assert set(steps["gradients"]["paths"]) == {"aten", "triton"}  # no cuda path on a CPU
    assert steps["gradients"]["available"]["cuda"].startswith("not available")
    for row in steps["gradients"]["rows"]:
        for path in ("aten", "triton"):
            assert set(row["errors"][path]) == {"y", "dx", "dw", "db", "running_mean",
                                                "running_var"}
    assert steps["numerics"]["paths"]["aten"]["var_rel_err"] < 1e-6
    assert [r["dtype"] for r in steps["timing"]["rows"]] == ["bfloat16", "float32"]
    assert {"BN", "aten", "triton"} <= set(steps["timing"]["rows"][0]["ms"])
    assert set(steps["timing"]["rows"][0]["vs_BN"]) == {"aten", "triton"}
    assert steps["timing"]["copy_bandwidth_GBps"] > 0
    verdicts = summary["verdicts"]
    assert {v["step"] for v in verdicts} == {"gradients", "numerics"}  # timing: vs SyncBN (CUDA)
    assert all(v["ok"] is True for v in verdicts if v["step"] == "gradients"), verdicts
    assert all(v["ok"] is None for v in verdicts if v["step"] == "numerics")  # smoke: no targets
    assert summary["recommended_default"]["path"] in ("aten", "triton")
    assert "force_sync" in summary["environment"]
    assert "[ok  ] gradients:" in run.stdout  # verdicts are printed as they come
    assert {p.name for p in out.iterdir()} == {"summary.json", "gpu_check.log"}


@pytest.mark.timeout(150)
def test_cpu_smoke_two_gloo_ranks(tmp_path: Path) -> None:
    out = tmp_path / "out"
    run = _driver(out, "--cpu-smoke", "--only", "gloo", "--budget", "120", timeout=140)
    assert run.returncode == 0, run.stdout + run.stderr
    summary = json.loads((out / "summary.json").read_text())
    gloo = summary["steps"]["gloo"]
    assert gloo["status"] == "passed", gloo
    assert gloo["rank_exit"] == [0, 0]
    checks = [v["check"] for v in gloo["verdicts"]]
    for path in ("aten", "triton"):  # every path: 2 shardings x 2 dtypes, then the skipped layer
        assert sum(c.startswith(f"{path} [") for c in checks) == 4, checks
        assert f"{path}: a rank skips a layer" in checks
    assert any("[4, 0]" in c for c in checks)


@pytest.mark.timeout(60)
def test_a_killed_step_times_out_and_fails_the_run(tmp_path: Path) -> None:
    """What the wrapper does after `timeout` killed a step: the running section timed out, the
    ones it never reached are skipped, and a timed-out correctness check makes the exit 1."""
    out = tmp_path / "out"
    out.mkdir()
    steps = {"env": {"status": "passed", "kind": "correctness"},
             "gloo": {"status": "running", "kind": "correctness"}}
    (out / "summary.json").write_text(json.dumps({"steps": steps, "verdicts": []}))
    assert _driver(out, "--only", "gloo,path_tests", "--mark-timeout", "75").returncode == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"]["gloo"]["status"] == "timed out"
    assert summary["steps"]["path_tests"]["status"] == "skipped"
    assert "75 s" in summary["steps"]["path_tests"]["reason"]
    run = _driver(out, "--finish")
    assert run.returncode == 1, run.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["exit_status"] == 1
    assert summary["failed_correctness_steps"] == ["gloo"]
