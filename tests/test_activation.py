"""Activated and in-place batch norm at the level of the backends' steps, in one process.

W ranks are simulated as in ``test_wire.py``: every shard writes its buffer
(``forward_reduce``), the buffers are summed (the all_reduce is a plain sum), every shard applies
the sum; the same for the backward. The property: ``act(batch_norm(x))`` over the shards, its
grad_input, the summed weight/bias gradients and the running statistics equal float64
``F.batch_norm`` followed by the activation (and autograd) over ``torch.cat(shards)``.

In-place passes write the output over the input (``out=x``) and run the backward from the
output alone: the input handed to the backward steps is ``None``, so a step that read it
would fail. Their error bound is the data dtype's precision times ``1 + |bias| / |weight|``
(the inverse's conditioning, docs/how-it-works.md), which the tolerances here carry.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F

from reference import TOLERANCES, make_data, make_params
from syncbn import _stats, _wire, backends

F64, F32 = torch.float64, torch.float32
CL, CL3 = torch.channels_last, torch.channels_last_3d
EPS, MOMENTUM = 1e-5, 0.1
ACTS = [("identity", 0.0), ("relu", 0.0), ("leaky_relu", 0.01), ("leaky_relu", 0.2),
        ("elu", 1.0)]
# (tail (C, *), dtype, memory format, shard sizes)
CASES = [
    ((5,), F32, None, [3, 0, 5]),  # 2D, uneven and empty shards
    ((6, 3, 5), F64, None, [2, 3]),  # 4D
    ((6, 3, 5), F32, CL, [3, 0, 4]),  # 4D channels_last
    ((70, 2, 3), F32, None, [2, 1]),  # more channels than a vector tile, odd spatial size
    ((70, 2, 3), F32, CL, [3, 2]),
    ((3, 2, 3, 2), F32, CL3, [2, 2]),  # 5D channels_last_3d
    ((3, 2, 3, 2), F64, None, [5]),  # 5D, one rank
    ((6, 3, 3), torch.bfloat16, CL, [3, 2]),  # half types: the aten backend only
    ((5, 7), torch.float16, None, [4, 3]),
]


def _ids(v: Any) -> str:
    return str(v).replace("torch.", "").replace(" ", "")


def _copy(t: torch.Tensor) -> torch.Tensor:
    """A copy with the same strides (channels_last stays channels_last)."""
    return torch.empty_strided(t.shape, t.stride(), dtype=t.dtype).copy_(t)


def backend_or_skip(name: str, x: torch.Tensor, *params: torch.Tensor | None) -> Any:
    backend = getattr(backends, name)
    if backend.applies(x, *params) is None:
        pytest.skip(f"the {name} backend does not take {x.dtype} input")
    if name == "fused" and not backend.load(required=False):
        from syncbn._native import kernel

        pytest.skip(f"the fused C kernel is not loaded here: {kernel.build_info()['error']}")
    return backend


def simulate(backend: Any, shards: list[torch.Tensor], grads: list[torch.Tensor],
             weight: torch.Tensor | None, bias: torch.Tensor | None,
             running: tuple[torch.Tensor, torch.Tensor] | None, act: int, param: float,
             inplace: bool) -> dict[str, Any]:
    """Forward and backward of ``len(shards)`` simulated ranks on one backend's steps."""
    channels, world = shards[0].shape[1], len(shards)
    size = _wire.length(_wire.width_for(channels))
    tag = _wire.LayerTag(key=4321, description="test_activation")
    ffields = _wire.fields(tag, _wire.FORWARD, channels, 1)
    bfields = _wire.fields(tag, _wire.BACKWARD, channels, 1)
    runs = [tuple(t.clone() for t in running) if running else (None, None) for _ in shards]
    geos = [backend.applies(x, weight, bias, *run) for x, run in zip(shards, runs)]
    bufs = [torch.empty(size, dtype=F64) for _ in shards]
    for geo, x, buf in zip(geos, shards, bufs):
        assert not backend.forward_reduce(geo, x, buf, ffields)
    reduced = torch.stack(bufs).sum(0)  # the all_reduce
    ys, stats = [], []
    for geo, x, (rm, rv) in zip(geos, shards, runs):
        xin = _copy(x) if inplace else x
        y, st, code = backend.forward_apply(geo, xin, reduced.clone(), world, ffields, weight,
                                            bias, rm, rv, EPS, MOMENTUM, 0, act=act,
                                            act_param=param, out=xin if inplace else None)
        assert code == _wire.OK
        assert y.shape == x.shape and y.dtype == x.dtype
        assert y.stride() == x.stride() or x.numel() == 0
        if inplace:
            assert y.data_ptr() == xin.data_ptr()
        ys.append(y)
        stats.append(st)
    wdt = None if weight is None else weight.dtype
    bdt = None if bias is None else bias.dtype
    bbufs, gws, gbs = [], [], []
    for geo, x, dy, y, st in zip(geos, shards, grads, ys, stats):
        buf = torch.empty(size, dtype=F64)
        gw, gb, code = backend.backward_reduce(
            geo, dy, None if inplace else x, st, buf, bfields, wdt, bdt, act=act,
            act_param=param, saved_output=y if inplace else None, weight=weight, bias=bias)
        assert code == _wire.OK
        bbufs.append(buf)
        gws.append(gw)
        gbs.append(gb)
    breduced = torch.stack(bbufs).sum(0)
    dxs = []
    for geo, x, dy, y, st in zip(geos, shards, grads, ys, stats):
        dx, code = backend.backward_apply(
            geo, dy, None if inplace else x, st, weight, breduced.clone(), world, bfields,
            act=act, act_param=param, saved_output=y if inplace else None, bias=bias)
        assert code == _wire.OK
        assert dx.shape == x.shape and (dx.stride() == x.stride() or x.numel() == 0)
        dxs.append(dx)
    out = {"y": torch.cat(ys), "dx": torch.cat(dxs),
           "dw": None if weight is None else torch.stack(gws).sum(0),
           "db": None if bias is None else torch.stack(gbs).sum(0),
           "running_mean": runs[0][0], "running_var": runs[0][1]}
    return out


