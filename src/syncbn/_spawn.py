"""Local CPU ranks for the command-line tools (``syncbn demo``, ``syncbn check``).

One place for what both need: spawn ``nprocs`` processes, wait with a deadline, turn a rank's
exception or death into a :class:`SpawnFailure` that names the rank, and leave no rank running
(also on Ctrl-C or SIGTERM).
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import Any

__all__ = ["SpawnFailure", "joined", "leave", "run_spawned"]


class SpawnFailure(Exception):
    """A rank failed or timed out; the message says which and why."""


def run_spawned(fn: Callable[..., None], args: tuple[Any, ...], nprocs: int, timeout: float,
                what: str) -> None:
    """Run ``fn(rank, *args)`` on ``nprocs`` spawned processes and wait at most ``timeout`` s.

    ``what`` describes the limit in the timeout message (e.g. ``"--timeout 900 s"``).
    """
    import torch.multiprocessing as tmp

    ctx = tmp.start_processes(fn, args=args, nprocs=nprocs, join=False, start_method="spawn")
    deadline = time.monotonic() + timeout
    previous = _stop_on_sigterm()
    try:
        while not ctx.join(timeout=1.0, grace_period=5.0):
            if time.monotonic() > deadline:
                running = [i for i, p in enumerate(ctx.processes) if p.is_alive()]
                raise SpawnFailure(f"ranks {running} did not finish within {what}; stopped them")
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
    into a failed one. Seen here in ranks of ``syncbn demo`` and ``syncbn bench`` (plain
    BatchNorm ranks too) and reproduced without syncbn: a loop of
    ``torch.distributed.nn.functional.all_reduce`` and backward on 2 gloo ranks aborted at exit
    in 2 of 8 runs.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
