"""Single-process behaviour of the modules: drop-in for torch.nn.BatchNorm*d, errors, state_dict,
conversion. With one rank (or no process group) syncbn must be exactly torch's batch norm.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.distributed as dist
from torch import nn

import syncbn
from syncbn import _comm, _settings

pytestmark = pytest.mark.timeout(120)

PAIRS = [
    (syncbn.SyncBatchNorm1d, nn.BatchNorm1d, (6, 4)),
    (syncbn.SyncBatchNorm1d, nn.BatchNorm1d, (6, 4, 3)),
    (syncbn.SyncBatchNorm2d, nn.BatchNorm2d, (5, 4, 3, 2)),
    (syncbn.SyncBatchNorm3d, nn.BatchNorm3d, (3, 4, 2, 3, 2)),
    (syncbn.SyncBatchNorm, nn.BatchNorm2d, (5, 4, 3, 2)),
]


def _pair_run(ours, theirs, shape, steps=3):
    g = torch.Generator().manual_seed(0)
    for step in range(steps):
        x = torch.randn(shape, generator=g, dtype=torch.float64)
        dy = torch.randn(shape, generator=g, dtype=torch.float64)
        outs = []
        for m in (ours, theirs):
            xi = x.clone().requires_grad_()
            y = m(xi)
            y.backward(dy)
            outs.append((y, xi.grad))
        torch.testing.assert_close(outs[0][0], outs[1][0], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(outs[0][1], outs[1][1], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ours.state_dict(), theirs.state_dict(), rtol=1e-12, atol=1e-12)
    if ours.affine:
        torch.testing.assert_close(ours.weight.grad, theirs.weight.grad, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(ours.bias.grad, theirs.bias.grad, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("ours_cls,theirs_cls,shape", PAIRS, ids=lambda v: getattr(v, "__name__", str(v)))
@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("affine,track", [(True, True), (False, True), (True, False)])
def test_single_process_equals_torch(ours_cls, theirs_cls, shape, momentum, affine, track):
    kw = dict(momentum=momentum, affine=affine, track_running_stats=track, dtype=torch.float64)
    ours, theirs = ours_cls(4, **kw), theirs_cls(4, **kw)
    theirs._check_input_dim = lambda x: None  # the generic layer is compared on a 4D input
    _pair_run(ours, theirs, shape)
    ours.eval()
    theirs.eval()
    _pair_run(ours, theirs, shape, steps=1)


def test_world_size_one_process_group_is_plain_batch_norm(tmp_path):
    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        assert _comm.group_size() == 1
        _pair_run(syncbn.SyncBatchNorm2d(4, dtype=torch.float64),
                  nn.BatchNorm2d(4, dtype=torch.float64), (3, 4, 2, 2))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize(
    "cls,shape,torch_words",
    [
        (syncbn.SyncBatchNorm1d, (2, 3, 4, 5), "expected 2D or 3D input (got 4D input)"),
        (syncbn.SyncBatchNorm1d, (3,), "expected 2D or 3D input (got 1D input)"),
        (syncbn.SyncBatchNorm2d, (2, 3, 4), "expected 4D input (got 3D input)"),
        (syncbn.SyncBatchNorm3d, (2, 3, 4, 4), "expected 5D input (got 4D input)"),
        (syncbn.SyncBatchNorm, (3,), "expected at least 2D input (got 1D input)"),
    ],
)
def test_wrong_dim_has_torchs_wording_and_names_the_layer(cls, shape, torch_words):
    layer = cls(3)
    with pytest.raises(ValueError) as info:
        layer(torch.randn(shape))
    # an unnamed layer is told apart by its creation number
    assert str(info.value) == f"{cls.__name__}(3) #{layer._creation_index}: {torch_words}"


def test_channel_mismatch_and_dtype_errors_name_layer_expected_and_got():
    net = syncbn.convert_sync_batchnorm(nn.Sequential(nn.Sequential(nn.Conv2d(1, 4, 1), nn.BatchNorm2d(5))))
    with pytest.raises(ValueError, match=r"SyncBatchNorm2d\(5\) '0\.1': expected input with 5 channels in dim 1, got 4"):
        net(torch.randn(2, 1, 3, 3))
    with pytest.raises(ValueError, match=r"SyncBatchNorm2d\(3\) #\d+: expected a floating-point input .* got torch.int64"):
        syncbn.SyncBatchNorm2d(3)(torch.ones(2, 3, 2, 2, dtype=torch.long))


def _pretend_two_ranks(monkeypatch):
    """Every group has 2 ranks (no process group is initialized: nothing may be sent)."""
    two = _comm.Group(None)
    two.size = 2
    monkeypatch.setattr(_comm, "group", lambda process_group=None: two)
    monkeypatch.setattr(_comm, "world_size", lambda process_group=None: 2)


def test_bad_input_raises_before_any_collective(monkeypatch):
    """With a (pretend) group of 2 ranks, bad input must fail before reaching the all_reduce."""
    _pretend_two_ranks(monkeypatch)

    def no_collective(*args, **kwargs):
        raise AssertionError("a collective was started before the input was checked")

    monkeypatch.setattr(_comm, "all_reduce", no_collective)  # the one collective of every backend
    layer = syncbn.SyncBatchNorm2d(3)
    for bad in (torch.randn(2, 3, 4), torch.randn(2, 4, 2, 2), torch.ones(2, 3, 2, 2, dtype=torch.int32)):
        with pytest.raises(ValueError):
            layer(bad)
    with pytest.raises(AssertionError, match="collective was started"):  # the spy does work
        layer(torch.randn(2, 3, 2, 2))


@pytest.mark.parametrize("track", [True, False])
def test_eval_mode_never_synchronizes(monkeypatch, track):
    """Eval mode makes no collective, also without running statistics (where it normalizes with
    the rank's own batch, like torch.nn.SyncBatchNorm): evaluating on one rank must not wait."""
    _pretend_two_ranks(monkeypatch)

    def no_collective(*args, **kwargs):
        raise AssertionError("eval mode started a collective")

    monkeypatch.setattr(_comm, "all_reduce", no_collective)
    layer = syncbn.SyncBatchNorm2d(3, track_running_stats=track).eval()
    plain = nn.BatchNorm2d(3, track_running_stats=track).eval()
    x = torch.randn(4, 3, 2, 2) * 3 + 1
    torch.testing.assert_close(layer(x), plain(x))


def test_functional_validates_parameter_sizes(monkeypatch):
    _pretend_two_ranks(monkeypatch)
    from syncbn.functional import sync_batch_norm
    with pytest.raises(ValueError, match="expected weight with 3 elements .* got 4"):
        sync_batch_norm(torch.randn(2, 3), None, None, torch.ones(4), None, training=True)


@pytest.mark.parametrize("ours,theirs", [
    (syncbn.SyncBatchNorm2d, nn.BatchNorm2d), (syncbn.SyncBatchNorm1d, nn.BatchNorm1d),
    (syncbn.SyncBatchNorm3d, nn.BatchNorm3d), (syncbn.SyncBatchNorm, nn.SyncBatchNorm),
])
def test_state_dict_loads_both_ways(ours, theirs):
    a = theirs(4)
    with torch.no_grad():
        a.weight.uniform_()
        a.bias.uniform_()
        a.running_mean.uniform_()
        a.running_var.uniform_(1, 2)
        a.num_batches_tracked.fill_(7)
    b = ours(4)
    b.load_state_dict(a.state_dict())
    torch.testing.assert_close(b.state_dict(), a.state_dict(), rtol=0, atol=0)
    c = theirs(4)
    c.load_state_dict(b.state_dict())
    torch.testing.assert_close(c.state_dict(), a.state_dict(), rtol=0, atol=0)
    assert list(b.state_dict()) == list(a.state_dict())


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
        self.vol = nn.BatchNorm3d(4)
        self.seq = nn.BatchNorm1d(4, affine=False)
        self.torch_sync = nn.SyncBatchNorm(4, momentum=None)

    def forward(self, x):
        x = self.stem(x)
        x = self.vol(x.unsqueeze(2)).squeeze(2)
        x = self.torch_sync(x)
        return self.seq(x.flatten(2))


def test_convert_revert_round_trip_keeps_everything():
    torch.manual_seed(0)
    model = Net().double()
    model.stem[1].weight.requires_grad_(False)
    model.vol.eval()
    with torch.no_grad():
        model.stem[1].running_mean.uniform_()
    x = torch.randn(3, 2, 5, 5, dtype=torch.float64)
    before_sd = {k: v.clone() for k, v in model.state_dict().items()}
    weight = model.stem[1].weight
    converted = syncbn.convert_sync_batchnorm(model)
    assert type(converted.stem[1]) is syncbn.SyncBatchNorm2d
    assert type(converted.vol) is syncbn.SyncBatchNorm3d
    assert type(converted.seq) is syncbn.SyncBatchNorm1d
    assert type(converted.torch_sync) is syncbn.SyncBatchNorm
    assert converted.stem[1].weight is weight  # the same Parameter, not a copy
    assert not converted.stem[1].weight.requires_grad
    assert not converted.vol.training and converted.stem[1].training
    assert converted.torch_sync.momentum is None
    assert converted.stem[1].running_mean.dtype == torch.float64
    assert converted.stem[1].layer_description() == "SyncBatchNorm2d(4) 'stem.1'"
    torch.testing.assert_close(converted.state_dict(), before_sd, rtol=0, atol=0)

    reverted = syncbn.revert_sync_batchnorm(syncbn.convert_sync_batchnorm(Net().double()))
    assert type(reverted.stem[1]) is nn.BatchNorm2d
    assert type(reverted.vol) is nn.BatchNorm3d
    assert type(reverted.seq) is nn.BatchNorm1d
    assert type(reverted.torch_sync) is syncbn.BatchNormNd
    assert not any(isinstance(m, (syncbn.SyncBatchNorm, nn.SyncBatchNorm)) for m in reverted.modules())

    original = Net().double()
    round_trip = syncbn.revert_sync_batchnorm(syncbn.convert_sync_batchnorm(Net().double()))
    round_trip.load_state_dict(original.state_dict())
    for mode in ("train", "eval"):
        getattr(original, mode)()
        getattr(round_trip, mode)()
        torch.testing.assert_close(round_trip(x), original(x), rtol=0, atol=0)
    torch.testing.assert_close(round_trip.state_dict(), original.state_dict(), rtol=0, atol=0)
    assert list(round_trip.state_dict()) == list(original.state_dict())


def test_convert_a_bare_layer_and_keep_process_group():
    bn = nn.BatchNorm2d(3)
    out = syncbn.convert_sync_batchnorm(bn, process_group="group-handle")
    assert type(out) is syncbn.SyncBatchNorm2d and out.process_group == "group-handle"
    assert out.weight is bn.weight and out.running_var is bn.running_var
    back = syncbn.revert_sync_batchnorm(out)
    assert type(back) is nn.BatchNorm2d and back.weight is bn.weight


def test_convert_leaves_subclasses_alone_with_a_warning():
    class BNAct(nn.BatchNorm2d):
        def forward(self, x):
            return torch.relu(super().forward(x))

    model = nn.Sequential(BNAct(3))
    with pytest.warns(UserWarning, match="left BNAct '0' unsynchronized"):
        out = syncbn.convert_sync_batchnorm(model)
    assert type(out[0]) is BNAct
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        syncbn.convert_sync_batchnorm(nn.Sequential(nn.BatchNorm2d(3)))  # no warning otherwise


def test_public_surface():
    assert syncbn.__version__
    for name in syncbn.__all__:
        assert hasattr(syncbn, name), name
    import importlib.resources
    assert importlib.resources.files("syncbn").joinpath("py.typed").is_file()


def test_api_reference_is_current():
    """docs/api.md is made from the docstrings: regenerate it with `python docs/make_api.py`."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).parents[1] / "docs" / "make_api.py"
    done = subprocess.run([sys.executable, str(script), "--check"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, "docs/api.md is stale: run `python docs/make_api.py`" + done.stderr


@pytest.mark.parametrize("value", ["soon", "-1", "nan", "inf", "1e30"])
def test_bad_poll_setting_names_itself(monkeypatch, value):
    """SYNCBN_POLL_US must be a finite number of microseconds in its stated range."""
    monkeypatch.setenv("SYNCBN_POLL_US", value)
    with pytest.raises(ValueError, match=rf"SYNCBN_POLL_US: expected a finite number from 0 to 1e\+09, got '{value}'"):
        _settings.reload()
        _settings.get()


@pytest.mark.parametrize("value,expected", [("1", 1), ("true", 1), ("YES", 1), ("On", 1), ("2", 2),
                                            ("0", 0), ("false", 0), ("No", 0), ("OFF", 0), ("", 0)])
def test_debug_setting_reads_booleans(monkeypatch, value, expected):
    """SYNCBN_DEBUG=false (or off, no) is off, not on (any case)."""
    monkeypatch.setenv("SYNCBN_DEBUG", value)
    _settings.reload()
    assert _settings.get().debug == expected


@pytest.mark.parametrize("name", ["SYNCBN_DEBUG", "SYNCBN_FORCE_SYNC"])
def test_bad_boolean_setting_names_itself(monkeypatch, name):
    monkeypatch.setenv(name, "maybe")
    with pytest.raises(ValueError, match=rf"{name}: expected .*got 'maybe'"):
        _settings.reload()
        _settings.get()


@pytest.mark.parametrize("value,expected", [("", 2000.0), ("0", 0.0), ("150.5", 150.5)])
def test_poll_setting(monkeypatch, value, expected):
    monkeypatch.setenv("SYNCBN_POLL_US", value)
    _settings.reload()
    assert _settings.get().poll_us == expected


def test_settings_are_read_once_until_reload(monkeypatch):
    monkeypatch.setenv("SYNCBN_NONFINITE", "skip")
    _settings.reload()
    assert _settings.get().nonfinite == "skip"
    monkeypatch.setenv("SYNCBN_NONFINITE", "raise")
    assert _settings.get().nonfinite == "skip"  # not read again on every pass
    _settings.reload()
    assert _settings.get().nonfinite == "raise"


def test_bad_shm_setting_names_itself(monkeypatch):
    monkeypatch.setenv("SYNCBN_SHM", "yes")
    _settings.reload()
    with pytest.raises(ValueError, match=r"SYNCBN_SHM: expected one of \('auto', 'off'\), got 'yes'"):
        _settings.get()


def test_a_copied_layer_has_its_own_registered_state():
    """copy.deepcopy / pickle copy the layer's state: the integer the registered ops use must
    name the copy's state (not the original's, which may be gone), with the same identity."""
    import copy
    import pickle

    from syncbn import _pass

    layer = syncbn.convert_sync_batchnorm(nn.Sequential(nn.BatchNorm1d(3)))[0]
    for clone in (copy.deepcopy(layer), pickle.loads(pickle.dumps(layer))):
        assert clone._sync is not layer._sync
        assert _pass._layers[clone._layer_id] is clone._sync
        assert clone._sync.tag.key == layer._sync.tag.key  # the same layer of the same model