def reference(shards: list[torch.Tensor], grads: list[torch.Tensor],
              weight: torch.Tensor | None, bias: torch.Tensor | None,
              running: tuple[torch.Tensor, torch.Tensor] | None, act: int, param: float,
              dtype: torch.dtype = F64) -> dict[str, Any]:
    """``F.batch_norm`` then the activation (torch's operators, out of place) over the global
    batch, with autograd, in ``dtype`` (float64: the reference; the data's dtype: torch's own
    error, the floor of the tolerance)."""
    x = torch.cat(shards).to(dtype).requires_grad_()
    pdt = F64 if dtype == F64 else F32
    w = None if weight is None else weight.detach().to(pdt).requires_grad_()
    b = None if bias is None else bias.detach().to(pdt).requires_grad_()
    rm, rv = (t.to(pdt, copy=True) for t in running) if running else (None, None)
    y = F.batch_norm(x, rm, rv, w, b, True, MOMENTUM, EPS)
    y = _stats.activate(y, act, param)
    y.backward(torch.cat(grads).to(dtype))
    return {"y": y.detach(), "dx": x.grad, "dw": None if w is None else w.grad,
            "db": None if b is None else b.grad, "running_mean": rm, "running_var": rv}


def conditioning(weight: torch.Tensor | None, bias: torch.Tensor | None) -> float:
    """``max |bias| / |weight|``: how much an in-place backward's inverse amplifies rounding."""
    if weight is None:
        return 0.0
    b = torch.zeros_like(weight) if bias is None else bias
    return float((b.double().abs() / weight.double().abs()).max())


