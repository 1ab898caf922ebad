"""How the command-line tools start their ranks: one launcher, one device rule, one progress bar.

* Spawned: :func:`run_spawned` starts ``nprocs`` processes (spawn start method), waits with a
  deadline, turns a rank's exception or death into a :class:`SpawnFailure` that names the rank
  and leaves no rank running (also on Ctrl-C or SIGTERM); each rank joins a gloo/NCCL group over
  a ``FileStore`` with :func:`joined` and ends with :func:`leave`.
* Under torchrun (``RANK`` and ``WORLD_SIZE`` set, see :func:`torchrun_env`), every process is a
  rank and joins torchrun's group from ``env://`` (:func:`join_torchrun`).
* Device and backend (:func:`place`), the same for both: ``cpu`` is gloo on the CPU; ``cuda`` puts
  local rank r on GPU ``r % count``, with NCCL when every local rank has a GPU of its own, else
  gloo (NCCL cannot put two ranks on one GPU); ``auto`` (:func:`resolve_device`) is ``cuda`` when
  every local rank has a GPU, else ``cpu``.
* Progress (:func:`progress_bar`): a tqdm bar on stderr when it is a terminal and tqdm is
  installed, else ``None`` (the caller prints a line per unit of work instead). Spawned ranks
  report units of work to the launching process through a file (:class:`Ticker`).
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch

from ._args import UsageError

__all__ = ["SpawnFailure", "Ticker", "TorchrunEnv", "join_torchrun", "joined", "leave", "place",
           "progress_bar", "resolve_device", "run_spawned", "tick", "torchrun_env"]


class SpawnFailure(Exception):
    """A rank failed or timed out; the message says which and why (exit status 1)."""


# --------------------------------------------------------------------------- spawned ranks


def run_spawned(fn: Callable[..., None], args: tuple[Any, ...], nprocs: int, timeout: float,
                what: str, poll: Callable[[], None] | None = None) -> None:
    """Run ``fn(rank, *args)`` on ``nprocs`` spawned processes and wait at most ``timeout`` s,
    calling ``poll()`` about twice a second meanwhile (e.g. :meth:`Ticker.poll`).

    ``what`` describes the limit in the timeout message (e.g. ``"--timeout 900 s"``).
    """
    import torch.multiprocessing as tmp

    ctx = tmp.start_processes(fn, args=args, nprocs=nprocs, join=False, start_method="spawn")
    deadline = time.monotonic() + timeout
    previous = _stop_on_sigterm()
    try:
        while not ctx.join(timeout=0.5, grace_period=5.0):
            if poll is not None:
                poll()
            if time.monotonic() > deadline:
                running = [i for i, p in enumerate(ctx.processes) if p.is_alive()]
                raise SpawnFailure(f"ranks {running} did not finish within {what}; stopped them")
        if poll is not None:
            poll()
    except tmp.ProcessRaisedException as e:
        raise SpawnFailure(f"rank {e.error_index} failed:{e}") from None
    except tmp.ProcessExitedException as e:
        raise SpawnFailure(f"rank {e.error_index} died: {e}") from None
    finally:  # also on Ctrl-C or SIGTERM: no rank outlives the command
        for p in ctx.processes:
            if p.is_alive():
                p.terminate()
        for p in ctx.processes:
            p.join(5)
            if p.is_alive():
                p.kill()
                p.join()
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _stop_on_sigterm() -> Any:
    """Turn SIGTERM into KeyboardInterrupt (so that the ranks get stopped); the old handler."""
    if threading.current_thread() is not threading.main_thread():
        return None

    def handler(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    return signal.signal(signal.SIGTERM, handler)


@contextlib.contextmanager
def joined(rank: int, world_size: int, store_path: str, backend: str,
           timeout_s: float) -> Iterator[None]:
    """A spawned rank's process group, over a ``FileStore`` at ``store_path``, for the block;
    destroyed after it with no barrier (a failed rank must not wait for the others)."""
    import torch.distributed as dist

    store = dist.FileStore(store_path, world_size)
    dist.init_process_group(backend, store=store, rank=rank, world_size=world_size,
                            timeout=timedelta(seconds=timeout_s))
    try:
        yield
    finally:
        dist.destroy_process_group()


def leave() -> None:
    """End a spawned rank whose work is done and saved, skipping the interpreter's teardown.

    torch 2.13 with gloo intermittently aborts in that teardown, after everything has run
    ("terminate called without an active exception", signal 6), which would turn a finished rank
    into a failed one; reproduced without syncbn (a loop of
    ``torch.distributed.nn.functional.all_reduce`` and backward on 2 gloo ranks aborted at exit
    in 2 of 8 runs). Nothing that needs a clean exit may live in a spawned rank: a
    multiprocessing lock made there (tqdm makes one unless :func:`progress_bar` gave it a
    thread lock) would be reported by the launcher's resource tracker as "leaked".
    """
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


# --------------------------------------------------------------------------- torchrun


@dataclass(frozen=True)
class TorchrunEnv:
    """What torchrun (or any launcher that sets the same variables) says about this process."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int


