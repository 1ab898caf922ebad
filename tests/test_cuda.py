"""The lean CUDA backend (``SYNCBN_KERNEL=cuda`` and ``cuda-welford``) on CPU tensors: its own
code, with torch's CUDA-only SyncBatchNorm operators replaced by CPU stand-ins
(``cuda_standins.py``, written from the CUDA kernels).

* step level, in one process: every rank's ``forward_reduce``, the sum of their buffers (what
  the all_reduce does), every rank's ``forward_apply``, the same backward, against plain float64
  BatchNorm on the concatenated batch; uneven and empty shards, float32/float64/bfloat16,
  contiguous and channels_last, 2-D/4-D/5-D; on the host path (CPU: header checked here) and on
  the device path (as on CUDA: header checked on the device, running statistics guarded);
* per-channel tensors of every dtype combination;
* numerics at mean/std 1e4 in float32, with CUDA's float32 Welford emulated;
* the operators each direction dispatches (what a GPU launches, one kernel each);
* ranks on cuda, aten and the fused kernel in one gloo group (tests/cuda_workers.py);
* on a GPU (marked ``cuda``, skipped without one): torch's real kernels against float64, with
  no host sync.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import cuda_standins
import cuda_workers
import harness
from reference import DTYPES, assert_matches, make_data, make_params, reference_steps
from syncbn import _settings, _stats, _wire, backends
from syncbn.backends import cuda

EPS, MOMENTUM = 1e-5, 0.1
PROPAGATE, SKIP = _wire.POLICIES["propagate"], _wire.POLICIES["skip"]


@pytest.fixture(autouse=True, scope="module")
def _standins():
    cuda_standins.register()


@pytest.fixture(params=["host", "device"])
def path(request, monkeypatch):
    """``device``: the backend behaves as on CUDA (no host check; the running statistics are
    guarded on the device)."""
    if request.param == "device":
        monkeypatch.setattr(cuda, "_host_checks", lambda buffer: False)
    return request.param


def _layout(t: torch.Tensor, memory: str) -> torch.Tensor:
    formats = {"channels_last": torch.channels_last, "channels_last_3d": torch.channels_last_3d}
    return t.contiguous(memory_format=formats[memory]) if memory in formats else t


class Ranks:
    """``world`` ranks of one layer in one process, each with its own running statistics."""

    def __init__(self, channels: int, world: int, dtype: torch.dtype, welford: bool = False,
                 weight: torch.Tensor | None = None, bias: torch.Tensor | None = None,
                 dtypes: tuple[torch.dtype, ...] | None = None, device: str = "cpu") -> None:
        """``dtypes``: weight's, bias', running mean's and var's (default: the accumulation
        dtype of ``dtype``, as with autocast)."""
        self.channels, self.world, self.welford, self.device = channels, world, welford, device
        wd, bd, md, vd = dtypes or (cuda_standins.acc(dtype),) * 4
        self.weight = None if weight is None else weight.to(device, wd)
        self.bias = None if bias is None else bias.to(device, bd)
        self.running = [(torch.zeros(channels, dtype=md, device=device),
                         torch.ones(channels, dtype=vd, device=device)) for _ in range(world)]
        self.tag = _wire.LayerTag(0x0003_0007, "SyncBatchNorm(test)")
        self.forwards = self.backwards = 0  # pass counters
        self.size = _wire.length(_wire.width_for(channels))

    def forward(self, xs: list[torch.Tensor], policy: int = PROPAGATE,
                fields: list[list[int]] | None = None) -> list[tuple[Any, ...]]:
        self.forwards += 1
        own = _wire.fields(self.tag, _wire.FORWARD, self.channels, self.forwards)
        fields = fields or [own] * self.world
        geos = [cuda.applies(x, self.weight, self.bias, *self.running[r], welford=self.welford)
                for r, x in enumerate(xs)]
        buffers = []
        for geo, x, f in zip(geos, xs, fields):
            buffer = torch.empty(self.size, dtype=torch.float64, device=self.device)
            assert cuda.forward_reduce(geo, x, buffer, f) == _wire.OK
            buffers.append(buffer)
        total = torch.stack(buffers).sum(0)  # the all_reduce
        return [cuda.forward_apply(geo, x, total.clone(), self.world, f, self.weight, self.bias,
                                   *running, EPS, MOMENTUM, policy)
                for geo, x, f, running in zip(geos, xs, fields, self.running)]

    def backward(self, dys: list[torch.Tensor], xs: list[torch.Tensor],
                 stats: list[torch.Tensor]) -> list[tuple[Any, ...]]:
        self.backwards += 1
        f = _wire.fields(self.tag, _wire.BACKWARD, self.channels, self.backwards)
        geos = [cuda.applies(x, self.weight, welford=self.welford) for x in xs]
        buffers, shares = [], []
        for geo, dy, x, s in zip(geos, dys, xs, stats):
            buffer = torch.empty(self.size, dtype=torch.float64, device=self.device)
            shares.append(cuda.backward_reduce(geo, dy, x, s, buffer, f, self.weight.dtype,
                                               self.bias.dtype))
            buffers.append(buffer)
        total = torch.stack(buffers).sum(0)
        return [(*cuda.backward_apply(geo, dy, x, s, self.weight, total.clone(), self.world, f),
                 *share[:2])
                for geo, dy, x, s, share in zip(geos, dys, xs, stats, shares)]


CASES = [  # sizes (one per rank), tail (C, *spatial), memory format
    ([6], (3,), "contiguous"),
    ([2, 5], (4, 3, 2), "channels_last"),
    ([3, 0, 4], (3, 2, 3), "contiguous"),
    ([0, 3], (2, 2, 2, 2), "channels_last_3d"),
    ([1, 1, 4], (5, 2, 1, 3), "contiguous"),
]


@pytest.mark.parametrize("welford", [False, True], ids=["cuda", "cuda-welford"])
@pytest.mark.parametrize("dtype_name", ["float32", "float64", "bfloat16"])
@pytest.mark.parametrize("sizes,tail,memory", CASES,
                         ids=[f"{len(s)}rank-{len(t) + 1}d-{m}" for s, t, m in CASES])
def test_steps_match_float64_batchnorm(path, welford, dtype_name, sizes, tail, memory):
    dtype = DTYPES[dtype_name]
    shards, grads = make_data(sizes, tail, dtype, seed=len(sizes), mean=3.0, std=2.0)
    weight, bias = make_params(tail[0], seed=1)
    ref = reference_steps(shards, grads, weight, bias, 2, MOMENTUM, EPS, True)
    ranks = Ranks(tail[0], len(sizes), dtype, welford, weight, bias)
    xs = [_layout(s, memory) for s in shards]
    dys = [_layout(g, memory) for g in grads]
    with cuda_standins.CudaWelford():
        for step in range(2):
            forward = ranks.forward(xs)
            backward = ranks.backward(dys, xs, [s for _, s, _ in forward])
            for r, ((out, _, code), (dx, code_b, dw, db)) in enumerate(zip(forward, backward)):
                where = f"rank {r} step {step}"
                assert code == code_b == _wire.OK, where
                assert out.dtype == dtype and dx.dtype == dtype, where
                assert_matches(out, ref[step]["y"][r], dtype, f"{where}: output")
                assert_matches(dx, ref[step]["dx"][r], dtype, f"{where}: grad_input")
                if memory != "contiguous" and out.numel():
                    assert out.stride() == xs[r].stride(), where
            for key, index in (("dw", 2), ("db", 3)):
                total = sum(b[index].double() for b in backward)
                assert_matches(total, ref[step][key], dtype, f"step {step}: summed {key}")
            for i, key in enumerate(("running_mean", "running_var")):
                first = ranks.running[0][i]
                assert_matches(first, ref[step][key], dtype, f"step {step}: {key}")
                assert all(torch.equal(first, running[i]) for running in ranks.running), key


F16, BF16, F32, F64 = torch.float16, torch.bfloat16, torch.float32, torch.float64


@pytest.mark.parametrize("dtype,dtypes", [
    (BF16, (BF16, BF16, BF16, BF16)),  # model.bfloat16()
    (F16, (F16, F16, F16, F16)),  # model.half(): float16 running statistics, via a copy
    (F32, (F64, F64, F64, F64)),  # a float64 layer fed float32
    (F64, (F32, F32, F32, F32)),  # a float32 layer fed float64
    (BF16, (F32, BF16, F16, F32)),  # everything different
], ids=["bf16-model", "half-model", "f64-layer-f32-input", "f32-layer-f64-input", "mixed"])
def test_every_parameter_dtype(path, dtype, dtypes):
    """Weight, bias and running statistics of any floating dtype, whatever the input's: cast
    where torch's kernels want another; each keeps its dtype."""
    sizes, tail = [3, 0, 4], (3, 2, 2)
    shards, grads = make_data(sizes, tail, dtype, seed=5, mean=3.0, std=2.0)
    weight, bias = make_params(tail[0], seed=5)
    ref = reference_steps(shards, grads, weight, bias, 2, MOMENTUM, EPS, True)
    ranks = Ranks(tail[0], len(sizes), dtype, False, weight, bias, dtypes)
    # the coarser of the input's and the tensor's precision
    coarse = {t: max((dtype, t), key=lambda d: DTYPES_EPS[d]) for t in dtypes}
    for step in range(2):
        forward = ranks.forward(shards)
        backward = ranks.backward(grads, shards, [s for _, s, _ in forward])
        for r, ((out, _, code), (dx, code_b, dw, db)) in enumerate(zip(forward, backward)):
            assert code == code_b == _wire.OK
            assert out.dtype == dx.dtype == dtype
            assert (dw.dtype, db.dtype) == dtypes[:2]
            assert_matches(out, ref[step]["y"][r], coarse[dtypes[0]], f"rank {r}: output")
            assert_matches(dx, ref[step]["dx"][r], coarse[dtypes[0]], f"rank {r}: grad_input")
        for i, key in enumerate(("running_mean", "running_var")):
            got = ranks.running[0][i]
            assert got.dtype == dtypes[2 + i]
            assert_matches(got, ref[step][key], coarse[dtypes[2 + i]], f"step {step}: {key}")


