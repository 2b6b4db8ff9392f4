"""Data-parallel training over `torch.distributed`: the process group, the DDP wrapper and the few collectives
the training loop needs. Inference across machines needs nothing here: the chunked outputs take a
`dask.distributed.Client` (see `scvi_scale.outputs`).

One process per device ("rank"). Every rank builds the same model, streams its own share of the training cells
(`BlockShuffleSampler(rank=, world_size=)`: disjoint, same number of minibatches per rank) and runs
`DistributedDataParallel`, which averages the gradients, so each optimizer step sees the mean over world_size * b
cells, as one process with batch world_size * b would. Epoch metrics are sums all-reduced over the ranks, so every
rank holds the same history and takes the same early-stopping and learning-rate decisions. Rank 0 alone writes
checkpoints and the saved model; the other ranks wait at a barrier.

BatchNorm: per-rank batch statistics (DDP's default, and Lightning's, which scvi-tools uses), not SyncBatchNorm.
Each rank normalises its b cells as one process with batch b would; syncing would cost an all-reduce per BatchNorm
layer per step for no change in what is learnt beyond the noise of the statistics. The running statistics (used
in evaluation only) are rank 0's: DDP broadcasts them at every forward, and `broadcast_buffers` once more before
validation and saving, so every rank evaluates and saves the same model.

Launching: `torchrun --nproc-per-node N [--nnodes M --rdzv-endpoint HOST:PORT] -m scvi_scale.cli train ...`
sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT, and `setup` joins that group when training
starts; `launch(function, n)` (and `scvi-scale train --nproc N`) starts n processes on this machine instead.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing
from torch.nn.parallel import DistributedDataParallel


def world() -> tuple[int, int]:
    """(rank, world_size) of this process; (0, 1) when no process group is initialised."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def setup(device: torch.device) -> torch.device:
    """Join the process group that torchrun's environment describes (WORLD_SIZE > 1), once, and return the device
    this rank trains on: cuda:LOCAL_RANK on GPUs, else `device`. Backend: nccl on CUDA, gloo on the CPU."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size > 1 and not dist.is_initialized():
        missing = [key for key in ("RANK", "MASTER_ADDR", "MASTER_PORT") if key not in os.environ]
        if missing:
            raise RuntimeError(
                f"WORLD_SIZE={world_size} but {', '.join(missing)} not set: launch with torchrun or "
                "`scvi-scale train --nproc N`"
            )
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if device.type == "cuda" and world()[1] > 1:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    return device


def rank_seed(seed: int) -> int:
    """The torch seed of this rank: `seed` itself on rank 0 (and in a single process), a seed derived from
    (seed, rank) elsewhere, so that ranks draw different noise (z samples, dropout) for their different cells."""
    rank = world()[0]
    if rank == 0:
        return seed
    return int(np.random.SeedSequence(seed, spawn_key=(rank,)).generate_state(1, np.uint32)[0])


class _LossOf(torch.nn.Module):
    """`module.loss` as forward(), so DistributedDataParallel sees the call that its gradient hooks follow."""

    def __init__(self, module: torch.nn.Module):
        super().__init__()
        self.module = module

    def forward(self, tensors: dict, kl_weight: float) -> dict:
        return self.module.loss(tensors, kl_weight=kl_weight)  # type: ignore[operator]  # VAE.loss, a method


def data_parallel_loss(module: torch.nn.Module, device: torch.device) -> Callable[..., dict]:
    """A function (tensors, kl_weight) -> loss dict that trains `module`: DDP-wrapped when world_size > 1 (rank 0's
    parameters and buffers are broadcast to all ranks here), else module.loss itself."""
    if world()[1] == 1:
        return module.loss  # type: ignore[return-value]  # VAE.loss, a method
    device_ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(_LossOf(module), device_ids=device_ids)


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    """Element-wise sums of `values` over all ranks (float64; the same result on every rank)."""
    if world()[1] == 1:
        return list(values)
    sums = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(sums)
    return sums.tolist()


def broadcast_buffers(module: torch.nn.Module) -> None:
    """Give every rank rank 0's buffers (BatchNorm running statistics)."""
    if world()[1] > 1:
        for buffer in module.buffers():
            dist.broadcast(buffer, src=0)


def all_gather(value) -> list:
    """[value of rank 0, value of rank 1, ...] on every rank, for any picklable value."""
    if world()[1] == 1:
        return [value]
    gathered = [None] * world()[1]
    dist.all_gather_object(gathered, value)
    return gathered


def on_rank_zero(write: Callable[[], object]) -> None:
    """Call write() on rank 0 only, then hold every rank at a barrier until it is done."""
    rank, world_size = world()
    if rank == 0:
        write()
    if world_size > 1:
        dist.barrier()


# --- launching n processes on this machine ---------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _run_rank(rank: int, function: Callable, world_size: int, port: int, threads: int, args: tuple) -> None:
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    torch.set_num_threads(threads)
    # both backends where there are GPUs enough: tensors on the CPU (accelerator="cpu") go through gloo
    gpus = torch.cuda.is_available() and torch.cuda.device_count() >= world_size
    dist.init_process_group("cpu:gloo,cuda:nccl" if gpus else "gloo")
    try:
        function(*args)
    finally:
        dist.destroy_process_group()


def launch(function: Callable, nproc: int, *args, threads: int | None = None) -> None:
    """Run function(*args) in `nproc` new processes forming one process group on loopback (MASTER_ADDR 127.0.0.1,
    a free port), with `threads` torch threads each (default: this machine's cores shared out, at least 1).

    `function` must be importable by name (a module-level function): the processes are spawned, not forked.
    Returns when all have finished; if one fails, the others are stopped and its error is raised here.
    """
    if isinstance(nproc, bool) or not isinstance(nproc, int) or nproc < 1:
        raise ValueError(f"nproc={nproc!r}: must be a positive integer")
    if dist.is_available() and dist.is_initialized():
        raise RuntimeError("launch() is called from inside a process group; call it from a plain process")
    threads = threads or max(1, (os.cpu_count() or 1) // nproc)
    torch.multiprocessing.start_processes(
        _run_rank, args=(function, nproc, _free_port(), threads, args), nprocs=nproc, start_method="spawn"
    )
