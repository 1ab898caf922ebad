"""syncbn's eager per-layer time before and after a change, side by side in one run, and the
compiled training step (issue: registered ops).

    python benchmarks/eager_and_compiled.py                     # before = efd05c1 (syncbn 0.1)
    python benchmarks/eager_and_compiled.py --before HEAD~3 --ranks 2 --iters 200

Each configuration runs in ``--ranks`` spawned CPU processes (gloo over a FileStore, one torch
thread per rank, the same-machine transport where it applies), all ranks in lockstep. At
``--ranks 1`` syncbn's synchronized Function is called directly over the 1-rank group (a module
would not synchronize): the per-call cost of syncbn's Python and kernels, without waiting. Per layer
(the ResNet-50 shapes of ``syncbn bench``): median microseconds of one forward+backward of
torch's *unsynchronized* ``BatchNorm`` (the floor), of syncbn at this checkout ("after") and of
syncbn at ``--before`` (its ``src/`` extracted with ``git archive`` into a temp dir); the ratio
columns divide by torch's BatchNorm. Then one training step of a small conv net (3 conv+BN
layers, batch 4x3x32x32 per rank) in eager mode, compiled with ``aot_eager`` + ``fullgraph=True``
and (``--inductor``) with inductor, against the same net with plain BatchNorm. ``--overhead``
prints only the fixed costs behind the eager design (an empty ``autograd.Function`` with one or
two outputs, a registered custom op against the same Python function called directly).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SHAPES = ("2x64x56x56,2x128x28x28,2x256x14x14,2x512x7x7,2x2048x7x7,8x64x56x56,8x128x28x28,"
          "8x256x14x14,8x512x7x7,8x2048x7x7,64x1024,cl:2x64x56x56")


def _rank(rank: int, world: int, store: str, cfg: dict, out: str) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", store=dist.FileStore(store, world), rank=rank,
                            world_size=world)
    import syncbn

    rows = {}
    for spec in cfg["shapes"].split(","):
        cl = spec.startswith("cl:")
        shape = tuple(int(v) for v in spec.removeprefix("cl:").split("x"))
        torch.manual_seed(rank)
        x = torch.randn(shape)
        if cl:
            x = x.contiguous(memory_format=torch.channels_last)
        x.requires_grad_()
        dy = torch.randn_like(x)
        plain = torch.nn.BatchNorm2d(shape[1]) if x.dim() == 4 else torch.nn.BatchNorm1d(shape[1])
        sync = syncbn.convert_sync_batchnorm(
            torch.nn.BatchNorm2d(shape[1]) if x.dim() == 4 else torch.nn.BatchNorm1d(shape[1]))
        if world == 1:  # a module would not synchronize: its synchronized Function directly
            sync = _function_layer(sync)
        for name, layer in (("bn", plain), ("syncbn", sync)):
            if cfg["only_syncbn"] and name == "bn":
                continue
            for _ in range(cfg["warmup"]):
                layer(x).backward(dy)
            runs = []
            for _ in range(5):  # 5 runs of iters/5 passes back to back; the median run's mean
                dist.barrier()  # the ranks start each run together
                t0 = time.perf_counter()
                for _ in range(cfg["iters"] // 5):
                    layer(x).backward(dy)
                runs.append((time.perf_counter() - t0) / (cfg["iters"] // 5))
            rows.setdefault(spec, {})[name] = statistics.median(runs) * 1e6
    if cfg["step"] and world > 1:
        rows["step"] = _steps(rank, world, cfg)
    if rank == 0:
        Path(out).write_text(json.dumps(rows))
    dist.barrier()
    dist.destroy_process_group()
    os._exit(0)  # torch 2.13 + gloo may abort at interpreter teardown (see syncbn.cli._launch.leave)


def _function_layer(module):
    """``x -> syncbn's synchronized Function`` over the 1-rank group (a plan that synchronizes
    even there; the collective itself is skipped on one rank)."""
    from syncbn import _pass

    w, b, rm, rv = module.weight, module.bias, module.running_mean, module.running_var
    plans = {}

    def fn(x):
        p = plans.get(x.shape)
        if p is None:
            p = plans[x.shape] = _pass.synchronized_plan(module._sync, x, (w, b, rm, rv))
        return _pass.SyncBatchNormFunction.apply(x, w, b, rm, rv, 1e-5, 0.1, p)

    fn.module = module
    return fn


def _net(sync: bool):
    import torch
    from torch import nn

    import syncbn

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                        nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
                        nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.BatchNorm2d(64), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10))
    return syncbn.convert_sync_batchnorm(net) if sync else net


def _steps(rank: int, world: int, cfg: dict) -> dict:
    import torch
    import torch.distributed as dist

    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    result = {}
    modes = [("plain BN, eager", False, None), ("syncbn, eager", True, None),
             ("plain BN, aot_eager fullgraph", False, "aot_eager"),
             ("syncbn, aot_eager fullgraph", True, "aot_eager")]
    if cfg["inductor"]:
        modes += [("plain BN, inductor fullgraph", False, "inductor"),
                  ("syncbn, inductor fullgraph", True, "inductor")]
    for name, sync, backend in modes:
        net = _net(sync)
        opt = torch.optim.SGD(net.parameters(), lr=0.01)
        model = net if backend is None else torch.compile(net, backend=backend, fullgraph=True)

        def step(net=net, model=model, opt=opt):  # type: ignore[no-untyped-def]
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            for p in net.parameters():  # gradients summed by hand (no DDP: one more graph)
                dist.all_reduce(p.grad)
            opt.step()

        times = []
        for i in range(5 + cfg["step_iters"]):
            dist.barrier()
            t0 = time.perf_counter()
            step()
            times.append(time.perf_counter() - t0)
        result[name] = statistics.median(times[5:]) * 1e3
    return result


def _overhead() -> None:
    """The fixed costs behind the eager design, in this process (median us per call)."""
    import torch

    torch.set_num_threads(1)

    class One(torch.autograd.Function):  # an empty Function with one output
        @staticmethod
        def forward(ctx, x):  # type: ignore[no-untyped-def]
            ctx.save_for_backward(x, torch.empty(3))
            return torch.empty_like(x)

        @staticmethod
        def backward(ctx, g):  # type: ignore[no-untyped-def]
            return g

    class Two(torch.autograd.Function):  # the same with a second, non-differentiable output
        @staticmethod
        def forward(ctx, x):  # type: ignore[no-untyped-def]
            s = torch.empty(3)
            ctx.mark_non_differentiable(s)
            ctx.save_for_backward(x, s)
            return torch.empty_like(x), s

        @staticmethod
        def backward(ctx, g, _):  # type: ignore[no-untyped-def]
            return g

    def body(x: torch.Tensor, eps: float) -> torch.Tensor:
        return x.clone()

    op = torch.library.custom_op("syncbn_bench::body", body, mutates_args=(),
                                 schema="(Tensor x, float eps) -> Tensor")
    x = torch.randn(2, 64, requires_grad=True)
    dy, bn = torch.randn(2, 64), torch.nn.BatchNorm1d(64)
    cases = {
        "torch BatchNorm1d(64) fwd+bwd, 2x64": lambda: bn(x).backward(dy),
        "empty autograd.Function fwd+bwd, 1 output": lambda: One.apply(x).backward(dy),
        "empty autograd.Function fwd+bwd, 2 outputs": lambda: Two.apply(x)[0].backward(dy),
        "a Python function, called directly": lambda: body(x, 1e-5),
        "the same function as a registered custom op": lambda: op(x, 1e-5),
    }
    print("fixed costs, 1 thread (median us per call of 7 x 2000)")
    for name, fn in cases.items():
        for _ in range(300):
            fn()
        runs = []
        for _ in range(7):
            t0 = time.perf_counter()
            for _ in range(2000):
                fn()
            runs.append((time.perf_counter() - t0) / 2000 * 1e6)
        print(f"{name:>48} {statistics.median(runs):8.1f}")


def _run(src: str | None, cfg: dict, ranks: int) -> dict:
    """One configuration in ``ranks`` fresh processes; rank 0's rows."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "out.json")
        env = dict(os.environ)
        if src:
            env["PYTHONPATH"] = os.pathsep.join(filter(None, [src, env.get("PYTHONPATH")]))
        code = (f"import sys; sys.path.insert(0, {str(HERE)!r}); import eager_and_compiled as m; "
                f"m._rank(int(sys.argv[1]), {ranks}, {os.path.join(tmp, 'store')!r}, "
                f"{cfg!r}, {out!r})")
        procs = [subprocess.Popen([sys.executable, "-c", code, str(r)], env=env)
                 for r in range(ranks)]
        if any(p.wait(timeout=3600) for p in procs):
            raise SystemExit("a rank failed")
        return json.loads(Path(out).read_text())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--before", default="efd05c1", help="git revision of the 'before' column")
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--iters", type=int, default=100)
    p.add_argument("--shapes", default=SHAPES)
    p.add_argument("--no-step", action="store_true", help="skip the training-step section")
    p.add_argument("--inductor", action="store_true", help="also compile with inductor (slow)")
    p.add_argument("--overhead", action="store_true",
                   help="only the fixed costs: empty autograd.Function, registered custom op")
    args = p.parse_args()
    if args.overhead:
        _overhead()
        return
    base = {"shapes": args.shapes, "iters": args.iters, "warmup": 10, "step": False,
            "step_iters": 20, "inductor": args.inductor, "only_syncbn": False}
    with tempfile.TemporaryDirectory() as old:
        root = subprocess.run(["git", "rev-parse", "--show-toplevel"], capture_output=True,
                              text=True, check=True, cwd=HERE).stdout.strip()
        archive = subprocess.run(["git", "archive", args.before, "src"], capture_output=True,
                                 check=True, cwd=root).stdout
        subprocess.run(["tar", "-x", "-C", old], input=archive, check=True)
        before = _run(os.path.join(old, "src"), {**base, "only_syncbn": True}, args.ranks)
    after = _run(str(Path(root) / "src"), {**base, "step": not args.no_step}, args.ranks)
    print(f"per layer, forward+backward, {args.ranks} ranks in lockstep, 1 thread each "
          f"(median us of {args.iters}); before = {args.before}")
    print(f"{'shape':>16} {'torch BN':>9} {'before':>9} {'after':>9} {'before/BN':>9} {'after/BN':>9}")
    for spec in args.shapes.split(","):
        bn, b, a = after[spec]["bn"], before[spec]["syncbn"], after[spec]["syncbn"]
        print(f"{spec:>16} {bn:9.1f} {b:9.1f} {a:9.1f} {b / bn:9.2f} {a / bn:9.2f}")
    if after.get("step"):
        print(f"\ntraining step, small conv net, {args.ranks} ranks x 4x3x32x32 (median ms)")
        for name, ms in after["step"].items():
            print(f"{name:>32} {ms:9.2f}")


if __name__ == "__main__":
    main()
