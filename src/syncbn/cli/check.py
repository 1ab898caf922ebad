"""``syncbn check``: is syncbn exact on *these* devices, with *this* backend? And how fast?

Commands::

    syncbn check                                   # 2 spawned CPU processes, gloo
    syncbn check --world-size 4 --dtype float64    # 4 processes; rank 1's shard is empty
    torchrun --nproc-per-node 8 -m syncbn check    # one rank per GPU: NCCL (CPU + gloo if no GPU)
    torchrun --nnodes 2 --node-rank 0 --nproc-per-node 8 --rdzv-backend c10d \\
        --rdzv-endpoint HOST0:29400 -m syncbn check  # and --node-rank 1 on the second machine

What it does. Every rank builds the same global batch from ``--seed`` (float64, then cast to
``--dtype``) and takes its own shard of it; shards differ in size (``--batch + rank % 3``), and
with 3 or more ranks rank 1's shard is empty. A :class:`syncbn.SyncBatchNorm2d` layer on the
rank's device runs two training steps (forward, backward with given upstream gradients), and the
rank compares, against plain float64 ``torch.nn.BatchNorm2d`` on the concatenated global batch
computed on its CPU:

* the forward output and ``grad_input`` of its shard,
* ``weight``/``bias`` gradients summed over ranks (each rank holds its share),
* the running mean and variance (and checks that they are bitwise identical on every rank).

Each error is ``max |syncbn - reference| / max(1, max |reference|)``; the tolerance is 1e-10 for
float64 and 1e-5 for float32. Then it times, on the same devices, the forward collective alone
(an ``all_reduce`` of as many float64 as syncbn sends: ``2C + 1`` padded to the widest layer,
at least 64 channels, plus a 14-number header) and one layer's forward +
backward on the rank's shard (both including their collectives; medians over ``--iters``).

Output: one line per rank (rank, host, device, backend, shard size, the largest errors, PASS or
FAIL, all_reduce latency, layer time, syncbn's path and transport), printed by rank 0, then a
verdict.

Launch. Without torchrun it spawns ``--world-size`` processes itself (spawn start method, gloo
over a ``FileStore`` in a temporary directory, one thread each; ``--device cuda`` puts rank r on
GPU ``r % count`` with NCCL when every rank has its own GPU, else gloo) and waits for them at most
``--timeout`` seconds; a failing rank's traceback is printed and the others are stopped. Under
torchrun (``RANK``/``WORLD_SIZE`` set) it joins torchrun's group from ``env://``: with
``--device auto`` NCCL on ``cuda:LOCAL_RANK`` when every local rank has a GPU, else gloo on the
CPU.

Exit status: 0 every rank matches; 1 a mismatch, or a rank failed or timed out; 2 bad options.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import tempfile
import textwrap
import time
from typing import Any

import torch
from torch import Tensor

from ._args import UsageError, int_at_least, number_above
from ._launch import (SpawnFailure, join_torchrun, joined, leave, place, run_spawned,
                      torchrun_env)
from ._table import WIDTH, table

__all__ = ["TOLERANCES", "add_parser", "run", "shard_sizes"]

#: Largest allowed ``max |syncbn - reference| / max(1, max |reference|)`` per dtype.
TOLERANCES = {"float64": 1e-10, "float32": 1e-5}
_DTYPES = {"float64": torch.float64, "float32": torch.float32}
_QUANTITIES = ("output", "grad_input", "grad_weight", "grad_bias", "running_mean", "running_var")
_STEPS = 2
_WARMUP = 3


def shard_sizes(world_size: int, batch: int) -> list[int]:
    """Samples per rank: ``batch + rank % 3``, and rank 1 empty when there are 3 or more ranks.

    >>> shard_sizes(2, 4), shard_sizes(4, 4)
    ([4, 5], [4, 0, 6, 4])
    """
    sizes = [batch + r % 3 for r in range(world_size)]
    if world_size >= 3:
        sizes[1] = 0
    return sizes


# --------------------------------------------------------------------------- command line


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``check`` subcommand to ``syncbn``'s subparsers; returns its parser."""
    p = subparsers.add_parser(
        "check",
        help="verify syncbn against a float64 single-process reference on your devices/backend",
        description=(
            "Run a SyncBatchNorm2d layer on uneven shards (one empty with 3+ ranks) on every "
            "rank, compare output, grad_input, summed weight/bias grads and running stats with "
            "plain float64 BatchNorm on the concatenated batch (tolerance: float64 1e-10, "
            "float32 1e-5, relative to the largest value), and time the all_reduce syncbn makes "
            "and one layer's forward+backward. Spawns --world-size CPU processes (gloo), or runs "
            "one rank per process under torchrun (NCCL on GPUs)."
        ),
        epilog="Exit status: 0 all ranks match, 1 mismatch or a rank failed, 2 bad options. "
        "The manual: python -c 'import syncbn.cli.check; help(syncbn.cli.check)'",
    )
    p.add_argument("-W", "--world-size", type=int_at_least(2), default=None, metavar="W",
                   help="number of processes to spawn (default: 2; under torchrun: its "
                   "WORLD_SIZE)")
    p.add_argument("--dtype", choices=sorted(_DTYPES), default="float32",
                   help="data and parameter dtype (default: %(default)s)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="'auto': CUDA when every local rank has a GPU under torchrun, else CPU; "
                   "spawned processes use the CPU unless 'cuda' (default: %(default)s)")
    p.add_argument("--backend", choices=("auto", "gloo", "nccl"), default="auto",
                   help="'auto': NCCL on CUDA when every local rank has its own GPU, else gloo "
                   "(default: %(default)s)")
    p.add_argument("-C", "--channels", type=int_at_least(1), default=32,
                   help="channels C of the layer (default: %(default)s)")
    p.add_argument("-b", "--batch", type=int_at_least(1), default=4,
                   help="base shard size: rank r gets batch + r %% 3 samples (default: "
                   "%(default)s)")
    p.add_argument("--size", type=int_at_least(1), default=8,
                   help="height and width of each sample (default: %(default)s)")
    p.add_argument("--iters", type=int_at_least(1), default=20,
                   help="timed iterations (after 3 warm-ups) (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="data seed (default: %(default)s)")
    p.add_argument("--timeout", type=number_above(0), default=180.0, metavar="SECONDS",
                   help="process-group timeout, and how long to wait for spawned ranks "
                   "(default: %(default)s)")
    # For the tests: shift this rank's input by +1 so that the check must fail.
    p.add_argument("--inject-error", type=int, default=None, metavar="RANK",
                   help=argparse.SUPPRESS)
    p.set_defaults(run=run)
    return p


def _options(args: argparse.Namespace) -> dict[str, Any]:
    return {k: getattr(args, k) for k in ("dtype", "device", "backend", "channels", "batch",
                                          "size", "iters", "seed", "timeout", "inject_error")}


# --------------------------------------------------------------------------- one rank


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _error(actual: Tensor, expected: Tensor) -> float:
    """``max |actual - expected| / max(1, max |expected|)`` (0 for empty tensors)."""
    if expected.numel() == 0:
        return 0.0
    diff = (actual.detach().double().cpu() - expected.double()).abs().max().item()
    if diff != diff:  # NaN
        return float("inf")
    return diff / max(1.0, expected.abs().max().item())


def _reference(shards: list[Tensor], grads: list[Tensor], weight: Tensor, bias: Tensor
               ) -> list[dict[str, Any]]:
    """Plain float64 BatchNorm2d on ``torch.cat(shards)``, ``_STEPS`` training steps."""
    bn = torch.nn.BatchNorm2d(weight.numel(), dtype=torch.float64)
    with torch.no_grad():
        bn.weight.copy_(weight)
        bn.bias.copy_(bias)
    sizes = [s.shape[0] for s in shards]
    steps = []
    for _ in range(_STEPS):
        bn.zero_grad()
        x = torch.cat([s.double() for s in shards]).requires_grad_()
        y = bn(x)
        y.backward(torch.cat([g.double() for g in grads]))
        steps.append({
            "output": y.detach().split(sizes), "grad_input": x.grad.split(sizes),
            "grad_weight": bn.weight.grad.clone(), "grad_bias": bn.bias.grad.clone(),
            "running_mean": bn.running_mean.clone(), "running_var": bn.running_var.clone(),
        })
    return steps


def check_rank(rank: int, world_size: int, device: torch.device, opts: dict[str, Any],
               group: Any = None) -> dict[str, Any]:
    """Run the check on this rank (inside an initialized process group); returns its row."""
    import torch.distributed as dist

    import syncbn

    dtype = _DTYPES[opts["dtype"]]
    c, s = opts["channels"], opts["size"]
    sizes = shard_sizes(world_size, opts["batch"])
    g = torch.Generator().manual_seed(opts["seed"])
    offsets = torch.linspace(-1.0, 1.0, c, dtype=torch.float64).view(1, c, 1, 1)
    x_all = (torch.randn(sum(sizes), c, s, s, generator=g, dtype=torch.float64) + offsets).to(dtype)
    dy_all = torch.randn(sum(sizes), c, s, s, generator=g, dtype=torch.float64).to(dtype)
    weight = torch.rand(c, generator=g, dtype=torch.float64) + 0.5
    bias = torch.randn(c, generator=g, dtype=torch.float64)
    shards, grads = list(x_all.split(sizes)), list(dy_all.split(sizes))
    ref = _reference(shards, grads, weight, bias)

    layer = syncbn.SyncBatchNorm2d(c, process_group=group, device=device, dtype=dtype)
    with torch.no_grad():
        layer.weight.copy_(weight)
        layer.bias.copy_(bias)
    x_in = shards[rank].to(device)
    if opts.get("inject_error") == rank:
        x_in = x_in + 1.0  # a rank with the wrong data: every rank's statistics are off
    errors = dict.fromkeys(_QUANTITIES, 0.0)
    for step in range(_STEPS):
        layer.zero_grad()
        x = x_in.clone().requires_grad_()
        y = layer(x)
        y.backward(grads[rank].to(device))
        dw = layer.weight.grad.detach().clone()
        db = layer.bias.grad.detach().clone()
        dist.all_reduce(dw, group=group)  # each rank holds its share; the sum is the global grad
        dist.all_reduce(db, group=group)
        got = {"output": y, "grad_input": x.grad, "grad_weight": dw, "grad_bias": db,
               "running_mean": layer.running_mean, "running_var": layer.running_var}
        for key in _QUANTITIES:
            exp = ref[step][key][rank] if key in ("output", "grad_input") else ref[step][key]
            errors[key] = max(errors[key], _error(got[key], exp))
    running = torch.cat([layer.running_mean, layer.running_var]).double().cpu().tolist()

    # Timing: the forward collective alone, then one layer's forward + backward.
    buffer = torch.zeros(syncbn._wire.length(syncbn._wire.width_for(c)), dtype=torch.float64,
                         device=device)
    times = []
    for i in range(_WARMUP + opts["iters"]):
        _sync(device)
        t0 = time.perf_counter()
        dist.all_reduce(buffer, group=group)
        _sync(device)
        if i >= _WARMUP:
            times.append(time.perf_counter() - t0)
    allreduce_us = statistics.median(times) * 1e6
    timed = syncbn.SyncBatchNorm2d(c, process_group=group, device=device, dtype=dtype)
    dy = grads[rank].to(device)
    times = []
    for i in range(_WARMUP + opts["iters"]):
        x = x_in.clone().requires_grad_()
        _sync(device)
        t0 = time.perf_counter()
        timed(x).backward(dy)
        _sync(device)
        if i >= _WARMUP:
            times.append(time.perf_counter() - t0)
    layer_ms = statistics.median(times) * 1e3

    tol = TOLERANCES[opts["dtype"]]
    path = syncbn.backends.describe(x_in, timed.weight, timed.bias, timed.running_mean,
                                    timed.running_var)
    return {
        "rank": rank, "host": socket.gethostname(), "device": str(device), "path": path,
        "transport": syncbn._comm.transport(group),
        "backend": str(dist.get_backend(group)), "shard": sizes[rank], "errors": errors,
        "max_error": max(errors.values()), "ok": all(e <= tol for e in errors.values()),
        "running": running, "allreduce_us": allreduce_us, "layer_ms": layer_ms,
    }


def _gather_rows(row: dict[str, Any], group: Any = None) -> list[dict[str, Any]]:
    """Every rank's row, on every rank; marks rows whose running stats differ from rank 0's."""
    import torch.distributed as dist

    rows: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(rows, row, group=group)
    first = rows[0]["running"]
    for r in rows:
        r["identical_running_stats"] = r["running"] == first
        r["ok"] = r["ok"] and r["identical_running_stats"]
        del r["running"]
    return rows


# --------------------------------------------------------------------------- report


def format_table(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    """The per-rank table and the verdict, as printed (at most 120 columns)."""
    tol = TOLERANCES[meta["dtype"]]
    head = ("rank", "host", "device", "backend", "shard", "output", "grad_in", "grad_w/b",
            "running", "result", "AR us", "layer ms", "path", "transport")
    lines, notes = [], []
    for r in rows:
        e = r["errors"]
        path, _, why = r["path"].partition(" ")
        if why:
            notes.append(f"rank {r['rank']}: syncbn's {path} path {why}")
        if not r["identical_running_stats"]:
            notes.append(f"rank {r['rank']}: its running statistics differ from rank 0's")
        lines.append((
            str(r["rank"]), _short_host(r["host"]), r["device"], r["backend"], str(r["shard"]),
            f"{e['output']:.1e}", f"{e['grad_input']:.1e}",
            f"{max(e['grad_weight'], e['grad_bias']):.1e}",
            f"{max(e['running_mean'], e['running_var']):.1e}", "PASS" if r["ok"] else "FAIL",
            f"{r['allreduce_us']:.0f}", f"{r['layer_ms']:.2f}", path, r["transport"],
        ))
    head_lines = [
        f"syncbn check: syncbn {meta['syncbn_version']}, torch {meta['torch_version']}, "
        f"{meta['world_size']} ranks ({meta['launcher']}), {meta['dtype']}, C={meta['channels']}, "
        f"{meta['size']}x{meta['size']} samples, shards {meta['sizes']}",
        f"output ... running: max |syncbn - float64 reference| / max(1, max |reference|), "
        f"tolerance {tol:g}",
        f"AR: one all_reduce of the forward's {meta['buffer']} float64 through the backend; "
        f"layer: forward+backward on the rank's shard; medians of {meta['iters']}",
        "path: syncbn's fused CPU kernel or its ATen path (SYNCBN_KERNEL); transport: shm "
        "(shared memory between the ranks of one machine, SYNCBN_SHM) or the backend",
    ]
    out = [
        *(textwrap.fill(line, WIDTH, subsequent_indent="  ") for line in head_lines),
        "",
        table(head, lines, left=5),
        *notes,
        "",
    ]
    bad = [r["rank"] for r in rows if not r["ok"]]
    if bad:
        out.append(f"FAIL: ranks {bad} do not match the float64 reference within {tol:g}")
    else:
        out.append(f"PASS: all {len(rows)} ranks match the float64 reference within {tol:g}")
    return "\n".join(out)


def _short_host(host: str) -> str:
    """The host name without its domain, at most 16 characters (the table fits 120 columns)."""
    name = host.split(".")[0]
    return name if len(name) <= 16 else name[:15] + "~"


def _meta(world_size: int, launcher: str, opts: dict[str, Any]) -> dict[str, Any]:
    from .. import __version__, _wire

    return {"syncbn_version": __version__, "torch_version": torch.__version__,
            "world_size": world_size, "launcher": launcher,
            "sizes": shard_sizes(world_size, opts["batch"]),
            "buffer": _wire.length(_wire.width_for(opts["channels"])), **opts}


# --------------------------------------------------------------------------- launching


def _spawned_rank(rank: int, world_size: int, store_path: str, result_path: str,
                  opts: dict[str, Any]) -> None:
    """Entry point of a spawned rank (top level, so that the spawn start method can import it)."""
    torch.set_num_threads(1)
    device, backend = place(opts["device"], opts["backend"], rank, world_size)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    with joined(rank, world_size, store_path, backend, opts["timeout"]):
        rows = _gather_rows(check_rank(rank, world_size, device, opts))
        if rank == 0:
            with open(result_path, "w") as f:
                json.dump(rows, f)
    leave()  # done and saved: skip the interpreter's teardown (see _launch.leave)


def _spawn(world_size: int, opts: dict[str, Any]) -> list[dict[str, Any]]:
    with tempfile.TemporaryDirectory(prefix="syncbn-check-") as tmpdir:
        result_path = os.path.join(tmpdir, "rows.json")
        run_spawned(_spawned_rank, (world_size, os.path.join(tmpdir, "store"), result_path, opts),
                    world_size, opts["timeout"] + 30.0,  # + start-up
                    f"--timeout {opts['timeout']:g} s (+30 s to start)")
        if not os.path.exists(result_path):
            raise SpawnFailure("rank 0 finished without writing its results")
        with open(result_path) as f:
            return json.load(f)  # type: ignore[no-any-return]


def run(args: argparse.Namespace) -> int:
    """Run ``syncbn check`` with parsed ``args``; returns the exit status (see the module doc)."""
    import torch.distributed as dist

    opts = _options(args)
    if not dist.is_available():
        raise UsageError("torch.distributed is not available in this build of PyTorch")
    env = torchrun_env()
    if env is not None:
        if args.world_size is not None and args.world_size != env.world_size:
            raise UsageError(f"--world-size {args.world_size}, but torchrun started "
                             f"{env.world_size} ranks; leave --world-size out under torchrun")
        device, backend = place(opts["device"], opts["backend"], env.local_rank,
                                env.local_world_size)
        if device.type == "cuda":
            torch.cuda.set_device(device)
        join_torchrun(env, backend, opts["timeout"])
        try:
            if env.world_size == 1:
                print("syncbn check: warning: one rank, so nothing is synchronized (syncbn is "
                      "plain BatchNorm here); start at least 2 ranks", file=sys.stderr)
            rows = _gather_rows(check_rank(env.rank, env.world_size, device,
                                           {**opts, "backend": backend}))
        finally:  # also a group the caller made: check's use of it ends the group's life
            dist.destroy_process_group()
        if env.rank == 0:
            print(format_table(rows, _meta(env.world_size, "torchrun", opts)), flush=True)
        return 0 if all(r["ok"] for r in rows) else 1
    world = args.world_size or 2
    if opts["device"] == "auto":
        opts["device"] = "cpu"  # spawned processes use the CPU unless told otherwise
    _, opts["backend"] = place(opts["device"], opts["backend"], 0, world)  # checked here
    meta = _meta(world, "spawned", opts)
    print(f"syncbn check: spawning {world} processes ({opts['device']}, {opts['backend']})...",
          file=sys.stderr, flush=True)
    rows = _spawn(world, opts)
    print(format_table(rows, meta), flush=True)
    return 0 if all(r["ok"] for r in rows) else 1
