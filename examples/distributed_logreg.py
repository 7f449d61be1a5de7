"""Data-parallel logistic regression with soo_func on torch.distributed.

Each rank makes (or loads) its own rows; the params are replicated. Every oracle the
optimizer calls is all-reduced across the ranks (one collective per call), so all ranks
take the same steps and end with the same params as one process on all the rows.

CPU, 2 processes on this machine (gloo)::

    OMP_NUM_THREADS=1 torchrun --standalone --nproc_per_node 2 examples/distributed_logreg.py

GPUs (NCCL, one device per rank)::

    torchrun --standalone --nproc_per_node 4 examples/distributed_logreg.py --backend nccl
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist

import soo_func as sf


def local_rows(rank: int, world: int, rows: int, features: int, device: torch.device):
    """This rank's rows (a seed per rank; a real job would read its shard of a file)."""
    g = torch.Generator().manual_seed(rank)
    x = torch.randn(rows // world, features, generator=g)
    y = (x @ torch.linspace(-1, 1, features) + torch.randn(rows // world, generator=g) > 0).float()
    return x.to(device), y.to(device)


def loss(params: dict, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    logits = x @ params["w"] + params["b"]
    return (
        torch.nn.functional.binary_cross_entropy_with_logits(logits, y)
        + 1e-4 * params["w"].square().sum()
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--backend", default="gloo", choices=["gloo", "nccl"])
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--features", type=int, default=50)
    parser.add_argument("--steps", type=int, default=50)
    args = parser.parse_args()
    dist.init_process_group(args.backend)
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cpu")
    if args.backend == "nccl":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    x, y = local_rows(rank, world, args.rows, args.features, device)
    value_fn = sf.distributed.data_parallel(loss, reduce="mean", timeout=60.0).bind(x, y)
    params = {"w": torch.zeros(args.features, device=device), "b": torch.zeros((), device=device)}
    result = sf.minimize(value_fn, params, sf.chain(sf.lbfgs(), sf.wolfe()), max_steps=args.steps)
    if rank == 0:
        torch.save({"params": result.params, "state": result.state}, "logreg_checkpoint.pt")
        print(
            f"{world} ranks: loss {float(result.value):.6f} after {result.num_steps} steps "
            f"({result.reason}); {result.num_value_evals} oracle calls, "
            f"{value_fn.num_collectives} all-reduces"
        )
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