def compare(got: dict[str, Any], want: dict[str, Any], floor: dict[str, Any],
            dtype: torch.dtype, scale: float, what: str) -> None:
    """Every quantity within ``dtype``'s tolerance times ``scale`` (relative to its largest
    value, at least 1), or twice torch's own error in ``dtype`` where that is larger."""
    rtol, atol = TOLERANCES[dtype]
    for key, expected in want.items():
        actual = got[key]
        if expected is None:
            assert actual is None, (what, key)
            continue
        big = float(expected.abs().max()) if expected.numel() else 1.0
        mine = floor[key]
        own = float((mine.double() - expected.double()).abs().max()) if expected.numel() else 0.0
        torch.testing.assert_close(
            actual.double(), expected.double(), rtol=rtol * scale,
            atol=max(atol * scale * max(big, 1.0), 2.0 * own),
            msg=lambda m, key=key, own=own: f"{what}: {key} (torch's own error {own:.2e}): {m}")


def data(tail: tuple[int, ...], dtype: torch.dtype, fmt: Any, sizes: list[int], seed: int = 0,
         mean: float = 0.5, affine: bool = True):
    shards, grads = make_data(sizes, tail, dtype, seed=seed, mean=mean)
    if fmt is not None:
        shards = [s.contiguous(memory_format=fmt) for s in shards]
        grads = [g.contiguous(memory_format=fmt) for g in grads]
    pdt = F64 if dtype == F64 else F32
    weight = bias = None
    if affine:
        weight, bias = (t.to(pdt) for t in make_params(tail[0], seed=seed))
    g = torch.Generator().manual_seed(seed + 7)
    running = (torch.randn(tail[0], generator=g, dtype=F64).to(pdt),
               (torch.rand(tail[0], generator=g, dtype=F64) + 0.5).to(pdt))
    return shards, grads, weight, bias, running


def check(backend_name: str, shards, grads, weight, bias, running, name: str, param: float,
          inplace: bool) -> None:
    dtype = shards[0].dtype
    backend = backend_or_skip(backend_name, shards[0], weight, bias, *running)
    act = _stats.activation_code(name, param, inplace, "test")
    got = simulate(backend, shards, grads, weight, bias, running, act, param, inplace)
    want = reference(shards, grads, weight, bias, running, act, param)
    floor = reference(shards, grads, weight, bias, running, act, param, dtype=dtype)
    scale = 1.0 + conditioning(weight, bias) if inplace else 1.0
    compare(got, want, floor, dtype, scale,
            f"{backend_name} {name}({param}) inplace={inplace} {dtype}")


@pytest.mark.parametrize("inplace", [False, True], ids=["out", "inplace"])
@pytest.mark.parametrize("name,param", ACTS, ids=[f"{n}{p:g}" for n, p in ACTS])
@pytest.mark.parametrize("tail,dtype,fmt,sizes", CASES, ids=_ids)
@pytest.mark.parametrize("backend_name", ["fused", "aten"])
def test_steps_match_float64_batch_norm_and_activation(backend_name, tail, dtype, fmt, sizes,
                                                       name, param, inplace):
    if inplace and name == "relu":
        pytest.skip("relu has no inverse (refused: test_relu_in_place_is_refused)")
    check(backend_name, *data(tail, dtype, fmt, sizes), name, param, inplace)


@pytest.mark.parametrize("inplace", [False, True], ids=["out", "inplace"])
@pytest.mark.parametrize("backend_name", ["fused", "aten"])
def test_without_affine(backend_name, inplace):
    shards, grads, _, _, running = data((6, 4), F32, None, [3, 4], seed=3)
    check(backend_name, shards, grads, None, None, running, "leaky_relu", 0.1, inplace)
    check(backend_name, shards, grads, None, None, running, "elu", 0.5, inplace)


@pytest.mark.parametrize("backend_name", ["fused", "aten"])
def test_negative_slope_and_alpha_out_of_place(backend_name):
    """Not invertible, so not in place, but computed: the derivative from the recomputed z."""
    shards, grads, weight, bias, running = data((6, 4), F64, None, [3, 4], seed=4)
    check(backend_name, shards, grads, weight, bias, running, "leaky_relu", -0.3, False)
    check(backend_name, shards, grads, weight, bias, running, "elu", -0.5, False)


@pytest.mark.parametrize("backend_name", ["fused", "aten"])
def test_negative_weights_in_place(backend_name):
    shards, grads, weight, bias, running = data((6, 3, 3), F32, CL, [3, 4], seed=5)
    weight = weight * torch.tensor([1.0, -1.0] * 3)
    check(backend_name, shards, grads, weight, bias, running, "leaky_relu", 0.01, True)
    check(backend_name, shards, grads, weight, bias, running, "elu", 1.0, True)