DTYPES_EPS = {F64: 1e-16, F32: 1e-7, F16: 1e-3, BF16: 1e-2}


def test_world_of_one_matches_torch_batchnorm(path):
    """One rank, no affine parameters: torch's own BatchNorm in float64 (its output, input
    gradient, running statistics)."""
    x = torch.randn(7, 3, 4, dtype=torch.float64) * 2 + 1
    dy = torch.randn_like(x)
    bn = torch.nn.BatchNorm1d(3, affine=False, dtype=torch.float64)
    xr = x.clone().requires_grad_()
    bn(xr).backward(dy)
    ranks = Ranks(3, 1, torch.float64)
    ranks.weight = ranks.bias = None
    [(out, stats, _)] = ranks.forward([x])
    f = _wire.fields(ranks.tag, _wire.BACKWARD, 3, 1)
    geo = cuda.applies(x)
    buffer = torch.empty(ranks.size, dtype=torch.float64)
    assert cuda.backward_reduce(geo, dy, x, stats, buffer, f, None, None) == (None, None, _wire.OK)
    dx, code = cuda.backward_apply(geo, dy, x, stats, None, buffer, 1, f)
    assert code == _wire.OK
    torch.testing.assert_close(out, torch.nn.functional.batch_norm(x, None, None, training=True))
    torch.testing.assert_close(dx, xr.grad)
    torch.testing.assert_close(ranks.running[0][0], bn.running_mean)
    torch.testing.assert_close(ranks.running[0][1], bn.running_var)


