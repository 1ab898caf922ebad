"""Activated layers at the module level, in one process: the constructor's arguments and their
checks, conversion of timm's batch norm + activation layers by structure (a stand-in written
from timm's ``BatchNormAct2d``: ``timm_standin.py``), and the way back for export
(``BatchNormAct``: ``torch.export`` and ONNX).

Tests that run an activated syncbn layer's forward need the core to honour ``activation``
(``SyncBatchNorm.forward``); until it does they are expected failures (``strict``: they must
pass once it does).
"""

from __future__ import annotations

import copy
import pickle
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import syncbn
from syncbn import _stats
from syncbn.convert import SyncBatchNorm2dDropAct, SyncBatchNormDropAct
from timm_standin import BatchNormAct2d, NoisyAct, SyncBatchNormAct, timm_convert_sync_batchnorm

CLASSES = [syncbn.SyncBatchNorm, syncbn.SyncBatchNorm1d, syncbn.SyncBatchNorm2d,
           syncbn.SyncBatchNorm3d, syncbn.BatchNormAct]


# ------------------------------------------------------------------------- constructor


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_defaults_keep_positions_state_dict_and_repr(cls):
    plain = cls(4, 1e-3, 0.2, True, True)
    assert (plain.eps, plain.momentum) == (1e-3, 0.2)
    assert (plain.activation, plain.activation_param, plain.inplace) == ("identity", 0.01, False)
    assert plain._act == _stats.IDENTITY
    act = cls(4, activation="leaky_relu", activation_param=0.2, inplace=True)
    assert list(act.state_dict()) == list(plain.state_dict()) == list(
        nn.BatchNorm1d(4).state_dict())
    assert (act.activation, act.activation_param, act.inplace, act._act) == (
        "leaky_relu", 0.2, True, _stats.LEAKY_RELU)
    assert "activation" not in repr(plain)
    assert repr(act).endswith("activation=leaky_relu, activation_param=0.2, inplace=True)")
    assert repr(cls(4, activation="relu")).endswith("track_running_stats=True, activation=relu)")
    with pytest.raises(TypeError):
        cls(4, 1e-5, 0.1, True, True, None, None, None, "relu")  # keyword only


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_bad_activation_arguments(cls):
    name = cls.__name__
    with pytest.raises(ValueError, match=rf"^{name}: inplace=True needs an invertible "
                                         r"activation .*got relu: relu maps every negative"):
        cls(4, activation="relu", inplace=True)
    with pytest.raises(ValueError, match=rf"^{name}: .*got leaky_relu: leaky_relu with slope "
                                         r"-0.1 <= 0 is not one-to-one"):
        cls(4, activation="leaky_relu", activation_param=-0.1, inplace=True)
    with pytest.raises(ValueError, match=rf"^{name}: expected activation to be one of "
                                         r"'identity', 'relu', 'leaky_relu', 'elu', got 'silu'"):
        cls(4, activation="silu")
    cls(4, activation="leaky_relu", activation_param=-0.1)  # fine out of place
    cls(4, activation="elu", activation_param=1.0, inplace=True)


def test_old_pickles_load_as_identity():
    """A layer pickled before the activation attributes existed: the class defaults."""
    layer = syncbn.SyncBatchNorm2d(3)
    for key in ("activation", "activation_param", "inplace", "_act"):
        del layer.__dict__[key]
    again = pickle.loads(pickle.dumps(layer))
    assert (again.activation, again.inplace, again._act) == ("identity", False, 0)


@pytest.mark.parametrize("name,param", [("relu", 0.0), ("leaky_relu", 0.1), ("elu", 0.7),
                                        ("leaky_relu", -0.2), ("elu", -0.5)])
def test_batch_norm_act_is_batch_norm_then_the_activation(name, param):
    act = _stats.ACTIVATIONS[name]
    x = torch.randn(6, 3, 4, dtype=torch.float64, requires_grad=True)
    w = torch.rand(3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, dtype=torch.float64, requires_grad=True)
    rm, rv = torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)
    rm2, rv2 = rm.clone(), rv.clone()
    got = _stats.batch_norm_act(x, rm, rv, w, b, True, 0.1, 1e-5, act, param)
    dy = torch.randn_like(got)
    gx, gw, gb = torch.autograd.grad(got, (x, w, b), dy)
    want = _stats.activate(F.batch_norm(x, rm2, rv2, w, b, True, 0.1, 1e-5), act, param)
    ex, ew, eb = torch.autograd.grad(want, (x, w, b), dy)
    for a, e in ((got, want), (gx, ex), (gw, ew), (gb, eb), (rm, rm2), (rv, rv2)):
        torch.testing.assert_close(a, e)


