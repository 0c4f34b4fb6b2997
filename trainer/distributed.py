"""All distributed setup lives here: rank arithmetic (pure, unit-tested) and the process group.

Works under `kmim train --nproc N` (which runs torchrun), an external torchrun, or Slurm (SLURM_PROCID
etc., with MASTER_ADDR/MASTER_PORT set by the batch script). gloo on CPU, NCCL on GPU.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None  # None: a single process, no process group

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def env_ranks(env: dict[str, str]) -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun's variables, else Slurm's, else a single process."""
    if "RANK" in env and "WORLD_SIZE" in env:
        return int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0))
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        return int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", 0))
    return 0, 1, 0


def shards_for(num_shards: int, rank: int, world: int, worker: int, workers: int, epoch_order: list[int]) -> list[int]:
    """The shards one data worker of one rank reads in an epoch: slot = rank * workers + worker takes
    every (world * workers)-th shard of the epoch's order; with fewer shards than slots, slots wrap."""
    slots = world * workers
    slot = rank * workers + worker
    if num_shards >= slots:
        return epoch_order[slot::slots]
    return [epoch_order[slot % num_shards]]


def split_evenly(total: int, parts: int, index: int) -> int:
    """The share of `total` for part `index` when split as evenly as possible."""
    return total // parts + (1 if index < total % parts else 0)


def init_distributed() -> DistInfo:
    rank, world, local_rank = env_ranks(dict(os.environ))
    if world == 1:
        return DistInfo()
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29500")
    if os.environ["MASTER_ADDR"] in ("127.0.0.1", "localhost") and backend == "gloo":
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # a single-node run talks over loopback only
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend=backend, rank=rank, world_size=world)
    return DistInfo(rank, world, local_rank, backend)


def device_for(info: DistInfo) -> torch.device:
    return torch.device(f"cuda:{info.local_rank}") if torch.cuda.is_available() else torch.device("cpu")


def cleanup(info: DistInfo) -> None:
    if info.backend is not None and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_mean(value: float, info: DistInfo, device: torch.device) -> float:
    if not info.distributed:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t.item()) / info.world_size


def barrier(info: DistInfo) -> None:
    if info.distributed:
        dist.barrier()