def _one_pass_apart(ranks: Ranks) -> list[list[int]]:
    """The fields of the next forward pass on rank 0, and of the one after it on rank 1."""
    return [_wire.fields(ranks.tag, _wire.FORWARD, ranks.channels, ranks.forwards + ahead)
            for ahead in (1, 2)]


def test_running_statistics_are_kept_when_the_header_disagrees(path):
    """A rank one pass ahead: on the host path the apply step says MISMATCH; on the device path
    it cannot know, and keeps the running statistics unchanged (bitwise)."""
    ranks = Ranks(3, 2, torch.float32, weight=torch.ones(3), bias=torch.zeros(3))
    xs = [torch.randn(4, 3), torch.randn(5, 3)]
    before = [tuple(t.clone() for t in running) for running in ranks.running]
    results = ranks.forward(xs, fields=_one_pass_apart(ranks))
    for r, (out, _, code) in enumerate(results):
        if path == "host":
            assert code == _wire.MISMATCH and out is None
        else:
            assert code == _wire.OK
        for kept, now in zip(before[r], ranks.running[r]):
            assert torch.equal(kept, now), (path, r)


def test_running_statistics_are_kept_below_two_values(monkeypatch):
    """Under CUDA-graph capture the core cannot read the global count: a global batch of one
    value reaches the apply step, which must leave the running statistics alone."""
    monkeypatch.setattr(cuda, "_host_checks", lambda buffer: False)
    ranks = Ranks(3, 2, torch.float32, weight=torch.ones(3), bias=torch.zeros(3))
    ranks.forward([torch.randn(1, 3), torch.randn(0, 3)])
    for running in ranks.running:
        assert running[0].tolist() == [0.0] * 3 and running[1].tolist() == [1.0] * 3
    ranks.forward([torch.randn(1, 3), torch.randn(1, 3)])  # two values: updated
    assert all(running[0].abs().sum() > 0 for running in ranks.running)


