"""The Triton backend (issue 13) on a GPU: speed, launch counts, host syncs, CUDA graphs, compile,
numerics, in one run that reports every section even when some fail.

    python benchmarks/gpu_triton.py                          # every section, CUDA
    python benchmarks/gpu_triton.py --only nosync,counts,numerics,table --budget 130
    python benchmarks/gpu_triton.py --only graphs            # each section alone, in its own process
    python benchmarks/gpu_triton.py --cpu-smoke              # no GPU: the code paths through Triton's
                                                             # interpreter, tiny shapes (< 1 min)

Without a CUDA device (and without ``--cpu-smoke``) it prints "no CUDA device: nothing to measure"
and exits 0. Every section runs in its own try/except and prints its error, so one run reports all
of them; the exit status is 0 unless the script itself could not start.

What is timed ("1 rank, collective forced"): one process, a 1-rank NCCL group, and each
contender's *synchronized* autograd Function called directly (at world size 1 the modules would
fall back to plain batch norm). torch's ``SyncBatchNorm`` Function always runs its all_gather;
syncbn's ``_comm.all_reduce`` skips the collective of a 1-rank group, so this script wraps it to
run ``dist.all_reduce`` on the buffer anyway (:func:`force_collective`; on 1 rank NCCL may turn
that into a copy or nothing, which the counts section shows). The ``gloo`` section times 2 real
ranks over gloo with CUDA tensors on the one GPU (host wall time: gloo copies through the host).
For the module sections (graphs, compile) ``syncbn.batchnorm.will_sync`` is also forced on.

Sections (``--only``, comma-separated; default: all, in this order):

* ``table``: per layer forward+backward (``torch.autograd.grad``, no .grad accumulation) at the
  ResNet-50 shapes of benchmarks/layer.py (``SHAPES``), float32, bfloat16 and float16 input
  (parameters float32), contiguous and channels_last: plain ``F.batch_norm`` (BN, the floor),
  torch.nn.SyncBatchNorm's Function, syncbn with ``SYNCBN_KERNEL=triton`` and ``=aten``; median
  ms (CUDA events, synchronized per iteration, contenders interleaved over rounds), the ratios
  and the max abs output error against float64 batch norm. Target: triton/SyncBN <= 0.8.
  ``--budget`` stops it (rows then say "skipped") so the later sections still run.
* ``counts``: CUDA kernels, NCCL (collective) kernels, memcpy and memset events per direction
  (torch.profiler, ProfilerActivity.CUDA), syncbn-triton beside torch.nn.SyncBatchNorm and
  plain BN, with the kernel names. Target: <= 3 kernels + 1 collective + <= 1 copy.
* ``nosync``: ``torch.cuda.set_sync_debug_mode("error")`` around two forward and two backward
  passes of syncbn (triton, then aten): ok/failed per pass.
* ``graphs``: conv -> syncbn.SyncBatchNorm2d -> relu, forward+backward captured with
  ``torch.cuda.graph`` after a side-stream warm-up (the PyTorch docs' recipe), replayed 3 times on
  fresh inputs against an eager copy: outputs, gradients, running statistics equal, and
  advancing per replay. Then an empty shard (batch 0) captured the same way. A failed capture is
  retried once with syncbn's pending header checks drained first (tells which part fails).
* ``compile``: the same model under ``torch.compile(mode="reduce-overhead")``, 4 training steps
  against eager; prints inductor's cudagraph skip counters.
* ``numerics``: relative error of the batch variance at mean/std = 1e4 in float32 against float64
  (syncbn triton and aten from the float64 ``stats`` and from the running_var buffer; torch's
  from its running_var). Target: < 1e-6.
* ``gloo``: 2 ranks over gloo sharing the GPU, a few shapes: syncbn-triton vs torch SyncBN.
* ``resnet``: one training step (forward, cross-entropy, backward, SGD step) of a hand-written
  ResNet-50 (bottlenecks [3, 4, 6, 3], widths 64..2048, 53 BatchNorm2d), ``--resnet-batch``
  x3x224x224 (default 32), channels_last, ``torch.autocast("cuda", dtype=torch.bfloat16)``,
  ``torch.compile(model)`` (inductor; the syncbn variants first with ``fullgraph=True``, falling
  back to the default with the error printed). Variants, timed one after another (compile and
  warm-up, then the median of ``--iters`` steps, CUDA events): plain ``nn.BatchNorm2d``, then
  ``syncbn.convert_sync_batchnorm`` with ``SYNCBN_KERNEL=triton`` and ``=aten``, synchronizing
  on 1 rank with the collective forced (as above). Target: triton/plain <= 1.02. ``--budget``:
  plain and triton start while time is left; aten only if the time triton took is still left.
  ``--cpu-smoke``: width 8, one bottleneck per stage, batch 2, 32x32, float32 (no autocast),
  backend ``aot_eager``, 2 timed steps (the interpreter: ~1 min).
"""

# ruff: noqa: B023  (closures over loop variables are called within their own iteration)
from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import math
import os
import re
import statistics
import sys
import tempfile
import time
import traceback
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from layer import SHAPES  # noqa: E402  (the ResNet-50 shapes, one source)

SECTIONS = ("table", "counts", "nosync", "graphs", "compile", "numerics", "gloo", "resnet")
EPS, MOMENTUM = 1e-5, 0.1
SMOKE_SHAPES = [(4, 8, 3, 3), (6, 16)]


