"""``examples/train_ddp.py`` as the README runs it: ``torchrun --nproc-per-node 2 examples/train_ddp.py
--steps 5`` on the CPU (gloo), in a fresh directory; it must train, evaluate on rank 0, save a
checkpoint with plain BatchNorm keys and export a model without a synchronized layer.
"""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import harness

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "train_ddp.py"


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.timeout(90)
def test_train_ddp_runs_under_torchrun_on_cpu(tmp_path: Path) -> None:
    # torchrun reads its options from PET_* variables too: a free port instead of 29500, which
    # another run on this machine may hold; the command line stays the README's.
    env = harness.child_env(OMP_NUM_THREADS="1", PET_MASTER_PORT=str(_free_port()),
                            CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", str(EXAMPLE),
         "--steps", "5"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=80, check=False)
    output = f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    assert proc.returncode == 0, output
    # rank 0 alone evaluates and reports; --steps 5 stops inside the first epoch
    assert proc.stdout.count("epoch 0: step 5, loss ") == 1, output
    assert "epoch 1" not in proc.stdout, output
    assert "exported: BatchNorm2d, BatchNorm2d" in proc.stdout, output

    checkpoint = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert checkpoint["step"] == 5
    bn = {k: v for k, v in checkpoint["model"].items() if k.startswith("1.")}
    assert set(bn) == {"1.weight", "1.bias", "1.running_mean", "1.running_var",
                       "1.num_batches_tracked"}
    assert int(bn["1.num_batches_tracked"]) == 5
    program = torch.export.load(tmp_path / "model.pt2")
    targets = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    assert any("batch_norm" in t for t in targets), targets
    assert not any("syncbn" in t for t in targets), targets
    for key, value in program.state_dict.items():  # the exported copy has the trained weights
        torch.testing.assert_close(value, checkpoint["model"][key], rtol=0, atol=0)
    x = torch.randn(3, 3, 16, 16)
    assert program.module()(x).shape == (3, 2)