# ---------------------------------------------------------------------- timm's layers


def timm_net() -> nn.Sequential:
    """One of each kind of BatchNormAct2d a timm model builds, and a plain BatchNorm2d."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        BatchNormAct2d(8),  # ReLU(inplace=True): fused
        BatchNormAct2d(8, act_layer=nn.LeakyReLU, act_kwargs={"negative_slope": 0.1}),
        BatchNormAct2d(8, act_layer=nn.ELU, inplace=False),
        BatchNormAct2d(8, apply_act=False),  # Identity
        BatchNormAct2d(8, act_layer=nn.GELU, inplace=False),  # not fused: runs after
        BatchNormAct2d(8, act_layer=NoisyAct, inplace=False),  # an act with state
        BatchNormAct2d(8, act_layer=nn.ReLU, drop_layer=lambda: nn.Dropout(0.0)),  # a drop
        nn.BatchNorm2d(8),
    )


def _randomize(net: nn.Module) -> None:
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g))
                m.running_mean.copy_(torch.randn(m.num_features, generator=g))
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)


EXPECTED = [  # (class, activation, param) of each converted layer
    (syncbn.SyncBatchNorm2d, "relu", 0.01),
    (syncbn.SyncBatchNorm2d, "leaky_relu", 0.1),
    (syncbn.SyncBatchNorm2d, "elu", 1.0),
    (syncbn.SyncBatchNorm2d, "identity", 0.01),
    (SyncBatchNorm2dDropAct, "identity", 0.01),
    (SyncBatchNorm2dDropAct, "identity", 0.01),
    (SyncBatchNorm2dDropAct, "identity", 0.01),
    (syncbn.SyncBatchNorm2d, "identity", 0.01),
]


def test_convert_recognizes_timm_layers_by_structure():
    net = timm_net()
    keys = list(net.state_dict())
    assert "6.act.scale" in keys and "6.act.shift" in keys
    originals = [net[i] for i in range(1, 9)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "left unsynchronized" warning
        converted = syncbn.convert_sync_batchnorm(net)
    assert list(converted.state_dict()) == keys
    for i, (cls, name, param) in enumerate(EXPECTED, start=1):
        layer = converted[i]
        assert type(layer) is cls, (i, type(layer))
        assert (layer.activation, layer.activation_param, layer.inplace) == (name, param, False)
        assert layer.weight is originals[i - 1].weight  # the same tensors
        assert layer.running_var is originals[i - 1].running_var
        assert layer.layer_description().endswith(f"'{i}'")
    # fused: act and drop are not submodules (nothing would run them); unfused: they are
    assert [n for n, _ in converted[1].named_children()] == []
    assert isinstance(converted[5].act, nn.GELU) and isinstance(converted[7].drop, nn.Dropout)
    assert converted[6].act is originals[5].act


def test_revert_gives_back_the_original_classes():
    net = timm_net()
    _randomize(net)
    before = copy.deepcopy(net).eval()
    keys = list(net.state_dict())
    converted = syncbn.convert_sync_batchnorm(net)
    converted[1].weight.data.mul_(2.0)  # a trained change comes back with it
    converted[6].act.scale.data.fill_(3.0)
    reverted = syncbn.revert_sync_batchnorm(converted)
    assert [type(m) for m in reverted] == [type(m) for m in before]
    assert list(reverted.state_dict()) == keys
    for i in range(1, 8):
        layer = reverted[i]
        assert isinstance(layer.act, type(before[i].act)) and isinstance(layer.drop,
                                                                         type(before[i].drop))
        assert not hasattr(layer, "_syncbn_origin")
    assert reverted[1].act.inplace and not reverted[3].act.inplace  # the act modules as they were
    assert reverted[2].act.negative_slope == 0.1
    torch.testing.assert_close(reverted[1].weight, before[1].weight * 2.0)
    assert float(reverted[6].act.scale.detach()) == 3.0
    with torch.no_grad():
        before[1].weight.mul_(2.0)
        before[6].act.scale.fill_(3.0)
        x = torch.randn(4, 3, 5, 5)
        torch.testing.assert_close(reverted.eval()(x), before(x))


def test_timm_sync_batchnorm_act_converts_and_reverts():
    net = timm_convert_sync_batchnorm(timm_net())
    assert type(net[1]) is SyncBatchNormAct and isinstance(net[1].act, nn.ReLU)
    keys = list(net.state_dict())
    converted = syncbn.convert_sync_batchnorm(net)
    assert type(converted[1]) is syncbn.SyncBatchNorm  # torch's SyncBatchNorm takes any dim
    assert converted[1].activation == "relu"
    assert type(converted[5]) is SyncBatchNormDropAct
    assert list(converted.state_dict()) == keys
    reverted = syncbn.revert_sync_batchnorm(converted)
    assert type(reverted[1]) is SyncBatchNormAct and isinstance(reverted[1].act, nn.ReLU)
    assert list(reverted.state_dict()) == keys


def test_other_subclasses_still_warn():
    class Scaled(nn.BatchNorm2d):
        def forward(self, x):
            return super().forward(x) * 2

    with pytest.warns(UserWarning, match="left Scaled '0' unsynchronized"):
        net = syncbn.convert_sync_batchnorm(nn.Sequential(Scaled(3)))
    assert type(net[0]) is Scaled


def test_converted_timm_layers_copy_and_pickle():
    converted = syncbn.convert_sync_batchnorm(timm_net())
    for again in (copy.deepcopy(converted), pickle.loads(pickle.dumps(converted))):
        reverted = syncbn.revert_sync_batchnorm(again)
        assert type(reverted[1]) is BatchNormAct2d and isinstance(reverted[1].act, nn.ReLU)


def test_unfused_layers_run_drop_and_act_after_the_batch_norm():
    """A converted layer whose activation syncbn does not compute: one rank, so batch norm is
    torch's, then its own drop and act (training and eval)."""
    net = timm_net()
    _randomize(net)
    plain = copy.deepcopy(net)
    converted = syncbn.convert_sync_batchnorm(net)
    x = torch.randn(4, 8, 5, 5)
    for i in (5, 6, 7):
        for train in (True, False):
            converted[i].train(train)
            plain[i].train(train)
            torch.testing.assert_close(converted[i](x), plain[i](x))