class Run:
    """What the sections share: device, options, the 1-rank group, the start time."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.device = torch.device("cpu" if args.cpu_smoke else "cuda")
        self.cuda = self.device.type == "cuda"
        self.start = time.perf_counter()
        self.group: Any = None

    def left(self) -> float:
        """Seconds left of ``--budget`` (infinite without one)."""
        if self.args.budget is None:
            return float("inf")
        return self.args.budget - (time.perf_counter() - self.start)

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()


# ------------------------------------------------------------------------------------ set-up
def kernel(name: str) -> None:
    """Route syncbn's next passes to backend ``name`` (SYNCBN_KERNEL, settings re-read)."""
    from syncbn import _settings

    os.environ["SYNCBN_KERNEL"] = name
    _settings.reload()


def force_collective() -> None:
    """Make syncbn's ``_comm.all_reduce`` run ``dist.all_reduce`` on a 1-rank group too (it
    returns early there), so the timed path includes a real collective like torch's."""
    from syncbn import _comm

    if getattr(_comm.all_reduce, "forced", False):
        return
    original = _comm.all_reduce

    def forced(buffer, process_group, tag, direction, payload_size, shape=()):  # type: ignore[no-untyped-def]
        world = original(buffer, process_group, tag, direction, payload_size, shape)
        if world == 1:
            dist.all_reduce(buffer, op=dist.ReduceOp.SUM, group=_comm.resolve(process_group))
        return world

    forced.forced = True  # type: ignore[attr-defined]
    _comm.all_reduce = forced


def force_module_sync() -> None:
    """The syncbn modules synchronize in training mode even on 1 rank (for graphs/compile)."""
    import syncbn.batchnorm

    syncbn.batchnorm.will_sync = lambda training, process_group=None: bool(training)


def one_rank_group(run: Run) -> None:
    store = dist.FileStore(os.path.join(tempfile.mkdtemp(), "store"), 1)
    if run.cuda:
        torch.cuda.set_device(0)
    dist.init_process_group("nccl" if run.cuda else "gloo", store=store, rank=0, world_size=1,
                            timeout=datetime.timedelta(seconds=60))
    run.group = dist.group.WORLD
    force_collective()


def header(run: Run) -> None:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError as e:
        triton_version = f"not importable ({e})"
    name = torch.cuda.get_device_name() if run.cuda else "CPU (--cpu-smoke, TRITON_INTERPRET=1)"
    cap = torch.cuda.get_device_capability() if run.cuda else ""
    print(f"device: {name} {cap}")
    print(f"torch {torch.__version__} (CUDA {torch.version.cuda}), triton {triton_version}, "
          f"python {sys.version.split()[0]}")
    import syncbn

    print(f"syncbn {syncbn.__version__} from {os.path.dirname(syncbn.__file__)}")


