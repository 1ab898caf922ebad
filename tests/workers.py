"""Worker functions run on every rank by ``harness.run`` (top level, so spawned children import them).

Each compares what this rank computes with syncbn against ``reference`` on the global batch, and
raises (with what differed) if it does not match. A worker's parameters are a frozen dataclass
(``Exactness``, ``DDPTraining``, ...): a misspelled or missing parameter is a TypeError where the
test builds it, not a default silently used.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
import torch.distributed as dist
from torch import nn

import syncbn
from syncbn.functional import sync_batch_norm

from reference import (DTYPES, assert_matches, make_data, make_params, reference_steps,
                       torch_grad_input_error)

LAYERS = {"1d": syncbn.SyncBatchNorm1d, "2d": syncbn.SyncBatchNorm2d,
          "3d": syncbn.SyncBatchNorm3d, "generic": syncbn.SyncBatchNorm}


@dataclass(frozen=True)
class Exactness:
    """``exactness``: shard ``sizes[r]`` of shape ``(n, *tail)`` on rank r, ``steps`` passes."""

    sizes: list[int]
    tail: tuple[int, ...]
    dtype: str = "float64"
    layer: str = "2d"  # a key of LAYERS, or "functional"
    steps: int = 2
    momentum: Optional[float] = 0.1
    eps: float = 1e-5
    affine: bool = True
    track: bool = True
    seed: int = 0
    mean: float = 0.0
    std: float = 1.0
    device: str = "cpu"
    groups: Optional[list[list[int]]] = None  # subgroups; every rank creates all of them
    kernels: Optional[list[str]] = None  # SYNCBN_KERNEL per rank
    memory_format: Optional[str] = None  # e.g. "channels_last"


@dataclass(frozen=True)
class FuzzCase(Exactness):
    """``fuzz_case``: an ``Exactness`` case, or with ``fault`` ("channels", "dim") on ``bad_rank``."""

    fault: Optional[str] = None
    bad_rank: int = 0


@dataclass(frozen=True)
class ExpectError:
    """``expect_error``: a ``layer`` of ``channels`` on input ``shapes[r]`` on rank r."""

    channels: int
    shapes: list[tuple[int, ...]]
    layer: str = "2d"


@dataclass(frozen=True)
class Shards:
    """Workers that need only shard sizes (and a channel count)."""

    sizes: list[int]
    channels: int = 3


@dataclass(frozen=True)
class DDPTraining:
    """``ddp_training``: ``steps`` SGD steps of ``accumulate`` micro-batches each."""

    sizes: list[int]
    steps: int = 3
    dtype: str = "float64"
    accumulate: int = 1
    ddp: dict[str, Any] = field(default_factory=dict)  # DistributedDataParallel's options


@dataclass(frozen=True)
class Moments:
    """``variance_accuracy``, ``large_mean_gradients``: data of this mean and std."""

    sizes: list[int]
    tail: tuple[int, ...]
    mean: float
    std: float
    dtype: str = "float32"


@dataclass(frozen=True)
class Misuse:
    """``misuse``: one ``scenario`` (see the worker) on layers of ``widths`` channels."""

    scenario: str
    widths: list[int] = field(default_factory=lambda: [4, 4])
    device: str = "cpu"
    debug: bool = False  # SYNCBN_DEBUG=1
    stall_s: float = 0.0  # "stall": how long rank 1 stays away


def _device(device: str, rank: int) -> torch.device:
    if device == "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _group(groups: Optional[list[list[int]]], rank: int) -> tuple[Any, list[int]]:
    """The process group this rank syncs over and the global ranks in it."""
    if not groups:
        return None, list(range(dist.get_world_size()))
    # Every rank must create every subgroup, in the same order.
    handles = [dist.new_group(g) for g in groups]
    for g, h in zip(groups, handles):
        if rank in g:
            return h, g
    raise AssertionError(f"rank {rank} in no group of {groups}")


def exactness(rank: int, world_size: int, cfg: Exactness) -> dict[str, Any]:
    """Forward/backward ``steps`` times on shard ``sizes[rank]`` and compare with the reference.

    ``cfg.kernels``, when given, is ``SYNCBN_KERNEL`` per rank (ranks on different paths)."""
    if cfg.kernels:
        import os

        os.environ["SYNCBN_KERNEL"] = cfg.kernels[rank]
    dtype = DTYPES[cfg.dtype]
    param_dtype = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    tail = tuple(cfg.tail)
    sizes = cfg.sizes
    steps = cfg.steps
    momentum = cfg.momentum
    eps = cfg.eps
    affine = cfg.affine
    track = cfg.track
    device = _device(cfg.device, rank)
    group, members = _group(cfg.groups, rank)
    shards, grads = make_data(sizes, tail, dtype, cfg.seed, mean=cfg.mean, std=cfg.std)
    weight, bias = make_params(tail[0], cfg.seed)
    ref = reference_steps([shards[r] for r in members], [grads[r] for r in members],
                          weight if affine else None, bias if affine else None,
                          steps, momentum, eps, track)
    me = members.index(rank)
    # float32 grad_input: held to torch's own float32 BatchNorm where that is worse than 1e-5
    floor = 0.0
    if dtype == torch.float32 and sum(sizes[r] for r in members) * math.prod(tail[1:]) > 1:
        floor = torch_grad_input_error([shards[r] for r in members], [grads[r] for r in members],
                                       weight if affine else None, bias if affine else None, eps,
                                       torch.cat(ref[0]["dx"]))

    kind = cfg.layer
    if kind == "functional":
        layer = None
        w = weight.to(device, param_dtype).requires_grad_() if affine else None
        b = bias.to(device, param_dtype).requires_grad_() if affine else None
        rm = torch.zeros(tail[0], device=device, dtype=param_dtype) if track else None
        rv = torch.ones(tail[0], device=device, dtype=param_dtype) if track else None
    else:
        layer = LAYERS[kind](tail[0], eps=eps, momentum=momentum, affine=affine,
                             track_running_stats=track, process_group=group,
                             device=device, dtype=param_dtype)
        if affine:
            with torch.no_grad():
                layer.weight.copy_(weight)
                layer.bias.copy_(bias)
    memory_format = cfg.memory_format
    fused = _count_fused_passes()
    for step in range(steps):
        x = shards[rank].to(device).clone()
        if memory_format is not None:
            x = x.contiguous(memory_format=getattr(torch, memory_format))
        x.requires_grad_()
        if layer is None:
            if affine:
                w.grad = b.grad = None
            y = sync_batch_norm(x, rm, rv, w, b, True, momentum, eps, group)
            params = (w, b)
        else:
            layer.zero_grad()
            y = layer(x)
            params = (layer.weight, layer.bias)
        assert y.dtype == x.dtype, f"output dtype {y.dtype} != input dtype {x.dtype}"
        assert y.shape == x.shape
        if memory_format is not None:
            assert y.is_contiguous(memory_format=getattr(torch, memory_format)), "output lost its memory format"
        y.backward(grads[rank].to(device))
        if memory_format is not None and x.numel():
            assert x.grad.is_contiguous(memory_format=getattr(torch, memory_format)), "grad lost its memory format"
        exp = ref[step]
        where = f"rank {rank} step {step}"
        assert_matches(y.cpu(), exp["y"][me], dtype, f"{where} output")
        assert_matches(x.grad.cpu(), exp["dx"][me], dtype, f"{where} grad_input", floor)
        if affine:
            for p, key in zip(params, ("dw", "db")):
                total = p.grad.detach().clone()
                dist.all_reduce(total, group=group)  # weight grads are per rank; the sum is global
                assert_matches(total.cpu(), exp[key], dtype, f"{where} {key} summed over ranks")
        if track:
            if layer is None:
                running = (rm, rv)
            else:
                running = (layer.running_mean, layer.running_var)
                assert int(layer.num_batches_tracked) == exp["num_batches_tracked"]
            for t, key in zip(running, ("running_mean", "running_var")):
                assert_matches(t.cpu(), exp[key], dtype, f"{where} {key}")
                # bitwise identical on every rank of the group
                gathered = [torch.empty_like(t) for _ in members]
                dist.all_gather(gathered, t, group=group)
                assert all(torch.equal(g, t) for g in gathered), f"{where} {key} differs across ranks"
    _check_path(fused, x, steps if len(members) > 1 else 0)
    return {"rank": rank, "ok": True}


def _count_fused_passes() -> list[int]:
    """Count the forwards that take the fused kernel (wraps it for the rest of this task)."""
    from syncbn import backends

    calls = [0]
    original = getattr(backends.fused.forward_reduce, "__wrapped__", backends.fused.forward_reduce)

    def counted(*args: Any, **kwargs: Any) -> Any:
        calls[0] += 1
        return original(*args, **kwargs)

    counted.__wrapped__ = original  # type: ignore[attr-defined]
    backends.fused.forward_reduce = counted
    return calls


def _check_path(fused: list[int], x: torch.Tensor, synced: int) -> None:
    """Under SYNCBN_KERNEL=fused, the ``synced`` forwards of CPU float32/float64 input must have
    taken the fused kernel; under aten, none."""
    import os

    kernel = os.environ.get("SYNCBN_KERNEL", "auto")
    takes = x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64)
    if kernel == "fused" and takes:
        assert fused[0] == synced, f"fused kernel used in {fused[0]} of {synced} forwards"
    if kernel == "aten" or not takes:
        assert fused[0] == 0, f"fused kernel used in {fused[0]} forwards"


def expect_error(rank: int, world_size: int, cfg: ExpectError) -> str:
    """Run a layer that must raise on this rank; return the error text (asserted by the test)."""
    layer = LAYERS[cfg.layer](cfg.channels)
    x = torch.randn(*cfg.shapes[rank])
    try:
        layer(x)
    except (ValueError, RuntimeError) as e:
        return f"{type(e).__name__}: {e}"
    raise AssertionError(f"rank {rank}: no error for input {tuple(x.shape)}")


def uses_one_collective(rank: int, world_size: int, cfg: Shards) -> dict[str, Any]:
    """Count collectives and their sizes in one training forward and backward, on either
    transport (the backend's all_reduce, or the same-machine shared-memory one)."""
    from syncbn import _comm, _shm

    # The group's set-up at its first syncbn collective (the settings check across ranks, the
    # transport) is not a pass's: a first layer of its own makes it before counting starts.
    syncbn.SyncBatchNorm2d(cfg.channels)(torch.randn(cfg.sizes[rank], cfg.channels, 3, 3))
    calls: list[tuple[str, int, torch.dtype]] = []
    real, real_local = dist.all_reduce, _shm.LocalGroup.all_reduce

    def spy(tensor, *args, **kwargs):  # type: ignore[no-untyped-def]
        calls.append(("all_reduce", tensor.numel(), tensor.dtype))
        return real(tensor, *args, **kwargs)

    def local_spy(self, tensor, *args, **kwargs):  # type: ignore[no-untyped-def]
        calls.append(("all_reduce", tensor.numel(), tensor.dtype))
        return real_local(self, tensor, *args, **kwargs)

    for name in ("all_gather", "all_gather_into_tensor", "broadcast", "reduce_scatter", "barrier"):
        orig = getattr(dist, name)
        setattr(dist, name, lambda *a, _n=name, _o=orig, **k: (calls.append((_n, -1, None)), _o(*a, **k))[1])
    dist.all_reduce = spy
    _shm.LocalGroup.all_reduce = local_spy  # type: ignore[method-assign]
    try:
        channels = cfg.channels
        layer = syncbn.SyncBatchNorm2d(channels)
        x = torch.randn(cfg.sizes[rank], channels, 3, 3, requires_grad=True)
        y = layer(x)
        forward_calls = list(calls)
        y.sum().backward()
        backward_calls = calls[len(forward_calls):]
        layer.eval()
        calls.clear()
        layer(x)
        eval_calls = list(calls)
    finally:
        dist.all_reduce = real
        _shm.LocalGroup.all_reduce = real_local  # type: ignore[method-assign]
    return {"forward": forward_calls, "backward": backward_calls, "eval": eval_calls,
            "transport": _comm.transport()}


def late_wide_layer(rank: int, world_size: int, cfg: Shards) -> dict[str, Any]:
    """A layer wider than every earlier one, built after the group's first collectives: its
    buffers no longer fit the shared-memory slots made at set-up, so every rank sets up wider
    ones at the same pass. Its results are still those of the reference."""
    from syncbn import _comm, _wire

    torch.manual_seed(0)
    narrow = syncbn.SyncBatchNorm1d(3).double()
    narrow(torch.randn(2, 3, dtype=torch.float64, requires_grad=True)).sum().backward()
    slot_before = _slot_len()
    channels, sizes = cfg.channels, cfg.sizes
    shards, grads = make_data(sizes, (channels,), torch.float64, 1)
    weight, bias = make_params(channels, 1)
    ref = reference_steps(shards, grads, weight, bias, 1, 0.1, 1e-5, True)
    wide = syncbn.SyncBatchNorm1d(channels).double()
    with torch.no_grad():
        wide.weight.copy_(weight)
        wide.bias.copy_(bias)
    x = shards[rank].clone().requires_grad_()
    y = wide(x)
    y.backward(grads[rank])
    assert_matches(y.detach(), ref[0]["y"][rank], torch.float64, "late wide layer: output")
    assert_matches(x.grad, ref[0]["dx"][rank], torch.float64, "late wide layer: grad_input")
    return {"transport": _comm.transport(), "slots": [slot_before, _slot_len()],
            "length": _wire.length(_wire.width_for(channels))}


def _slot_len() -> int:
    from syncbn import _comm

    shm = _comm.group(None).shm
    return shm.slot_len if shm is not None else 0


class SmallNet(nn.Module):
    """Conv -> BN -> ReLU -> Conv -> BN -> ReLU -> pool -> Linear, with a BatchNorm1d on features.

    (Also the network of tests/test_export.py, with other sizes.)"""

    def __init__(self, cin: int = 2, widths: tuple[int, int] = (6, 8), hidden: int = 8,
                 classes: int = 3) -> None:
        super().__init__()
        c1, c2 = widths
        self.features = nn.Sequential(
            nn.Conv2d(cin, c1, 3, padding=1), nn.BatchNorm2d(c1), nn.ReLU(),
            nn.Conv2d(c1, c2, 3, padding=1, stride=2), nn.BatchNorm2d(c2), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.head = nn.Sequential(nn.Linear(c2, hidden), nn.BatchNorm1d(hidden), nn.ReLU(),
                                  nn.Linear(hidden, classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def ddp_training(rank: int, world_size: int, cfg: DDPTraining) -> dict[str, Any]:
    """DDP + syncbn for a few SGD steps == one process with plain BN on the concatenated batch."""
    dtype = DTYPES[cfg.dtype]
    sizes, steps, accumulate = cfg.sizes, cfg.steps, cfg.accumulate
    torch.manual_seed(0)
    reference = SmallNet().to(dtype)
    model = syncbn.convert_sync_batchnorm(SmallNet().to(dtype))
    model.load_state_dict(reference.state_dict())
    ddp = nn.parallel.DistributedDataParallel(model, **cfg.ddp)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1, momentum=0.9)
    ref_opt = torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9)
    total = sum(sizes)
    g = torch.Generator().manual_seed(1)
    for step in range(steps):
        opt.zero_grad()
        ref_opt.zero_grad()
        for micro in range(accumulate):
            x = torch.randn(total, 2, 6, 6, generator=g, dtype=dtype)
            target = torch.randint(0, 3, (total,), generator=g)
            lo = sum(sizes[:rank])
            xs, ts = x[lo:lo + sizes[rank]], target[lo:lo + sizes[rank]]
            # DDP averages gradients over ranks: scale the local sum so the average is the global mean.
            # Gradient accumulation: no gradient all-reduce until the last micro-batch.
            with ddp.no_sync() if micro < accumulate - 1 else contextlib.nullcontext():
                loss = nn.functional.cross_entropy(ddp(xs), ts, reduction="sum") * world_size / total
                loss.backward()
            nn.functional.cross_entropy(reference(x), target).backward()
        opt.step()
        ref_opt.step()
    for (name, p), (_, q) in zip(model.named_parameters(), reference.named_parameters()):
        assert_matches(p.detach(), q.detach(), dtype, f"rank {rank} parameter {name}")
    for (name, b), (_, c) in zip(model.named_buffers(), reference.named_buffers()):
        assert_matches(b.double(), c.double(), dtype, f"rank {rank} buffer {name}")
    return {"rank": rank}


def variance_accuracy(rank: int, world_size: int, cfg: Moments) -> dict[str, Any]:
    """Global variance of float32 data with a large mean/std, against float64 on the same data."""
    dtype = DTYPES[cfg.dtype]
    shards, _ = make_data(cfg.sizes, tuple(cfg.tail), dtype, 0, mean=cfg.mean, std=cfg.std)
    layer = syncbn.SyncBatchNorm2d(cfg.tail[0], momentum=1.0)  # running_var = this batch's
    layer(shards[rank])
    data = torch.cat(shards).double()
    expected = data.transpose(0, 1).flatten(1).var(dim=1)  # unbiased, float64
    rel = ((layer.running_var.double() - expected).abs() / expected).max().item()
    assert rel < 1e-4, f"relative variance error {rel:.3g} >= 1e-4"
    # The same data through the textbook float32 formula E[x^2] - E[x]^2 fails this bound:
    # the test above can tell a cancellation-prone method apart.
    flat = torch.cat(shards).transpose(0, 1).flatten(1)
    n = flat.shape[1]
    naive = ((flat * flat).mean(1) - flat.mean(1) ** 2) * n / (n - 1)
    naive_rel = ((naive.double() - expected).abs() / expected).max().item()
    assert naive_rel > 1e-4, f"the naive float32 formula was accurate ({naive_rel:.3g}): test too weak"
    return {"rel": rel, "naive_rel": naive_rel}


def empty_everywhere(rank: int, world_size: int) -> dict[str, Any]:
    """A global batch of 0 values: empty output and grads, running stats untouched, like torch."""
    layer = syncbn.SyncBatchNorm2d(3)
    x = torch.randn(0, 3, 2, 2, requires_grad=True)
    y = layer(x)
    assert y.shape == x.shape
    y.sum().backward()
    assert x.grad.shape == x.shape
    assert torch.equal(layer.running_mean, torch.zeros(3))
    assert torch.equal(layer.running_var, torch.ones(3))
    assert int(layer.num_batches_tracked) == 1
    return {}


def autocast_training(rank: int, world_size: int, cfg: Shards) -> dict[str, Any]:
    """Conv -> syncbn under torch.autocast(bfloat16): output in the conv's dtype, float32 running
    stats equal to the float64 reference on the (bfloat16) conv outputs of all ranks."""
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3)
    bn = syncbn.SyncBatchNorm2d(4, momentum=1.0)
    sizes = cfg.sizes
    x = torch.randn(sum(sizes), 3, 6, 6, generator=torch.Generator().manual_seed(1))
    lo = sum(sizes[:rank])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        h_all = conv(x)  # every rank computes the global batch's conv output for the reference
        h = conv(x[lo:lo + sizes[rank]])
        y = bn(h)
    assert h.dtype == torch.bfloat16 and y.dtype == torch.bfloat16, (h.dtype, y.dtype)
    assert bn.running_mean.dtype == torch.float32
    y.float().sum().backward()
    assert conv.weight.grad is not None
    flat = h_all.detach().double().transpose(0, 1).flatten(1)
    assert_matches(bn.running_mean, flat.mean(1), torch.float32, "running_mean under autocast")
    assert_matches(bn.running_var, flat.var(1), torch.float32, "running_var under autocast")
    ref = torch.nn.functional.batch_norm(h.detach().double(), flat.mean(1), flat.var(1, correction=0),
                                         bn.weight.double(), bn.bias.double(), False, 0.0, bn.eps)
    assert_matches(y.detach(), ref, torch.bfloat16, "output under autocast")
    return {}


def double_backward_is_refused(rank: int, world_size: int) -> str:
    """Gradient of a gradient through a synchronized layer: a clear error, never a wrong number."""
    layer = syncbn.SyncBatchNorm1d(3, dtype=torch.float64)
    x = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    (grad,) = torch.autograd.grad(layer(x).pow(2).sum(), x, create_graph=True)
    try:
        grad.sum().backward()
    except RuntimeError as e:
        return str(e)
    raise AssertionError("double backward through a synchronized layer did not raise")


def misuse(rank: int, world_size: int, cfg: Misuse) -> str:
    """Run a misuse scenario; return this rank's error text ("" if it raised none)."""
    import os
    import time

    if cfg.debug:
        os.environ["SYNCBN_DEBUG"] = "1"
    scenario = cfg.scenario
    torch.manual_seed(0)
    widths = cfg.widths
    device = _device(cfg.device, rank)
    model = syncbn.convert_sync_batchnorm(nn.Sequential(*[nn.BatchNorm1d(c) for c in widths])).to(device)
    x = torch.randn(3, widths[0], device=device, requires_grad=True)
    try:
        if scenario == "skip":  # rank 1 skips the first layer
            h = x if rank == 1 else model[0](x)
            model[1](h).sum().backward()
        elif scenario == "order":  # rank 1 runs the two layers in the other order
            layers = [model[1], model[0]] if rank == 1 else [model[0], model[1]]
            layers[1](layers[0](x)).sum().backward()
        elif scenario == "channels":  # the models differ: another channel count on rank 1
            layer = syncbn.SyncBatchNorm1d(3 + rank)
            layer(torch.randn(3, 3 + rank))
        elif scenario == "eval-on-one":  # rank 0 in eval mode, rank 1 training
            if rank == 0:
                model.eval()
            model(x).sum().backward()
        elif scenario == "exit-mid-step":  # rank 1 leaves after the forward
            y = model(x)
            if rank == 1:
                return ""
            y.sum().backward()
        elif scenario == "steps":  # rank 0 runs one step more than rank 1
            for _ in range(3 if rank == 0 else 2):
                model(torch.randn(3, widths[0])).sum().backward()
        elif scenario == "pass-spread":  # rank r has run r + 1 steps: passes #2, #3, #4 meet
            # Consistent ranks cannot get here through the collective itself (passes pair up in
            # call order and each is checked; a layer also synchronized over subgroups fails there
            # first): the counters diverge outside this group (a rank rebuilt its model, caught an
            # error, trained in a subgroup). Set them as if rank r had run r + 1 forward passes.
            # Rank 1's pass number is then the mean (2 + 3 + 4 == 3 * 3): the sums of the header
            # agree on it, only the sums of squares catch it. Every rank must raise, none wait.
            syncbn._comm.group(None).counters(model[0]._sync.tag.key)[0] = rank + 1
            model(x).sum().backward()
        elif scenario == "stall":  # after a step, rank 1 stays away (alive) past the timeout
            model(x).sum().backward()
            if rank == 1:
                time.sleep(cfg.stall_s)
                return ""
            model(x).sum().backward()
        elif scenario == "nan":  # rank 1's data has a NaN
            data = torch.randn(3, widths[0])
            if rank == 1:
                data[0, 0] = float("nan")
            model(data)
        else:
            raise ValueError(scenario)
        # On CUDA the header check lands without a device sync, at the next pass: flush it here.
        syncbn._comm.check_pending(wait=True)
    except RuntimeError as e:
        return str(e)
    return ""


def checkpointing(rank: int, world_size: int, sizes: list[int], reentrant: bool) -> dict[str, Any]:
    """syncbn inside torch.utils.checkpoint: gradients equal the reference, running statistics
    and num_batches_tracked updated once per step (not again by the recompute)."""
    from torch.utils.checkpoint import checkpoint

    torch.manual_seed(0)
    block = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())
    reference = nn.Sequential(nn.Conv2d(2, 4, 1), block, nn.BatchNorm2d(4)).double()
    model = syncbn.convert_sync_batchnorm(nn.Sequential(nn.Conv2d(2, 4, 1), nn.Sequential(
        nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU()), nn.BatchNorm2d(4))).double()
    model.load_state_dict(reference.state_dict())
    lo = sum(sizes[:rank])
    g = torch.Generator().manual_seed(1)
    for step in range(2):
        x = torch.randn(sum(sizes), 2, 4, 4, generator=g, dtype=torch.float64)
        w = torch.randn(sum(sizes), 4, 4, 4, generator=g, dtype=torch.float64)
        model.zero_grad()
        reference.zero_grad()
        xs = x[lo:lo + sizes[rank]]
        h = model[0](xs)
        h = checkpoint(model[1], h, use_reentrant=reentrant)
        (model[2](h) * w[lo:lo + sizes[rank]]).sum().backward()
        (reference(x) * w).sum().backward()
        for (name, p), (_, q) in zip(model.named_parameters(), reference.named_parameters()):
            total = p.grad.clone()
            dist.all_reduce(total)
            assert_matches(total, q.grad, torch.float64, f"rank {rank} step {step} grad of {name}")
        for (name, b), (_, c) in zip(model.named_buffers(), reference.named_buffers()):
            assert_matches(b.double(), c.double(), torch.float64, f"rank {rank} step {step} buffer {name}")
    assert int(model[1][1].num_batches_tracked) == 2
    return {}