def test_fused_timm_layers_compute_the_same():
    net = timm_net()
    _randomize(net)
    plain = copy.deepcopy(net)
    converted = syncbn.convert_sync_batchnorm(net)
    x = torch.randn(4, 3, 5, 5)
    for train in (False, True):
        torch.testing.assert_close(converted.train(train)(x), plain.train(train)(x))


# ------------------------------------------------------------------- revert and export


def test_revert_of_an_activated_layer_is_batch_norm_act_and_back():
    layer = syncbn.SyncBatchNorm2d(4, activation="leaky_relu", activation_param=0.05,
                                   inplace=True)
    keys = list(layer.state_dict())
    plain = syncbn.revert_sync_batchnorm(layer)
    assert type(plain) is syncbn.BatchNormAct and list(plain.state_dict()) == keys
    assert (plain.activation, plain.activation_param, plain.inplace) == ("leaky_relu", 0.05, True)
    assert plain.weight is layer.weight
    again = syncbn.convert_sync_batchnorm(plain)
    assert type(again) is syncbn.SyncBatchNorm2d
    assert (again.activation, again.activation_param, again.inplace) == ("leaky_relu", 0.05, True)
    # identity layers revert to torch's classes, as before
    assert type(syncbn.revert_sync_batchnorm(syncbn.SyncBatchNorm2d(4))) is nn.BatchNorm2d
    # a plain BatchNormAct (never synchronized) converts to the generic layer
    assert type(syncbn.convert_sync_batchnorm(syncbn.BatchNormAct(4))) is syncbn.SyncBatchNorm


@pytest.mark.parametrize("name,param", [("relu", 0.0), ("leaky_relu", 0.01), ("elu", 1.0),
                                        ("leaky_relu", -0.5)])
