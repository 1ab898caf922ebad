"""Export after training with syncbn: revert to torch BatchNorm, then ``torch.export`` and ONNX.

Also: a ResNet-style model's checkpoint saved while it had syncbn layers loads into the plain
model with ``strict=True`` (and back), since conversion keeps every ``state_dict`` key.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import syncbn
from workers import SmallNet


def small_net() -> nn.Module:
    """Conv/BN2d x 2, pool, Linear/BN1d/Linear: 3 input channels, 4 classes."""
    return SmallNet(cin=3, widths=(8, 8), hidden=16, classes=4)


def trained_reverted() -> tuple[nn.Module, torch.Tensor]:
    """A small_net() converted to syncbn, trained 2 SGD steps, reverted, in eval mode; and an input."""
    torch.manual_seed(0)
    model = syncbn.convert_sync_batchnorm(small_net())
    assert sum(isinstance(m, syncbn.SyncBatchNorm) for m in model.modules()) == 3
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(2):
        opt.zero_grad()
        nn.functional.cross_entropy(model(torch.randn(6, 3, 10, 10)), torch.randint(0, 4, (6,))).backward()
        opt.step()
    plain = syncbn.revert_sync_batchnorm(model).eval()
    types = [type(m) for m in plain.modules() if "BatchNorm" in type(m).__name__]
    assert types == [nn.BatchNorm2d, nn.BatchNorm2d, nn.BatchNorm1d], types
    assert int(plain.features[1].num_batches_tracked) == 2  # the trained running stats came along
    return plain, torch.randn(5, 3, 10, 10)


@pytest.mark.timeout(120)
def test_torch_export_after_revert():
    plain, x = trained_reverted()
    with torch.no_grad():
        expected = plain(x)
    program = torch.export.export(plain, (x,))
    ops = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    assert any("batch_norm" in op for op in ops), ops
    torch.testing.assert_close(program.module()(x), expected, rtol=1e-6, atol=1e-6)
    # An eval-mode syncbn model exports too (eval mode never synchronizes: it is F.batch_norm).
    model = syncbn.convert_sync_batchnorm(plain).eval()
    assert isinstance(model.features[1], syncbn.SyncBatchNorm2d)
    torch.testing.assert_close(torch.export.export(model, (x,)).module()(x), expected,
                               rtol=1e-6, atol=1e-6)


@pytest.mark.timeout(180)
def test_onnx_export_matches_onnxruntime(tmp_path):
    pytest.importorskip("onnx", reason="onnx is not installed: pip install 'syncbn[export]'")
    ort = pytest.importorskip("onnxruntime", reason="onnxruntime is not installed: pip install 'syncbn[export]'")
    pytest.importorskip("onnxscript", reason="onnxscript (torch.onnx's exporter) is not installed")
    import onnx

    plain, x = trained_reverted()
    with torch.no_grad():
        expected = plain(x).numpy()
    path = tmp_path / "model.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(plain, (x,), str(path), input_names=["x"], output_names=["y"],
                          dynamic_shapes={"x": {0: torch.export.Dim("batch")}})
    graph = onnx.load(str(path)).graph
    # Standard ONNX operators only (the exporter folds eval-mode BatchNorm into Conv/Gemm).
    assert all(n.domain in ("", "ai.onnx") for n in graph.node), {(n.domain, n.op_type) for n in graph.node}
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {"x": x.numpy()})
    assert abs(got - expected).max() < 1e-5, abs(got - expected).max()
    # Another batch size through the dynamic batch dimension.
    x2 = torch.randn(2, 3, 10, 10)
    (got2,) = session.run(None, {"x": x2.numpy()})
    with torch.no_grad():
        assert abs(got2 - plain(x2).numpy()).max() < 1e-5


class BasicBlock(nn.Module):
    """torchvision's ResNet BasicBlock layout (conv1/bn1/conv2/bn2/downsample.0/.1)."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + identity)


class TinyResNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = nn.Sequential(BasicBlock(8, 8, 1), BasicBlock(8, 8, 1))
        self.layer2 = nn.Sequential(BasicBlock(8, 16, 2), BasicBlock(16, 16, 1))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer2(self.layer1(x))
        return self.fc(torch.flatten(self.avgpool(x), 1))


@pytest.mark.timeout(60)
def test_resnet_checkpoint_roundtrip(tmp_path):
    torch.manual_seed(0)
    plain_keys = list(TinyResNet().state_dict())
    model = syncbn.convert_sync_batchnorm(TinyResNet())
    assert sum(isinstance(m, syncbn.SyncBatchNorm2d) for m in model.modules()) == 10
    assert list(model.state_dict()) == plain_keys
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(2):  # train a little so that running stats and num_batches_tracked change
        opt.zero_grad()
        model(torch.randn(4, 3, 8, 8)).logsumexp(1).sum().backward()
        opt.step()
    torch.save(model.state_dict(), tmp_path / "syncbn.pt")

    fresh = TinyResNet()
    result = fresh.load_state_dict(torch.load(tmp_path / "syncbn.pt", weights_only=True), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    x = torch.randn(3, 3, 8, 8)
    model.eval(), fresh.eval()
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), model(x), rtol=0, atol=0)
        reverted = syncbn.revert_sync_batchnorm(model)
        assert list(reverted.state_dict()) == plain_keys
        torch.testing.assert_close(reverted(x), fresh(x), rtol=0, atol=0)
    # And a plain checkpoint (e.g. pretrained weights) loads strictly into the syncbn model.
    torch.save(fresh.state_dict(), tmp_path / "plain.pt")
    again = syncbn.convert_sync_batchnorm(TinyResNet())
    again.load_state_dict(torch.load(tmp_path / "plain.pt", weights_only=True), strict=True)
    for (k, a), b in zip(again.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(a, b), k