# ------------------------------------------------------------------------------ contenders
def make_case(run: Run, shape: tuple[int, ...], dtype: torch.dtype, layout: str,
              seed: int = 0) -> dict[str, Any]:
    """Input, output gradient and float32 parameters of one configuration."""
    g = torch.Generator().manual_seed(seed)
    c = shape[1]
    x = torch.randn(shape, generator=g).to(run.device, dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    dy = torch.randn(shape, generator=g).to(run.device, dtype)
    if layout == "channels_last":
        dy = dy.contiguous(memory_format=torch.channels_last)
    w = (1 + 0.1 * torch.randn(c, generator=g)).to(run.device).requires_grad_()
    b = (0.1 * torch.randn(c, generator=g)).to(run.device).requires_grad_()
    return {"x": x.requires_grad_(), "dy": dy, "w": w, "b": b, "c": c,
            "rm": torch.zeros(c, device=run.device), "rv": torch.ones(c, device=run.device)}


def contenders(run: Run, case: dict[str, Any]) -> dict[str, tuple[str | None, Callable[[], Any]]]:
    """name -> (syncbn kernel or None, forward: the output)."""
    import syncbn
    from syncbn._pass import SyncBatchNormFunction
    from torch.nn.modules._functions import SyncBatchNorm as TorchSyncBNFunction

    x, w, b = case["x"], case["w"], case["b"]
    tag = syncbn._wire.LayerTag.for_layer("gpu_triton", 0, "gpu_triton")
    case["tag"] = tag  # kept alive: layer_id holds it weakly
    layer = syncbn._pass.layer_id(tag)
    gid = syncbn._pass.group_id(run.group)
    rm = {k: case["rm"].clone() for k in ("bn", "torch", "triton", "aten")}
    rv = {k: case["rv"].clone() for k in ("bn", "torch", "triton", "aten")}
    found = {
        "BN": (None, lambda: F.batch_norm(x, rm["bn"], rv["bn"], w, b, True, MOMENTUM, EPS)),
        "triton": ("triton", lambda: SyncBatchNormFunction.apply(
            x, w, b, rm["triton"], rv["triton"], EPS, MOMENTUM, gid, layer)),
        "aten": ("aten", lambda: SyncBatchNormFunction.apply(
            x, w, b, rm["aten"], rv["aten"], EPS, MOMENTUM, gid, layer)),
    }
    if run.cuda:  # torch.nn.SyncBatchNorm refuses CPU tensors
        found["SyncBN"] = (None, lambda: TorchSyncBNFunction.apply(
            x, w, b, rm["torch"], rv["torch"], EPS, MOMENTUM, run.group, 1))
    return found


def step(forward: Callable[[], Any], case: dict[str, Any]) -> Callable[[], Any]:
    """Forward + backward (grads of x, w, b; nothing accumulated)."""
    def fn() -> Any:
        out = forward()
        return torch.autograd.grad(out, (case["x"], case["w"], case["b"]), case["dy"])
    return fn


def median_ms(run: Run, fns: dict[str, tuple[str | None, Callable[[], Any]]], iters: int,
              warmup: int, rounds: int = 5) -> dict[str, float]:
    """Median milliseconds per call of each function, interleaved over ``rounds``."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    for name, (k, fn) in fns.items():
        if k:
            kernel(k)
        for _ in range(warmup):
            fn()
    run.sync()
    per_round = max(1, iters // rounds)
    for _ in range(rounds):
        for name, (k, fn) in fns.items():
            if k:
                kernel(k)
            for _ in range(per_round):
                if run.cuda:
                    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    start.record()
                    fn()
                    end.record()
                    end.synchronize()
                    times[name].append(start.elapsed_time(end))
                else:
                    t0 = time.perf_counter()
                    fn()
                    times[name].append((time.perf_counter() - t0) * 1e3)
    return {k: statistics.median(v) for k, v in times.items()}


def reference_out(case: dict[str, Any]) -> torch.Tensor:
    x = case["x"].detach().double()
    return F.batch_norm(x, None, None, case["w"].detach().double(), case["b"].detach().double(),
                        True, 0.0, EPS)


def configs(run: Run) -> list[tuple[tuple[int, ...], torch.dtype, str]]:
    shapes = SMOKE_SHAPES if run.args.cpu_smoke else [tuple(s) for s in SHAPES]
    dtypes = ([torch.float32, torch.bfloat16] if run.args.cpu_smoke
              else [torch.float32, torch.bfloat16, torch.float16])
    out = []
    for dtype in dtypes:
        for layout in ("contiguous", "channels_last"):
            for shape in shapes:
                if layout == "channels_last" and len(shape) != 4:
                    continue
                out.append((shape, dtype, layout))
    return out


# -------------------------------------------------------------------------------- sections
def section_table(run: Run) -> None:
    """1. per-layer forward+backward time."""
    print(f"1 rank, collective forced ({'NCCL' if run.cuda else 'gloo'}); median ms of "
          f"forward+backward over {run.args.iters} iterations after {run.args.warmup} warm-ups; "
          "err = max |out - float64 BN| (half outputs: their own rounding, ~1e-2)")
    cols = ["BN", "SyncBN", "triton", "aten"]
    print(f"{'shape':>18} {'dtype':>8} {'layout':>13} " + " ".join(f"{c:>8}" for c in cols)
          + f" {'tri/SyncBN':>10} {'aten/SyncBN':>11} {'tri/BN':>7} {'err tri':>8} {'err torch':>9}")
    ratios: list[float] = []
    skipped = 0
    for shape, dtype, layout in configs(run):
        label = f"{'x'.join(map(str, shape)):>18} {str(dtype)[6:]:>8} {layout:>13}"
        if run.left() < 0:
            print(f"{label} skipped (--budget {run.args.budget} s spent)")
            skipped += 1
            continue
        try:
            case = make_case(run, shape, dtype, layout)
            fns = contenders(run, case)
            ms = median_ms(run, {k: (kk, step(f, case)) for k, (kk, f) in fns.items()},
                           run.args.iters, run.args.warmup)
            ref = reference_out(case)
            errs = {}
            for name in ("triton", "SyncBN"):
                if name in fns:
                    k, f = fns[name]
                    if k:
                        kernel(k)
                    with torch.no_grad():
                        errs[name] = (f().double() - ref).abs().max().item()
            t, s = ms["triton"], ms.get("SyncBN", float("nan"))
            if s == s:
                ratios.append(t / s)
            print(f"{label} " + " ".join(f"{ms.get(c, float('nan')):8.4f}" for c in cols)
                  + f" {t / s:10.2f} {ms['aten'] / s:11.2f} {t / ms['BN']:7.2f}"
                  f" {errs.get('triton', float('nan')):8.1e} {errs.get('SyncBN', float('nan')):9.1e}",
                  flush=True)
        except Exception as e:  # one configuration failing must not hide the others
            print(f"{label} FAILED: {type(e).__name__}: {first_lines(e)}")
    if ratios:
        met = sum(r <= 0.8 for r in ratios)
        print(f"triton/SyncBN over {len(ratios)} configurations: min {min(ratios):.2f}, median "
              f"{statistics.median(ratios):.2f}, max {max(ratios):.2f}; <= 0.8x in {met} of "
              f"{len(ratios)}" + (f"; {skipped} skipped" if skipped else ""))


def cuda_events(run: Run, fn: Callable[[], Any]) -> dict[str, list[str]]:
    """The CUDA-side events of one call of ``fn``, by kind: kernel, collective, copy, memset."""
    from torch.profiler import ProfilerActivity, profile

    run.sync()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        run.sync()
    names: list[str] = []
    try:  # the raw kineto events (one per kernel, memcpy, memset)
        for ev in prof.profiler.kineto_results.events():
            if "CUDA" in str(ev.device_type()):
                names.append(ev.name())
    except AttributeError:
        names = [e.name for e in prof.events() if "CUDA" in str(e.device_type)]
    kinds: dict[str, list[str]] = {"kernel": [], "collective": [], "copy": [], "memset": []}
    for name in names:
        low = name.lower()
        if "activity buffer" in low or "overhead" in low:  # the profiler's own bookkeeping
            continue
        if "nccl" in low:
            kinds["collective"].append(name)
        elif low.startswith("memcpy"):
            kinds["copy"].append(name)
        elif low.startswith("memset"):
            kinds["memset"].append(name)
        else:
            kinds["kernel"].append(name)
    return kinds


def short(name: str) -> str:
    """A kernel's name without namespaces and parameters, with its first telling template
    argument (``vectorized_elementwise_kernel<FillFunctor>``)."""
    name = name.replace("(anonymous namespace)::", "").replace("void ", "")
    base = re.split(r"[<(]", name, maxsplit=1)[0].split("::")[-1]
    rest = name[len(name.split("<")[0]):] if "<" in name.split("(")[0] else ""
    hints = [t.split("::")[-1] for t in re.findall(r"[A-Za-z_][\w:]*", rest)
             if re.search(r"Functor|Op|Std|Kernel|Reduce|Sum", t)]
    return (base + (f"<{hints[0]}>" if hints else ""))[:60]


def section_counts(run: Run) -> None:
    """2. kernels, collectives and copies per direction, syncbn-triton beside torch."""
    if not run.cuda:
        print("needs CUDA (the profiler's CUDA activity): skipped")
        return
    import syncbn.backends.triton as bt

    print("per direction: kernels + collective (NCCL kernels) + copies (memcpy) + memsets; "
          "target for triton: <= 3 + 1 + <= 1. A 1-rank NCCL all_reduce may run as a copy or "
          "nothing: the collective column shows what NCCL launched.")
    for shape, dtype, layout in [((8, 64, 56, 56), torch.float32, "contiguous"),
                                 ((8, 64, 56, 56), torch.bfloat16, "channels_last"),
                                 ((64, 1024), torch.float32, "contiguous")]:
        print(f"-- {'x'.join(map(str, shape))} {str(dtype)[6:]} {layout}")
        case = make_case(run, shape, dtype, layout)
        for name, (k, forward) in contenders(run, case).items():
            if name == "aten":
                continue
            try:
                if k:
                    kernel(k)
                for _ in range(3):  # warm-up: Triton builds, NCCL's communicator, the allocator
                    step(forward, case)()
                before = bt.launches()
                fwd = cuda_events(run, forward)
                forward_launches = bt.launches() - before
                out = forward()
                before = bt.launches()
                bwd = cuda_events(run, lambda: torch.autograd.grad(
                    out, (case["x"], case["w"], case["b"]), case["dy"]))
                backward_launches = bt.launches() - before
                for direction, kinds, triton_launches in (("forward", fwd, forward_launches),
                                                          ("backward", bwd, backward_launches)):
                    counted = " + ".join(f"{len(kinds[kk])} {kk}" for kk in kinds)
                    extra = f" (backend launches: {triton_launches})" if name == "triton" else ""
                    print(f"   {name:>7} {direction:>8}: {counted}{extra}")
                    print(f"   {'':>7} {'':>8}  " + ", ".join(short(n) for n in
                                                            kinds["kernel"] + kinds["collective"]
                                                            + kinds["copy"] + kinds["memset"]))
            except Exception as e:
                print(f"   {name}: FAILED: {type(e).__name__}: {first_lines(e)}")


def section_nosync(run: Run) -> None:
    """3. no host synchronization in forward or backward."""
    if not run.cuda:
        print("needs CUDA (torch.cuda.set_sync_debug_mode): skipped")
        return
    case = make_case(run, (8, 64, 28, 28), torch.float32, "contiguous")
    fns = contenders(run, case)
    for name in ("triton", "aten"):
        k, forward = fns[name]
        kernel(k)
        for _ in range(3):
            step(forward, case)()
        run.sync()
        results = []
        torch.cuda.set_sync_debug_mode("error")
        try:
            for i in (1, 2):  # the second forward runs the first's deferred header check
                try:
                    out = forward()
                    results.append(f"forward #{i} ok")
                except RuntimeError as e:
                    results.append(f"forward #{i} FAILED ({first_lines(e)})")
                    continue
                try:
                    torch.autograd.grad(out, (case["x"], case["w"], case["b"]), case["dy"])
                    results.append(f"backward #{i} ok")
                except RuntimeError as e:
                    results.append(f"backward #{i} FAILED ({first_lines(e)})")
        finally:
            torch.cuda.set_sync_debug_mode("default")
        print(f"   syncbn {name}, set_sync_debug_mode('error'): " + "; ".join(results))


def small_model(run: Run, channels: int = 16) -> nn.Module:
    import syncbn

    torch.manual_seed(0)
    bn = syncbn.SyncBatchNorm2d(channels, process_group=run.group)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)
    return nn.Sequential(nn.Conv2d(8, channels, 3, padding=1), bn, nn.ReLU()).to(run.device)


def compare(name: str, got: torch.Tensor | None, want: torch.Tensor | None, rtol: float = 1e-5,
            atol: float = 1e-5) -> str | None:
    """None when equal within tolerance, else what differs."""
    if got is None or want is None:
        return None if got is None and want is None else f"{name}: one is None"
    try:
        torch.testing.assert_close(got, want, rtol=rtol, atol=atol)
        return None
    except AssertionError as e:
        return f"{name}: {first_lines(e, 2)}"


def capture_and_replay(run: Run, model: nn.Module, x_shape: tuple[int, ...], drain: bool) -> bool:
    """Warm up on a side stream, capture forward+backward, replay 3 times on fresh inputs
    against an eager copy; print what differs. True when everything matched."""
    from syncbn import _comm

    static_x = torch.randn(x_shape, device=run.device, requires_grad=True)
    bn = model[1] if isinstance(model, nn.Sequential) else model
    out_shape = (x_shape[0], bn.num_features, *x_shape[2:])
    static_dy = torch.randn(out_shape, device=run.device)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            model.zero_grad(set_to_none=True)
            static_x.grad = None
            model(static_x).backward(static_dy)
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    if drain:
        _comm.check_pending(wait=True)
    eager = copy.deepcopy(model)
    graph = torch.cuda.CUDAGraph()
    model.zero_grad(set_to_none=True)
    static_x.grad = None
    with torch.cuda.graph(graph):
        static_y = model(static_x)
        static_y.backward(static_dy)
    print("   captured")
    ok = True
    previous = bn.running_mean.clone()
    eager_bn = eager[1] if isinstance(eager, nn.Sequential) else eager
    for i in range(3):
        fresh = (torch.randn(x_shape, device=run.device) + i).requires_grad_()
        with torch.no_grad():
            static_x.copy_(fresh)
        graph.replay()
        torch.cuda.synchronize()
        eager.zero_grad(set_to_none=True)
        y = eager(fresh)
        y.backward(static_dy)
        problems = [p for p in (
            compare("output", static_y, y),
            compare("grad input", static_x.grad, fresh.grad, 1e-4, 1e-4),
            *(compare(f"grad {n}", p.grad, q.grad, 1e-4, 1e-4)
              for (n, p), q in zip(model.named_parameters(), eager.parameters())),
            compare("running_mean", bn.running_mean, eager_bn.running_mean),
            compare("running_var", bn.running_var, eager_bn.running_var),
            compare("num_batches_tracked", bn.num_batches_tracked, eager_bn.num_batches_tracked),
        ) if p]
        advanced = not torch.equal(bn.running_mean, previous)
        should_advance = x_shape[0] > 0
        if advanced != should_advance:
            problems.append(f"running_mean {'advanced' if advanced else 'did not advance'}")
        previous = bn.running_mean.clone()
        ok = ok and not problems
        print(f"   replay {i + 1}: " + ("equal to eager" + (", running stats advanced"
                                                            if advanced else "")
                                        if not problems else "; ".join(problems)))
    return ok


def section_graphs(run: Run) -> None:
    """4. torch.cuda.graph capture and replay."""
    if not run.cuda:
        print("needs CUDA: skipped")
        return
    force_module_sync()
    kernel("triton")
    for label, make, shape in (
            ("conv -> SyncBatchNorm2d -> relu, batch 8", lambda: small_model(run), (8, 8, 16, 16)),
            ("SyncBatchNorm2d alone, empty shard (batch 0)", lambda: small_model(run)[1],
             (0, 16, 8, 8))):
        print(f"-- {label}")
        for drain in (False, True):
            try:
                verdict = capture_and_replay(run, make(), shape, drain)
                print(f"   {'ok' if verdict else 'FAILED'}"
                      + (" (pending header checks drained before capture)" if drain else ""))
                break
            except Exception as e:
                print(f"   capture FAILED{' (drained first)' if drain else ''}: "
                      f"{type(e).__name__}: {first_lines(e, 4)}")
                print("   at: " + where(e))
                with contextlib.suppress(Exception):
                    torch.cuda.synchronize()


def section_compile(run: Run) -> None:
    """5. torch.compile(mode="reduce-overhead")."""
    if not run.cuda:
        print("needs CUDA (reduce-overhead uses CUDA graphs): skipped")
        return
    from torch._dynamo.utils import counters

    force_module_sync()
    kernel("triton")
    model = small_model(run)
    eager = copy.deepcopy(model)
    compiled = torch.compile(model, mode="reduce-overhead")
    dy = torch.randn(8, 16, 16, 16, device=run.device)
    ok = True
    for i in range(4):
        x = torch.randn(8, 8, 16, 16, device=run.device)
        torch.compiler.cudagraph_mark_step_begin()
        model.zero_grad(set_to_none=True)
        y = compiled(x)
        y.backward(dy)
        y = y.detach().clone()
        eager.zero_grad(set_to_none=True)
        ye = eager(x)
        ye.backward(dy)
        problems = [p for p in (
            compare("output", y, ye, 1e-4, 1e-4),
            *(compare(f"grad {n}", p.grad, q.grad, 1e-3, 1e-3)
              for (n, p), q in zip(model.named_parameters(), eager.parameters())),
            compare("running_mean", model[1].running_mean, eager[1].running_mean),
            compare("running_var", model[1].running_var, eager[1].running_var),
        ) if p]
        ok = ok and not problems
        print(f"   step {i + 1}: " + ("equal to eager" if not problems else "; ".join(problems)))
    skips = {k: v for k, v in counters["inductor"].items() if "cudagraph" in k}
    print(f"   inductor cudagraph counters: {skips or 'none (no skips recorded)'}")
    print(f"   {'ok' if ok else 'FAILED'}")


def section_numerics(run: Run) -> None:
    """6. variance accuracy at mean/std = 1e4, float32."""
    import syncbn
    from syncbn import _pass
    from torch.nn.modules._functions import SyncBatchNorm as TorchSyncBNFunction

    shape = (4, 8, 3, 3) if run.args.cpu_smoke else (8, 64, 28, 28)
    g = torch.Generator().manual_seed(1)
    x64 = 1e4 + torch.randn(shape, generator=g, dtype=torch.float64)
    x = x64.float().to(run.device)
    exact = x.double().cpu()  # the float32 input itself, in float64
    dims = [d for d in range(exact.dim()) if d != 1]
    var_b = exact.var(dim=dims, unbiased=False)
    var_u = exact.var(dim=dims, unbiased=True)
    c = shape[1]
    w, b = torch.ones(c, device=run.device), torch.zeros(c, device=run.device)
    print(f"input {'x'.join(map(str, shape))} float32, mean 1e4, std 1; max relative error of "
          "the batch variance vs float64 (target < 1e-6)")

    def rel(v: torch.Tensor, ref: torch.Tensor) -> float:
        return ((v.double().cpu() - ref) / ref).abs().max().item()

    for name in ("triton", "aten"):
        try:
            kernel(name)
            tag = syncbn._wire.LayerTag.for_layer("numerics", 0, "numerics")
            rm, rv = torch.zeros(c, device=run.device), torch.ones(c, device=run.device)
            _, stats = _pass.forward_pass(x, w, b, rm, rv, EPS, 1.0, run.group, tag)
            var = 1.0 / stats[c:2 * c].double() ** 2 - EPS
            print(f"   syncbn {name:>6}: stats (float64) {rel(var, var_b):.1e}, "
                  f"running_var (float32 buffer) {rel(rv, var_u):.1e}")
        except Exception as e:
            print(f"   syncbn {name}: FAILED: {type(e).__name__}: {first_lines(e)}")
    if run.cuda:
        try:
            rm, rv = torch.zeros(c, device=run.device), torch.ones(c, device=run.device)
            TorchSyncBNFunction.apply(x, w, b, rm, rv, EPS, 1.0, run.group, 1)
            print(f"   torch SyncBN: running_var (float32 buffer) {rel(rv, var_u):.1e}")
        except Exception as e:
            print(f"   torch SyncBN: FAILED: {type(e).__name__}: {first_lines(e)}")
    else:
        print("   torch SyncBN: refuses CPU tensors (n/a)")


def gloo_worker(rank: int, world: int, store_path: str, cpu_smoke: bool, iters: int) -> None:
    """One of the 2 gloo ranks: time syncbn-triton and torch SyncBN, rank 0 prints."""
    if cpu_smoke:
        os.environ["TRITON_INTERPRET"] = "1"
        smoke_tuning()
    os.environ["SYNCBN_KERNEL"] = "triton"
    import syncbn
    from syncbn._pass import SyncBatchNormFunction
    from torch.nn.modules._functions import SyncBatchNorm as TorchSyncBNFunction

    device = torch.device("cpu" if cpu_smoke else "cuda:0")
    store = dist.FileStore(store_path, world)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    group = dist.group.WORLD
    gid = syncbn._pass.group_id(group)
    cases = ([((4, 8, 3, 3), torch.float32, "contiguous")] if cpu_smoke else
             [((8, 64, 56, 56), torch.float32, "contiguous"),
              ((8, 256, 14, 14), torch.float32, "contiguous"),
              ((8, 64, 56, 56), torch.bfloat16, "channels_last"),
              ((64, 1024), torch.float32, "contiguous")])
    if rank == 0:
        print(f"{world} ranks over gloo, CUDA tensors on one GPU; median host ms per "
              "forward+backward (barrier, call, synchronize)")
        print(f"{'shape':>18} {'dtype':>8} {'layout':>13} {'BN':>8} {'SyncBN':>8} {'triton':>8} "
              f"{'tri/SyncBN':>10}", flush=True)
    for shape, dtype, layout in cases:
        torch.manual_seed(rank)
        c = shape[1]
        x = torch.randn(shape, device=device, dtype=dtype)
        if layout == "channels_last":
            x = x.contiguous(memory_format=torch.channels_last)
        x.requires_grad_()
        dy = torch.randn_like(x)
        w = torch.ones(c, device=device, requires_grad=True)
        b = torch.zeros(c, device=device, requires_grad=True)
        rm, rv = torch.zeros(c, device=device), torch.ones(c, device=device)
        tag = syncbn._wire.LayerTag.for_layer("gloo", 0, "gloo")
        layer = syncbn._pass.layer_id(tag)
        fns = {"BN": lambda: F.batch_norm(x, rm, rv, w, b, True, MOMENTUM, EPS),
               "triton": lambda: SyncBatchNormFunction.apply(x, w, b, rm, rv, EPS, MOMENTUM, gid,
                                                            layer)}
        if not cpu_smoke:
            fns["SyncBN"] = lambda: TorchSyncBNFunction.apply(x, w, b, rm, rv, EPS, MOMENTUM,
                                                              group, world)
        ms = {}
        for name, forward in fns.items():
            times = []
            for i in range(iters + 3):
                dist.barrier(group)
                t0 = time.perf_counter()
                torch.autograd.grad(forward(), (x, w, b), dy)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                if i >= 3:
                    times.append((time.perf_counter() - t0) * 1e3)
            ms[name] = statistics.median(times)
        s = ms.get("SyncBN", float("nan"))
        if rank == 0:
            print(f"{'x'.join(map(str, shape)):>18} {str(dtype)[6:]:>8} {layout:>13} "
                  f"{ms['BN']:8.3f} {s:8.3f} {ms['triton']:8.3f} {ms['triton'] / s:10.2f}",
                  flush=True)
    dist.barrier(group)
    dist.destroy_process_group()


def section_gloo(run: Run) -> None:
    """1b. 2 real ranks over gloo on the one GPU."""
    import torch.multiprocessing as mp

    store = os.path.join(tempfile.mkdtemp(), "store")
    mp.start_processes(gloo_worker, args=(2, store, run.args.cpu_smoke,
                                          3 if run.args.cpu_smoke else 30),
                       nprocs=2, join=True, start_method="spawn")


class Bottleneck(nn.Module):
    """1x1 -> 3x3 (stride) -> 1x1 (x4), BN after each conv, projection shortcut when needed."""

    def __init__(self, cin: int, mid: int, stride: int) -> None:
        super().__init__()
        cout = 4 * mid
        self.conv1, self.bn1 = nn.Conv2d(cin, mid, 1, bias=False), nn.BatchNorm2d(mid)
        self.conv2, self.bn2 = nn.Conv2d(mid, mid, 3, stride, 1, bias=False), nn.BatchNorm2d(mid)
        self.conv3, self.bn3 = nn.Conv2d(mid, cout, 1, bias=False), nn.BatchNorm2d(cout)
        self.down = None
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                      nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return F.relu(out + (x if self.down is None else self.down(x)))


def resnet50(width: int = 64, num_classes: int = 1000,
             depths: tuple[int, ...] = (3, 4, 6, 3)) -> nn.Sequential:
    """ResNet-50-style: 7x7/2 stem + BN + max-pool, bottleneck stages ``depths`` of widths
    ``width * (1, 2, 4, 8)`` (outputs x4: 256..2048 at width 64), average pool, linear."""
    layers: list[nn.Module] = [nn.Conv2d(3, width, 7, 2, 3, bias=False), nn.BatchNorm2d(width),
                               nn.ReLU(), nn.MaxPool2d(3, 2, 1)]
    cin = width
    for i, (blocks, mult) in enumerate(zip(depths, (1, 2, 4, 8))):
        for j in range(blocks):
            layers.append(Bottleneck(cin, width * mult, 2 if i > 0 and j == 0 else 1))
            cin = 4 * width * mult
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, num_classes)]
    return nn.Sequential(*layers)


def resnet_variant(run: Run, name: str, k: str | None, shape: tuple[int, ...]) -> float:
    """Build, compile, warm up and time one variant; print its line; the median step ms."""
    import syncbn

    smoke = run.args.cpu_smoke
    torch._dynamo.reset()  # variants run one after another: no stale graphs, no cache limits
    from torch._dynamo.utils import counters

    counters.clear()
    torch.manual_seed(0)
    model = resnet50(8, depths=(1, 1, 1, 1)) if smoke else resnet50(64)
    model = model.to(run.device).to(memory_format=torch.channels_last)
    if k:
        kernel(k)
        # the default group (run.group, the 1-rank WORLD): an explicit process_group breaks
        # fullgraph=True (_pass.group_id writes/reads a WeakValueDictionary while dynamo
        # traces: "does not know how to trace ... KeyedRef")
        model = syncbn.convert_sync_batchnorm(model)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(shape, generator=g).to(run.device).contiguous(
        memory_format=torch.channels_last)
    labels = torch.randint(0, 1000, (shape[0],), generator=g).to(run.device)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    backend = "aot_eager" if smoke else "inductor"
    autocast = (contextlib.nullcontext() if smoke
                else torch.autocast("cuda", dtype=torch.bfloat16))
    losses: list[float] = []

    def make_step(compiled: Callable[..., Any]) -> Callable[[], torch.Tensor]:
        def train_step() -> torch.Tensor:
            with autocast:
                loss = F.cross_entropy(compiled(x).float(), labels)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            return loss
        return train_step

    mode = "default"
    t0 = time.perf_counter()
    if k:  # syncbn's ops are registered for dynamo: try one graph first
        try:
            train_step = make_step(torch.compile(model, backend=backend, fullgraph=True))
            losses.append(train_step().item())
            mode = "fullgraph=True"
        except Exception as e:
            print(f"   {name}: fullgraph=True FAILED ({type(e).__name__}: {first_lines(e, 4)}); "
                  "compiling with graph breaks allowed")
            torch._dynamo.reset()
            opt.zero_grad(set_to_none=True)
    if not losses:
        train_step = make_step(torch.compile(model, backend=backend))
        losses.append(train_step().item())
    run.sync()
    first = time.perf_counter() - t0
    for _ in range(0 if smoke else run.args.warmup):
        train_step()
    times: list[float] = []
    for _ in range(2 if smoke else run.args.iters):
        if run.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            loss = train_step()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t1 = time.perf_counter()
            loss = train_step()
            times.append((time.perf_counter() - t1) * 1e3)
    losses.append(loss.item())
    breaks = sum(counters["graph_break"].values())
    ms = statistics.median(times)
    print(f"   {name:>7}: {ms:9.3f} ms/step (median of {len(times)}; min {min(times):.3f}); "
          f"compile + first step {first:.1f} s; torch.compile {mode}, {breaks} graph break(s); "
          f"loss {losses[0]:.3f} -> {losses[-1]:.3f}", flush=True)
    if not all(math.isfinite(v) for v in losses):
        print(f"   {name}: loss not finite: {losses}")
    return ms


def section_resnet(run: Run) -> None:
    """7. a compiled ResNet-50 training step: syncbn synchronizing vs plain BatchNorm."""
    smoke = run.args.cpu_smoke
    shape = (2, 3, 32, 32) if smoke else (run.args.resnet_batch, 3, 224, 224)
    force_module_sync()
    print(f"input {'x'.join(map(str, shape))} channels_last, "
          + ("float32, backend aot_eager (--cpu-smoke: width 8, one block per stage)" if smoke else
             "bf16 autocast, backend inductor")
          + "; step = forward + cross-entropy + backward + SGD(momentum) step; syncbn: 1 rank, "
          f"collective forced ({'NCCL' if run.cuda else 'gloo'}); "
          + ("2 timed steps after the compiling one" if smoke else
             f"{run.args.warmup} warm-up steps after the compiling one"))
    ms: dict[str, float] = {}
    took = 0.0
    if smoke:  # the interpreter: 53 layers, so the default (large) tiles, 2 programs
        import syncbn.backends.triton as bt

        bt.tuning = bt.Tuning(programs=2)
    for name, k, required in (("plain", None, True), ("triton", "triton", True),
                              ("aten", "aten", False)):
        need = 0.0 if required else took
        if run.left() < need:
            print(f"   {name:>7}: skipped (--budget {run.args.budget} s: {max(run.left(), 0):.0f} s "
                  f"left, the last variant took {took:.0f} s)")
            continue
        t0 = time.perf_counter()
        try:
            ms[name] = resnet_variant(run, name, k, shape)  # its model is freed on return
            if run.cuda:
                torch.cuda.empty_cache()
        except Exception as e:
            print(f"   {name:>7}: FAILED: {type(e).__name__}: {first_lines(e, 6)}")
            print("   at: " + where(e))
        took = time.perf_counter() - t0
    if "plain" in ms:
        for name in ("triton", "aten"):
            if name in ms:
                r = ms[name] / ms["plain"]
                verdict = "met" if r <= 1.02 else "NOT met"
                print(f"   {name}/plain = {r:.3f} (target <= 1.02x: {verdict}"
                      + (", --cpu-smoke: not a measurement" if smoke else "") + ")")


# ------------------------------------------------------------------------------------ helpers
def first_lines(e: BaseException, n: int = 3) -> str:
    lines = [line for line in str(e).strip().splitlines() if line.strip()]
    return " | ".join(lines[:n]) + (" | ..." if len(lines) > n else "")


def where(e: BaseException) -> str:
    """Where an exception was raised, innermost first: its last frame, then the last frames
    inside syncbn or this script (file:line function)."""
    frames = traceback.extract_tb(e.__traceback__)
    ours = [f for f in frames[:-1] if "syncbn" in f.filename or "gpu_triton" in f.filename]
    return " <- ".join(f"{os.path.basename(f.filename)}:{f.lineno} {f.name}"
                       for f in reversed(ours[-4:] + frames[-1:]))


def smoke_tuning() -> None:
    """Tiny tiles for the interpreter (several tiles and channel blocks, few programs)."""
    import syncbn.backends.triton as bt

    bt.tuning = bt.Tuning(elems=16, max_block_m=8, max_block_c=4, programs=2, pack_block_c=4,
                          block_z=64)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n".join(__doc__.splitlines()[1:]))
    parser.add_argument("--only", default=",".join(SECTIONS),
                        help=f"comma-separated sections, run in this order (default: all: "
                             f"{','.join(SECTIONS)})")
    parser.add_argument("--iters", type=int, default=50, help="timed iterations per contender")
    parser.add_argument("--warmup", type=int, default=10, help="warm-up calls per contender")
    parser.add_argument("--budget", type=float, default=None,
                        help="seconds after which the table skips its remaining rows (and the "
                             "resnet section its remaining variants)")
    parser.add_argument("--resnet-batch", type=int, default=32,
                        help="batch of the resnet section's 3x224x224 input (default 32)")
    parser.add_argument("--cpu-smoke", action="store_true",
                        help="no GPU: run the sections' code on CPU through Triton's "
                             "interpreter with tiny shapes (CUDA-only sections say skipped)")
    args = parser.parse_args()
    wanted = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = [s for s in wanted if s not in SECTIONS]
    if unknown:
        parser.error(f"--only: unknown section(s) {unknown}; expected some of {SECTIONS}")
    if not args.cpu_smoke and not torch.cuda.is_available():
        print("no CUDA device: nothing to measure")
        return 0
    if args.cpu_smoke:
        os.environ["TRITON_INTERPRET"] = "1"  # before syncbn builds its kernels
        args.iters, args.warmup = min(args.iters, 3), min(args.warmup, 1)
    run = Run(args)
    header(run)
    if args.cpu_smoke:
        smoke_tuning()
    kernel("triton")
    one_rank_group(run)
    for name in wanted:
        print(f"\n=== {name}: {globals()['section_' + name].__doc__}", flush=True)
        t0 = time.perf_counter()
        try:
            globals()["section_" + name](run)
        except Exception as e:  # every section reports, whatever the others did
            print(f"   section FAILED: {type(e).__name__}: {first_lines(e, 6)}")
            print("   at: " + where(e))
        print(f"   ({time.perf_counter() - t0:.1f} s)", flush=True)
    with contextlib.suppress(Exception):
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