@pytest.mark.parametrize("backend_name", ["fused", "aten"])
@pytest.mark.parametrize("dtype", [F32, F64], ids=_ids)
def test_elu_saturated_in_place(backend_name, dtype):
    """An elu output that rounded to ``-alpha`` has lost its input (``z`` is clamped at
    ``log(eps/2)``); its ``dz = dy * (y + alpha)`` is 0 there, so every gradient stays finite
    and within the tolerance of the float64 answer."""
    shards, grads, weight, bias, running = data((4, 5), dtype, None, [6, 5], seed=6)
    bias = torch.tensor([-60.0, -45.0, 0.0, 2.0], dtype=bias.dtype)
    weight = torch.ones_like(weight)  # channels 0, 1: every output is -alpha in float32/64
    backend = backend_or_skip(backend_name, shards[0], weight, bias, *running)
    got = simulate(backend, shards, grads, weight, bias, running, _stats.ELU, 1.0, True)
    assert bool((got["y"][:, :2] == -1.0).all())
    for key in ("dx", "dw", "db"):
        assert bool(torch.isfinite(got[key]).all()), key
    want = reference(shards, grads, weight, bias, running, _stats.ELU, 1.0)
    compare(got, want, want, dtype, 1.0, f"{backend_name} saturated elu")


def test_inplace_invertible_is_the_conditioning():
    """The helper the core asks before an in-place pass: a weight of 0, or a bias large
    against the weight, is refused (the core then keeps a copy of the input)."""
    w, b = torch.ones(3), torch.zeros(3)
    assert _stats.inplace_invertible(w, b, F32)
    assert _stats.inplace_invertible(w * 1e-6, b, F32)  # no bias: xhat is z / w, exact
    assert not _stats.inplace_invertible(torch.tensor([1.0, 0.0, 1.0]), b, F32)
    assert not _stats.inplace_invertible(torch.tensor([1.0, -0.0, 1.0]), b, F64)
    limit = _stats.INPLACE_MAX_COND
    assert _stats.inplace_invertible(w, torch.full((3,), limit * 0.99), F32)
    assert not _stats.inplace_invertible(w, torch.tensor([0.0, -limit * 1.01, 0.0]), F32)
    # float16: z below float16's normal range loses digits: a tiny weight alone is refused
    assert not _stats.inplace_invertible(w * 1e-4, b, torch.float16)
    assert _stats.inplace_invertible(w * 1e-2, b, torch.float16)
    assert _stats.inplace_invertible(None, None, torch.bfloat16)


