"""Workers of tests/test_dtypes.py (top level, so spawned ranks import them)."""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

import syncbn
from reference import DTYPES, assert_matches, make_data

_CAST = {"float16": "half", "bfloat16": "bfloat16"}  # model.half(), model.bfloat16()


def half_model(rank: int, world_size: int, dtype_name: str, sizes: list[int]) -> dict[str, Any]:
    """Two steps of a converted model cast with ``model.half()`` (or ``.bfloat16()``) on this
    rank's shard, against torch's own model cast the same way on the concatenated batch in this
    process (the drop-in standard). Both are compared with the same model in float64 (the half
    weights, as they are) on the same values: syncbn must be within ``dtype``'s tolerance of it,
    or within twice torch's own error where that is larger (a gradient that went back through a
    half-precision network is a sum of many rounded values; see ``reference.assert_matches``)."""
    dtype = DTYPES[dtype_name]
    torch.manual_seed(0)  # the same model on every rank
    plain = nn.Sequential(nn.BatchNorm2d(4),
                          nn.Sequential(nn.Conv2d(4, 4, 1), nn.ReLU(), nn.BatchNorm2d(4)))
    with torch.no_grad():
        for m in plain.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_()
    plain = getattr(plain, _CAST[dtype_name])()  # the weights as the half model has them
    model = getattr(syncbn.convert_sync_batchnorm(copy.deepcopy(plain)), _CAST[dtype_name])()
    nets = {"torch": copy.deepcopy(plain), "exact": copy.deepcopy(plain).double()}
    lo = sum(sizes[:rank])
    mine = slice(lo, lo + sizes[rank])
    for step in range(2):
        shards, grads = make_data(sizes, (4, 3, 3), dtype, seed=step, mean=2.0, std=1.5)
        x = shards[rank].clone().requires_grad_()
        model.zero_grad()
        y = model(x)
        y.backward(grads[rank])
        outputs = {}
        for name, net in nets.items():
            cast = torch.float64 if name == "exact" else dtype
            whole = torch.cat(shards).to(cast).requires_grad_()
            net.zero_grad()
            out = net(whole)
            out.backward(torch.cat(grads).to(cast))
            outputs[name] = (out.detach()[mine], whole.grad[mine])
        where = f"rank {rank} step {step} ({dtype_name})"
        assert y.dtype == dtype and x.grad.dtype == dtype, (y.dtype, x.grad.dtype)
        for i, (got, what) in enumerate(((y.detach(), "output"), (x.grad, "grad_input"))):
            _match(got, outputs["torch"][i], outputs["exact"][i], dtype, f"{where} {what}")
        layers = zip(*([m for m in net.modules() if isinstance(m, nn.BatchNorm2d)]
                       for net in (model, nets["torch"], nets["exact"])))
        for k, (ours, theirs, exact) in enumerate(layers):
            for name in ("weight", "bias"):
                grad = getattr(ours, name).grad
                assert grad.dtype == dtype, (name, grad.dtype)
                total = grad.double()
                dist.all_reduce(total)  # each rank's share; the sum is the global gradient
                _match(total, getattr(theirs, name).grad, getattr(exact, name).grad, dtype,
                       f"{where} layer {k} {name} grad")
            for name in ("running_mean", "running_var"):
                buf = getattr(ours, name)
                assert buf.dtype == dtype, (name, buf.dtype)
                _match(buf, getattr(theirs, name), getattr(exact, name), dtype,
                       f"{where} layer {k} {name}")
                gathered = [torch.empty_like(buf.double()) for _ in range(world_size)]
                dist.all_gather(gathered, buf.double())
                assert all(torch.equal(g, buf.double()) for g in gathered), f"{where} {name}"
            assert int(ours.num_batches_tracked) == int(theirs.num_batches_tracked) == step + 1
    return {"dtype": dtype_name}


def _match(ours: torch.Tensor, torch_own: torch.Tensor, exact: torch.Tensor, dtype: torch.dtype,
           what: str) -> None:
    """``ours`` within ``dtype``'s tolerance of ``exact``, or twice torch's own error."""
    floor = float((torch_own.double() - exact.double()).abs().max()) if exact.numel() else 0.0
    assert_matches(ours, exact, dtype, what, floor)