def nonfinite(rank: int, world_size: int, policy: str) -> str:
    """A NaN in channel 0 of rank 1's data, under SYNCBN_NONFINITE=policy."""
    import os

    os.environ["SYNCBN_NONFINITE"] = policy
    shards, _ = make_data([3, 4], (2,), torch.float64, 0)
    layer = syncbn.SyncBatchNorm1d(2, dtype=torch.float64, momentum=0.5)
    x = shards[rank].clone()
    if rank == 1:
        x[0, 0] = float("nan")
    try:
        layer(x)
    except RuntimeError as e:
        return str(e)
    clean = torch.cat(shards)[:, 1]
    if policy == "propagate":
        assert_matches(layer.running_mean[1:], 0.5 * clean.mean().view(1), torch.float64,
                       "clean channel")
        assert torch.isnan(layer.running_mean[0]) and torch.isnan(layer.running_var[0])
    else:  # skip: the batch leaves every statistic untouched, num_batches_tracked included
        assert layer.running_mean.tolist() == [0.0, 0.0], layer.running_mean
        assert layer.running_var.tolist() == [1.0, 1.0], layer.running_var
        assert int(layer.num_batches_tracked) == 0
    return ""


def fuzz_case(rank: int, world_size: int, cfg: FuzzCase) -> tuple[str, str]:
    """One random case: valid ones must match the reference (asserted in ``exactness``);
    invalid ones must raise. Returns ("ok", "") or (error type, message) for this rank."""
    fault = cfg.fault
    one_value = sum(cfg.sizes) * math.prod(cfg.tail[1:]) == 1
    try:
        if fault is None and not one_value:
            exactness(rank, world_size, cfg)
            return "ok", ""
        channels = cfg.tail[0]
        layer = syncbn.SyncBatchNorm(channels)
        shape = (cfg.sizes[rank], *cfg.tail)
        if fault is not None and rank == cfg.bad_rank:
            shape = (shape[0], channels + 1, *shape[2:]) if fault == "channels" else (channels,)
        layer(torch.randn(shape)).sum().backward()
        return "ok", ""
    except (ValueError, RuntimeError) as e:
        return type(e).__name__, str(e)


