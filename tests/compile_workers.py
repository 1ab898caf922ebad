"""Workers for ``tests/test_compile.py`` (top level, so that spawned ranks can import them)."""

from __future__ import annotations

import time
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

import syncbn

from reference import assert_matches


def make_net(act: str = "relu") -> nn.Sequential:
    """Conv -> BN2d -> act -> Conv -> BN2d -> act -> Linear, float64, seeded; ``act``: relu or
    leaky_relu (slope 0.1)."""
    torch.manual_seed(0)

    def activation() -> nn.Module:
        return nn.ReLU() if act == "relu" else nn.LeakyReLU(0.1)

    return nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), activation(),
        nn.Conv2d(4, 4, 3, stride=2), nn.BatchNorm2d(4), activation(),
        nn.Flatten(), nn.Linear(4 * 2 * 2, 3),
    ).double()


def make_sync_net(group: Any = None, fused: bool = False) -> nn.Sequential:
    """``make_net`` converted; ``fused``: its batch norms and leaky_relus as activated syncbn
    layers (the activation inside the synchronized pass, the activation modules Identity)."""
    if not fused:
        return syncbn.convert_sync_batchnorm(make_net(), group)
    net = make_net("leaky_relu")
    for i in (1, 4):
        layer = syncbn.SyncBatchNorm2d(4, process_group=group, activation="leaky_relu",
                                       activation_param=0.1).double()
        layer.load_state_dict(net[i].state_dict())
        net[i], net[i + 1] = layer, nn.Identity()
    return net


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


def reference(sizes: list[int], steps: int, act: str = "relu") -> dict[str, torch.Tensor]:
    """Plain torch BatchNorm, one process, on the concatenated global batches."""
    net = make_net(act)
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
        assert_matches(state[key].double().cpu(), value, torch.float64,
                       f"rank {rank} {key} (compiled)")
    return {"error": None, "seconds": elapsed}


def fullgraph_training(rank: int, world_size: int, sizes: list[int], steps: int,
                       backend: str, device: str = "cpu",
                       own_group: bool = False, fused: bool = False) -> dict[str, Any]:
    """A synchronized model compiled with ``fullgraph=True`` (no graph break allowed) trained on
    this rank's shard: per step, equal to the same model in eager mode on this rank (losses, and
    every parameter and buffer after training), and to plain BatchNorm on the concatenated
    global batches in float64. Returns the graph-break count that ``torch._dynamo.explain``
    reports for the synchronized model."""
    import torch._dynamo

    torch._dynamo.reset()
    lo = sum(sizes[:rank])
    shards = [(x[lo:lo + sizes[rank]].to(device), y[lo:lo + sizes[rank]].to(device))
              for x, y in global_batches(sizes, steps)]
    scale = world_size / sum(sizes)
    # own_group: the layers synchronize over an explicit group (every rank makes it, in order)
    group = dist.new_group(list(range(world_size))) if own_group else None
    eager = make_sync_net(group, fused).to(device)
    eager_losses = train(eager, shards, scale, world_size)
    model = make_sync_net(group, fused).to(device)
    try:
        losses = train(torch.compile(model, backend=backend, fullgraph=True), shards, scale,
                       world_size)
        probe = make_sync_net(None, fused).to(device)  # every rank: it syncs
        explained = torch._dynamo.explain(probe)(shards[0][0])
    finally:
        torch._dynamo.reset()
    for step, (a, b) in enumerate(zip(losses, eager_losses)):
        assert abs(a - b) <= 1e-12 * max(1.0, abs(b)), f"rank {rank} step {step}: loss {a} vs eager {b}"
    expected = reference(sizes, steps, "leaky_relu" if fused else "relu")
    state, eager_state = model.state_dict(), eager.state_dict()
    for key, value in expected.items():
        assert_matches(state[key].double().cpu(), value, torch.float64,
                       f"rank {rank} {key} (compiled)")
        torch.testing.assert_close(state[key], eager_state[key], rtol=1e-12, atol=1e-12,
                                   msg=lambda m, key=key: f"rank {rank} {key}: compiled vs eager: {m}")
    assert int(model[1].num_batches_tracked) == steps
    return {"graph_breaks": explained.graph_break_count, "graphs": explained.graph_count}


class _Branchy(nn.Module):
    """Two synchronized layers; ``skip`` leaves the first one out (a rank that skips a layer)."""

    def __init__(self, skip: bool) -> None:
        super().__init__()
        self.skip = skip
        self.bn1, self.bn2 = nn.BatchNorm1d(4), nn.BatchNorm1d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.skip:
            x = self.bn1(x)
        return self.bn2(x)


def fullgraph_out_of_step(rank: int, world_size: int, skipping_rank: int) -> str:
    """Compiled (fullgraph) models where one rank skips a layer: the out-of-step error must
    still come, from inside the registered op, on every rank. Returns the error text."""
    import torch._dynamo

    torch._dynamo.reset()
    model = syncbn.convert_sync_batchnorm(_Branchy(skip=rank == skipping_rank))
    try:
        torch.compile(model, backend="aot_eager", fullgraph=True)(torch.randn(3, 4))
    except RuntimeError as e:
        return str(e)
    finally:
        torch._dynamo.reset()
    return ""
