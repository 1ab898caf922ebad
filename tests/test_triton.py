"""The Triton backend (``backends.triton.py``), run by Triton's interpreter on CPU tensors.

W ranks are simulated in one process: every shard writes its own buffer (``forward_reduce``),
the buffers are summed (the all_reduce: the same sum for every rank), then every shard applies
it; the same for the backward. The property: the shards' results == float64 batch norm on
``torch.cat(shards)``. ``TRITON_INTERPRET=1`` is set by a module fixture before the kernels are
first built (the backend builds them lazily) and removed afterwards, so the other test modules
never route CPU tensors through the interpreter. Shapes are tiny and the tile sizes are shrunk
(``TUNING``) so that a pass still has several row tiles and channel blocks: the interpreter
runs ~10 ms per program.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

triton = pytest.importorskip("triton", reason="triton is not installed: the Triton backend "
                                              "(syncbn.backends.triton) is not tested")

from reference import (  # noqa: E402
    TOLERANCES,
    assert_matches,
    make_data,
    make_params,
    reference_steps,
    torch_grad_input_error,
)

import triton_interp  # noqa: E402
import syncbn.backends.triton as bt  # noqa: E402  (imports no triton: kernels are built lazily)
from syncbn import _stats  # noqa: E402

OK, MISMATCH, NONFINITE = 0, 1, 2
PROPAGATE, SKIP, RAISE = 0, 1, 2
FIELDS = [1, 1234, 5, 7, 0, 0]  # ones, layer key (low, high), pass, channels (set per test), dir.
WIDTH = 64
EPS = 1e-5
# several row tiles and channel blocks from a handful of rows and channels
TUNING = triton_interp.SMALL_TILES


@pytest.fixture(scope="module", autouse=True)
def interpreted():
    """TRITON_INTERPRET=1 while this module runs; kernels (re)built under it; tiles shrunk."""
    with triton_interp.interpreted(TUNING):
        yield


def length(channels: int) -> int:
    return 2 * max(WIDTH, channels) + 1 + 2 * bt.NUM_FIELDS + 2


def fields_for(channels: int, direction: int = 0, key: int = 1234) -> list[int]:
    return [1, key, 5, 7, channels, direction]


def header(fields: list[int], world: int = 1) -> torch.Tensor:
    return torch.tensor([world * v for f in fields for v in (f, f * f)], dtype=torch.float64)


def poisoned(channels: int) -> torch.Tensor:
    """A buffer full of NaN: every number the backend leaves unwritten shows."""
    return torch.full((length(channels),), float("nan"), dtype=torch.float64)


def simulate(shards, grads, weight, bias, running, momentum=0.1, policy=PROPAGATE,
             fields=None, backward=True, status=None, world=None):
    """Forward (+ backward) of W = len(shards) simulated ranks. ``running``: per-rank
    ``(running_mean, running_var)`` pairs (updated in place) or None. ``fields``: per-rank
    header fields (default: the same for every rank)."""
    channels = shards[0].shape[1]
    ranks = len(shards)
    world = ranks if world is None else world
    per_rank = fields or [fields_for(channels)] * ranks
    bufs = [poisoned(channels) for _ in shards]
    for x, buf, f in zip(shards, bufs, per_rank):
        assert bt.forward_reduce(bt.applies(x), x, buf, f) == 0
    reduced = torch.stack(bufs).sum(0)  # the all_reduce
    outs, stats, codes = [], [], []
    for r, (x, f) in enumerate(zip(shards, per_rank)):
        rm, rv = running[r] if running is not None else (None, None)
        out, st, code = bt.forward_apply(bt.applies(x), x, reduced.clone(), world, f, weight, bias, rm, rv, EPS,
                                         momentum, policy, status)
        outs.append(out)
        stats.append(st)
        codes.append(code)
    result = {"y": outs, "stats": stats, "codes": codes, "reduced": reduced}
    if not backward:
        return result
    bw_fields = [f[:5] + [1] for f in per_rank]
    bbufs, gws, gbs = [], [], []
    for x, dy, st, f in zip(shards, grads, stats, bw_fields):
        buf = poisoned(channels)
        gw, gb, _ = bt.backward_reduce(bt.applies(x), dy, x, st, buf, f, None if weight is None else weight.dtype,
                                    None if bias is None else bias.dtype)
        bbufs.append(buf)
        gws.append(gw)
        gbs.append(gb)
    breduced = torch.stack(bbufs).sum(0)
    dxs, bcodes = [], []
    for x, dy, st, f in zip(shards, grads, stats, bw_fields):
        dx, code = bt.backward_apply(bt.applies(x), dy, x, st, weight, breduced.clone(), world, f, status)
        dxs.append(dx)
        bcodes.append(code)
    result.update(dx=dxs, dw=gws, db=gbs, bcodes=bcodes)
    return result


def test_kernels_run_interpreted():
    """The fixture's TRITON_INTERPRET=1 took effect: the kernels are the interpreter's."""
    from triton.runtime.interpreter import InterpretedFunction

    kernels = bt._kernels()
    for name in ("fwd_tile", "fwd_pack", "fwd_apply", "bwd_tile", "bwd_pack", "bwd_apply"):
        assert isinstance(getattr(kernels, name), InterpretedFunction), name


def test_import_does_not_import_triton():
    code = ("import sys, syncbn.backends.triton as b; "
            "assert 'triton' not in sys.modules, 'triton imported at import time'; "
            "print(b.launches())")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    env.pop("TRITON_INTERPRET", None)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "0"


def test_every_launch_compiles_for_the_gpu():
    """The interpreter accepts programs the compiler refuses: every launch the backend makes
    (recorded from real calls) is compiled for sm_90 (PTX and cubin; no GPU needed)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    env.pop("TRITON_INTERPRET", None)
    script = os.path.join(os.path.dirname(__file__), "triton_compile_check.py")
    done = subprocess.run([sys.executable, script], capture_output=True, text=True, env=env,
                          timeout=280)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "distinct launches compiled for sm_90" in done.stdout