def large_mean_gradients(rank: int, world_size: int, cfg: Moments) -> dict[str, float]:
    """float32 data with mean/std = cfg.mean/cfg.std: syncbn's output and grad_input errors (against
    float64 on the global batch) must be no worse than torch's own float32 BatchNorm's on the
    concatenated batch: no cancellation beyond what float32 data forces on everyone."""
    sizes, tail = cfg.sizes, tuple(cfg.tail)
    shards, _ = make_data(sizes, tail, torch.float32, 3, mean=cfg.mean, std=cfg.std)
    # upstream gradients correlated with x (as from a loss like y**2): sum(dy * xhat) is large,
    # which is where a folded x * b + c form of grad_input cancels
    grads = [((s.double() - cfg.mean) / cfg.std).float() for s in shards]
    ref = reference_steps(shards, grads, None, None, 1, 0.1, 1e-5, True)[0]
    layer = syncbn.SyncBatchNorm2d(tail[0], affine=False)
    x = shards[rank].clone().requires_grad_()
    y = layer(x)
    y.backward(grads[rank])
    whole = torch.cat(shards).clone().requires_grad_()
    torch.nn.functional.batch_norm(whole, None, None, training=True).backward(torch.cat(grads))
    torch_dx = whole.grad.split(sizes)[rank]
    ours = (x.grad.double() - ref["dx"][rank]).abs().max().item()
    theirs = (torch_dx.double() - ref["dx"][rank]).abs().max().item()
    assert ours <= 2 * theirs, f"grad_input error {ours:.3g} vs torch float32 {theirs:.3g}"
    return {"ours": ours, "torch": theirs}


