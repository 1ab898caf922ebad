"""Half-precision and mixed-dtype parameters: every backend takes the same dtype combinations.

``model.half()`` / ``model.bfloat16()`` give float16/bfloat16 weight, bias and running
statistics next to float16/bfloat16 input; autocast gives half input with float32 parameters;
``model.double()`` parts may meet float32 parameters. Every float dtype is accepted for the input
and for each per-channel tensor independently: statistics are kept in float32 or better,
parameters, running statistics and gradients keep their own dtype, the output takes the input's.

Backend level (one process, ``world = 1``: the four steps of ``syncbn.backends`` on one shard,
the buffer summed over one rank): each backend against float64 batch norm on the same values.
The fused C kernel takes float32/float64 input and per-channel tensors, and ``applies`` must say
so exactly (other dtypes go to aten). Layer level (2 gloo ranks, each ``SYNCBN_KERNEL``):
``model.half()`` and ``model.bfloat16()`` give what torch gives in one process on the
concatenated batch in the same dtype.
"""

from __future__ import annotations

import os

import pytest
import torch

import dtype_workers
import harness
from reference import (
    assert_matches,
    make_data,
    make_params,
    reference_steps,
    torch_grad_input_error,
)
from syncbn import _wire, backends

F16, BF16, F32, F64 = torch.float16, torch.bfloat16, torch.float32, torch.float64
EPS, MOMENTUM = 1e-5, 0.1
TAIL = (3, 2)  # (C, L): 3 channels

# (input, weight, bias, running_mean, running_var)
COMBOS = [
    (F16, F16, F16, F16, F16),  # model.half()
    (BF16, BF16, BF16, BF16, BF16),  # model.bfloat16()
    (F16, F32, F32, F32, F32),  # autocast: half input, float32 layer
    (BF16, F32, F32, F32, F32),
    (F64, F32, F32, F32, F32),  # float32 layer, float64 input (fused took it, aten refused)
    (F32, F64, F64, F64, F64),
    (F32, F16, F16, F16, F16),  # a half layer fed float32
    (F16, F16, F32, F64, BF16),  # every per-channel tensor its own dtype
    (F64, F32, F64, F32, F64),
    (F32, F32, F32, F32, F32),
    (F64, F64, F64, F64, F64),
]
_NAMES = {F16: "f16", BF16: "bf16", F32: "f32", F64: "f64"}
_IDS = ["x" + "-".join(_NAMES[d] for d in c) for c in COMBOS]
_PRECISION = [F64, F32, F16, BF16]  # finer to coarser (machine epsilon)


def _coarser(*dtypes: torch.dtype) -> torch.dtype:
    return max(dtypes, key=_PRECISION.index)


def _case(combo: tuple[torch.dtype, ...]) -> dict:
    x_dtype, w_dtype, b_dtype, rm_dtype, rv_dtype = combo
    (x,), (dy,) = make_data([6], TAIL, x_dtype, seed=5, mean=2.0, std=1.5)
    weight, bias = make_params(TAIL[0], seed=5)
    return {"x": x, "dy": dy, "weight": weight.to(w_dtype), "bias": bias.to(b_dtype),
            "running_mean": torch.zeros(TAIL[0], dtype=rm_dtype),
            "running_var": torch.ones(TAIL[0], dtype=rv_dtype)}


def _steps(backend, geo, case: dict) -> dict:
    """Forward and backward of one shard through a backend's four steps, at world size 1."""
    x, dy, w, b = case["x"], case["dy"], case["weight"], case["bias"]
    channels = x.shape[1]
    tag = _wire.LayerTag.for_layer("dtypes", 0, f"SyncBatchNorm1d({channels}) 'dtypes'")
    size = _wire.length(_wire.width_for(channels))
    fields = _wire.fields(tag, _wire.FORWARD, channels, 1)
    buffer = torch.full((size,), float("nan"), dtype=torch.float64)
    assert backend.forward_reduce(geo, x, buffer, fields) == _wire.OK
    out, stats, code = backend.forward_apply(
        geo, x, buffer, 1, fields, w, b, case["running_mean"], case["running_var"], EPS,
        MOMENTUM, _wire.POLICIES["propagate"], None)
    assert code == _wire.OK, code
    fields = _wire.fields(tag, _wire.BACKWARD, channels, 1)
    buffer = torch.full((size,), float("nan"), dtype=torch.float64)
    dw, db, code = backend.backward_reduce(geo, dy, x, stats, buffer, fields, w.dtype, b.dtype)
    assert code == _wire.OK, code
    dx, code = backend.backward_apply(geo, dy, x, stats, w, buffer, 1, fields, None)
    assert code == _wire.OK, code
    return {"y": out, "stats": stats, "dx": dx, "dw": dw, "db": db}