def test_applies():
    x = torch.randn(2, 3, 4)
    assert bt.applies(x, None, None, None, None)
    assert bt.applies(x.to(torch.bfloat16), torch.ones(3), torch.zeros(3), torch.zeros(3,
                      dtype=torch.float64), torch.ones(3, dtype=torch.float64))
    assert not bt.applies(x.long(), None, None, None, None)  # not a float dtype
    assert not bt.applies(x, torch.ones(4), None, None, None)  # weight of the wrong size
    assert not bt.applies(x.to("meta"), None, None, None, None)  # neither CUDA nor CPU
    assert not bt.applies(torch.randn(2, 3, 4, 5)[:, :, :, :2], None, None, None, None)  # H, W
    assert bt.applies(torch.randn(2, 3, 4, 5)[:, :, :2], None, None, None, None)  # collapse
    os.environ.pop("TRITON_INTERPRET")
    try:
        assert not bt.applies(x, None, None, None, None)  # CPU tensors need the interpreter
    finally:
        os.environ["TRITON_INTERPRET"] = "1"


# (dtype, tail (C, *), memory format, shard sizes, affine, track running stats)
CASES = [
    (torch.float32, (6, 3, 3), torch.contiguous_format, [3, 0, 5], True, True),
    (torch.float32, (6, 3, 3), torch.channels_last, [3, 0, 5], True, True),
    (torch.float64, (5, 2, 3, 2), torch.contiguous_format, [2, 3], True, True),
    (torch.float32, (5, 2, 3, 2), torch.channels_last_3d, [3, 2], False, True),
    (torch.bfloat16, (6, 3, 3), torch.channels_last, [4, 3], True, True),
    (torch.float16, (5, 7), torch.contiguous_format, [6], True, False),
    (torch.float32, (6,), torch.contiguous_format, [5, 0, 4], False, False),
    (torch.float64, (3,), torch.contiguous_format, [7], True, True),
]


@pytest.mark.parametrize("dtype,tail,layout,sizes,affine,track", CASES,
                         ids=lambda v: str(v).replace("torch.", ""))
