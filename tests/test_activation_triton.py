"""The Triton backend's activated and in-place steps, run by Triton's interpreter on CPU tensors
(``TRITON_INTERPRET=1`` for this module, as in ``test_triton.py``), against the same float64
reference as ``test_activation.py``; and every new launch compiled for a GPU (sm_90, no GPU
needed)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed: the Triton backend "
                                     "(syncbn.backends.triton) is not tested")

import triton_interp
import syncbn.backends.triton as bt
from test_activation import ACTS, _ids, check, data

F32, F64 = torch.float32, torch.float64
CL = torch.channels_last
TUNING = triton_interp.SMALL_TILES
CASES = [
    ((6, 3, 3), F32, CL, [3, 0, 4]),
    ((5,), F64, None, [3, 2]),
    ((6, 3, 3), torch.bfloat16, CL, [3, 2]),
    ((5, 7), torch.float16, None, [4, 3]),
]


@pytest.fixture(scope="module", autouse=True)
def interpreted():
    """TRITON_INTERPRET=1 while this module runs; kernels (re)built under it; tiles shrunk."""
    with triton_interp.interpreted(TUNING):
        yield


@pytest.mark.timeout(300)
@pytest.mark.parametrize("inplace", [False, True], ids=["out", "inplace"])
@pytest.mark.parametrize("name,param", ACTS, ids=[f"{n}{p:g}" for n, p in ACTS])
@pytest.mark.parametrize("tail,dtype,fmt,sizes", CASES, ids=_ids)
def test_triton_steps_match_float64_batch_norm_and_activation(tail, dtype, fmt, sizes, name,
                                                              param, inplace):
    if inplace and name == "relu":
        pytest.skip("relu has no inverse")
    check("triton", *data(tail, dtype, fmt, sizes), name, param, inplace)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("inplace", [False, True], ids=["out", "inplace"])
def test_triton_without_affine_and_negative_parameters(inplace):
    shards, grads, weight, bias, running = data((5, 4), F32, None, [3, 4], seed=3)
    check("triton", shards, grads, None, None, running, "elu", 0.5, inplace)
    if not inplace:
        check("triton", shards, grads, weight, bias, running, "leaky_relu", -0.3, False)
        check("triton", shards, grads, weight, bias, running, "elu", -0.5, False)


_COMPILE = textwrap.dedent("""
    import torch, triton_compile_check as tcc
    import syncbn.backends.triton as bt
    from syncbn import _stats

    def record_launches():
        seen = []
        def record(kernel, grid, *args, **constexprs):
            values = dict(zip(kernel.arg_names, args))
            values.update(constexprs)
            seen.append((kernel, values))
        bt._launch = record
        fields = [1, 2, 3, 4, 5, 0]
        for dtype in (torch.float32, torch.bfloat16, torch.float64):
            param = torch.float64 if dtype == torch.float64 else torch.float32
            for act, p in ((_stats.IDENTITY, 0.0), (_stats.RELU, 0.0), (_stats.LEAKY_RELU, 0.01),
                           (_stats.ELU, 1.0)):
                for inplace in (False, True):
                    if inplace and act == _stats.RELU:
                        continue
                    x = torch.randn(3, 4, 5, 6, dtype=dtype).contiguous(
                        memory_format=torch.channels_last)
                    w = torch.ones(4, dtype=param)
                    buf = torch.zeros(2 * 64 + 1 + 12 + 2, dtype=torch.float64)
                    status = torch.zeros(1, dtype=torch.int32)
                    geo = bt.applies(x, w, w, w, w)
                    bt.forward_reduce(geo, x, buf, fields)
                    y, stats, _ = bt.forward_apply(geo, x, buf, 2, fields, w, w, w, w, 1e-5,
                                                   0.1, 0, status, act=act, act_param=p,
                                                   out=x if inplace else None)
                    keys = dict(act=act, act_param=p, saved_output=y if inplace else None)
                    bt.backward_reduce(geo, x, None if inplace else x, stats, buf, fields,
                                       param, param, weight=w, bias=w, **keys)
                    bt.backward_apply(geo, x, None if inplace else x, stats, w, buf, 1,
                                      fields, status, bias=w, **keys)
        return seen

    bt.applies = lambda x, *p: (x.shape[1], x.shape[0] * x[0, 0].numel(),
                                x[0, 0].numel(), bt._flat_strides(x))
    tcc.record_launches = record_launches
    raise SystemExit(tcc.main())
""")


@pytest.mark.timeout(600)
def test_activated_launches_compile_for_the_gpu():
    """The interpreter accepts programs the compiler refuses: every launch of the activated
    steps (each kind, identity included, from x and from the output) compiles for sm_90 (PTX
    and cubin; no GPU needed)."""
    tests = os.path.dirname(__file__)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([tests, *sys.path])}
    env.pop("TRITON_INTERPRET", None)
    done = subprocess.run([sys.executable, "-c", _COMPILE], capture_output=True, text=True, check=False,
                          env=env, timeout=580, cwd=tests)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "distinct launches compiled for sm_90" in done.stdout
