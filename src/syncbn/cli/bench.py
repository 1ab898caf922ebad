"""``syncbn bench``: how fast is syncbn, per layer and end to end, against torch and a textbook SyncBN.

Commands::

    syncbn bench                      # full run: CPU (GPU where available), a few minutes on 2 cores
    syncbn bench --quick              # short run (N=2 shapes, fewer iterations, small network)
    syncbn bench --out results/ --threads 1,2 --world-sizes 1,2
    syncbn bench --shapes 2x64x56x56,64x1024,cl:2x64x56x56 --no-e2e
    syncbn bench --no-layers --no-e2e                # only the activated-layer section
    SYNCBN_KERNEL=aten syncbn bench   # syncbn on its plain ATen path only

Four sections, each a table on stdout (at most 120 columns: the ratios that matter); every
number, per rank too, goes to ``--out/syncbn-bench.json`` (with torch version, machine, date,
threads, the fused kernel's build time and the command line). On a terminal a progress bar counts
the units of work (a shape at one world size and thread count; an end-to-end contender). The header line says whether syncbn's fused CPU kernel is used, how long its cold build
takes (measured in a subprocess with an empty cache) and how long this run took to get it.

1. Per layer: forward + backward of one batch-norm layer (ResNet-50-like shapes at small per-rank
   batch; ``NxCxHxW``, ``NxC`` for 1d, ``cl:`` prefix for channels_last), at each world size in
   ``--world-sizes`` (spawned gloo processes, or NCCL with one GPU per rank). Contenders, timed in
   the same processes, interleaved in rounds, median over all timed iterations after warm-up:

   * ``torch BN``: ``torch.nn.BatchNorm1d/2d``, unsynchronized (the floor);
   * ``syncbn``: at W >= 2 the real ``syncbn.SyncBatchNorm1d/2d`` module; at W = 1 (where the
     module falls back to plain BN, timed as ``fallback``) syncbn's synchronized path itself,
     ``SyncBatchNormFunction.apply`` over a 1-rank group;
   * ``textbook``: the SyncBN most pure-Python versions write: per-channel sum and sum of squares,
     one autograd-aware ``torch.distributed.nn.functional.all_reduce`` of ``[sum, sum_sq, count]``,
     ``(x - mean) * rsqrt(var + eps) * w + b`` with autograd doing the backward (also two
     collectives per forward+backward), running statistics updated under ``no_grad``;
   * ``aten``: the same syncbn contender with ``SYNCBN_KERNEL=aten`` (torch operators
     instead of the fused CPU kernel; includes two ``os.environ`` writes per iteration);
   * ``all_reduce``: one plain ``dist.all_reduce`` of the buffer syncbn sends for that layer
     (``syncbn._wire.length(...)`` float64): the collective's latency on its own.

   ``coll`` (in-situ collectives): the median time one syncbn iteration spent inside its two collectives
   (``syncbn._comm.collective_seconds``): the latency as the layer meets it, including the wait
   for the slower rank. ``compute`` = median over iterations of (syncbn time - in-situ
   collective time). ``BN+2AR`` = torch BN + 2 x all_reduce, the W >= 2 target for syncbn.

   The per-layer section runs once per ``--threads`` value (default 1,2). Combinations whose
   ranks x threads exceed the cores are skipped (say so, and ``--oversubscribe`` runs them):
   there every synchronizing contender waits on descheduled threads.

   Each shape is timed as if it were the only syncbn layer of the process (syncbn pads every
   buffer to the widest layer it has seen; the benchmark resets that between shapes). In a
   ResNet-50 every buffer is padded to 2048 channels; section 2 runs a whole network.

2. End to end: one training step (forward, backward, SGD step) of a ResNet-18-style network
   (BasicBlocks, BatchNorm after every conv: ``_bench_models.make_resnet18``) on ``--e2e-input`` per rank
   (default 2x3x64x64; --quick: 2x3x32x32 and half the widths), W=2 ranks under DDP (default
   options, so buffers are broadcast every forward in both contenders), plain BatchNorm vs
   ``syncbn.convert_sync_batchnorm`` on the default group (the one DDP's gradient all-reduces
   use) vs on a process group of its own (``dist.new_group``: its collectives cannot queue behind
   DDP's). Each contender runs in its own fresh processes. Median step time per rank (the table
   shows the slowest rank's median) and the median time per step inside syncbn's collectives.

3. Memory, from the same runs. CUDA: ``torch.cuda.max_memory_allocated`` over the steps. CPU: peak
   RSS growth of each rank over the steps: ``ru_maxrss`` (``resource.getrusage``) after the steps
   minus the resident set size (``/proc/self/statm``) right before the first step, after the model,
   data and optimizer exist. It counts what the allocator takes from the OS during the steps
   (activations, gradients, optimizer and communication buffers, allocator slack), at page
   granularity, not bytes torch allocated; the absolute peak RSS is in the JSON too.

4. Activated layers: one training step (forward, backward, SGD) of a ResNet-18-style network with
   leaky_relu(0.01) after the first batch norm of each block and the stem
   (``_bench_models.make_act_resnet``), on the same input as section 2, W=2 ranks under DDP,
   with the batch norms written three ways, each in fresh processes: ``unfused``
   (``syncbn.SyncBatchNorm2d`` then ``nn.LeakyReLU(0.01)``), ``fused``
   (``activation="leaky_relu"``) and ``inplace`` (``inplace=True`` as well, also on the batch
   norms without an activation). Per variant: the median step time, the peak memory as in
   section 3, the bytes the step keeps for its backward (the distinct storages of the tensors
   autograd saves, counted with ``torch.autograd.graph.saved_tensors_hooks``: exact, and
   independent of the allocator), and the first step's loss (the same in every variant when
   they compute the same). Before the steps every rank checks that its syncbn layers honour
   ``activation`` and ``inplace`` (a synchronized leaky_relu layer's output has the
   activation, an in-place layer's output is its input); the table says when they do not
   (then the fused and in-place numbers are not those of activated layers).

Spawned ranks: ``spawn`` start method, gloo over a ``FileStore`` in a temporary directory, a
timeout on ``init_process_group``, ``torch.set_num_threads(--threads)`` per rank; on CPU each
rank is bound to cores of its own (``os.sched_setaffinity``) when there are enough for every
rank's threads (``--no-pin`` turns that off; it applies to every contender alike: on this VM a
wake-up across cores costs tens of microseconds, which every collective pays several times); a
failing rank's traceback is printed and the run exits 1; ``--timeout`` bounds each launch.

Exit status: 0 done; 1 a rank failed or timed out; 2 bad options.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch

from ._args import UsageError, int_at_least, int_list, number_above, out_dir, shape, shape_list
from ._bench_models import make_resnet18, textbook_sync_bn
from ._launch import SpawnFailure, Ticker, joined, leave, place, progress_bar, run_spawned, tick
from ._table import table

FULL_SHAPES = ("2x64x56x56,2x128x28x28,2x256x14x14,2x512x7x7,2x2048x7x7,"
               "8x64x56x56,8x128x28x28,8x256x14x14,8x512x7x7,8x2048x7x7,64x1024,cl:2x64x56x56")
QUICK_SHAPES = "2x64x56x56,2x128x28x28,2x256x14x14,2x512x7x7,2x2048x7x7,64x1024,cl:2x64x56x56"
_PG_TIMEOUT_S = 120
EPS, MOMENTUM = 1e-5, 0.1


# --------------------------------------------------------------------------- options


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``bench`` subcommand to ``syncbn``'s subparsers; returns its parser."""
    p = subparsers.add_parser(
        "bench", help="time syncbn per layer and end to end against torch BN and a textbook SyncBN",
        description=__doc__.split("\n\n")[0] + " Tables on stdout, all numbers in "
        "OUT/syncbn-bench.json.", epilog="Exit status: 0 done, 1 a rank failed, 2 bad options. "
        "The manual: python -c 'import syncbn.cli.bench; help(syncbn.cli.bench)'")
    p.add_argument("--quick", action="store_true",
                   help="short run: N=2 shapes, fewer iterations, smaller network (< 1 min on 2 cores)")
    p.add_argument("--out", default=".", metavar="DIR", help="directory for syncbn-bench.json, "
                   "created if needed (default: the current directory)")
    p.add_argument("--threads", type=int_list, default=[1, 2], metavar="T[,T...]",
                   help="torch.set_num_threads in every rank; the per-layer section runs once per "
                   "value, the end-to-end step with the first (default: 1,2)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="'auto': CUDA when there is a GPU per rank, else CPU (default: %(default)s)")
    p.add_argument("--shapes", type=shape_list, default=None,
                   help="per-layer shapes, comma-separated NxCxHxW / NxC / cl:NxCxHxW "
                   "(default: the ResNet-50 set; --quick: its N=2 part)")
    p.add_argument("--world-sizes", type=int_list, default=[1, 2], metavar="W[,W...]",
                   help="world sizes of the per-layer section (default: 1,2)")
    p.add_argument("--iters", type=int_at_least(1), default=None,
                   help="timed iterations per contender and shape (default 100; --quick 10)")
    p.add_argument("--warmup", type=int_at_least(1), default=None,
                   help="warm-up iterations per contender and shape (default 10; --quick 2)")
    p.add_argument("--no-layers", action="store_true", help="skip the per-layer section")
    p.add_argument("--no-e2e", action="store_true", help="skip the end-to-end and memory sections")
    p.add_argument("--no-act", action="store_true",
                   help="skip the activated-layer section (in-place leaky_relu layers: memory "
                   "and step time)")
    p.add_argument("--e2e-input", type=shape, default=None, metavar="NxCxHxW",
                   help="per-rank input of the end-to-end step (default 2x3x64x64; --quick 2x3x32x32)")
    p.add_argument("--e2e-steps", type=int_at_least(1), default=None,
                   help="timed training steps per contender (default 30; --quick 5)")
    p.add_argument("--oversubscribe", action="store_true",
                   help="also run the per-layer world sizes whose ranks x threads exceed the CPU "
                   "cores (skipped by default: every synchronizing contender then waits on "
                   "descheduled threads, tens of ms per layer here)")
    p.add_argument("--no-pin", action="store_true",
                   help="do not bind each CPU rank to cores of its own (by default a rank gets "
                   "THREADS cores of its own when the machine has enough for every rank)")
    p.add_argument("--timeout", type=number_above(0), default=600.0, metavar="SECONDS",
                   help="seconds each launch of ranks may take (default: %(default)s)")
    p.set_defaults(run=run)
    return p


# --------------------------------------------------------------------------- timing helpers


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_rounds(contenders: dict[str, Callable[[], Any]], iters: int, warmup: int,
                 device: torch.device, barrier: Callable[[], None], rounds: int = 5) -> dict[str, dict]:
    """Median/min ms of each contender; contenders interleaved in ``rounds`` blocks.

    Also the median of each iteration's time minus the time it spent inside syncbn's
    collectives (``compute_median_ms``) and the median of that collective time."""
    from syncbn._comm import collective_seconds

    times: dict[str, list[float]] = {k: [] for k in contenders}
    waits: dict[str, list[float]] = {k: [] for k in contenders}
    for name, fn in contenders.items():
        barrier()
        for _ in range(warmup):
            fn()
    per_round = [iters // rounds + (1 if r < iters % rounds else 0) for r in range(rounds)]
    for n in per_round:
        for name, fn in contenders.items():
            barrier()
            for _ in range(n):
                _sync(device)
                w0 = collective_seconds()
                t0 = time.perf_counter()
                fn()
                _sync(device)
                times[name].append((time.perf_counter() - t0) * 1e3)
                waits[name].append((collective_seconds() - w0) * 1e3)
    return {k: {"median_ms": statistics.median(v), "min_ms": min(v), "n": len(v),
                "compute_median_ms": statistics.median(t - w for t, w in zip(v, waits[k])),
                "collective_median_ms": statistics.median(waits[k])}
            for k, v in times.items() if v}


# --------------------------------------------------------------------------- per layer


def _layer_rank(rank: int, world: int, device: torch.device, opts: dict[str, Any]) -> dict:
    rows = []
    for spec in opts["shapes"]:
        rows.append(_layer_row(spec, rank, world, device, opts))
        if rank == 0:
            tick(opts["progress"])
    return {"layers": rows}


def _layer_row(spec: dict[str, Any], rank: int, world: int, device: torch.device,
               opts: dict[str, Any]) -> dict:
    """Time every contender on one shape (all ranks run the same shapes in the same order)."""
    import torch.distributed as dist

    import syncbn
    from syncbn import _comm, _pass, _settings, _wire, backends
    from syncbn._pass import SyncBatchNormFunction

    group = dist.group.WORLD
    barrier = (lambda: dist.barrier()) if world > 1 else (lambda: None)
    shape, c = spec["shape"], spec["shape"][1]
    torch.manual_seed(rank)
    x = torch.randn(shape, device=device)
    if spec["layout"] == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    dy = torch.randn_like(x)
    two_d = len(shape) == 4
    bn = (torch.nn.BatchNorm2d(c) if two_d else torch.nn.BatchNorm1d(c)).to(device)
    sbn = (syncbn.SyncBatchNorm2d(c) if two_d else syncbn.SyncBatchNorm1d(c)).to(device)
    tb_w = torch.nn.Parameter(torch.ones(c, device=device))
    tb_b = torch.nn.Parameter(torch.zeros(c, device=device))
    tb_rm, tb_rv = torch.zeros(c, device=device), torch.ones(c, device=device)
    f_rm, f_rv = torch.zeros(c, device=device), torch.ones(c, device=device)
    tag = _wire.LayerTag.for_layer(f"bench.{spec['name']}", 0, f"bench layer {spec['name']}")
    state = _pass.LayerState(tag, lambda x: None)
    plans = {}

    def plan() -> _pass.Plan:  # the synchronized path even on one rank (the Function's cost)
        kernel_now = _settings.get().kernel
        if kernel_now not in plans:
            params = (sbn.weight, sbn.bias, f_rm, f_rv)
            plans[kernel_now] = _pass.synchronized_plan(state, x, params, group)
        return plans[kernel_now]

    buf = torch.zeros(_wire.length(_wire.width_for(c)), dtype=torch.float64, device=device)

    def torch_bn() -> None:
        x.grad = None
        bn(x).backward(dy)

    def syncbn_module() -> None:
        x.grad = None
        sbn(x).backward(dy)

    def syncbn_function() -> None:
        x.grad = None
        SyncBatchNormFunction.apply(x, sbn.weight, sbn.bias, f_rm, f_rv, EPS, MOMENTUM,
                                    plan()).backward(dy)

    kernel = os.environ.get("SYNCBN_KERNEL", "auto") or "auto"

    def on_aten_path(fn: Callable[[], None]) -> Callable[[], None]:
        def run() -> None:
            os.environ["SYNCBN_KERNEL"] = "aten"
            _settings.reload()
            try:
                fn()
            finally:
                os.environ["SYNCBN_KERNEL"] = kernel
                _settings.reload()
        return run

    def textbook() -> None:
        x.grad = None
        textbook_sync_bn(x, tb_w, tb_b, tb_rm, tb_rv, EPS, MOMENTUM, group).backward(dy)

    def all_reduce() -> None:
        dist.all_reduce(buf, group=group)

    contenders = {"torch_bn": torch_bn}
    if world == 1:
        contenders["syncbn"] = syncbn_function
        contenders["syncbn_fallback"] = syncbn_module
    else:
        contenders["syncbn"] = syncbn_module
    contenders["syncbn_aten"] = on_aten_path(contenders["syncbn"])
    contenders["textbook"] = textbook
    contenders["all_reduce"] = all_reduce
    res = _time_rounds(contenders, opts["iters"], opts["warmup"], device, barrier)
    row = {f"{k}_ms": v["median_ms"] for k, v in res.items()}
    for k in ("syncbn", "syncbn_aten"):
        row[f"{k}_compute_ms"] = res[k]["compute_median_ms"]
        row[f"{k}_collective_ms"] = res[k]["collective_median_ms"]
    return {"shape": spec["name"], "world_size": world, "rank": rank, "threads": opts["threads"],
            "fused": backends.describe(x, sbn.weight, sbn.bias, sbn.running_mean,
                                       sbn.running_var) == "fused",
            "transport": _comm.transport(group),
            "buffer_numbers": buf.numel(), **row}


# --------------------------------------------------------------------------- end to end


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _maxrss_bytes() -> int:
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb if sys.platform == "darwin" else kb * 1024


def _ddp_step_setup(model: torch.nn.Module, rank: int, device: torch.device,
                    opts: dict[str, Any]) -> tuple[Any, Any, torch.Tensor, torch.Tensor]:
    """DDP around ``model`` (on ``device``), its SGD, and this rank's batch (``--e2e-input``,
    seeded by the rank): ``(ddp, optimizer, x, y)``."""
    ddp = torch.nn.parallel.DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.01, momentum=0.9)
    torch.manual_seed(1 + rank)
    x = torch.randn(opts["e2e_input"], device=device)
    y = torch.randint(0, 10, (x.shape[0],), device=device)
    return ddp, opt, x, y


def _memory_base(device: torch.device) -> int:
    """What the peak of :func:`_memory_peak` is measured from (and its counter reset)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device)
    return _rss_bytes()


def _memory_peak(device: torch.device, base: int) -> dict[str, Any]:
    """The peak since :func:`_memory_base`, as the records store it."""
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
        method = "torch.cuda.max_memory_allocated"
    else:
        peak = _maxrss_bytes()
        method = "ru_maxrss after the steps minus RSS before the first step"
    return {"peak_growth_bytes": peak - base, "peak_bytes": peak, "method": method}


def _e2e_rank(rank: int, world: int, device: torch.device, opts: dict[str, Any]) -> dict:
    import torch.distributed as dist

    import syncbn

    torch.manual_seed(0)
    model = make_resnet18(opts["e2e_width"])
    group = None  # syncbn's: the default group, or one of its own
    if opts["contender"] == "syncbn":
        model = syncbn.convert_sync_batchnorm(model)
    elif opts["contender"] == "syncbn_own_group":  # a group of its own: not queued behind DDP's
        group = dist.new_group(list(range(world)))
        model = syncbn.convert_sync_batchnorm(model, group)
    ddp, opt, x, y = _ddp_step_setup(model.to(device), rank, device, opts)
    loss_fn = torch.nn.CrossEntropyLoss()

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        loss_fn(ddp(x), y).backward()
        opt.step()

    base = _memory_base(device)
    for _ in range(opts["warmup"]):
        step()
    from syncbn._comm import collective_seconds, transport

    times, waits = [], []
    for _ in range(opts["e2e_steps"]):
        dist.barrier()
        _sync(device)
        w0 = collective_seconds()
        t0 = time.perf_counter()
        step()
        _sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
        waits.append((collective_seconds() - w0) * 1e3)
    mem = _memory_peak(device, base)
    return {"e2e": {"contender": opts["contender"], "rank": rank, "world_size": world,
                    "step_median_ms": statistics.median(times), "step_min_ms": min(times),
                    "collective_median_ms": statistics.median(waits),
                    "transport": None if opts["contender"] == "torch_bn" else transport(group),
                    "steps": len(times), **mem}}


def _honoured(device: torch.device) -> dict[str, bool]:
    """Whether this process's syncbn layers apply ``activation`` and write ``inplace`` outputs
    over their input in a synchronized training pass (every rank runs it: it synchronizes)."""
    import syncbn

    layer = syncbn.SyncBatchNorm2d(2, activation="leaky_relu", activation_param=0.5,
                                   inplace=True).to(device)
    x = torch.linspace(-1.0, 1.0, 16, device=device).view(2, 2, 2, 2)
    xhat = torch.nn.functional.batch_norm(x, None, None, training=True)
    y = layer(x)
    activated = bool(torch.allclose(y.detach(), torch.nn.functional.leaky_relu(xhat, 0.5),
                                    atol=1e-4))
    return {"activation": activated, "inplace": y.data_ptr() == x.data_ptr()}


def _act_rank(rank: int, world: int, device: torch.device, opts: dict[str, Any]) -> dict:
    import torch.distributed as dist

    from ._bench_models import make_act_resnet

    honoured = _honoured(device)
    torch.manual_seed(0)
    model = make_act_resnet(opts["variant"], opts["e2e_width"]).to(device)
    ddp, opt, x0, y = _ddp_step_setup(model, rank, device, opts)
    loss_fn = torch.nn.CrossEntropyLoss()
    saved: dict[tuple[Any, int], int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        saved[(t.device, storage.data_ptr())] = storage.nbytes()
        return t

    def step(count: bool = False) -> float:
        opt.zero_grad(set_to_none=True)
        if count:
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                loss = loss_fn(ddp(x0), y)
        else:
            loss = loss_fn(ddp(x0), y)
        loss.backward()
        opt.step()
        return float(loss.detach())

    base = _memory_base(device)
    first_loss = step(count=True)  # the first step: the same weights in every variant
    params = {(p.device, p.untyped_storage().data_ptr()) for p in model.parameters()}
    saved_bytes = sum(n for key, n in saved.items() if key not in params)
    for _ in range(opts["warmup"]):
        step()
    times = []
    for _ in range(opts["e2e_steps"]):
        dist.barrier()
        _sync(device)
        t0 = time.perf_counter()
        step()
        _sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return {"act": {"variant": opts["variant"], "rank": rank, "world_size": world,
                    "step_median_ms": statistics.median(times), "step_min_ms": min(times),
                    "steps": len(times), "first_loss": first_loss,
                    "saved_for_backward_bytes": saved_bytes, **_memory_peak(device, base),
                    "honoured": honoured}}


# --------------------------------------------------------------------------- launching


def _rank_main(rank: int, world: int, store_path: str, result_path: str, task: str,
               opts: dict[str, Any]) -> None:
    """Entry point of a spawned rank."""
    torch.set_num_threads(opts["threads"])
    if opts.get("pin") and hasattr(os, "sched_setaffinity"):
        cores = sorted(os.sched_getaffinity(0))
        if len(cores) >= world * opts["threads"]:  # each rank on cores of its own
            os.sched_setaffinity(0, cores[rank * opts["threads"]:(rank + 1) * opts["threads"]])
    device, backend = place(opts["device"], "auto", rank, world)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    with joined(rank, world, store_path, backend, _PG_TIMEOUT_S):
        fn = {"layers": _layer_rank, "e2e": _e2e_rank, "act": _act_rank}[task]
        result = fn(rank, world, device, opts)
        result["backend"] = backend
        if task in ("e2e", "act") and rank == 0:
            tick(opts["progress"])
        torch.save(result, f"{result_path}.{rank}")
    leave()  # done and saved: skip the interpreter's teardown (see _launch.leave)


def _launch(world: int, task: str, opts: dict[str, Any], ticker: Ticker) -> list[dict]:
    """Run ``task`` on ``world`` spawned ranks; every rank's result. Rank 0 ticks ``ticker``'s
    file once per unit of work (a shape, or an end-to-end contender)."""
    with tempfile.TemporaryDirectory(prefix="syncbn-bench-") as tmpdir:
        result_path = os.path.join(tmpdir, "result")
        try:
            run_spawned(_rank_main, (world, os.path.join(tmpdir, "store"), result_path, task,
                                     {**opts, "progress": ticker.path}),
                        world, opts["timeout"], f"--timeout {opts['timeout']:g} s", ticker.poll)
        except SpawnFailure as e:
            raise SpawnFailure(f"{task} on {world} ranks: {e}") from None
        return [torch.load(f"{result_path}.{r}", weights_only=False) for r in range(world)]


# --------------------------------------------------------------------------- report


def _merge_layer_rows(per_rank: list[dict]) -> list[dict]:
    """One row per shape: the slowest rank's median for every contender (ranks wait on each other)."""
    merged = []
    for rows in zip(*(r["layers"] for r in per_rank)):
        row = {"shape": rows[0]["shape"], "world_size": rows[0]["world_size"],
               "threads": rows[0]["threads"], "fused": all(r["fused"] for r in rows),
               "buffer_numbers": rows[0]["buffer_numbers"],
               "transport": "/".join(sorted({r["transport"] for r in rows}))}
        for key in rows[0]:
            if key.endswith("_ms"):
                row[key] = max(r[key] for r in rows)
                row[key.replace("_ms", "_ms_per_rank")] = [r[key] for r in rows]
        row["syncbn_over_bn"] = row["syncbn_ms"] / row["torch_bn_ms"]
        row["aten_over_bn"] = row["syncbn_aten_ms"] / row["torch_bn_ms"]
        row["compute_over_bn"] = row["syncbn_compute_ms"] / row["torch_bn_ms"]
        row["textbook_over_syncbn"] = row["textbook_ms"] / row["syncbn_ms"]
        row["syncbn_minus_bn_plus_2ar_ms"] = (row["syncbn_ms"] - row["torch_bn_ms"]
                                              - 2 * row["all_reduce_ms"])
        merged.append(row)
    return merged


def layer_table(rows: list[dict]) -> str:
    """Section 1 as printed; the other numbers of each row are in the JSON."""
    header = ["shape", "W", "T", "BN ms", "syncbn ms", "syncbn/BN", "compute/BN",
              "coll us", "AR us", "BN+2AR ms", "aten/BN", "textbook/syncbn"]
    body = [[r["shape"], str(r["world_size"]), str(r["threads"]), f"{r['torch_bn_ms']:.3f}",
             f"{r['syncbn_ms']:.3f}", f"{r['syncbn_over_bn']:.2f}",
             f"{r['compute_over_bn']:.2f}", f"{r['syncbn_collective_ms'] * 1e3:.0f}",
             f"{r['all_reduce_ms'] * 1e3:.0f}",
             f"{r['torch_bn_ms'] + 2 * r['all_reduce_ms']:.3f}", f"{r['aten_over_bn']:.2f}",
             f"{r['textbook_over_syncbn']:.2f}"] for r in rows]
    return table(header, body)


def e2e_tables(e2e: dict[str, Any]) -> tuple[str, str]:
    """Sections 2 and 3 as printed (per-rank numbers: in the JSON)."""
    bn = e2e["torch_bn"]
    t_bn = max(r["step_median_ms"] for r in bn)
    rows = []
    for key, label in (("syncbn", "default group"), ("syncbn_own_group", "own group")):
        if key not in e2e:
            continue
        sb = e2e[key]
        t_sb = max(r["step_median_ms"] for r in sb)
        rows.append([label, str(sb[0].get("transport")), f"{t_bn:.1f}", f"{t_sb:.1f}",
                     f"{t_sb / t_bn:.3f}",
                     f"{max(r['collective_median_ms'] for r in sb):.1f}"])
    step = table(["syncbn's group", "transport", "BN step ms", "syncbn step ms", "syncbn/BN",
                  "in collectives ms"], rows)
    mib = 2**20
    rows = []
    for r_bn, r_sb in zip(bn, e2e["syncbn"]):
        rows.append([str(r_bn["rank"]), f"{r_bn['peak_growth_bytes'] / mib:.1f}",
                     f"{r_sb['peak_growth_bytes'] / mib:.1f}",
                     f"{r_sb['peak_growth_bytes'] / max(r_bn['peak_growth_bytes'], 1):.3f}",
                     f"{r_bn['peak_bytes'] / mib:.1f}", f"{r_sb['peak_bytes'] / mib:.1f}"])
    mem = table(["rank", "BN growth MiB", "syncbn growth MiB", "syncbn/BN", "BN peak MiB",
                 "syncbn peak MiB"], rows)
    return step, mem


def _units(args: argparse.Namespace, shapes: int, skip: Callable[[int, int], bool]) -> int:
    """How many units of work (a shape at one W and T; an end-to-end contender) the run has."""
    layers = 0 if args.no_layers else shapes * sum(
        not skip(w, t) for t in args.threads for w in args.world_sizes)
    return layers + (0 if args.no_e2e else 3) + (0 if args.no_act else 3)


def run(args: argparse.Namespace) -> int:
    """Run ``syncbn bench`` with parsed ``args``; returns the exit status (see the module doc)."""
    quick = args.quick
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda, but CUDA is not available")
    e2e_input = args.e2e_input or shape("2x3x32x32" if quick else "2x3x64x64")
    if len(e2e_input["shape"]) != 4 or e2e_input["layout"] != "contiguous":
        raise UsageError(f"--e2e-input {e2e_input['name']}: expected NxCxHxW")
    opts = {
        "threads": args.threads[0], "device": device, "pin": not args.no_pin,
        "shapes": args.shapes or shape_list(QUICK_SHAPES if quick else FULL_SHAPES),
        "iters": args.iters or (10 if quick else 100), "warmup": args.warmup or (2 if quick else 10),
        "timeout": args.timeout, "e2e_input": e2e_input["shape"],
        "e2e_width": 32 if quick else 64, "e2e_steps": args.e2e_steps or (5 if quick else 30),
    }
    out = out_dir(args.out)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (
        os.cpu_count() or 1)

    def skipped(world: int, threads: int) -> bool:
        return device == "cpu" and world * threads > cores and not args.oversubscribe

    report: dict[str, Any] = {
        "command": " ".join(["python -m syncbn" if sys.argv[0].endswith("__main__.py")
                             else Path(sys.argv[0]).name] + sys.argv[1:]),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__, "python": platform.python_version(),
        "machine": {"platform": platform.platform(), "processor": platform.processor(),
                    "machine": platform.machine(), "cpu_count": os.cpu_count(),
                    "gpu": torch.cuda.get_device_name() if device == "cuda" else None},
        "device": device, "threads": args.threads, "quick": quick,
        "kernel": _kernel_report(device),
        "allocator": _allocator_settings(),
        "options": {k: (list(v) if isinstance(v, tuple) else v) for k, v in opts.items()
                    if k != "shapes"} | {"shapes": [s["name"] for s in opts["shapes"]]},
    }
    t_start = time.monotonic()
    threads = ",".join(map(str, args.threads))
    print(f"syncbn bench: torch {torch.__version__}, {device}, {os.cpu_count()} CPUs, "
          f"{threads} thread(s) per rank{', quick' if quick else ''}", flush=True)
    print("memory allocator settings: " + (", ".join(f"{k}={v}" for k, v in
                                                    report["allocator"].items()) or
                                          "none (glibc defaults)"), flush=True)
    k = report["kernel"]
    print(f"fused CPU kernel (SYNCBN_KERNEL={k['mode']}): "
          + (f"cold build {k['cold_build_s']:.2f} s; this run {k['this_run']} it in "
             f"{k['this_run_s'] * 1e3:.1f} ms" if k["available"] else f"not used ({k['error']})"),
          flush=True)
    bar = progress_bar(_units(args, len(opts["shapes"]), skipped), "syncbn bench", "unit")
    with tempfile.TemporaryDirectory(prefix="syncbn-bench-progress-") as tmp:
        ticker = Ticker(os.path.join(tmp, "done"), bar)

        def launch(world: int, task: str, what: str, extra: dict[str, Any]) -> list[dict]:
            if bar is None:
                print(f"{what} ...", file=sys.stderr, flush=True)
            else:
                bar.set_postfix_str(what)
            return _launch(world, task, opts | extra, ticker)

        try:
            if not args.no_layers:
                _layers(args, opts, report, launch, skipped, cores)
            if not args.no_e2e:
                _end_to_end(opts, report, launch)
            if not args.no_act:
                _activated(opts, report, launch)
        finally:
            if bar is not None:
                bar.close()
    report["wall_s"] = time.monotonic() - t_start
    path = out / "syncbn-bench.json"
    path.write_text(json.dumps(report, indent=1) + "\n")
    print(f"\nwrote {path} ({report['wall_s']:.0f} s)")
    return 0


def _layers(args: argparse.Namespace, opts: dict[str, Any], report: dict[str, Any],
            launch: Callable[..., list[dict]], skipped: Callable[[int, int], bool],
            cores: int) -> None:
    """Section 1: every world size x thread count, then its table."""
    rows: list[dict] = []
    for t in args.threads:
        for world in args.world_sizes:
            if skipped(world, t):
                print(f"per layer, W={world}, {t} thread(s): skipped, {world} x {t} "
                      f"threads > {cores} cores (--oversubscribe runs it)", flush=True)
                report.setdefault("skipped", []).append(
                    {"world_size": world, "threads": t, "cores": cores})
                continue
            rows += _merge_layer_rows(launch(world, "layers", f"per layer, W={world}, T={t}",
                                             {"threads": t}))
    report["layers"] = rows
    print("\n1. Per layer: forward + backward, median ms (slowest rank), T threads per rank;\n"
          "   compute = syncbn minus its time in its two collectives (coll); AR = one plain\n"
          "   all_reduce of the same buffer; BN+2AR = torch BN + 2 AR, the target at W>1;\n"
          "   W=1: syncbn = its synchronized Function over a 1-rank group (the module falls\n"
          "   back to plain BN: fallback_ms in the JSON); aten = syncbn with SYNCBN_KERNEL=aten")
    moved = sorted({r["transport"] for r in rows if r["world_size"] > 1})
    print("   syncbn's collectives at W>1 went through: " + (", ".join(moved) or "-")
          + " (shm: shared memory between the ranks of this machine, SYNCBN_SHM)")
    aten = sorted({r["shape"] for r in rows if not r["fused"]})
    if aten:
        print("   on syncbn's ATen path (no fused kernel): " + ", ".join(aten))
    print()
    print(layer_table(rows), flush=True)


def _end_to_end(opts: dict[str, Any], report: dict[str, Any],
                launch: Callable[..., list[dict]]) -> None:
    """Sections 2 and 3: each contender in fresh ranks, then the two tables."""
    e2e: dict[str, Any] = {"network": f"resnet18-style width {opts['e2e_width']}",
                           "input": "x".join(map(str, opts["e2e_input"])),
                           "steps": opts["e2e_steps"], "warmup": opts["warmup"]}
    for contender in ("torch_bn", "syncbn", "syncbn_own_group"):
        results = launch(2, "e2e", f"end to end, {contender}", {"contender": contender})
        e2e[contender] = [r["e2e"] for r in results]
    t_bn = max(r["step_median_ms"] for r in e2e["torch_bn"])
    e2e["step_ratio"] = max(r["step_median_ms"] for r in e2e["syncbn"]) / t_bn
    e2e["own_group_step_ratio"] = max(
        r["step_median_ms"] for r in e2e["syncbn_own_group"]) / t_bn
    e2e["memory_ratio_per_rank"] = [
        s["peak_growth_bytes"] / max(b["peak_growth_bytes"], 1)
        for b, s in zip(e2e["torch_bn"], e2e["syncbn"])]
    report["e2e"] = e2e
    step, mem = e2e_tables(e2e)
    print(f"\n2. End to end: training step (forward, backward, SGD) of a {e2e['network']} on "
          f"{e2e['input']} per rank,\n   DDP on 2 ranks, median ms (slowest rank); syncbn "
          "on DDP's group or on a group of its own\n")
    print(step)
    print(f"\n3. Memory per rank over the steps ({e2e['syncbn'][0]['method']})\n")
    print(mem, flush=True)


def act_table(act: dict[str, Any]) -> str:
    """Section 4 as printed: per variant, the slowest rank's step, the largest rank's memory."""
    mib = 2**20
    unfused = act["unfused"]
    t0 = max(r["step_median_ms"] for r in unfused)
    g0 = max(r["peak_growth_bytes"] for r in unfused)
    s0 = max(r["saved_for_backward_bytes"] for r in unfused)
    rows = []
    for variant in ("unfused", "fused", "inplace"):
        ranks = act[variant]
        t = max(r["step_median_ms"] for r in ranks)
        g = max(r["peak_growth_bytes"] for r in ranks)
        saved = max(r["saved_for_backward_bytes"] for r in ranks)
        ok = all(r["honoured"]["activation"] for r in ranks)
        if variant == "inplace":
            ok = ok and all(r["honoured"]["inplace"] for r in ranks)
        rows.append([variant, f"{t:.1f}", f"{t / t0:.3f}", f"{saved / mib:.1f}",
                     f"{saved / max(s0, 1):.3f}", f"{g / mib:.1f}", f"{g / max(g0, 1):.3f}",
                     f"{ranks[0]['first_loss']:.6f}",
                     "-" if variant == "unfused" else "yes" if ok else "NO"])
    return table(["variant", "step ms", "step/unfused", "saved MiB", "saved/unfused",
                  "peak MiB", "peak/unfused", "first loss", "honoured"], rows)


def _activated(opts: dict[str, Any], report: dict[str, Any],
               launch: Callable[..., list[dict]]) -> None:
    """Section 4: each variant in fresh ranks, then its table."""
    from ._bench_models import ACT_VARIANTS

    act: dict[str, Any] = {"network": f"resnet18-style width {opts['e2e_width']}, leaky_relu "
                                      "0.01", "input": "x".join(map(str, opts["e2e_input"])),
                           "steps": opts["e2e_steps"], "warmup": opts["warmup"]}
    for variant in ACT_VARIANTS:
        results = launch(2, "act", f"activated layers, {variant}", {"variant": variant})
        act[variant] = [r["act"] for r in results]
    for variant in ACT_VARIANTS[1:]:
        act[f"{variant}_step_ratio"] = (max(r["step_median_ms"] for r in act[variant])
                                        / max(r["step_median_ms"] for r in act["unfused"]))
        act[f"{variant}_peak_ratio"] = (
            max(r["peak_growth_bytes"] for r in act[variant])
            / max(max(r["peak_growth_bytes"] for r in act["unfused"]), 1))
        act[f"{variant}_saved_ratio"] = (
            max(r["saved_for_backward_bytes"] for r in act[variant])
            / max(max(r["saved_for_backward_bytes"] for r in act["unfused"]), 1))
    act["honoured"] = all(r["honoured"]["activation"] and r["honoured"]["inplace"]
                          for v in ACT_VARIANTS[1:] for r in act[v])
    report["act"] = act
    print(f"\n4. Activated layers: training step (forward, backward, SGD) of a {act['network']}"
          f"\n   on {act['input']} per rank, DDP on 2 ranks. unfused = SyncBatchNorm2d + "
          "nn.LeakyReLU(0.01); fused =\n   activation=\"leaky_relu\"; inplace = that and "
          "inplace=True. step: median ms (slowest rank); saved:\n   what autograd keeps for "
          "the backward (distinct storages, no parameters; the largest rank);\n   peak: "
          f"{act['unfused'][0]['method']} (the largest rank);\n   honoured: the layers "
          "apply activation (and inplace) in a synchronized pass\n")
    print(act_table(act), flush=True)
    if not act["honoured"]:
        print("\n   NOTE: this syncbn's layers do not honour activation/inplace yet (honoured = NO):"
              "\n   the fused and inplace rows are not those of activated layers.", flush=True)


_ALLOCATOR_VARIABLES = ("MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TOP_PAD_",
                        "GLIBC_TUNABLES", "LD_PRELOAD")


def _allocator_settings() -> dict[str, str]:
    """The environment variables that change how freed memory goes back to the OS (and so how
    many page faults each pass takes, for torch and syncbn alike), where they are set."""
    return {k: os.environ[k] for k in _ALLOCATOR_VARIABLES if os.environ.get(k)}


def _kernel_report(device: str) -> dict[str, Any]:
    """The fused kernel's cold build time (a fresh cache, in a subprocess) and cached load time."""
    import subprocess

    from syncbn import _settings
    from syncbn._native import kernel as _kernel

    mode = _settings.get().kernel
    info: dict[str, Any] = {"mode": mode, "available": False, "error": None,
                            "cold_build_s": None, "this_run": None, "this_run_s": None}
    if device != "cpu" or mode == "aten":
        info["error"] = "not a CPU run" if device != "cpu" else "SYNCBN_KERNEL=aten"
        return info
    code = ("from syncbn._native import kernel as _kernel; _kernel.get(); "
            "print(_kernel.build_info()['seconds'] if _kernel.build_info()['compiled'] else -1)")
    with tempfile.TemporaryDirectory(prefix="syncbn-kernel-") as cache:
        env = {**os.environ, "SYNCBN_CACHE_DIR": cache, "SYNCBN_KERNEL": "fused"}
        proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                              text=True, timeout=600, check=False)
    lib = _kernel.get(warn=True)
    if proc.returncode == 0 and lib is not None:
        built = _kernel.build_info()
        info.update(available=True, cold_build_s=float(proc.stdout.split()[-1]),
                    this_run="built" if built["compiled"] else "loaded from the cache",
                    this_run_s=built["seconds"], path=built["path"], flags=built["flags"])
    else:
        info["error"] = _kernel.build_info()["error"] or proc.stderr.strip()[-300:]
    return info
