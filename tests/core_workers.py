"""Workers for tests/test_core.py (top level, so that spawned ranks can import them)."""

from __future__ import annotations

import os
import sys
import threading
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

import syncbn


def count_calls(rank: int, world_size: int, passes: int) -> dict[str, Any]:
    """The Python calls into syncbn of one steady-state forward+backward of SyncBatchNorm2d(8)
    over a (4, 8, 5, 5) input (the ``passes``-th pass; ``sys.setprofile``: calls whose code lives
    in the package)."""
    root = os.path.dirname(syncbn.__file__)
    layer = syncbn.SyncBatchNorm2d(8)
    calls: list[str] = []

    def profile(frame: Any, event: str, arg: Any) -> None:
        if event == "call" and frame.f_code.co_filename.startswith(root):
            calls.append(f"{os.path.relpath(frame.f_code.co_filename, root)}:"
                         f"{frame.f_code.co_name}")

    for i in range(passes):
        x = torch.randn(4, 8, 5, 5, requires_grad=True)
        if i == passes - 1:
            sys.setprofile(profile)
        layer(x).sum().backward()
        sys.setprofile(None)
    return {"calls": calls, "transport": syncbn._comm.transport()}


def two_models(rank: int, world_size: int, swapped: bool) -> str:
    """Two models converted apart (a generator and a discriminator) each with a layer '0'; rank 1
    runs them in the other order when ``swapped``."""
    gen = syncbn.convert_sync_batchnorm(nn.Sequential(nn.BatchNorm1d(3)))
    disc = syncbn.convert_sync_batchnorm(nn.Sequential(nn.BatchNorm1d(3)))
    order = [gen, disc] if not (swapped and rank == 1) else [disc, gen]
    try:
        for model in order:
            model(torch.randn(4, 3) + (10.0 if model is disc else 0.0))
    except RuntimeError as e:
        return str(e)
    return ""


def throwaway_layer(rank: int, world_size: int) -> str:
    """Rank 0 builds a layer it never uses; the model built afterwards is converted: no error."""
    if rank == 0:
        syncbn.SyncBatchNorm1d(3)
    model = syncbn.convert_sync_batchnorm(nn.Sequential(nn.BatchNorm1d(3), nn.BatchNorm1d(3)))
    model(torch.randn(4, 3)).sum().backward()
    return ""


def restart(rank: int, world_size: int, store_path: str) -> str:
    """An in-process restart: the ranks train in one group until rank 1 fails (it has run one
    forward more than rank 0), the group is destroyed and a new one made with the same models.
    The pass counters belong to the old group: the new one starts from pass 1 on every rank."""
    store = dist.FileStore(store_path, world_size)
    model = syncbn.convert_sync_batchnorm(nn.Sequential(nn.BatchNorm1d(3)))
    for _ in range(2):
        model(torch.randn(4, 3)).sum().backward()
    # rank 1 alone runs a third forward, as if it had gone on before a failure: its counter is
    # a pass ahead (here without a collective: the counter is set as that pass would leave it)
    if rank == 1:
        syncbn._comm.group(None).counters(model[0]._sync.tag.key)[0] += 1
    dist.destroy_process_group()
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world_size)
    try:
        model(torch.randn(4, 3)).sum().backward()
    except RuntimeError as e:
        return str(e)
    return ""


def settings_differ(rank: int, world_size: int, name: str, value: str) -> str:
    """``name=value`` on rank 1 only: every rank gets the error naming the setting."""
    from syncbn import _settings

    if rank == 1:
        os.environ[name] = value
    _settings.reload()
    try:
        syncbn.SyncBatchNorm1d(3)(torch.randn(4, 3))
    except RuntimeError as e:
        return f"{type(e).__name__}: {e}"
    finally:
        os.environ.pop(name, None)
        _settings.reload()
    return ""


def two_threads(rank: int, world_size: int) -> list[str]:
    """Two threads of one process use synchronized layers of one group: refused, clearly."""
    first = syncbn.SyncBatchNorm1d(3)
    first(torch.randn(4, 3))  # this thread runs the group's layers
    errors: list[str] = []

    def other() -> None:
        try:
            first(torch.randn(4, 3))
        except RuntimeError as e:
            errors.append(str(e))
        try:
            syncbn.SyncBatchNorm1d(3)(torch.randn(4, 3))
        except RuntimeError as e:
            errors.append(str(e))

    t = threading.Thread(target=other)
    t.start()
    t.join()
    first(torch.randn(4, 3))  # the first thread goes on: nothing was sent by the other one
    return errors


def skipped_batch_not_counted(rank: int, world_size: int, policy: str) -> dict[str, Any]:
    """A NaN on rank 1 under SYNCBN_NONFINITE=skip/raise, momentum=None: the batch leaves every
    statistic untouched, num_batches_tracked included."""
    from syncbn import _settings

    os.environ["SYNCBN_NONFINITE"] = policy
    _settings.reload()
    try:
        layer = syncbn.SyncBatchNorm1d(2, momentum=None, dtype=torch.float64)
        for value in (2.0, 6.0):  # two clean batches of constant mean 2 then 6
            layer(torch.full((3, 2), value, dtype=torch.float64) + torch.tensor([[0.0], [1.0], [-1.0]],
                  dtype=torch.float64))
        x = torch.ones(3, 2, dtype=torch.float64)
        if rank == 1:
            x[0, 0] = float("nan")
        error = ""
        try:
            layer(x)
        except RuntimeError as e:
            error = str(e)
        return {"tracked": int(layer.num_batches_tracked), "mean": layer.running_mean.tolist(),
                "error": error}
    finally:
        os.environ.pop("SYNCBN_NONFINITE", None)
        _settings.reload()


def checkpoint_backward_in_another_thread(rank: int, world_size: int) -> dict[str, Any]:
    """Activation checkpointing whose backward (and so the recompute of the synchronized layer)
    runs in another thread than the forward, as autograd's device threads do on a GPU: allowed
    (the same program, in step), and equal to the same step without checkpointing."""
    from torch.utils.checkpoint import checkpoint

    torch.manual_seed(0)
    net = syncbn.convert_sync_batchnorm(nn.Sequential(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3)))
    ref = syncbn.convert_sync_batchnorm(nn.Sequential(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3)))
    ref.load_state_dict(net.state_dict())
    x = torch.randn(3, 2, 5, 5, generator=torch.Generator().manual_seed(rank))
    y = checkpoint(net, x, use_reentrant=False)
    errors: list[BaseException] = []

    def backward() -> None:
        try:
            y.sum().backward()
        except BaseException as e:  # noqa: BLE001  (reported below)
            errors.append(e)

    t = threading.Thread(target=backward)
    t.start()
    t.join()
    if errors:
        raise errors[0]
    ref(x).sum().backward()
    for (name, a), b in zip(net.named_parameters(), ref.parameters()):
        torch.testing.assert_close(a.grad, b.grad, msg=name)
    return {"ok": True}
