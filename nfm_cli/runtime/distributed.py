"""Running one measurement over several processes with ``torch.distributed`` (launched by ``torchrun``).

Detection is by the environment ``torchrun`` sets: ``WORLD_SIZE`` > 1 with ``RANK`` and
``LOCAL_RANK``. Without it (a plain ``nfm`` process) everything here is a no-op of world size 1 and
no process group is created.

The process group is created lazily by ``setup(device)`` on first use, with NCCL for a CUDA device
(each rank on ``cuda:LOCAL_RANK``) and gloo otherwise, and destroyed by ``shutdown()`` (the CLI calls
it in a ``finally``; an ``atexit`` hook covers library use). Only rank 0 writes files and reports
progress; the helpers below are the only collectives the core uses.
"""
from __future__ import annotations

import atexit
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from nfm_cli.errors import NfmError


@dataclass(frozen=True)
class Dist:
    """This process's place in the job: world size, rank, and the device collectives run on."""

    world: int = 1
    rank: int = 0
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1


def env_world() -> tuple[int, int, int]:
    """(world size, rank, local rank) from the torchrun environment; (1, 0, 0) without it."""
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", str(rank)))
    except ValueError:
        raise NfmError("WORLD_SIZE, RANK and LOCAL_RANK must be integers (set by torchrun)") from None
    if world <= 1:
        return 1, 0, 0
    if not 0 <= rank < world:
        raise NfmError(f"RANK {rank} is outside 0..{world - 1} (WORLD_SIZE {world})")
    return world, rank, local


def env_rank() -> int:
    """This process's rank (0 without torchrun); never raises."""
    try:
        return env_world()[1]
    except NfmError:
        return 0


def setup(device: torch.device) -> tuple[Dist, torch.device]:
    """Join the job's process group (once) and return (Dist, this rank's compute device).

    A CUDA ``device`` becomes ``cuda:LOCAL_RANK`` with NCCL; anything else uses gloo."""
    world, rank, local = env_world()
    if world == 1:
        return Dist(), device
    if device.type == "cuda":
        if local >= torch.cuda.device_count():
            raise NfmError(f"LOCAL_RANK {local} but only {torch.cuda.device_count()} CUDA devices; "
                           "use --nproc-per-node at most the number of GPUs")
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend)
        atexit.register(shutdown)
    elif dist.get_backend() != backend:
        raise NfmError(f"the process group uses {dist.get_backend()}, this step needs {backend}; "
                       "use the same --device in every step of one job")
    comm = device if backend == "nccl" else torch.device("cpu")
    return Dist(world, rank, local, comm), device


def shutdown() -> None:
    """Destroy the process group if this process created one (safe to call any number of times)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(ctx: Dist, tensors: list[torch.Tensor]) -> None:
    """Sum ``tensors`` over all ranks in place: one collective per dtype (float64, int64, ...)."""
    if not ctx.active or not tensors:
        return
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for t in tensors:
        by_dtype.setdefault(t.dtype, []).append(t)
    for dtype in sorted(by_dtype, key=str):
        group = by_dtype[dtype]
        flat = torch.cat([t.reshape(-1).to(ctx.device) for t in group])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        offset = 0
        for t in group:
            t.copy_(flat[offset:offset + t.numel()].view_as(t))
            offset += t.numel()


def broadcast_ints(ctx: Dist, values: list[int]) -> list[int]:
    """Rank 0's ``values`` on every rank (decisions such as "save now" must be taken together)."""
    if not ctx.active:
        return list(values)
    t = torch.tensor(values, dtype=torch.int64, device=ctx.device)
    dist.broadcast(t, src=0)
    return [int(v) for v in t.cpu()]


def max_ints(ctx: Dist, values: list[int]) -> list[int]:
    """Element-wise maximum over ranks."""
    if not ctx.active:
        return list(values)
    t = torch.tensor(values, dtype=torch.int64, device=ctx.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return [int(v) for v in t.cpu()]


def barrier(ctx: Dist) -> None:
    """Wait for every rank (no-op in a single process)."""
    if ctx.active:
        if ctx.device.type == "cuda":
            dist.barrier(device_ids=[ctx.device.index])
        else:
            dist.barrier()