def test_batch_norm_act_matches_torch(name, param):
    layer = syncbn.BatchNormAct(3, activation=name, activation_param=param)
    bn = nn.BatchNorm2d(3)
    act = {"relu": nn.ReLU(), "leaky_relu": nn.LeakyReLU(param), "elu": nn.ELU(param)}[name]
    x = torch.randn(5, 3, 4, 4)
    for train in (True, False):
        x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
        y1, y2 = layer.train(train)(x1), act(bn.train(train)(x2))
        torch.testing.assert_close(y1, y2)
        y1.sum().backward()
        y2.sum().backward()
        torch.testing.assert_close(x1.grad, x2.grad)
        torch.testing.assert_close(layer.weight.grad, bn.weight.grad)
    torch.testing.assert_close(layer.running_var, bn.running_var)
    assert int(layer.num_batches_tracked) == 1


class ActNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.bn1 = syncbn.SyncBatchNorm2d(6, activation="leaky_relu", activation_param=0.01,
                                          inplace=True)
        self.bn2 = syncbn.SyncBatchNorm2d(6, activation="elu", activation_param=1.0)
        self.bn3 = syncbn.SyncBatchNorm2d(6, activation="relu")
        self.head = nn.Linear(6, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bn3(self.bn2(self.bn1(self.conv(x))))
        return self.head(x.mean((2, 3)))


def reverted_act_net() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """ActNet reverted (BatchNormAct layers) in eval mode, an input, and the output the same
    computation gives with torch's modules."""
    torch.manual_seed(0)
    net = ActNet()
    _randomize(net)
    with torch.no_grad():
        for bn in (net.bn1, net.bn2, net.bn3):
            bn.running_mean.copy_(torch.randn(6))
            bn.running_var.copy_(torch.rand(6) + 0.5)
    keys = list(net.state_dict())
    plain = syncbn.revert_sync_batchnorm(net).eval()
    assert all(type(m) is syncbn.BatchNormAct for m in (plain.bn1, plain.bn2, plain.bn3))
    assert list(plain.state_dict()) == keys
    x = torch.randn(2, 3, 7, 7)

    def torch_bn(layer: nn.Module, t: torch.Tensor) -> torch.Tensor:
        return F.batch_norm(t, layer.running_mean, layer.running_var, layer.weight,
                            layer.bias, False, 0.0, layer.eps)

    with torch.no_grad():
        h = F.leaky_relu(torch_bn(plain.bn1, plain.conv(x)), 0.01)
        h = F.relu(torch_bn(plain.bn3, F.elu(torch_bn(plain.bn2, h), 1.0)))
        expected = plain.head(h.mean((2, 3)))
    return plain, x, expected


@pytest.mark.timeout(120)
def test_torch_export_of_reverted_activated_layers():
    plain, x, expected = reverted_act_net()
    with torch.no_grad():
        torch.testing.assert_close(plain(x), expected)
    program = torch.export.export(plain, (x,))
    ops = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    assert any("batch_norm" in op for op in ops), ops
    assert any("leaky_relu" in op for op in ops) and any("elu" in op for op in ops), ops
    torch.testing.assert_close(program.module()(x), expected, rtol=1e-6, atol=1e-6)


@pytest.mark.timeout(180)
def test_onnx_export_of_reverted_activated_layers(tmp_path):
    pytest.importorskip("onnx", reason="onnx is not installed: pip install 'syncbn[export]'")
    ort = pytest.importorskip("onnxruntime",
                              reason="onnxruntime is not installed: pip install 'syncbn[export]'")
    pytest.importorskip("onnxscript", reason="onnxscript (torch.onnx's exporter) is not installed")
    import onnx

    plain, x, expected = reverted_act_net()
    path = tmp_path / "act.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(plain, (x,), str(path), input_names=["x"], output_names=["y"],
                          dynamic_shapes={"x": {0: torch.export.Dim("batch")}})
    graph = onnx.load(str(path)).graph
    assert all(n.domain in ("", "ai.onnx") for n in graph.node), {
        (n.domain, n.op_type) for n in graph.node}
    kinds = {n.op_type for n in graph.node}
    assert {"LeakyRelu", "Elu", "Relu"} <= kinds, kinds
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {"x": x.numpy()})
    assert abs(got - expected.numpy()).max() < 1e-5
