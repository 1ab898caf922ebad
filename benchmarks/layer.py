"""Per-layer forward+backward time: syncbn's full synchronized path vs torch, on one device.

    torchrun is not needed: the script makes a 1-rank group (NCCL on GPU, gloo on CPU) and calls
    each contender's *synchronized* autograd Function directly (at world size 1 the modules would
    fall back to plain batch norm), so the collective is real but trivial and the numbers are the
    compute path:

    python benchmarks/layer.py                # CUDA if available, else CPU
    python benchmarks/layer.py --device cpu --threads 1

Contenders: torch.nn.BatchNorm2d (unsynchronized, the floor), torch.nn.SyncBatchNorm's Function
(all_gather of stats, as in torch), syncbn's Function. Median of 50 timed iterations after 10
warm-ups, CUDA events. Also checks that syncbn's forward does not synchronize the host
(torch.cuda.set_sync_debug_mode("error") around it).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import torch
import torch.distributed as dist
from torch.nn.modules._functions import SyncBatchNorm as TorchSyncBNFunction

import syncbn
from syncbn._pass import SyncBatchNormFunction

DEVICE = "cuda"
SHAPES = [(8, 64, 56, 56), (8, 128, 28, 28), (8, 256, 14, 14), (8, 512, 7, 7), (8, 2048, 7, 7), (64, 1024)]


def timed(fn, iters=50, warmup=10):
    """Median milliseconds of ``fn``."""
    for _ in range(warmup):
        fn()
    if not torch.cuda.is_available() or DEVICE == "cpu":
        times = []
        for _ in range(iters):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def main() -> None:
    global DEVICE
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (torch.set_num_threads)")
    args = parser.parse_args()
    DEVICE = args.device
    if args.threads:
        torch.set_num_threads(args.threads)
    store = dist.FileStore(os.path.join(tempfile.mkdtemp(), "store"), 1)
    dist.init_process_group("nccl" if DEVICE == "cuda" else "gloo", store=store, rank=0, world_size=1)
    group = dist.group.WORLD
    name = torch.cuda.get_device_name() if DEVICE == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"{name}, torch {torch.__version__}")
    print(f"{'shape':>22} {'dtype':>9} {'layout':>13} {'torch BN':>9} {'torch SyncBN':>12} {'syncbn':>9} {'syncbn/BN':>9} {'syncbn/SyncBN':>13}")
    for dtype in (torch.float32, torch.float16):
        for shape in SHAPES + [("cl", (8, 64, 56, 56))]:
            layout = "contiguous"
            if shape[0] == "cl":
                shape, layout = shape[1], "channels_last"
            c = shape[1]
            if DEVICE == "cpu" and dtype == torch.float16:
                continue
            x = torch.randn(shape, device=DEVICE, dtype=dtype)
            if layout == "channels_last":
                x = x.contiguous(memory_format=torch.channels_last)
            x.requires_grad_()
            dy = torch.randn_like(x)
            bn = (torch.nn.BatchNorm2d(c) if x.dim() == 4 else torch.nn.BatchNorm1d(c)).to(DEVICE)
            w, b = bn.weight, bn.bias
            rm, rv = bn.running_mean.clone(), bn.running_var.clone()
            state = syncbn._pass.LayerState(syncbn._wire.LayerTag.for_layer("bench", 0, "bench"),
                                            lambda x: None)
            plan = syncbn._pass.synchronized_plan(state, x, (w, b, rm, rv), group)

            def plain():
                bn(x).backward(dy)

            def torch_sync():
                TorchSyncBNFunction.apply(x, w, b, rm, rv, 1e-5, 0.1, group, 1).backward(dy)

            def ours():
                SyncBatchNormFunction.apply(x, w, b, rm, rv, 1e-5, 0.1, plan).backward(dy)

            t_plain, t_ours = timed(plain), timed(ours)
            # torch.nn.SyncBatchNorm refuses CPU tensors
            t_torch = timed(torch_sync) if DEVICE == "cuda" else float("nan")
            print(f"{str(tuple(shape)):>22} {str(dtype)[6:]:>9} {layout:>13} {t_plain:9.4f} {t_torch:12.4f} "
                  f"{t_ours:9.4f} {t_ours / t_plain:9.2f} {t_ours / t_torch:13.2f}")
    if DEVICE == "cpu":
        dist.destroy_process_group()
        return
    # No host synchronization in syncbn's forward.
    x = torch.randn(8, 64, 28, 28, device="cuda", requires_grad=True)
    bn = torch.nn.BatchNorm2d(64).cuda()
    params = (bn.weight, bn.bias, bn.running_mean, bn.running_var)
    plan = syncbn._pass.synchronized_plan(state, x, params, group)
    SyncBatchNormFunction.apply(x, bn.weight, bn.bias, bn.running_mean, bn.running_var, 1e-5, 0.1, plan)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        SyncBatchNormFunction.apply(x, bn.weight, bn.bias, bn.running_mean, bn.running_var, 1e-5, 0.1, plan)
        print("forward host sync: none (torch.cuda.set_sync_debug_mode('error') passed)")
    except RuntimeError as e:
        print(f"forward host sync: YES: {e}")
    finally:
        torch.cuda.set_sync_debug_mode("default")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