def revert_mid_training(rank: int, world_size: int) -> dict[str, Any]:
    """Export in the middle of DDP training. Reverting a deepcopy (the documented way) warns
    nothing and leaves the wrapped model's layers synchronized (checked against plain BN over the
    global batch after the export); reverting parts of ``model.module`` itself warns, once."""
    import copy
    import sys
    import warnings

    sys.modules["syncbn.convert"]._warned_in_place = False  # one-time per process: reused ranks
    torch.manual_seed(0)  # the same shards and weights on every rank
    shards = [torch.randn(2 + r, 3, dtype=torch.float64) for r in range(world_size)]
    model = syncbn.convert_sync_batchnorm(nn.Sequential(
        nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))))
    ddp = nn.parallel.DistributedDataParallel(model.double())
    ddp(shards[rank]).sum().backward()
    with warnings.catch_warnings(record=True) as on_copy:
        warnings.simplefilter("always")
        plain = syncbn.revert_sync_batchnorm(copy.deepcopy(ddp.module))
        syncbn.revert_sync_batchnorm(ddp.module[1])  # a layer alone: a new layer, nothing changed
    kept = [type(m).__name__ for m in (model[1], model[2][1])]
    out = ddp(shards[rank])  # still synchronized: the global batch's statistics
    with torch.no_grad():
        h = torch.cat(shards)
        for linear, bn in ((model[0], model[1]), (model[2][0], model[2][1])):
            h = nn.functional.batch_norm(linear(h), None, None, bn.weight, bn.bias, training=True)
    start = sum(len(s) for s in shards[:rank])
    torch.testing.assert_close(out.detach(), h[start:start + len(shards[rank])])
    with warnings.catch_warnings(record=True) as in_place:
        warnings.simplefilter("always")
        syncbn.revert_sync_batchnorm(ddp.module[2])  # in place: warns
        syncbn.revert_sync_batchnorm(ddp.module)  # in place too: no second warning
    return {"on_copy": [str(w.message) for w in on_copy], "kept": kept,
            "exported": [type(m).__name__ for m in (plain[1], plain[2][1])],
            "reverted": [type(m).__name__ for m in (model[1], model[2][1])],
            "in_place": [(w.category.__name__, str(w.message)) for w in in_place]}