@pytest.mark.parametrize("backend_name", ["fused", "aten"])
def test_ill_conditioned_weight_keeps_a_copy_of_the_input(backend_name):
    """A zero weight (e.g. ResNet's zero-initialized last BN of a block): the output holds no
    trace of the input, and the true weight gradient is not zero. ``inplace_invertible`` says
    no; the in-place pass then keeps a copy of its input, and the steps' x path (the copy)
    gives the exact gradients while the output still lands in the input's storage."""
    shards, grads, weight, bias, running = data((4, 3, 2), F32, None, [3, 4], seed=8)
    weight = torch.tensor([0.0, 1.0, 1e-4, 0.7], dtype=F32)
    bias = torch.tensor([0.5, 0.0, 1.0, -0.2], dtype=F32)
    assert not _stats.inplace_invertible(weight, bias, F32)
    backend = backend_or_skip(backend_name, shards[0], weight, bias, *running)
    act = _stats.LEAKY_RELU
    want = reference(shards, grads, weight, bias, running, act, 0.01)
    assert float(want["dw"][0].abs()) > 1e-3  # what an inverse-based backward would lose
    # the core's in-place pass with the fallback: copy, then write the output over the input
    channels, world = 4, 2
    size = _wire.length(_wire.width_for(channels))
    tag = _wire.LayerTag(key=99, description="test")
    ff, bf = _wire.fields(tag, _wire.FORWARD, channels, 1), _wire.fields(tag, _wire.BACKWARD,
                                                                       channels, 1)
    geos = [backend.applies(x, weight, bias) for x in shards]
    bufs = [torch.empty(size, dtype=F64) for _ in shards]
    for geo, x, buf in zip(geos, shards, bufs):
        backend.forward_reduce(geo, x, buf, ff)
    reduced = torch.stack(bufs).sum(0)
    kept, ys, stats = [], [], []
    for geo, x in zip(geos, shards):
        xin = _copy(x)
        kept.append(xin.clone())  # the fallback's copy
        y, st, _ = backend.forward_apply(geo, xin, reduced, world, ff, weight, bias, None,
                                         None, EPS, MOMENTUM, 0, act=act, act_param=0.01,
                                         out=xin)
        assert y.data_ptr() == xin.data_ptr()
        ys.append(y)
        stats.append(st)
    bbufs, gws = [], []
    for geo, x, dy, st in zip(geos, kept, grads, stats):
        buf = torch.empty(size, dtype=F64)
        gw, _, _ = backend.backward_reduce(geo, dy, x, st, buf, bf, F32, None, act=act,
                                           act_param=0.01, weight=weight, bias=bias)
        bbufs.append(buf)
        gws.append(gw)
    breduced = torch.stack(bbufs).sum(0)
    dxs = [backend.backward_apply(geo, dy, x, st, weight, breduced, world, bf, act=act,
                                  act_param=0.01, bias=bias)[0]
           for geo, x, dy, st in zip(geos, kept, grads, stats)]
    torch.testing.assert_close(torch.cat(ys).double(), want["y"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.cat(dxs).double(), want["dx"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.stack(gws).sum(0).double(), want["dw"], rtol=1e-5,
                               atol=1e-5)


def test_relu_in_place_is_refused():
    with pytest.raises(ValueError, match=r"SyncBatchNorm2d: inplace=True needs an invertible "
                                         r"activation .* got relu: relu maps every negative"):
        _stats.activation_code("relu", 0.0, True, "SyncBatchNorm2d")
    with pytest.raises(ValueError, match=r"got leaky_relu: leaky_relu with slope 0 <= 0"):
        _stats.activation_code("leaky_relu", 0.0, True, "SyncBatchNorm2d")
    with pytest.raises(ValueError, match=r"got elu: elu with alpha -1 <= 0"):
        _stats.activation_code("elu", -1.0, True, "SyncBatchNorm2d")
    with pytest.raises(ValueError, match=r"SyncBatchNorm: expected activation to be one of "
                                         r"'identity', 'relu', 'leaky_relu', 'elu', got 'gelu'"):
        _stats.activation_code("gelu", 0.0, False, "SyncBatchNorm")
    with pytest.raises(ValueError, match=r"finite number, got nan"):
        _stats.activation_code("elu", float("nan"), False, "SyncBatchNorm")
    assert _stats.activation_code("relu", 0.0, False, "x") == _stats.RELU
    assert _stats.activation_code("elu", 1.0, True, "x") == _stats.ELU


@pytest.mark.parametrize("name,param", ACTS, ids=[f"{n}{p:g}" for n, p in ACTS])
def test_scalar_formulas_agree_with_torch(name, param):
    """``activate``, ``act_grad`` (from z), ``act_grad_from_output`` (from y) and
    ``act_inverse`` against torch's activation and its autograd, at and around 0."""
    act = _stats.ACTIVATIONS[name]
    z = torch.tensor([-30.0, -3.0, -0.5, -1e-3, 0.0, 1e-3, 0.5, 3.0], dtype=F64,
                     requires_grad=True)
    y = _stats.activate(z * 1.0, act, param)
    y.sum().backward()
    torch.testing.assert_close(_stats.act_grad(z.detach(), act, param), z.grad)
    torch.testing.assert_close(_stats.act_grad_from_output(y.detach(), act, param), z.grad)
    if act != _stats.RELU:
        back = _stats.act_inverse(y.detach(), act, param)
        keep = z.detach() > -30  # elu at -30: y + alpha ~ 1e-13, the inverse keeps ~3 digits
        torch.testing.assert_close(back[keep], z.detach()[keep], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend_name", ["fused", "aten"])
def test_default_keywords_are_the_plain_steps(backend_name):
    """Identity out of place through the new keywords is bitwise the old call."""
    shards, grads, weight, bias, running = data((6, 3, 5), F32, CL, [4], seed=9)
    backend = backend_or_skip(backend_name, shards[0], weight, bias, *running)
    x, dy = shards[0], grads[0]
    geo = backend.applies(x, weight, bias, *running)
    size = _wire.length(_wire.width_for(6))
    f = [1, 2, 3, 4, 6, 1]
    buf = torch.empty(size, dtype=F64)
    backend.forward_reduce(geo, x, buf, f)
    plain = backend.forward_apply(geo, x, buf.clone(), 1, f, weight, bias, None, None, EPS,
                                  MOMENTUM, 0)
    keyed = backend.forward_apply(geo, x, buf.clone(), 1, f, weight, bias, None, None, EPS,
                                  MOMENTUM, 0, act=_stats.IDENTITY, act_param=0.0, out=None)
    assert torch.equal(plain[0], keyed[0]) and torch.equal(plain[1], keyed[1])
    stats = plain[1]
    b1, b2 = torch.empty(size, dtype=F64), torch.empty(size, dtype=F64)
    r1 = backend.backward_reduce(geo, dy, x, stats, b1, f, F32, F32)
    r2 = backend.backward_reduce(geo, dy, x, stats, b2, f, F32, F32, act=0, act_param=0.0,
                                 saved_output=None, weight=weight, bias=bias)
    assert torch.equal(b1, b2) and torch.equal(r1[0], r2[0]) and torch.equal(r1[1], r2[1])
    a1 = backend.backward_apply(geo, dy, x, stats, weight, b1, 1, f)
    a2 = backend.backward_apply(geo, dy, x, stats, weight, b1, 1, f, None, act=0,
                                act_param=0.0, saved_output=None, bias=bias)
    assert torch.equal(a1[0], a2[0])


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("inplace", [False, True], ids=["out", "inplace"])
@pytest.mark.parametrize("tail,fmt,sizes", [((16, 48, 48), CL, [9, 7]),
                                            ((3, 70, 70), None, [4, 3])], ids=_ids)
def test_fused_threads_and_blocks(two_threads, tail, fmt, sizes, inplace):
    """Large enough for two threads (the kernel's NSC row split; its NCS channel split) and,
    at 70 x 70 values per row, for rows longer than one block of the NCS sums."""
    shards, grads, weight, bias, running = data(tail, F32, fmt, sizes, seed=11)
    check("fused", shards, grads, weight, bias, running, "leaky_relu", 0.01, inplace)
    check("fused", shards, grads, weight, bias, running, "elu", 1.0, inplace)


@pytest.mark.parametrize("name,param", [("identity", 0.0), ("leaky_relu", 0.01), ("elu", 1.0)])
@pytest.mark.parametrize("backend_name", ["fused", "aten"])
def test_in_place_at_the_conditioning_bound(backend_name, name, param):
    """|bias| / |weight| = 30, just inside INPLACE_MAX_COND: float32 in-place results within the
    plain float32 tolerance (the weight gradient's error is ~30 float32 roundings)."""
    shards, grads, weight, bias, running = data((8, 6, 6), F32, None, [5, 4], seed=12)
    weight = torch.full_like(weight, 0.05) * torch.tensor([1.0, -1.0] * 4)
    bias = torch.tensor([1.5, -1.5] * 4)
    assert _stats.inplace_invertible(weight, bias, F32)
    assert not _stats.inplace_invertible(weight, bias * 1.1, F32)
    backend = backend_or_skip(backend_name, shards[0], weight, bias, *running)
    act = _stats.ACTIVATIONS[name]
    got = simulate(backend, shards, grads, weight, bias, running, act, param, True)
    want = reference(shards, grads, weight, bias, running, act, param)
    compare(got, want, want, F32, 1.0, f"{backend_name} {name} at the bound")
