"""PyTorch Lightning: ``syncbn.lightning.SyncBatchNormPlugin`` with ``ddp_spawn`` on 2 CPU ranks.

Each rank gets a different number of samples per step (3 and 5). With the plugin, the
LightningModule's BatchNorm layers are syncbn layers during fitting, and training equals one
process on the concatenated batches: parameters and running statistics (bitwise identical on both
ranks) match a plain float64 model trained on the global batches. Without synchronization the
running statistics would differ between the ranks and from the reference, so the test can fail.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

L = pytest.importorskip("lightning", reason="lightning is not installed: pip install 'syncbn[lightning]'")

import syncbn  # noqa: E402
from syncbn.lightning import PLSyncBatchNormPlugin, SyncBatchNormPlugin  # noqa: E402

SIZES = [3, 5]  # samples per rank per step
STEPS = 3
LR = 0.1


def make_net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
        nn.Conv2d(4, 6, 3, stride=2), nn.BatchNorm2d(6), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 3),
    ).double()


def global_batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    total = sum(SIZES)
    return [(torch.randn(total, 2, 6, 6, generator=g, dtype=torch.float64) * 2 + 1,
             torch.randint(0, 3, (total,), generator=g)) for _ in range(STEPS)]


class Net(L.LightningModule):
    def __init__(self, out_dir: str) -> None:
        super().__init__()
        self.out_dir = out_dir
        self.net = make_net()
        self.layer_types: list[str] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def train_dataloader(self) -> torch.utils.data.DataLoader:
        lo = sum(SIZES[: self.global_rank])
        shards = [(x[lo:lo + SIZES[self.global_rank]], y[lo:lo + SIZES[self.global_rank]])
                  for x, y in global_batches()]
        return torch.utils.data.DataLoader(shards, batch_size=None)  # one shard = one step

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        if batch_idx == 0:
            self.layer_types = sorted({f"{type(m).__module__}.{type(m).__name__}"
                                       for m in self.net.modules() if "BatchNorm" in type(m).__name__})
        x, y = batch
        # DDP averages gradients over ranks: scale the local sum so that the average is the
        # gradient of the mean loss over the global batch.
        return nn.functional.cross_entropy(self(x), y, reduction="sum") * len(SIZES) / sum(SIZES)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=LR)

    def on_train_end(self) -> None:  # before the strategy's teardown reverts the layers
        torch.save({"types": self.layer_types,
                    "state": {k: v.detach().clone() for k, v in self.net.state_dict().items()}},
                   Path(self.out_dir) / f"rank-{self.global_rank}.pt")


def reference_state() -> dict[str, torch.Tensor]:
    net = make_net()
    opt = torch.optim.SGD(net.parameters(), lr=LR)
    for x, y in global_batches():
        opt.zero_grad()
        nn.functional.cross_entropy(net(x), y).backward()
        opt.step()
    return net.state_dict()


@pytest.mark.timeout(90)
def test_plugin_types_and_import_is_lazy():
    """`import syncbn` imports no Lightning; the plugin is a LayerSync of the right package."""
    code = "import sys, syncbn, syncbn.lightning; print(sorted(m for m in sys.modules if 'lightning' in m))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "['syncbn.lightning']", out.stdout
    from lightning.pytorch.plugins import LayerSync

    plugin = SyncBatchNormPlugin()
    assert isinstance(plugin, LayerSync)
    model = plugin.apply(nn.Sequential(nn.BatchNorm2d(3), nn.BatchNorm1d(2)))
    assert [type(m) for m in model] == [syncbn.SyncBatchNorm2d, syncbn.SyncBatchNorm1d]
    assert [type(m) for m in plugin.revert(model)] == [nn.BatchNorm2d, nn.BatchNorm1d]
    pl = pytest.importorskip("pytorch_lightning")
    assert isinstance(PLSyncBatchNormPlugin(), pl.plugins.LayerSync)


@pytest.mark.timeout(240)
def test_ddp_spawn_trains_like_one_process(tmp_path):
    module = Net(str(tmp_path))
    trainer = L.Trainer(
        strategy="ddp_spawn", accelerator="cpu", devices=len(SIZES), precision="64-true",
        plugins=[SyncBatchNormPlugin()], max_steps=STEPS, use_distributed_sampler=False,
        logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0,
    )
    trainer.fit(module)

    ranks = [torch.load(tmp_path / f"rank-{r}.pt", weights_only=True) for r in range(len(SIZES))]
    for r, got in enumerate(ranks):
        assert got["types"] == ["syncbn.batchnorm.SyncBatchNorm2d"], (r, got["types"])
    expected = reference_state()
    for key, value in expected.items():
        for r, got in enumerate(ranks):
            torch.testing.assert_close(got["state"][key], value, rtol=1e-9, atol=1e-9,
                                       msg=lambda m, r=r, key=key: f"rank {r} {key}: {m}")
        if "running" in key:
            assert torch.equal(ranks[0]["state"][key], ranks[1]["state"][key]), f"{key} differs across ranks"
    # ddp_spawn hands rank 0's weights back to this process's (never converted) module.
    assert {type(m) for m in module.net if "BatchNorm" in type(m).__name__} == {nn.BatchNorm2d}
    for key, value in expected.items():
        torch.testing.assert_close(module.net.state_dict()[key], value, rtol=1e-9, atol=1e-9)
