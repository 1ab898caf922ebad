"""A tiny spawn harness for multi-process tests: gloo (or NCCL) over a FileStore in a temp dir.

``run(worker, world_size, tmp_path, *args)`` has ``world_size`` processes each call
``worker(rank, world_size, *args)`` inside a freshly initialized process group, and returns the
list of their return values by rank. A child's exception is re-raised in the parent with the
child's traceback; a child that does not finish in time gets every child killed and the test
failed with which ranks were still running. Never a fixed port: the rendezvous is a file.

Processes are reused between calls of the same world size (importing torch in a fresh process
costs seconds on 2 cores); any failure or timeout discards them, and ``fresh=True`` (for tests
that may leave a process in a bad state) uses new processes that end with the call.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import queue as queue_mod
import time
import traceback
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist

PG_TIMEOUT_S = float(os.environ.get("SYNCBN_TEST_PG_TIMEOUT", "60"))
SRC = Path(__file__).resolve().parents[1] / "src"
_LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")


def child_env(**overrides: str | None) -> dict[str, str]:
    """Environment for a child ``python`` that runs syncbn from this checkout: ``src/`` first on
    ``PYTHONPATH``, no torchrun variables (the child is not a torchrun rank), then ``overrides``
    (a value of None removes the variable)."""
    env = {k: v for k, v in os.environ.items() if k not in _LAUNCHER_VARS}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(SRC), env.get("PYTHONPATH")]))
    for key, value in overrides.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    return env
# SYNCBN_KERNEL in the ranks (fused C kernel or plain ATen path): tests set it per call, or for a
# whole module through the ``kernel`` fixture (conftest.py), which sets this default.
KERNEL = "auto"


def _serve(rank: int, tasks: Any, results: Any) -> None:
    """A reusable rank: run tasks from ``tasks`` until it receives None."""
    while True:
        task = tasks.get()
        if task is None:
            return
        _child(rank, *task, results)


def _child(rank: int, world_size: int, store_path: str, backend: str, device: str,
           worker: Callable[..., Any], args: tuple, pg_timeout: float, kernel: str,
           env: dict[str, str], results: Any) -> None:
    torch.set_num_threads(1)
    os.environ["SYNCBN_KERNEL"] = kernel
    before = {k: os.environ.get(k) for k in env}  # this task's settings only: ranks are reused
    os.environ.update(env)
    _reload_settings()
    try:
        if device == "cuda":
            torch.cuda.set_device(rank % torch.cuda.device_count())
        store = dist.FileStore(store_path, world_size)
        dist.init_process_group(backend, store=store, rank=rank, world_size=world_size,
                                timeout=timedelta(seconds=pg_timeout))
        _all_joined(store, world_size, pg_timeout)
        try:
            value = worker(rank, world_size, *args)
        finally:
            # No barrier here: a rank that failed must not wait for the others.
            dist.destroy_process_group()
        results.put((rank, "ok", pickle.dumps(value)))
    except BaseException:  # noqa: BLE001 - everything goes back to the parent
        results.put((rank, "error", traceback.format_exc()))
    finally:
        for k, v in before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        _reload_settings()


def _reload_settings() -> None:
    """syncbn reads its SYNCBN_* settings once: a reused rank reads this task's again."""
    from syncbn import _settings

    _settings.reload()


def _all_joined(store: Any, world_size: int, timeout: float) -> None:
    """Wait (through the store, not the backend) until every rank has finished
    ``init_process_group``: a rank whose worker fails at once and exits must not close its
    connections while another rank is still making them (gloo's connectFullMesh then fails with
    "Connection closed by peer" in that rank's init, instead of the error under test)."""
    store.add("joined", 1)
    deadline = time.monotonic() + timeout
    while store.add("joined", 0) < world_size:
        if time.monotonic() > deadline:
            raise TimeoutError(f"not every rank finished init_process_group within {timeout:g}s")
        time.sleep(0.005)


