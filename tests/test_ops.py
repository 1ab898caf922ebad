"""``torch.library.opcheck`` of the registered ops ``syncbn::forward`` and ``syncbn::backward``.

opcheck runs each op for real and checks its schema against what it does (a mutated argument
the schema does not declare mutable fails: ``syncbn::forward`` must declare ``running_mean`` and
``running_var``, or a compile backend that trusts the schema may drop their update), its fake
implementation against the real outputs (shapes, dtypes, strides), its autograd registration
and an AOT-dispatch trace. One process, no process group: group id 0 is the default group, one
rank, so a pass runs its four backend steps without a collective (the header is still checked).
The layer ids are real layers' (kept alive while the op runs), as ``SyncBatchNorm.forward``
passes them.
"""

from __future__ import annotations

import pytest
import torch

import syncbn
from syncbn import _settings

CHECKS = ("test_schema", "test_autograd_registration", "test_faketensor",
          "test_aot_dispatch_dynamic")


@pytest.fixture(params=["auto", "aten"])
def kernel_setting(request, monkeypatch):
    """``auto`` takes the fused C kernel where it loads (else aten), ``aten`` the torch one."""
    monkeypatch.setenv("SYNCBN_KERNEL", request.param)
    _settings.reload()
    return request.param


def _report(result: dict) -> None:
    assert set(result) == set(CHECKS), result
    failed = {k: v for k, v in result.items() if v != "SUCCESS"}
    assert not failed, failed


# (input dtype, parameter dtype, memory format, affine, tracked)
FORWARD_CASES = [
    (torch.float32, torch.float32, torch.contiguous_format, True, True),
    (torch.float64, torch.float64, torch.channels_last, True, True),
    (torch.float32, torch.float32, torch.contiguous_format, False, False),
    (torch.float16, torch.float16, torch.contiguous_format, True, True),  # model.half()
]


@pytest.mark.parametrize("dtype,param_dtype,layout,affine,track", FORWARD_CASES,
                         ids=lambda v: str(v).replace("torch.", ""))
def test_forward_op(kernel_setting, dtype, param_dtype, layout, affine, track):
    layer = syncbn.SyncBatchNorm2d(4)
    x = torch.randn(3, 4, 2, 5, dtype=dtype).contiguous(memory_format=layout)
    weight = torch.rand(4, dtype=param_dtype) + 0.5 if affine else None
    bias = torch.randn(4, dtype=param_dtype) if affine else None
    running_mean = torch.zeros(4, dtype=param_dtype) if track else None
    running_var = torch.ones(4, dtype=param_dtype) if track else None
    args = (x, weight, bias, running_mean, running_var, 1e-5, 0.1, layer._group_id,
            layer._layer_id)
    _report(torch.library.opcheck(torch.ops.syncbn.forward.default, args))  # on copies
    torch.ops.syncbn.forward(*args)
    if track:  # the premise of the schema check: the op does mutate them
        assert not torch.equal(running_mean, torch.zeros(4, dtype=param_dtype))
        assert not torch.equal(running_var, torch.ones(4, dtype=param_dtype))


@pytest.mark.parametrize("needs", [(True, True, True), (True, False, False), (False, True, True),
                                   (False, False, True)],
                         ids=["all", "input-only", "weight-bias", "bias-only"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
def test_backward_op(kernel_setting, needs, dtype):
    layer = syncbn.SyncBatchNorm2d(4)
    x = torch.randn(3, 4, 2, 5, dtype=dtype)
    weight, bias = torch.rand(4, dtype=dtype) + 0.5, torch.randn(4, dtype=dtype)
    _, stats = torch.ops.syncbn.forward(x, weight, bias, None, None, 1e-5, 0.1,
                                        layer._group_id, layer._layer_id)
    need_input, need_weight, need_bias = needs
    args = (torch.randn_like(x), x, weight, stats, layer._group_id, layer._layer_id, need_input,
            need_weight, need_bias, bias.dtype)
    _report(torch.library.opcheck(torch.ops.syncbn.backward.default, args))
