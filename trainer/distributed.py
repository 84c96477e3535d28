"""Multi-process (DistributedDataParallel) training through fastai's distributed support, on GPUs or the CPU.

fastai's DistributedDL moves the shuffled indices to CUDA to broadcast them, as NCCL needs; under gloo
(CPU processes) that fails, so this module's loader broadcasts on the device the backend wants.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch
import torch.distributed as dist
from fastai.distributed import DistributedDL, DistributedTrainer
from fastai.torch_core import num_distrib, rank_distrib


def process_group(cpu: bool) -> tuple[int, int]:
    """(rank, world size) of this process: (0, 1) alone; under torchrun (WORLD_SIZE set) the distributed
    process group is joined first (gloo on the CPU, NCCL on GPUs)."""
    world = num_distrib()
    if world <= 1:
        return 0, 1
    from accelerate import PartialState

    PartialState(cpu=cpu)
    return rank_distrib(), world


class BackendDistributedDL(DistributedDL):
    """fastai's DistributedDL with the index broadcast on the backend's device (CUDA for NCCL, else CPU)."""

    def _broadcast(self, t, rank):
        device = "cuda" if dist.get_backend() == "nccl" else "cpu"
        indexes = torch.tensor(t, dtype=torch.long, device=device)
        dist.broadcast(indexes, rank)
        return indexes.cpu().tolist()


class BackendDistributedTrainer(DistributedTrainer):
    def _wrap_dl(self, dl):
        return dl if isinstance(dl, DistributedDL) else BackendDistributedDL(dl, device=self.learn.dls.device)


@contextlib.contextmanager
def data_parallel(learn, cuda: bool) -> Iterator[None]:
    """Train `learn` data-parallel across the process group for the block. Synchronised batch norm needs
    GPUs; on the CPU each process keeps its own batch-norm statistics."""
    trainer = BackendDistributedTrainer(sync_bn=cuda, cpu=not cuda)
    learn.add_cb(trainer)
    try:
        yield
    finally:
        learn.remove_cb(trainer)


def rank0_first(world: int, rank: int, build):
    """`build()` in the first process, then in the others (which then find its result, e.g. a cache)."""
    if world <= 1:
        return build()
    if rank != 0:
        dist.barrier()
    value = build()
    if rank == 0:
        dist.barrier()
    return value