class _Pool:
    def __init__(self, world_size: int) -> None:
        ctx = mp.get_context("spawn")
        self.results = ctx.Queue()
        self.tasks = [ctx.Queue() for _ in range(world_size)]
        self.procs = [ctx.Process(target=_serve, args=(r, self.tasks[r], self.results), daemon=True)
                      for r in range(world_size)]
        for p in self.procs:
            p.start()

    def close(self) -> None:
        for p in self.procs:
            if p.is_alive():
                p.kill()
            p.join(timeout=5)


_pools: dict[int, _Pool] = {}


def run(worker: Callable[..., Any], world_size: int, tmp_path: Path, *args: Any,
        backend: str = "gloo", device: str = "cpu", timeout: float = 120.0,
        pg_timeout: float = PG_TIMEOUT_S, fresh: bool = False,
        kernel: str | None = None, env: dict[str, str] | None = None) -> list[Any]:
    """Run ``worker(rank, world_size, *args)`` on ``world_size`` ranks; their values by rank.

    ``kernel`` is ``SYNCBN_KERNEL`` in the ranks (default :data:`KERNEL`); ``env``, more
    environment settings in the ranks for this run only."""
    store_path = str(tmp_path / f"store-{time.monotonic_ns()}")
    task = (world_size, store_path, backend, device, worker, args, pg_timeout,
            kernel or KERNEL, env or {})
    if fresh:
        ctx = mp.get_context("spawn")
        results = ctx.Queue()
        procs = [ctx.Process(target=_child, daemon=True, args=(r, *task, results))
                 for r in range(world_size)]
        for p in procs:
            p.start()
        try:
            return _collect(procs, results, world_size, timeout, pg_timeout)
        finally:
            for p in procs:
                p.join(timeout=5)
                if p.is_alive():
                    p.kill()
                    p.join(timeout=5)
    pool = _pools.get(world_size)
    if pool is None or not all(p.is_alive() for p in pool.procs):
        if pool is not None:
            pool.close()
        pool = _pools[world_size] = _Pool(world_size)
    for q in pool.tasks:
        q.put(task)
    try:
        return _collect(pool.procs, pool.results, world_size, timeout, pg_timeout)
    except BaseException:
        _pools.pop(world_size, None)
        pool.close()  # a rank may still be waiting in a collective: start afresh next time
        raise


def _collect(procs: list[Any], results: Any, world_size: int, timeout: float,
             pg_timeout: float) -> list[Any]:
    values: dict[int, Any] = {}
    errors: dict[int, str] = {}
    deadline = time.monotonic() + timeout
    while len(values) + len(errors) < world_size:
        left = deadline - time.monotonic()
        if left <= 0:
            missing = sorted(set(range(world_size)) - set(values) - set(errors))
            raise AssertionError(
                f"ranks {missing} did not finish within {timeout:.0f}s"
                + "".join(f"\n--- rank {r} failed ---\n{tb}" for r, tb in sorted(errors.items()))
            )
        try:
            rank, status, payload = results.get(timeout=min(left, 1.0))
        except queue_mod.Empty:
            dead = [i for i, p in enumerate(procs)
                    if p.exitcode not in (None, 0) and i not in values and i not in errors]
            for i in dead:
                errors[i] = f"process exited with code {procs[i].exitcode} without a result"
            continue
        if status == "ok":
            values[rank] = pickle.loads(payload)
        else:
            errors[rank] = payload
        if errors and len(values) + len(errors) < world_size:
            # Give the other ranks a moment to report their own errors, then stop waiting.
            deadline = min(deadline, time.monotonic() + pg_timeout + 15)
    if errors:
        raise AssertionError("".join(f"\n--- rank {r} failed ---\n{tb}" for r, tb in sorted(errors.items())))
    return [values[r] for r in range(world_size)]


def cuda_skip_reason(world_size: int) -> str | None:
    """Why the CUDA variant of a test cannot run here, or None if it can."""
    if not torch.cuda.is_available():
        return "CUDA is not available on this machine"
    return None


def cuda_backend(world_size: int) -> str:
    """NCCL when every rank has its own GPU; gloo (which also reduces CUDA tensors) otherwise."""
    return "nccl" if torch.cuda.device_count() >= world_size and dist.is_nccl_available() else "gloo"
