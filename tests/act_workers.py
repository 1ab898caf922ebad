"""Workers for tests/test_activated_ranks.py: activated and in-place layers on several ranks
against float64 ``F.batch_norm`` + the activation over the concatenated batch."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

import syncbn
from reference import assert_matches, make_data, make_params

LAYERS = {2: syncbn.SyncBatchNorm1d, 3: syncbn.SyncBatchNorm1d, 4: syncbn.SyncBatchNorm2d, 5: syncbn.SyncBatchNorm3d}
ACTS = {"identity": lambda z, p: z, "relu": lambda z, p: F.relu(z),
        "leaky_relu": lambda z, p: F.leaky_relu(z, p), "elu": lambda z, p: F.elu(z, p)}


@dataclass
class Case:
    sizes: list[int]
    tail: tuple[int, ...]
    dtype: str = "float64"
    activation: str = "leaky_relu"
    param: float = 0.1
    inplace: bool = False
    channels_last: bool = False
    steps: int = 2
    functional: bool = False
    zero_weight: bool = False  # an ill-conditioned inverse (in place: a copy for that pass)


def _reference(case: Case, shards: list[torch.Tensor], grads: list[torch.Tensor],
               weight: torch.Tensor, bias: torch.Tensor) -> list[dict[str, Any]]:
    """Float64: act(F.batch_norm(cat(shards))) ``steps`` times, with torch's running stats."""
    c = case.tail[0]
    rm, rv = torch.zeros(c, dtype=torch.float64), torch.ones(c, dtype=torch.float64)
    w = weight.clone().requires_grad_()
    b = bias.clone().requires_grad_()
    sizes = [s.shape[0] for s in shards]
    out = []
    for _ in range(case.steps):
        x = torch.cat([s.double() for s in shards]).requires_grad_()
        w.grad = b.grad = None
        y = ACTS[case.activation](F.batch_norm(x, rm, rv, w, b, True, 0.1, 1e-5), case.param)
        y.backward(torch.cat([g.double() for g in grads]))
        out.append({"y": list(y.detach().split(sizes)), "dx": list(x.grad.split(sizes)),
                    "dw": w.grad.clone(), "db": b.grad.clone(), "running_mean": rm.clone(),
                    "running_var": rv.clone()})
    return out


def exact(rank: int, world_size: int, case: Case) -> dict[str, Any]:
    dtype = getattr(torch, case.dtype)
    param_dtype = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    shards, grads = make_data(case.sizes, case.tail, dtype, seed=7)
    weight, bias = make_params(case.tail[0], seed=7)
    if case.zero_weight:
        weight[0] = 0.0
    ref = _reference(case, shards, grads, weight, bias)
    c = case.tail[0]
    if case.functional:
        w = weight.to(param_dtype).requires_grad_()
        b = bias.to(param_dtype).requires_grad_()
        rm, rv = torch.zeros(c, dtype=param_dtype), torch.ones(c, dtype=param_dtype)
    else:
        layer = LAYERS[len(case.tail) + 1](c, dtype=param_dtype, activation=case.activation,
                                           activation_param=case.param, inplace=case.inplace)
        with torch.no_grad():
            layer.weight.copy_(weight)
            layer.bias.copy_(bias)
        w, b, rm, rv = layer.weight, layer.bias, layer.running_mean, layer.running_var
    for step in range(case.steps):
        leaf = shards[rank].clone()
        if case.channels_last:
            leaf = leaf.contiguous(memory_format=torch.channels_last)
        leaf.requires_grad_()
        x = leaf * 1.0  # not a leaf: an in-place layer may overwrite it
        w.grad = b.grad = None
        if case.functional:
            y = syncbn.functional.sync_batch_norm(
                x, rm, rv, w, b, True, 0.1, 1e-5, activation=case.activation,
                activation_param=case.param, inplace=case.inplace)
        else:
            y = layer(x)
        if case.inplace and x.numel():
            assert y.data_ptr() == x.data_ptr(), "in place: the output is the input's storage"
        if case.channels_last and x.numel():
            assert y.is_contiguous(memory_format=torch.channels_last)
        y.backward(grads[rank].to(y.dtype))
        where = f"rank {rank} step {step}"
        assert_matches(y.detach(), ref[step]["y"][rank], dtype, f"{where}: output")
        assert_matches(leaf.grad, ref[step]["dx"][rank], dtype, f"{where}: grad_input")
        for key, got in (("dw", w.grad), ("db", b.grad)):
            total = got.detach().double().clone()
            dist.all_reduce(total)
            assert_matches(total, ref[step][key], dtype, f"{where}: summed {key}")
        assert_matches(rm, ref[step]["running_mean"], dtype, f"{where}: running_mean")
        assert_matches(rv, ref[step]["running_var"], dtype, f"{where}: running_var")
    return {"ok": True}