def test_simulated_ranks_match_float64_batch_norm(dtype, tail, layout, sizes, affine, track):
    channels = tail[0]
    shards, grads = make_data(sizes, tail, dtype, seed=len(tail) * 10 + sum(sizes), mean=2.0)
    shards = [s.contiguous(memory_format=layout) for s in shards]
    grads = [g.contiguous(memory_format=layout) for g in grads]
    # float16 data gets float16 weight and bias (allowed by the interface), others float32/64
    param_dtype = {torch.float64: torch.float64, torch.float16: torch.float16}.get(dtype,
                                                                                  torch.float32)
    weight = bias = None
    if affine:
        weight, bias = (t.to(param_dtype) for t in make_params(channels, seed=3))
    running = None
    if track:
        start = (torch.randn(channels, dtype=param_dtype),
                 torch.rand(channels, dtype=param_dtype) + 0.5)
        running = [(start[0].clone(), start[1].clone()) for _ in sizes]  # one pair per rank
        start_mean, start_var = start[0].double(), start[1].double()
    got = simulate(shards, grads, weight, bias, running)
    ref = reference_steps(shards, grads, None if weight is None else weight.double(),
                          None if bias is None else bias.double(), 1, 0.1, EPS, False)[0]
    assert got["codes"] == [OK] * len(sizes) and got["bcodes"] == [OK] * len(sizes)
    for r, x in enumerate(shards):
        out, dx = got["y"][r], got["dx"][r]
        assert out.dtype == dtype and dx.dtype == dtype
        assert out.shape == x.shape and out.stride() == x.stride(), "memory format kept"
        assert dx.stride() == x.stride()
        assert_matches(out, ref["y"][r], dtype, f"output of rank {r}")
    floor = torch_grad_input_error(shards, grads, weight, bias, EPS, torch.cat(ref["dx"]))
    assert_matches(torch.cat(got["dx"]), torch.cat(ref["dx"]), dtype, "grad_input", floor)

    whole = torch.cat([s.double() for s in shards])
    dims = [0, *range(2, whole.dim())]
    mean, var = whole.mean(dims), whole.var(dims, unbiased=False)
    count = whole.numel() // channels
    for st in got["stats"]:  # identical reduced buffer: identical stats on every rank
        assert st.dtype == torch.float64 and st.shape == (2 * channels + 1,)
        assert torch.equal(st, got["stats"][0])
    torch.testing.assert_close(got["stats"][0][:channels], mean, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(got["stats"][0][channels:2 * channels], (var + EPS).rsqrt(),
                               rtol=1e-6, atol=0)
    assert got["stats"][0][-1].item() == count

    if affine:
        dw, db = torch.stack(got["dw"]).sum(0), torch.stack(got["db"]).sum(0)
        assert got["dw"][0].dtype == weight.dtype and got["db"][0].dtype == bias.dtype
        dy_whole = torch.cat([g.double() for g in grads])
        xhat = (whole - mean.view(1, -1, *[1] * (whole.dim() - 2))) * (var + EPS).rsqrt().view(
            1, -1, *[1] * (whole.dim() - 2))
        rtol, atol = TOLERANCES[param_dtype]  # the gradients are stored in the params' dtype
        torch.testing.assert_close(db.double(), dy_whole.sum(dims), rtol=rtol, atol=atol)
        torch.testing.assert_close(dw.double(), (dy_whole * xhat).sum(dims), rtol=rtol,
                                   atol=atol)
    else:
        assert got["dw"] == [None] * len(sizes) and got["db"] == [None] * len(sizes)
    if track:
        exp_mean = 0.9 * start_mean + 0.1 * mean
        exp_var = 0.9 * start_var + 0.1 * var * count / (count - 1)
        tol = {"rtol": 1e-12, "atol": 1e-12} if param_dtype == torch.float64 else {}
        for rm, rv in running:  # every rank's buffers, bitwise equal
            assert torch.equal(rm, running[0][0]) and torch.equal(rv, running[0][1])
            torch.testing.assert_close(rm.double(), exp_mean, **tol)
            torch.testing.assert_close(rv.double(), exp_var, **tol)


def test_buffers_are_the_torch_paths_buffers():
    """Same layout and numbers as ``[1 | _stats.local_moments(x) | zeros | header | 1]``, the
    forward buffer of the torch-operator path (ranks on either path can share a collective),
    and a backward payload of ``_stats.backward_reduce``'s sums. Packed in a fixed order:
    the same buffer twice. An empty shard sends zeros in both directions."""
    channels = 5
    shards, grads = make_data([4, 0], (channels, 3, 2), torch.float64, seed=7, mean=3.0)
    f, fb = fields_for(channels), fields_for(channels, direction=1)
    bufs = []
    for x in shards:
        buf = poisoned(channels)
        bt.forward_reduce(bt.applies(x), x, buf, f)
        torch.testing.assert_close(buf[1:2 * channels + 2], _stats.local_moments(x),
                                   rtol=1e-12, atol=1e-12)
        assert buf[0] == 1 and buf[-1] == 1
        pad = length(channels) - 2 * channels - 15
        assert torch.equal(buf[2 * channels + 2:-13], torch.zeros(pad, dtype=torch.float64))
        assert torch.equal(buf[-13:-1], header(f))
        again = poisoned(channels)
        bt.forward_reduce(bt.applies(x), x, again, f)
        assert torch.equal(again, buf), "the pack sums in a fixed order"
        bufs.append(buf)
    reduced = torch.stack(bufs).sum(0)
    _, stats, code = bt.forward_apply(bt.applies(shards[0]), shards[0], reduced, 2, f, None, None, None, None, EPS,
                                      0.1, PROPAGATE)
    assert code == OK
    mean, invstd = stats[:channels], stats[channels:2 * channels]
    for x, dy in zip(shards, grads):
        bbuf = poisoned(channels)
        bt.backward_reduce(bt.applies(x), dy, x, stats, bbuf, fb, None, None)
        expected = torch.cat(_stats.backward_reduce(dy, x, mean, invstd))
        torch.testing.assert_close(bbuf[1:2 * channels + 1], expected, rtol=1e-12, atol=1e-12)
        pad = length(channels) - 2 * channels - 14
        assert torch.equal(bbuf[2 * channels + 1:-13], torch.zeros(pad, dtype=torch.float64))
        assert torch.equal(bbuf[-13:-1], header(fb)) and bbuf[0] == 1 and bbuf[-1] == 1
    assert not bool(bbuf[1:2 * channels + 1].any()), "the empty shard sends zeros"


def test_float32_buffer_matches_the_torch_path():
    x = make_data([6], (4, 5), torch.float32, seed=2, mean=50.0)[0][0]
    buf = poisoned(4)
    bt.forward_reduce(bt.applies(x), x, buf, fields_for(4))
    torch.testing.assert_close(buf[1:10], _stats.local_moments(x), rtol=1e-6, atol=1e-6)


def test_float32_at_mean_over_std_1e4():
    """Relative variance error < 1e-6 at mean/std = 1e4 (float32 data; float64 reference on
    the same float32 values), through tiles with different shifts and two ranks; outputs and
    grad_input to 1e-5 absolute (std 1), where an ``x - mean`` rounded to float32 would be off
    by ~1e-3 (the float32 ulp at 1e4)."""
    channels = 3
    shards, grads = make_data([40, 24], (channels, 5), torch.float32, seed=11, mean=1e4, std=1.0)
    weight, bias = (t.float() for t in make_params(channels, seed=4))
    running = [(torch.zeros(channels, dtype=torch.float64),
                torch.zeros(channels, dtype=torch.float64)) for _ in shards]
    got = simulate(shards, grads, weight, bias, running, momentum=1.0)
    assert got["codes"] == [OK, OK] and got["bcodes"] == [OK, OK]
    whole = torch.cat(shards).double()
    var = whole.var([0, 2], unbiased=True)
    err = ((running[0][1] - var).abs() / var).max().item()
    assert err < 1e-6, f"relative variance error {err:.2e}"
    mean_err = (running[0][0] - whole.mean([0, 2])).abs().max().item()
    assert mean_err < 1e-6, f"mean error {mean_err:.2e} (std 1)"
    ref = reference_steps(shards, grads, weight.double(), bias.double(), 1, 0.1, EPS, False)[0]
    for what in ("y", "dx"):
        err = (torch.cat(got[what]).double() - torch.cat(ref[what])).abs().max().item()
        assert err < 1e-5, f"{what}: error {err:.2e}"


def test_header_mismatch_sets_status_and_updates_nothing():
    channels = 4
    shards, grads = make_data([3, 4], (channels, 2), torch.float32, seed=5)
    keep = (torch.randn(channels), torch.rand(channels) + 0.5)
    running = [(keep[0].clone(), keep[1].clone()) for _ in shards]
    # rank 1 is one pass ahead (field 3 differs)
    per_rank = [fields_for(channels), [1, 1234, 6, 7, channels, 0]]
    status = torch.zeros(1, dtype=torch.int32)
    got = simulate(shards, grads, None, None, running, fields=per_rank, status=status)
    assert got["codes"] == [OK, OK]  # with a status word the codes land in it
    assert status.item() == MISMATCH
    for rm, rv in running:
        assert torch.equal(rm, keep[0]) and torch.equal(rv, keep[1])
    # the wrong world size (a sentinel mismatch), without a status word: the code comes back
    got = simulate(shards, grads, None, None, None, world=3)
    assert got["codes"] == [MISMATCH, MISMATCH] and got["bcodes"] == [MISMATCH, MISMATCH]
    # a partly reduced buffer: right header, one sentinel off
    x, dy = shards[0], grads[0]
    buf = poisoned(channels)
    bt.forward_reduce(bt.applies(x), x, buf, fields_for(channels))
    for end in (0, -1):
        broken = buf.clone()
        broken[end] = 2.0
        code = bt.forward_apply(bt.applies(x), x, broken, 1, fields_for(channels), None, None, None, None, EPS,
                                0.1, PROPAGATE)[2]
        assert code == MISMATCH, f"sentinel {end}"
    # a backward-only mismatch
    status.zero_()
    _, stats, _ = bt.forward_apply(bt.applies(x), x, buf, 1, fields_for(channels), None, None, None, None, EPS,
                                   0.1, PROPAGATE, status)
    assert status.item() == OK
    bbuf = poisoned(channels)
    bt.backward_reduce(bt.applies(x), dy, x, stats, bbuf, fields_for(channels, 1), None, None)
    bt.backward_apply(bt.applies(x), dy, x, stats, None, bbuf, 1, fields_for(channels, 1, key=99), status)
    assert status.item() == MISMATCH


@pytest.mark.parametrize("policy", [PROPAGATE, SKIP, RAISE], ids=["propagate", "skip", "raise"])
def test_nonfinite_policies(policy):
    channels = 3
    shards, grads = make_data([3, 2], (channels, 2), torch.float32, seed=9)
    shards[1][0, 1, 0] = float("nan")  # channel 1 of rank 1
    keep = (torch.zeros(channels), torch.ones(channels))
    running = [(keep[0].clone(), keep[1].clone()) for _ in shards]
    got = simulate(shards, grads, None, None, running, policy=policy, backward=False)
    rm, rv = running[0]
    if policy == RAISE:
        assert got["codes"] == [NONFINITE, NONFINITE]
        assert torch.equal(rm, keep[0]) and torch.equal(rv, keep[1])  # nothing updated
        return
    assert got["codes"] == [OK, OK]
    good = [0, 2]
    assert bool(torch.isfinite(rm[good]).all()) and not torch.equal(rm[good], keep[0][good])
    if policy == SKIP:
        assert rm[1] == keep[0][1] and rv[1] == keep[1][1]
    else:
        assert torch.isnan(rm[1]) and torch.isnan(rv[1])


def test_three_launches_per_direction():
    bt.tuning, saved = bt.Tuning(), bt.tuning  # default tile sizes as well
    try:
        channels = 3
        x, dy = (t[0] for t in make_data([4], (channels, 3), torch.float32, seed=1))
        f = fields_for(channels)
        buf = poisoned(channels)
        start = bt.launches()
        bt.forward_reduce(bt.applies(x), x, buf, f)
        assert bt.launches() - start == 2
        _, stats, code = bt.forward_apply(bt.applies(x), x, buf, 1, f, None, None, None, None, EPS, 0.1,
                                          PROPAGATE)
        assert bt.launches() - start == 3 and code == OK
        bbuf = poisoned(channels)
        bt.backward_reduce(bt.applies(x), dy, x, stats, bbuf, fields_for(channels, 1), torch.float32,
                           torch.float32)
        assert bt.launches() - start == 5
        dx, code = bt.backward_apply(bt.applies(x), dy, x, stats, None, bbuf, 1, fields_for(channels, 1))
        assert bt.launches() - start == 6 and code == OK
        ref = x.double().requires_grad_()
        F.batch_norm(ref, None, None, training=True, eps=EPS).backward(dy.double())
        torch.testing.assert_close(dx.double(), ref.grad, **dict(zip(("rtol", "atol"),
                                                                     TOLERANCES[x.dtype])))
    finally:
        bt.tuning = saved


def test_tuning_gives_several_tiles_and_channel_blocks():
    """The shrunk tiles of this module really split the tiny tensors (else the merges above
    would go untested)."""
    plan = bt._plan(rows=5 * 9, channels=6, s_c=9, device=torch.device("cpu"))
    assert plan.tiles >= 2 and plan.n_cb >= 2
    plan = bt._plan(rows=5 * 9, channels=6, s_c=1, device=torch.device("cpu"))
    assert plan.tiles >= 2 and plan.n_cb >= 2
    assert replace(TUNING) == bt.tuning