def test_skip_keeps_channels_whose_statistics_are_not_finite(path):
    ranks = Ranks(3, 2, torch.float32, weight=torch.ones(3), bias=torch.zeros(3))
    xs = [torch.randn(4, 3), torch.randn(3, 3)]
    xs[1][0, 1] = float("inf")
    ranks.forward(xs, policy=SKIP)
    for running_mean, running_var in ranks.running:
        assert running_mean[1] == 0.0 and running_var[1] == 1.0
        assert running_mean[0] != 0.0 and torch.isfinite(running_var).all()


def test_numerics_at_mean_over_std_1e4():
    """float32 data at mean/std = 1e4, on two uneven ranks, with CUDA's float32 Welford
    emulated: the variance the reduced buffer carries, and the running variance (momentum 1),
    within 1e-6 of float64 for ``cuda``; ``cuda-welford`` shows torch's error (>= 1e-5), which
    is why it is opt-in (and shows that the emulation reproduces it)."""
    torch.manual_seed(0)
    errors = {}
    for n in (98, 25088):
        spread = torch.linspace(0.5, 2.0, 4, dtype=torch.float64).view(1, 4, 1, 1)
        x = (torch.randn(2 * n // 49, 4, 7, 7, dtype=torch.float64) * spread + 1e4).float()
        shards = list(x.split([n // 49 - 1, n // 49 + 1]))  # uneven: ~n values per rank
        true = x.double().var((0, 2, 3), unbiased=False)
        for welford in (False, True):
            ranks = Ranks(4, 2, torch.float32, welford)
            f = _wire.fields(ranks.tag, _wire.FORWARD, 4, 1)
            with cuda_standins.CudaWelford():
                buffers = []
                for s in shards:
                    buffer = torch.empty(ranks.size, dtype=torch.float64)
                    cuda.forward_reduce(cuda.applies(s, welford=welford), s, buffer, f)
                    buffers.append(buffer)
                total = torch.stack(buffers).sum(0)
                running_mean, running_var = ranks.running[0]
                cuda.forward_apply(cuda.applies(shards[0], welford=welford), shards[0], total, 2,
                                   f, None, None, running_mean, running_var, EPS, 1.0, PROPAGATE)
            _, var, count = _stats.global_mean_var(_wire.payload(total, 2 * 4 + 1), 4)
            wire = float(((var - true) / true).abs().max())
            running = float(((running_var.double() * (count - 1) / count - true) / true).abs().max())
            errors[("cuda-welford" if welford else "cuda", n)] = (wire, running)
    print("relative variance errors (wire, running):", errors)
    for n in (98, 25088):
        assert max(errors[("cuda", n)]) <= 1e-6, errors
        assert errors[("cuda-welford", n)][0] >= 1e-5, errors


# ------------------------------------------------------------------------------ operator counts
# allocations (no kernel) and dtype arithmetic (no tensor)
_NOT_KERNELS = {torch.ops.aten.empty.memory_format, torch.ops.aten.empty_strided.default,
                torch.ops.aten.empty_like.default, torch.ops.aten.promote_types.default}


class Ops(TorchDispatchMode):
    """The ATen operators dispatched inside the block: every one that computes (each is one
    kernel launch, or one memset, on CUDA), leaving out views, allocations and dtype
    arithmetic; host reads
    (``_local_scalar_dense``: a device sync on CUDA) are listed apart."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []
        self.host_reads = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if func is torch.ops.aten._local_scalar_dense.default:
            self.host_reads += 1
        elif not func.is_view and func not in _NOT_KERNELS:
            self.ops.append(func.__name__)
        return func(*args, **(kwargs or {}))


def _count(kernel: str, dtype: torch.dtype, memory: str, running: bool) -> dict[str, Any]:
    """Operators per direction of a 2-rank pass (rank 0's steps), after a first pass (which
    makes the cached device templates)."""
    _pass(kernel, dtype, memory, running)
    return _pass(kernel, dtype, memory, running)


def _pass(kernel: str, dtype: torch.dtype, memory: str, running: bool) -> dict[str, Any]:
    welford = kernel == "cuda-welford"
    x = _layout(torch.randn(4, 8, 5, 5).to(dtype), memory)
    dy = _layout(torch.randn(4, 8, 5, 5).to(dtype), memory)
    ranks = Ranks(8, 2, dtype, welford, torch.ones(8), torch.zeros(8))
    if not running:
        ranks.running = [(None, None)] * 2
    geo = cuda.applies(x, ranks.weight, ranks.bias, *ranks.running[0], welford=welford)
    fwd, bwd = (_wire.fields(ranks.tag, d, 8, 1) for d in (_wire.FORWARD, _wire.BACKWARD))
    buffer = torch.empty(ranks.size, dtype=torch.float64)
    counts: dict[str, Any] = {}
    with Ops() as reduce:
        cuda.forward_reduce(geo, x, buffer, fwd)
    buffer *= 2
    with Ops() as apply:
        _, stats, _ = cuda.forward_apply(geo, x, buffer, 2, fwd, ranks.weight, ranks.bias,
                                         *ranks.running[0], EPS, MOMENTUM, PROPAGATE)
    counts["forward"] = reduce.ops + apply.ops
    with Ops() as reduce_b:
        cuda.backward_reduce(geo, dy, x, stats, buffer, bwd, ranks.weight.dtype,
                             ranks.bias.dtype)
    buffer *= 2
    with Ops() as apply_b:
        cuda.backward_apply(geo, dy, x, stats, ranks.weight, buffer, 2, bwd)
    counts["backward"] = reduce_b.ops + apply_b.ops
    counts["host_reads"] = reduce.host_reads + apply.host_reads + reduce_b.host_reads + apply_b.host_reads
    return counts


# Operators per direction on the device path (as on CUDA), float32 parameters (float64 for
# float64 input). Forward: 6 in the reduce step (frame, x - k, torch's statistics, 3 on C
# numbers) + 15 in the apply step (6 on C numbers, 4 for the running statistics' guard, 4 for
# their update, normalize); bfloat16 adds the shift's cast; without running statistics 6 + 7.
# Backward: 6 + 5 (5 + 3 for float64 input: no casts to float32).
EXPECTED = {
    # kernel, dtype, memory, running statistics: (forward, backward)
    ("cuda", "float32", "contiguous", True): (21, 11),
    ("cuda", "float32", "channels_last", True): (21, 11),
    ("cuda", "float32", "contiguous", False): (13, 11),
    ("cuda", "bfloat16", "channels_last", True): (22, 11),
    ("cuda", "float64", "contiguous", True): (20, 8),
    ("cuda-welford", "float32", "contiguous", True): (20, 11),
}


@pytest.mark.parametrize("case", sorted(EXPECTED), ids=lambda c: "-".join(map(str, c)))
def test_operators_per_direction(monkeypatch, case):
    monkeypatch.setattr(cuda, "_host_checks", lambda buffer: False)  # as on CUDA
    kernel, dtype_name, memory, running = case
    counts = _count(kernel, DTYPES[dtype_name], memory, running)
    print(case, {k: (len(v), v) if isinstance(v, list) else v for k, v in counts.items()})
    assert counts["host_reads"] == 0  # no host sync
    assert (len(counts["forward"]), len(counts["backward"])) == EXPECTED[case], counts


def test_fewer_operators_than_the_torch_operator_backend(monkeypatch):
    """The same pass on the torch-operator backend (aten), for scale: on CPU, where its header
    check is a host read (on CUDA it runs a device-side guard instead)."""
    monkeypatch.setattr(cuda, "_host_checks", lambda buffer: False)
    lean = _count("cuda", torch.float32, "contiguous", True)
    aten = backends.aten
    x, dy = torch.randn(4, 8, 5, 5), torch.randn(4, 8, 5, 5)
    tag = _wire.LayerTag(0x0003_0007, "SyncBatchNorm(test)")
    size = _wire.length(_wire.width_for(8))
    rm, rv, w, b = torch.zeros(8), torch.ones(8), torch.ones(8), torch.zeros(8)
    for passes in (1, 2):  # the second pass is counted
        f, fb = (_wire.fields(tag, d, 8, passes) for d in (_wire.FORWARD, _wire.BACKWARD))
        buffer = torch.empty(size, dtype=torch.float64)
        with Ops() as forward:
            aten.forward_reduce(None, x, buffer, f)
            buffer *= 2
            _, stats, _ = aten.forward_apply(None, x, buffer, 2, f, w, b, rm, rv, EPS, MOMENTUM,
                                             PROPAGATE)
        with Ops() as backward:
            aten.backward_reduce(None, dy, x, stats, buffer, fb, w.dtype, b.dtype)
            buffer *= 2
            aten.backward_apply(None, dy, x, stats, w, buffer, 2, fb)
    print(f"operators per direction, forward/backward: aten on CPU {len(forward.ops) - 1}/"
          f"{len(backward.ops) - 1}, cuda as on CUDA {len(lean['forward'])}/"
          f"{len(lean['backward'])}")  # (- 1: the test's own * 2)
    assert len(lean["forward"]) < (len(forward.ops) - 1) / 2
    assert len(lean["backward"]) < (len(backward.ops) - 1) / 2


# ------------------------------------------------------------------------------ on a GPU
@pytest.mark.cuda
@pytest.mark.parametrize("welford", [False, True], ids=["cuda", "cuda-welford"])
@pytest.mark.parametrize("dtype,dtypes,memory", [
    (F32, None, "contiguous"),
    (BF16, None, "channels_last"),
    (F64, None, "contiguous"),
    (BF16, (BF16, BF16, BF16, BF16), "contiguous"),
    (F16, (F16, F16, F16, F16), "channels_last"),
    (F32, (F64, F32, F64, F64), "contiguous"),
], ids=["f32", "bf16-channels-last", "f64", "bf16-model", "half-model-channels-last", "mixed"])
def test_on_a_gpu_torch_kernels_match_float64_without_a_host_sync(welford, dtype, dtypes, memory):
    """torch's real kernels (not the stand-ins) at 3 ranks in one process, one of them empty:
    float64 BatchNorm's results, and no host sync in any step once warm
    (``torch.cuda.set_sync_debug_mode("error")``)."""
    if not torch.cuda.is_available():
        print("CUDA is not available on this machine")
        pytest.skip("CUDA is not available on this machine")
    sizes, tail = [3, 0, 5], (4, 3, 2)
    shards, grads = make_data(sizes, tail, dtype, seed=7, mean=3.0, std=2.0)
    weight, bias = make_params(tail[0], seed=7)
    ref = reference_steps(shards, grads, weight, bias, 3, MOMENTUM, EPS, True)
    ranks = Ranks(tail[0], len(sizes), dtype, welford, weight, bias, dtypes, "cuda")
    xs = [_layout(s.cuda(), memory) for s in shards]
    dys = [_layout(g.cuda(), memory) for g in grads]
    coarse = max((dtype, *(dtypes or ())), key=lambda d: DTYPES_EPS[d])
    for step in range(3):
        if step:  # the first pass makes the cached templates (a host-to-device copy)
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
        try:
            forward = ranks.forward(xs)
            backward = ranks.backward(dys, xs, [s for _, s, _ in forward])
        finally:
            torch.cuda.set_sync_debug_mode("default")
        for r, ((out, _, _), (dx, _, _, _)) in enumerate(zip(forward, backward)):
            assert_matches(out.cpu(), ref[step]["y"][r], coarse, f"step {step} rank {r}: output")
            assert_matches(dx.cpu(), ref[step]["dx"][r], coarse,
                           f"step {step} rank {r}: grad_input")
        for key, index in (("dw", 2), ("db", 3)):
            total = sum(b[index].double().cpu() for b in backward)
            assert_matches(total, ref[step][key], coarse, f"step {step}: summed {key}")
        for i, key in enumerate(("running_mean", "running_var")):
            assert_matches(ranks.running[0][i].cpu(), ref[step][key], coarse, f"step {step}: {key}")


# ------------------------------------------------------------------------------ selection
def test_selected_only_when_named(monkeypatch):
    x = torch.randn(4, 3)
    for kernel in ("auto", "fused", "aten"):
        monkeypatch.setenv("SYNCBN_KERNEL", kernel)
        _settings.reload()
        assert backends.select(x)[0] is not cuda, kernel
    for kernel in ("cuda", "cuda-welford"):
        monkeypatch.setenv("SYNCBN_KERNEL", kernel)
        _settings.reload()
        backend, geo = backends.select(x, None, None, None, None)
        assert backend is cuda and geo.shift == (kernel == "cuda")
        assert backends.describe(x) == f"cuda (SYNCBN_KERNEL={kernel})"


@pytest.mark.parametrize("input,params", [
    (torch.randn(4, 3, device="meta"), ()),  # no SyncBatchNorm kernels on this device
    (torch.randn(4, 3), (torch.ones(4),)),  # a weight of 4 for 3 channels
    (torch.randn(4, 3), (torch.ones(3, dtype=torch.int64),)),
    (torch.randn(4, 3).int(), ()),
    (torch.randn(4, 0), ()),
], ids=["meta-device", "weight-of-4", "int-weight", "int-input", "no-channels"])
def test_unavailable_is_an_error_naming_the_setting(monkeypatch, input, params):
    monkeypatch.setenv("SYNCBN_KERNEL", "cuda")
    _settings.reload()
    with pytest.raises(backends.BackendUnavailable, match="SYNCBN_KERNEL=cuda, but the lean CUDA"):
        backends.select(input, *params)


# ------------------------------------------------------------------------------ process groups
@pytest.mark.timeout(300)
@pytest.mark.parametrize("kernels,sizes,dtype,tail,channels_last", [
    (["cuda", "cuda"], [3, 2], "float32", (3, 2, 2), True),
    (["cuda", "fused", "aten"], [2, 0, 3], "float64", (3, 4), False),
    (["cuda-welford", "aten"], [4, 1], "float32", (4, 3, 2), True),
    (["cuda", "cuda-welford"], [2, 3], "bfloat16", (3, 2, 2), True),
], ids=["2-cuda-ranks-channels-last", "cuda-fused-aten-one-empty", "cuda-welford-aten",
        "cuda-and-welford-bf16"])
def test_ranks_on_cuda_and_other_backends_agree(tmp_path, kernels, sizes, dtype, tail,
                                                channels_last):
    out = harness.run(cuda_workers.mixed_backends, len(kernels), tmp_path, kernels, sizes, tail,
                      dtype, channels_last, 2, fresh=True, timeout=240)
    for rank, kernel in enumerate(kernels):
        assert out[rank]["backends"] == ["cuda" if kernel.startswith("cuda") else kernel], out