def _check(got: dict, case: dict) -> None:
    """Against float64 batch norm on the same values (the half weights, as they are), each
    quantity to the tolerance of the coarser of the input's dtype and its own."""
    x, w, b = case["x"], case["weight"], case["bias"]
    ref = reference_steps([x], [case["dy"]], w.double(), b.double(), 1, MOMENTUM, EPS, True)[0]
    assert got["y"].dtype == x.dtype and got["dx"].dtype == x.dtype
    assert got["dw"].dtype == w.dtype and got["db"].dtype == b.dtype
    assert got["stats"].dtype == torch.float64
    floor = torch_grad_input_error([x], [case["dy"]], w.double(), b.double(), EPS, ref["dx"][0])
    assert_matches(got["y"], ref["y"][0], x.dtype, "output")
    assert_matches(got["dx"], ref["dx"][0], x.dtype, "grad_input", floor)
    assert_matches(got["dw"], ref["dw"], _coarser(x.dtype, w.dtype), "grad_weight")
    assert_matches(got["db"], ref["db"], _coarser(x.dtype, b.dtype), "grad_bias")
    for key in ("running_mean", "running_var"):
        assert_matches(case[key], ref[key], _coarser(x.dtype, case[key].dtype), key)


@pytest.mark.parametrize("combo", COMBOS, ids=_IDS)
def test_aten_takes_every_dtype_combination(combo):
    case = _case(combo)
    params = (case["weight"], case["bias"], case["running_mean"], case["running_var"])
    geo = backends.aten.applies(case["x"], *params)
    assert geo
    _check(_steps(backends.aten, geo, case), case)


@pytest.mark.parametrize("combo", COMBOS, ids=_IDS)
def test_fused_takes_float32_and_float64_in_any_combination(combo):
    case = _case(combo)
    params = (case["weight"], case["bias"], case["running_mean"], case["running_var"])
    geo = backends.fused.applies(case["x"], *params)
    takes = all(d in (F32, F64) for d in combo)
    assert bool(geo) == takes, (combo, geo)
    if not takes:
        return  # backends.select sends it to aten (tested above)
    if not backends.fused.load(required=False):
        from syncbn._native import kernel as _kernel

        reason = f"the fused C kernel is not loaded here: {_kernel.build_info()['error']}"
        print(reason)
        pytest.skip(reason)
    _check(_steps(backends.fused, geo, case), case)


@pytest.fixture
def interpreted_triton():
    """TRITON_INTERPRET=1 while the test runs (kernels rebuilt under it), then as it was."""
    pytest.importorskip("triton", reason="triton is not installed: the Triton backend is not "
                                         "tested")
    from syncbn.backends import triton as bt

    old = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    bt._kernels.cache_clear()
    yield bt
    if old is None:
        del os.environ["TRITON_INTERPRET"]
    else:
        os.environ["TRITON_INTERPRET"] = old
    bt._kernels.cache_clear()


# the interpreter runs ~10 ms per program: the combinations that differ for a kernel
TRITON_COMBOS = [COMBOS[0], COMBOS[1], COMBOS[4], COMBOS[6], COMBOS[7]]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("combo", TRITON_COMBOS, ids=[_IDS[COMBOS.index(c)] for c in TRITON_COMBOS])
def test_triton_takes_every_dtype_combination(interpreted_triton, combo):
    case = _case(combo)
    params = (case["weight"], case["bias"], case["running_mean"], case["running_var"])
    geo = interpreted_triton.applies(case["x"], *params)
    assert geo
    _check(_steps(interpreted_triton, geo, case), case)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_model_on_two_ranks_equals_torch_on_one(tmp_path, kernel, dtype):
    """``model.half()`` / ``model.bfloat16()``, converted, on 2 ranks (shards of 3 and 2):
    outputs, input gradients, the syncbn layers' parameter gradients (summed over ranks) and
    running statistics equal torch's own model in the same dtype on the concatenated batch."""
    out = harness.run(dtype_workers.half_model, 2, tmp_path, dtype, [3, 2], timeout=240)
    assert [o["dtype"] for o in out] == [dtype, dtype], out
