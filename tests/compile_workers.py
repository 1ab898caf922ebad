"""Workers for ``tests/test_compile.py`` (top level, so that spawned ranks can import them)."""

from __future__ import annotations

import time
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

import syncbn

from reference import assert_matches


def make_net() -> nn.Sequential:
    """Conv -> BN2d -> ReLU -> Conv -> BN2d -> ReLU -> Linear, float64, seeded."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
        nn.Conv2d(4, 4, 3, stride=2), nn.BatchNorm2d(4), nn.ReLU(),
        nn.Flatten(), nn.Linear(4 * 2 * 2, 3),
    ).double()


def global_batches(sizes: list[int], steps: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    total = sum(sizes)
    return [(torch.randn(total, 2, 6, 6, generator=g, dtype=torch.float64) * 2 + 1,
             torch.randint(0, 3, (total,), generator=g)) for _ in range(steps)]


def train(model: nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]], scale: float,
          world_size: int = 1) -> list[float]:
    """SGD on ``batches`` with loss ``scale * sum of cross-entropies``; gradients are averaged over
    ranks by hand (an all_reduce per parameter, no DDP). Returns each step's loss."""
    params = list(model.parameters())
    opt = torch.optim.SGD(params, lr=0.1)
    losses = []
    for x, y in batches:
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y, reduction="sum") * scale
        loss.backward()
        if world_size > 1:
            for p in params:
                dist.all_reduce(p.grad)
                p.grad /= world_size
        opt.step()
        losses.append(loss.item())
    return losses


def reference(sizes: list[int], steps: int) -> dict[str, torch.Tensor]:
    """Plain torch BatchNorm, one process, on the concatenated global batches."""
    net = make_net()
    train(net, global_batches(sizes, steps), 1.0 / sum(sizes))
    return net.state_dict()


def compiled_sync_training(rank: int, world_size: int, cfg: dict[str, Any]) -> dict[str, Any]:
    """``torch.compile`` of a syncbn model trained on this rank's shard; compared with
    ``reference`` (raises if it differs). Returns ``{"error": text or None, "seconds": ...}``: a
    compile-time refusal (fullgraph) is returned rather than raised, for the test to judge."""
    import torch._dynamo

    torch._dynamo.reset()
    sizes, steps = cfg["sizes"], cfg["steps"]
    model = syncbn.convert_sync_batchnorm(make_net())
    compiled = torch.compile(model, backend=cfg.get("backend", "inductor"),
                             fullgraph=cfg.get("fullgraph", False))
    lo = sum(sizes[:rank])
    shards = [(x[lo:lo + sizes[rank]], y[lo:lo + sizes[rank]]) for x, y in global_batches(sizes, steps)]
    t0 = time.perf_counter()
    try:
        train(compiled, shards, world_size / sum(sizes), world_size)
    except torch._dynamo.exc.Unsupported as e:
        # Every rank refuses at the same place while tracing, before its first collective of
        # the pass... unless a rank got further: the test checks that all ranks agree.
        return {"error": f"{type(e).__name__}: {e}", "seconds": time.perf_counter() - t0}
    finally:
        torch._dynamo.reset()
    elapsed = time.perf_counter() - t0
    expected = reference(sizes, steps)
    state = model.state_dict()
    for key, value in expected.items():
        assert_matches(state[key].double(), value, torch.float64, f"rank {rank} {key} (compiled)")
    return {"error": None, "seconds": elapsed}