def torchrun_env() -> TorchrunEnv | None:
    """This process's place under torchrun, or ``None`` when ``RANK``/``WORLD_SIZE`` are unset.

    ``LOCAL_RANK`` defaults to 0 and ``LOCAL_WORLD_SIZE`` to ``WORLD_SIZE`` (all on one machine).
    """
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return None
    world = int(os.environ["WORLD_SIZE"])
    return TorchrunEnv(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")),
                       int(os.environ.get("LOCAL_WORLD_SIZE", str(world))))


def join_torchrun(env: TorchrunEnv, backend: str, timeout_s: float) -> bool:
    """Join torchrun's group from ``env://`` unless a group exists already (a script that calls
    ``syncbn``'s ``main`` itself); returns whether this call created it (and should destroy it)."""
    import torch.distributed as dist

    if dist.is_initialized():
        return False
    dist.init_process_group(backend, init_method="env://", rank=env.rank,
                            world_size=env.world_size, timeout=timedelta(seconds=timeout_s))
    return True


# --------------------------------------------------------------------------- devices


def _gpus() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def resolve_device(device: str, local_world_size: int) -> str:
    """``auto`` -> ``cuda`` when every one of the ``local_world_size`` local ranks has a GPU of
    its own, else ``cpu``; ``cpu`` and ``cuda`` as given."""
    if device != "auto":
        return device
    gpus = _gpus()
    return "cuda" if 0 < local_world_size <= gpus else "cpu"


def place(device: str, backend: str, local_rank: int,
          local_world_size: int) -> tuple[torch.device, str]:
    """The device and backend of local rank ``local_rank`` of ``local_world_size`` (the rule in
    the module docstring). ``device`` is ``cpu``, ``cuda`` or ``auto``; ``backend`` is ``auto``,
    ``gloo`` or ``nccl``. Raises :class:`UsageError` for what cannot work (no GPU; NCCL on the
    CPU); does not touch CUDA's current device."""
    import torch.distributed as dist

    device = resolve_device(device, local_world_size)
    gpus = _gpus()
    if device == "cuda" and gpus == 0:
        raise UsageError("--device cuda, but CUDA is not available")
    if device == "cpu":
        if backend == "nccl":
            raise UsageError("--backend nccl needs CUDA devices (--device cuda, or auto on a "
                             "machine with a GPU per rank)")
        return torch.device("cpu"), "gloo"
    if backend == "auto":
        backend = "nccl" if gpus >= local_world_size and dist.is_nccl_available() else "gloo"
    return torch.device("cuda", local_rank % gpus), backend


# --------------------------------------------------------------------------- progress


def progress_bar(total: int, desc: str, unit: str, enabled: bool = True) -> Any:
    """A tqdm bar on stderr when it is a terminal and tqdm is installed, else ``None``.

    tqdm is given a thread lock: its default is a multiprocessing lock, which a spawned rank
    that ends with :func:`leave` would leave registered ("leaked semaphore objects" at exit).
    """
    if not enabled or not sys.stderr.isatty():
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    tqdm.set_lock(threading.RLock())
    return tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, dynamic_ncols=True,
                leave=True)


def tick(path: str) -> None:
    """Report one unit of work done to the launching process (see :class:`Ticker`)."""
    with open(path, "ab") as f:
        f.write(b".")


class Ticker:
    """Units of work that spawned ranks :func:`tick` into a file, shown by the launching process
    on a progress bar: no pipe, queue or lock shared with the ranks."""

    def __init__(self, path: str, bar: Any) -> None:
        self.path, self.bar, self.seen = path, bar, 0

    def poll(self) -> None:
        try:
            done = os.path.getsize(self.path)
        except OSError:
            return
        if done > self.seen and self.bar is not None:
            self.bar.update(done - self.seen)
        self.seen = done
