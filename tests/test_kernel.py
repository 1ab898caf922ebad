"""Single-process tests of the fused C kernel path (``SYNCBN_KERNEL=fused``, ``csrc/kernel.c``).

The synchronized Function runs in a 1-rank gloo group (it skips the all_reduce there: a sum over
one rank is the buffer itself, and the header check still runs on it), so every branch of the
kernel and of the C backend's steps (``backends.fused.py``) is exercised without spawning ranks. Every case is compared with the float64 reference (plain ``F.batch_norm`` + autograd) and
with the ATen path (``SYNCBN_KERNEL=aten``). Build and fallback behaviour (no compiler, the cache)
is tested in subprocesses, since the kernel is loaded once per process.
"""

from __future__ import annotations

import datetime
import json
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

import harness
from reference import assert_matches, make_data
from syncbn import _pass, _settings, _wire, backends
from syncbn._native import kernel as _kernel

pytestmark = pytest.mark.timeout(120)

F64 = torch.float64
KEYS = ("y", "dx", "dw", "db", "running_mean", "running_var")
CL, CL3 = torch.channels_last, torch.channels_last_3d


@pytest.fixture(scope="module", autouse=True)
def process_group(tmp_path_factory):
    """A 1-rank gloo group for the whole module (the Function's collectives are skipped there)."""
    if dist.is_initialized():
        pytest.skip("a process group is already initialized in this process")
    store = dist.FileStore(str(tmp_path_factory.mktemp("pg") / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1,
                            timeout=datetime.timedelta(seconds=60))
    yield
    dist.destroy_process_group()


@pytest.fixture
def spy(monkeypatch):
    """Counts the calls of the C backend's forward and backward reduce steps (which still run)."""
    calls = {"forward": 0, "backward": 0}
    forward, backward = backends.fused.forward_reduce, backends.fused.backward_reduce

    def counting_forward(*args, **kwargs):
        calls["forward"] += 1
        return forward(*args, **kwargs)

    def counting_backward(*args, **kwargs):
        calls["backward"] += 1
        return backward(*args, **kwargs)

    monkeypatch.setattr(backends.fused, "forward_reduce", counting_forward)
    monkeypatch.setattr(backends.fused, "backward_reduce", counting_backward)
    return calls


@pytest.fixture
def threads():
    """``torch.set_num_threads`` for the test, restored afterwards."""
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


def _data(shape, dtype, fmt=None, seed=0, mean=0.0, std=1.0):
    """Input and upstream gradient of ``shape`` (``reference.make_data``: per-channel offsets
    differ, so a kernel that mixes channels shows), in memory format ``fmt``."""
    (x,), (dy,) = make_data([shape[0]], tuple(shape[1:]), dtype, seed, mean=mean, std=std)
    if fmt is not None:
        x, dy = x.contiguous(memory_format=fmt), dy.contiguous(memory_format=fmt)
    return x, dy


def _params(channels, dtype, affine=True, track=True, seed=0):
    """weight, bias, running_mean, running_var (None where the option is off)."""
    g = torch.Generator().manual_seed(seed + 1)
    weight = (torch.rand(channels, generator=g, dtype=F64) + 0.5).to(dtype)
    bias = torch.randn(channels, generator=g, dtype=F64).to(dtype)
    rmean = torch.randn(channels, generator=g, dtype=F64).to(dtype)
    rvar = (torch.rand(channels, generator=g, dtype=F64) + 0.5).to(dtype)
    return (weight if affine else None, bias if affine else None,
            rmean if track else None, rvar if track else None)


def _copy(t, grad=False):
    """A copy with the same strides (a non-contiguous view stays non-contiguous)."""
    if t is None:
        return None
    out = torch.empty_strided(t.shape, t.stride(), dtype=t.dtype).copy_(t.detach())
    return out.requires_grad_(grad)


def _plan(x, params, name: str) -> _pass.Plan:
    """The synchronized path's plan for this input on the 1-rank group (collective skipped)."""
    state = _pass.LayerState(_wire.LayerTag.for_layer(name, 0, f"SyncBatchNorm({name})"), print)
    return _pass.synchronized_plan(state, x, params)


def _sync(x, dy, weight, bias, rmean, rvar, eps=1e-5, momentum=0.1) -> dict[str, Any]:
    """One forward/backward of the synchronized Function (path from SYNCBN_KERNEL, read now)."""
    _settings.reload()
    xl, wl, bl = (_copy(t, grad=True) for t in (x, weight, bias))
    rm, rv = _copy(rmean), _copy(rvar)
    y = _pass.SyncBatchNormFunction.apply(xl, wl, bl, rm, rv, eps, momentum,
                                          _plan(xl, (wl, bl, rm, rv), "test_kernel"))
    y.backward(dy)
    return {"y": y.detach(), "dx": xl.grad, "dw": None if wl is None else wl.grad,
            "db": None if bl is None else bl.grad, "running_mean": rm, "running_var": rv}


def _reference(x, dy, weight, bias, rmean, rvar, eps=1e-5, momentum=0.1) -> dict[str, Any]:
    """Plain float64 ``F.batch_norm`` in training mode and autograd."""
    def d(t, grad=False):
        return None if t is None else t.detach().double().clone().requires_grad_(grad)
    xd, wd, bd, rm, rv = d(x, True), d(weight, True), d(bias, True), d(rmean), d(rvar)
    y = F.batch_norm(xd, rm, rv, wd, bd, training=True, momentum=momentum, eps=eps)
    y.backward(dy.double())
    return {"y": y.detach(), "dx": xd.grad, "dw": None if wd is None else wd.grad,
            "db": None if bd is None else bd.grad, "running_mean": rm, "running_var": rv}


def _assert_same(actual, expected, dtype, what, keys=KEYS):
    for key in keys:
        if expected[key] is None:
            assert actual[key] is None, f"{what}: {key} should be None"
            continue
        assert actual[key] is not None, f"{what}: {key} is None"
        assert actual[key].shape == expected[key].shape, (what, key)
        assert_matches(actual[key], expected[key], dtype, f"{what} {key}")


def _fused_vs_aten_vs_reference(monkeypatch, spy, x, dy, params, eps=1e-5, momentum=0.1,
                                keys=KEYS):
    """Run the fused path (asserting it was taken) and the ATen path; compare both with the
    float64 reference and with each other."""
    dtype = x.dtype
    monkeypatch.setenv("SYNCBN_KERNEL", "fused")
    fused = _sync(x, dy, *params, eps=eps, momentum=momentum)
    assert spy == {"forward": 1, "backward": 1}, f"the fused path was not taken: {spy}"
    monkeypatch.setenv("SYNCBN_KERNEL", "aten")
    aten = _sync(x, dy, *params, eps=eps, momentum=momentum)
    assert spy == {"forward": 1, "backward": 1}, f"the ATen path used the kernel: {spy}"
    ref = _reference(x, dy, *params, eps=eps, momentum=momentum)
    _assert_same(fused, ref, dtype, "fused vs float64 reference", keys)
    _assert_same(aten, ref, dtype, "aten vs float64 reference", keys)
    _assert_same(fused, {k: None if v is None else v.double() for k, v in aten.items()}, dtype,
                 "fused vs aten", keys)
    return fused


# (id, shape, memory format): every branch of the kernel. NCS = torch's default layout, NSC =
# channels innermost (channels_last, or (N, C) input). BLOCK = 4096 values per NCS block; NSC
# blocks are at most 1024 rows and at most 262144 bytes of rows.
LAYOUTS = [
    ("ncs-2d-short-7x7", (4, 3, 7, 7), None),           # S < BLOCK, a vector tail (49 % 8)
    ("ncs-2d-short-2x2", (5, 3, 2, 2), None),           # S shorter than one vector
    ("ncs-2d-long-80x80", (2, 3, 80, 80), None),         # S > BLOCK: rows split 4096 + 2304
    ("ncs-2d-many-row-blocks", (200, 3, 5, 5), None),    # N*S > BLOCK: 2 blocks of whole rows
    ("ncs-1d-NCL", (4, 3, 50), None),
    ("ncs-3d", (2, 3, 4, 5, 6), None),
    ("ncs-6d", (2, 3, 2, 3, 2, 2), None),
    ("ncs-one-channel", (6, 1, 3, 3), None),
    ("nsc-channels-last-2d", (4, 3, 7, 7), CL),
    ("nsc-channels-last-2d-many-blocks", (16, 8, 40, 40), CL),  # 25600 rows: 25 blocks
    ("nsc-channels-last-3d", (2, 3, 4, 5, 6), CL3),
    ("nsc-1d-NC", (6, 4), None),
    ("nsc-1d-NC-many-blocks", (3000, 8), None),          # 3 blocks of <= 1024 rows
    ("nsc-1d-NC-wide-blocks", (1200, 96), None),         # by bytes: 682 rows (float32), 341
    # NSC sums run in tiles of 4 vectors of channels (32 float32, 16 float64), then one channel
    # at a time: C = 40 and 37 take both, C <= 8 only the second, C = 96 only tiles (float32)
    ("nsc-channels-last-2d-tiles-and-tail", (3, 40, 5, 5), CL),
    ("nsc-1d-NC-tiles-and-tail", (50, 37), None),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("shape,fmt", [c[1:] for c in LAYOUTS], ids=[c[0] for c in LAYOUTS])
def test_fused_matches_reference_and_aten(monkeypatch, spy, shape, fmt, dtype):
    """Fused == float64 reference == ATen path: output, all grads, running stats."""
    x, dy = _data(shape, dtype, fmt)
    if fmt is not None:
        assert not x.is_contiguous() and x.is_contiguous(memory_format=fmt)
    _fused_vs_aten_vs_reference(monkeypatch, spy, x, dy, _params(shape[1], dtype))


def test_channels_last_input_with_contiguous_grad_output(monkeypatch, spy):
    """channels_last input with a default-layout grad_output: the backward re-lays dy out."""
    x, _ = _data((4, 8, 6, 6), torch.float64, CL)
    _, dy = _data((4, 8, 6, 6), torch.float64, None, seed=1)
    assert dy.is_contiguous() and not x.is_contiguous()
    _fused_vs_aten_vs_reference(monkeypatch, spy, x, dy, _params(8, torch.float64))


OPTIONS = {
    "no-affine": ({"affine": False}, {}),
    "no-running-stats": ({"track": False}, {}),
    "no-affine-no-running-stats": ({"affine": False, "track": False}, {}),
    "momentum-1": ({}, {"momentum": 1.0}),
    "eps-1e-3": ({}, {"eps": 1e-3}),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("shape,fmt", [((6, 3, 5, 5), None), ((6, 3, 5, 5), CL), ((40, 5), None)],
                         ids=["ncs", "nsc-channels-last", "nsc-1d"])
@pytest.mark.parametrize("option", list(OPTIONS))
def test_fused_options(monkeypatch, spy, option, shape, fmt, dtype):
    """affine=False, no running stats, momentum 1.0, eps 1e-3: fused == reference == ATen."""
    param_kw, call_kw = OPTIONS[option]
    x, dy = _data(shape, dtype, fmt, seed=2)
    _fused_vs_aten_vs_reference(monkeypatch, spy, x, dy, _params(shape[1], dtype, **param_kw),
                                **call_kw)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("shape,fmt", [((0, 3, 4, 4), None), ((0, 3, 4, 4), CL), ((0, 8), None),
                                       ((0, 3, 5), None)],
                         ids=["ncs-2d", "channels-last-2d", "nsc-1d", "ncs-1d"])
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "no-affine"])
def test_empty_batch(monkeypatch, spy, shape, fmt, dtype, affine):
    """N = 0 (global count 0): empty output and grad_input, zero weight/bias grads, running
    statistics unchanged, on both paths."""
    x, dy = _data(shape, dtype, fmt)
    params = _params(shape[1], dtype, affine=affine)
    fused = _fused_vs_aten_vs_reference(monkeypatch, spy, x, dy, params,
                                        keys=("y", "dx", "dw", "db"))
    monkeypatch.setenv("SYNCBN_KERNEL", "aten")
    aten = _sync(x, dy, *params)
    for result, path in ((fused, "fused"), (aten, "aten")):
        assert result["y"].shape == x.shape and result["dx"].shape == x.shape, path
        for key, before in (("running_mean", params[2]), ("running_var", params[3])):
            torch.testing.assert_close(result[key], before, rtol=0, atol=0,
                                       msg=lambda m, k=key, p=path: f"{p} {k} changed: {m}")
        if affine:
            for key in ("dw", "db"):
                torch.testing.assert_close(result[key], torch.zeros_like(result[key]), rtol=0,
                                           atol=0, msg=lambda m, k=key, p=path: f"{p} {k}: {m}")


THREADED = [("ncs-2d", (4, 16, 32, 32), None), ("nsc-channels-last", (4, 16, 32, 32), CL),
            ("nsc-1d", (4096, 16), None)]  # 65536 values each: over the 32768 threshold


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("shape,fmt", [c[1:] for c in THREADED], ids=[c[0] for c in THREADED])
def test_two_threads(monkeypatch, spy, threads, shape, fmt, dtype):
    """Inputs over the threading threshold: with 2 threads fused == reference == ATen, and the
    1- and 2-thread results agree to a few units of the dtype's rounding."""
    numel = 1
    for d in shape:
        numel *= d
    assert numel >= 32768
    x, dy = _data(shape, dtype, fmt, seed=3)
    params = _params(shape[1], dtype)
    threads(2)
    two = _fused_vs_aten_vs_reference(monkeypatch, spy, x, dy, params)
    threads(1)
    monkeypatch.setenv("SYNCBN_KERNEL", "fused")
    one = _sync(x, dy, *params)
    print(f"kernel flags: {_kernel.build_info()['flags']}")
    tol = 8 * torch.finfo(dtype).eps
    for key in KEYS:
        scale = max(1.0, float(one[key].abs().max()))
        torch.testing.assert_close(two[key], one[key], rtol=tol, atol=tol * scale,
                                   msg=lambda m, k=key: f"2 threads vs 1 thread, {k}: {m}")


@pytest.mark.parametrize("shape,fmt", [((64, 4, 16, 16), None), ((64, 4, 16, 16), CL),
                                       ((20000, 4), None)],
                         ids=["ncs-2d", "nsc-channels-last", "nsc-1d"])
def test_variance_at_large_mean_over_std(monkeypatch, spy, shape, fmt):
    """float32 data with mean/std = 1e4: the fused batch variance (the running_var with
    momentum 1.0) within 1e-3 relative of the float64 variance of the same data."""
    monkeypatch.setenv("SYNCBN_KERNEL", "fused")
    x, dy = _data(shape, torch.float32, fmt, seed=4, mean=1e4, std=1.0)
    _, _, rmean, rvar = _params(shape[1], torch.float32)
    out = _sync(x, dy, None, None, rmean, rvar, momentum=1.0)
    assert spy["forward"] == 1
    dims = [0, *range(2, x.dim())]
    true_var = x.double().var(dim=dims, correction=1)
    true_mean = x.double().mean(dim=dims)
    err = float(((out["running_var"].double() - true_var) / true_var).abs().max())
    print(f"relative error of the batch variance at mean/std = 1e4: {err:.3g}")
    torch.testing.assert_close(out["running_var"].double(), true_var, rtol=1e-3, atol=0)
    torch.testing.assert_close(out["running_mean"].double(), true_mean, rtol=1e-6, atol=0)


@pytest.mark.parametrize("shape,fmt", [((16, 3, 4, 4), None), ((16, 3, 4, 4), CL),
                                       ((256, 3), None)],
                         ids=["ncs-2d", "nsc-channels-last", "nsc-1d"])
def test_grad_input_at_large_mean_over_std(monkeypatch, spy, shape, fmt):
    """float32 data with mean/std = 1e3: fused grad_input error (against float64) at most 2x
    torch's own float32 BatchNorm's."""
    monkeypatch.setenv("SYNCBN_KERNEL", "fused")
    mean, std = 10.0, 0.01
    x, _ = _data(shape, torch.float32, fmt, seed=5, mean=mean, std=std)
    # dy correlated with x (as from a loss like y**2): sum(dy * xhat) is large, which is where a
    # folded x * b + c form of grad_input cancels
    dy = ((x.double() - mean) / std).float()
    ours = _sync(x, dy, None, None, None, None)["dx"]
    assert spy == {"forward": 1, "backward": 1}
    truth = _reference(x, dy, None, None, None, None)["dx"]
    xt = x.detach().clone().requires_grad_()
    F.batch_norm(xt, None, None, training=True).backward(dy)
    ours_err = float((ours.double() - truth).abs().max())
    torch_err = float((xt.grad.double() - truth).abs().max())
    print(f"grad_input max error at mean/std = 1e3: fused {ours_err:.3g}, "
          f"torch float32 {torch_err:.3g}")
    assert ours_err <= 2 * torch_err, f"fused {ours_err:.3g} vs torch float32 {torch_err:.3g}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("mode", ["fused", "aten"])
def test_path_taken(monkeypatch, spy, mode, dtype):
    """SYNCBN_KERNEL=fused takes the kernel for CPU float32/float64; aten never does."""
    monkeypatch.setenv("SYNCBN_KERNEL", mode)
    x, dy = _data((4, 3, 5, 5), dtype)
    params = _params(3, dtype)
    out = _sync(x, dy, *params)
    expected = 1 if mode == "fused" else 0
    assert spy == {"forward": expected, "backward": expected}
    _assert_same(out, _reference(x, dy, *params), dtype, f"{mode} vs float64 reference")


@pytest.mark.parametrize("mode", ["fused", "aten"])
def test_one_rank_group_sends_nothing(monkeypatch, spy, mode):
    """In a 1-rank group the Function calls no collective (the sum over one rank is its own
    buffer) and its results are still those of the reference."""
    calls = []
    monkeypatch.setattr(dist, "all_reduce", lambda *a, **k: calls.append(a))
    monkeypatch.setenv("SYNCBN_KERNEL", mode)
    x, dy = _data((4, 3, 5, 5), torch.float64)
    params = _params(3, torch.float64)
    out = _sync(x, dy, *params)
    assert calls == [], f"{len(calls)} all_reduce calls in a 1-rank group"
    assert spy == ({"forward": 1, "backward": 1} if mode == "fused" else
                   {"forward": 0, "backward": 0})
    _assert_same(out, _reference(x, dy, *params), torch.float64, f"{mode} vs float64 reference")


def _strided(dtype):
    x, dy = _data((4, 3, 6, 5), dtype)
    return x.transpose(2, 3), dy.transpose(2, 3)  # neither contiguous nor channels_last


def _sliced(dtype):
    x, dy = _data((4, 3, 10, 5), dtype)
    return x[:, :, ::2], dy[:, :, ::2]


@pytest.mark.parametrize("case", ["float16", "bfloat16", "transposed-float32", "sliced-float64",
                                  "strided-weight"])
def test_fallback_to_aten_under_fused(monkeypatch, spy, case):
    """Half-precision or non-contiguous input (or a non-contiguous weight) takes the ATen path
    even under SYNCBN_KERNEL=fused, with correct results."""
    monkeypatch.setenv("SYNCBN_KERNEL", "fused")
    if case in ("float16", "bfloat16"):
        dtype = getattr(torch, case)
        x, dy = _data((4, 3, 5, 5), dtype)
        params = _params(3, torch.float32)  # half input, float32 parameters (as under autocast)
    elif case == "strided-weight":
        dtype = torch.float64
        x, dy = _data((4, 3, 5, 5), dtype)
        w, b, rm, rv = _params(6, dtype)
        params = (w[::2], b[:3], rm[:3], rv[:3])
        assert not params[0].is_contiguous()
    else:
        dtype = torch.float32 if case.endswith("float32") else torch.float64
        x, dy = (_strided if case.startswith("transposed") else _sliced)(dtype)
        params = _params(3, dtype)
        assert not x.is_contiguous() and not x.is_contiguous(memory_format=CL)
    out = _sync(x, dy, *params)
    assert spy == {"forward": 0, "backward": 0}, f"the fused path was taken: {spy}"
    assert out["y"].dtype == dtype and out["dx"].dtype == dtype
    _assert_same(out, _reference(x, dy, *params), dtype, f"{case} under fused vs reference")


# ---------------------------------------------------------------------------------------------
# Build and fallback behaviour, in fresh processes (the kernel is loaded once per process).

_CHILD = textwrap.dedent("""
    import datetime, json, sys, warnings
    import torch
    import torch.distributed as dist
    from syncbn import _pass, _wire
    from syncbn._native import kernel as _kernel

    store, out = sys.argv[1], sys.argv[2]
    dist.init_process_group("gloo", store=dist.FileStore(store, 1), rank=0, world_size=1,
                            timeout=datetime.timedelta(seconds=60))
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 3, 5, 5, generator=g, dtype=torch.float64)
    dy = torch.randn(6, 3, 5, 5, generator=g, dtype=torch.float64)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step in range(2):  # the second pass must not warn again
            xl = x.clone().requires_grad_()
            state = _pass.LayerState(_wire.LayerTag.for_layer("child", 0, "child"), print)
            plan = _pass.synchronized_plan(state, xl, (None, None, None, None))
            y = _pass.SyncBatchNormFunction.apply(xl, None, None, None, None, 1e-5, 0.1, plan)
            y.backward(dy)
    torch.save({"x": x, "dy": dy, "y": y.detach(), "dx": xl.grad}, out)
    dist.destroy_process_group()
    print(json.dumps({"warnings": [[w.category.__name__, str(w.message)] for w in caught],
                      "info": _kernel.build_info()}))
""")


def _child(tmp_path: Path, name: str, cache: Path, **env_vars: str | None):
    """Run _CHILD in a fresh interpreter; (process, its JSON report or None, its tensors path)."""
    env = harness.child_env(SYNCBN_CACHE_DIR=str(cache), **env_vars)
    out = tmp_path / f"{name}.pt"
    proc = subprocess.run([sys.executable, "-c", _CHILD, str(tmp_path / f"{name}-store"), str(out)],
                          env=env, capture_output=True, text=True, timeout=120, check=False)
    lines = proc.stdout.strip().splitlines()
    report = json.loads(lines[-1]) if proc.returncode == 0 and lines else None
    return proc, report, out


def _explain(proc: subprocess.CompletedProcess) -> str:
    return f"exit {proc.returncode}\n--- stdout ---\n{proc.stdout}\n--- stderr ---\n{proc.stderr}"


def _check_child_results(out: Path) -> None:
    saved = torch.load(out)
    ref = _reference(saved["x"], saved["dy"], None, None, None, None)
    assert_matches(saved["y"], ref["y"], F64, "child output")
    assert_matches(saved["dx"], ref["dx"], F64, "child grad_input")


def test_no_compiler_auto_warns_once_and_uses_aten(tmp_path):
    """CC that does not exist, SYNCBN_KERNEL=auto: one RuntimeWarning naming the cause, then the
    ATen path with correct results."""
    proc, report, out = _child(tmp_path, "auto", tmp_path / "cache", CC="/nonexistent/cc",
                               SYNCBN_KERNEL="auto")
    assert report is not None, _explain(proc)
    ours = [(cat, msg) for cat, msg in report["warnings"] if "syncbn" in msg]
    assert len(ours) == 1, ours
    category, message = ours[0]
    print("warning:", message)
    assert category == "RuntimeWarning", ours
    assert "fused CPU kernel is unavailable" in message and "ATen path" in message, message
    assert "/nonexistent/cc" in message, f"the warning does not say why: {message}"
    info = report["info"]
    assert info["available"] is False and "/nonexistent/cc" in info["error"], info
    _check_child_results(out)


def test_no_compiler_fused_raises(tmp_path):
    """CC that does not exist, SYNCBN_KERNEL=fused: KernelUnavailable, saying why."""
    proc, _, _ = _child(tmp_path, "fused", tmp_path / "cache", CC="/nonexistent/cc",
                        SYNCBN_KERNEL="fused")
    assert proc.returncode != 0, _explain(proc)
    # the traceback's last line (torch.distributed may prefix it with "[rank0]: ")
    lines = [ln for ln in proc.stderr.splitlines() if "syncbn._native.kernel.KernelUnavailable: " in ln]
    assert len(lines) == 1, _explain(proc)
    last = lines[0]
    print(last)
    assert "SYNCBN_KERNEL=fused" in last and "fused CPU kernel is unavailable" in last, last
    assert "/nonexistent/cc" in last, last
    assert "RuntimeWarning" not in proc.stderr, _explain(proc)


def test_build_once_then_load_from_cache(tmp_path):
    """A fresh cache: the first process compiles into it, the second loads it, faster."""
    if _kernel._compiler() is None:
        pytest.skip("no C compiler on this machine (CC unset, no cc/gcc/clang on PATH)")
    cache = tmp_path / "cache"
    infos = []
    for name in ("first", "second"):
        proc, report, out = _child(tmp_path, name, cache, SYNCBN_KERNEL="fused")
        assert report is not None, _explain(proc)
        infos.append(report["info"])
        _check_child_results(out)
        assert not [m for _, m in report["warnings"] if "syncbn" in m], report["warnings"]
    first, second = infos
    print(f"kernel build: {first['seconds']:.2f} s ({first['flags']}); "
          f"load from the cache: {second['seconds']:.3f} s")
    assert first["available"] and first["compiled"] is True, first
    assert Path(first["path"]).parent == cache and Path(first["path"]).is_file(), first
    assert second["available"] and second["compiled"] is False, second
    assert second["path"] == first["path"], (first, second)
    assert second["seconds"] < first["seconds"], (first, second)


def test_kernel_command_builds_then_loads_and_reports_failure(tmp_path):
    """``syncbn kernel`` builds into the cache, then loads from it; without a compiler it exits 1."""
    def kernel_cli(*args, **env_extra):
        env = harness.child_env(**{"SYNCBN_CACHE_DIR": str(tmp_path / "cache"), **env_extra})
        return subprocess.run([sys.executable, "-m", "syncbn", "kernel", *args], env=env,
                              capture_output=True, text=True, timeout=120, check=False)

    if _kernel._compiler() is None:
        pytest.skip("no C compiler on this machine: the kernel cannot be built")
    first = kernel_cli()
    assert first.returncode == 0, first.stdout + first.stderr
    assert first.stdout.startswith("syncbn kernel: built "), first.stdout
    print(first.stdout.strip())
    second = kernel_cli()
    assert second.returncode == 0 and "loaded from the cache" in second.stdout, second.stdout
    assert first.stdout.split()[3] == second.stdout.split()[6]  # the same file
    rebuilt = kernel_cli("--rebuild")
    assert rebuilt.returncode == 0 and rebuilt.stdout.startswith("syncbn kernel: built "), rebuilt
    broken = kernel_cli(CC="/nonexistent/cc", SYNCBN_CACHE_DIR=str(tmp_path / "other"))
    assert broken.returncode == 1, broken.stdout + broken.stderr
    assert "fused CPU kernel is unavailable" in broken.stderr and "/nonexistent/cc" in broken.stderr
    assert "RuntimeWarning" not in broken.stderr  # said once, as the error
