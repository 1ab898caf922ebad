"""Train a network with BatchNorm on several processes with syncbn: the whole recipe, one file.

    torchrun --nproc-per-node 2 examples/train_ddp.py             # CPU: gloo; one GPU per rank: NCCL
    torchrun --nproc-per-node 2 examples/train_ddp.py --steps 5   # stop after 5 training steps

Every rank makes the same data set (here, from a seed: nothing is downloaded) and reads its own
part of it through a DistributedSampler. The one rule: every rank runs every synchronized layer
in training mode the same number of times (the sampler and drop_last give each rank the same
number of batches). Rank 0 alone evaluates (eval mode: no collective), saves a checkpoint and
exports a plain-BatchNorm copy with torch.export (files in --out).
"""

import argparse
import copy
import os

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

import syncbn

parser = argparse.ArgumentParser(description="syncbn + DDP: train, evaluate, save, export.")
parser.add_argument("--epochs", type=int, default=3)
parser.add_argument("--steps", type=int, default=None, help="stop after N training steps in all")
parser.add_argument("--batch-size", type=int, default=16, help="images per rank and step")
parser.add_argument("--out", default=".", help="where rank 0 writes checkpoint.pt and model.pt2")
args = parser.parse_args()

cuda = torch.cuda.device_count() >= int(os.environ["LOCAL_WORLD_SIZE"])  # a GPU for each rank
dist.init_process_group("nccl" if cuda else "gloo")  # torchrun sets RANK, WORLD_SIZE, ...
rank = dist.get_rank()
device = torch.device("cuda", int(os.environ["LOCAL_RANK"])) if cuda else torch.device("cpu")
if cuda:
    torch.cuda.set_device(device)

g = torch.Generator().manual_seed(0)  # the same data set on every rank
x = torch.randn(1024, 3, 16, 16, generator=g)
y = (x[:, 0].mean((1, 2)) > x[:, 1].mean((1, 2))).long()  # a label the network can learn
train, test = TensorDataset(x[:896], y[:896]), TensorDataset(x[896:], y[896:])
sampler = DistributedSampler(train, shuffle=True, seed=0)  # rank r's share of each epoch
loader = DataLoader(train, batch_size=args.batch_size, sampler=sampler, drop_last=True)

torch.manual_seed(0)  # the same initial weights on every rank (DDP also broadcasts rank 0's)
model = nn.Sequential(
    nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
    nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
    nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 2),
)
model = syncbn.convert_sync_batchnorm(model).to(device)  # BatchNorm2d -> SyncBatchNorm2d
ddp = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if cuda else None)
opt = torch.optim.SGD(ddp.parameters(), lr=0.1, momentum=0.9)

step = 0
for epoch in range(args.epochs):
    sampler.set_epoch(epoch)
    ddp.train()
    for xb, yb in loader:
        loss = F.cross_entropy(ddp(xb.to(device)), yb.to(device))  # statistics of all ranks' xb
        opt.zero_grad()
        loss.backward()
        opt.step()
        step += 1
        if step == args.steps:
            break
    if rank == 0:  # eval mode normalizes with the running statistics: no collective, one rank
        ddp.module.eval()
        with torch.no_grad():
            pred = ddp.module(test.tensors[0].to(device)).argmax(1).cpu()
        accuracy = (pred == test.tensors[1]).float().mean().item()
        print(f"epoch {epoch}: step {step}, loss {loss.item():.3f}, test accuracy {accuracy:.1%}")
    if step == args.steps:
        break

if rank == 0:
    os.makedirs(args.out, exist_ok=True)
    checkpoint = {"model": ddp.module.state_dict(), "optimizer": opt.state_dict(), "step": step}
    torch.save(checkpoint, os.path.join(args.out, "checkpoint.pt"))
    # Export a reverted *copy*: reverting ddp.module itself would unsynchronize training.
    plain = syncbn.revert_sync_batchnorm(copy.deepcopy(ddp.module)).cpu().eval()
    plain.load_state_dict(checkpoint["model"])  # the same state_dict keys as plain BatchNorm
    print("exported:", ", ".join(type(m).__name__ for m in plain if "Norm" in type(m).__name__))
    batch = {0: torch.export.Dim("batch")}  # any batch size
    program = torch.export.export(plain, (test.tensors[0][:2],), dynamic_shapes=(batch,))
    torch.export.save(program, os.path.join(args.out, "model.pt2"))
dist.barrier()  # leave together: a rank that tears gloo down while another still works can
dist.destroy_process_group()  # abort at exit with torch 2.13 (2 of 8 runs here without it)
