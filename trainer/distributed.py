"""All distributed setup lives here: who this process is (rank, world size, main or not, already under a
launcher or not), relaunching a command as local ranks, rank arithmetic (pure, unit-tested) and the
process group. Nothing else reads RANK or SLURM_PROCID.

Works under `kmim train --nproc N` (which starts N local ranks itself, everything on 127.0.0.1), an external
torchrun, or Slurm's `srun` without
torchrun (SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID; MASTER_ADDR defaults to 127.0.0.1 and MASTER_PORT
to 29500, both settable). gloo on CPU, NCCL when each local rank has its own GPU, else gloo. torch is imported only where a process group is
made, so that the CLI decides about relaunching without loading it.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch
    from torch.distributed import TCPStore

LOOPBACK = "127.0.0.1"
DEFAULT_MASTER_PORT = "29500"


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


def process_info(env: Mapping[str, str] | None = None) -> DistInfo:
    """This process's place in the run (default: from os.environ), before any process group exists."""
    return DistInfo(*env_ranks(os.environ if env is None else env))


def is_main_process(env: Mapping[str, str] | None = None) -> bool:
    """Whether this process prints and writes the run's reports: rank 0, or the only process."""
    return process_info(env).is_main


def under_launcher(env: Mapping[str, str] | None = None) -> bool:
    """Whether a launcher already started this process as one rank of a run: torchrun (RANK and WORLD_SIZE,
    even a world of 1), or Slurm with more than one task. Then `--nproc` must not start more processes."""
    env = os.environ if env is None else env
    if "RANK" in env and "WORLD_SIZE" in env:
        return True
    return "SLURM_PROCID" in env and int(env.get("SLURM_NTASKS", "1")) > 1


def wants_relaunch(nproc: int, env: Mapping[str, str] | None = None) -> bool:
    """Whether `--nproc nproc` means: run this command again as nproc local processes (relaunch_ranks)."""
    return nproc > 1 and not under_launcher(env)


def free_port(host: str = LOOPBACK) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def command_args(argv: Sequence[str]) -> list[str]:
    """The current command's arguments less `--nproc`: the children must not relaunch."""
    args, rest = [], iter(argv)
    for arg in rest:
        if arg == "--nproc":
            next(rest, None)
        elif not arg.startswith("--nproc="):
            args.append(arg)
    return args


def local_rank_env(nproc: int, rank: int, port: int, base: Mapping[str, str]) -> dict[str, str]:
    """The environment of rank `rank` of a local run: torchrun's variables, the store on 127.0.0.1:port."""
    threads = base.get("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    env = {
        **base,
        "RANK": str(rank),
        "LOCAL_RANK": str(rank),
        "WORLD_SIZE": str(nproc),
        "LOCAL_WORLD_SIZE": str(nproc),
        "MASTER_ADDR": LOOPBACK,
        "MASTER_PORT": str(port),
        "OMP_NUM_THREADS": threads,
    }
    env.setdefault("GLOO_SOCKET_IFNAME", "lo")
    env.pop("TORCHELASTIC_USE_AGENT_STORE", None)
    return env


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    """A rank must not outlive its launcher (a SIGKILLed `kmim train --nproc 2` leaves no orphans)."""
    import ctypes
    import signal

    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def relaunch_ranks(nproc: int, args: Sequence[str] | None = None) -> int:
    """Run `kmim ARGS` (default: this very command line, less `--nproc`) as nproc local DDP processes; its
    exit code. The children get torchrun's variables (RANK etc.), so they do the work instead of relaunching.

    Not torchrun itself: its launcher's stores listen on every interface whatever address it is given. Here
    rank 0 serves the process group's store on 127.0.0.1 (`loopback_store`), so nothing listens elsewhere.
    When one rank fails the others are stopped; the first non-zero exit code is returned."""
    import signal
    import time

    argv = command_args(sys.argv[1:]) if args is None else list(args)
    port = free_port()
    children = [
        subprocess.Popen(
            [sys.executable, "-m", "kmim", *argv],
            env=local_rank_env(nproc, rank, port, os.environ),
            preexec_fn=_die_with_parent if sys.platform == "linux" else None,
        )
        for rank in range(nproc)
    ]
    code = 0
    try:
        while any(c.poll() is None for c in children):
            failed = [c.returncode for c in children if c.returncode not in (None, 0)]
            if failed:
                code = code or failed[0]
                for c in children:
                    if c.poll() is None:
                        c.send_signal(signal.SIGTERM)
            time.sleep(0.2)
    except KeyboardInterrupt:
        for c in children:
            c.send_signal(signal.SIGINT)
    for c in children:
        c.wait()
    return code or next((c.returncode for c in children if c.returncode), 0)


def shards_for(
    num_shards: int, rank: int, world: int, worker: int, workers: int, epoch_order: list[int]
) -> list[int]:
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


def local_world_size(env: Mapping[str, str], world: int) -> int:
    """Ranks on this machine: torchrun's (and `--nproc`'s) LOCAL_WORLD_SIZE, else Slurm's tasks on this node
    (SLURM_STEP_TASKS_PER_NODE / SLURM_TASKS_PER_NODE, e.g. `2` or `2(x3)`), else the whole world."""
    if "LOCAL_WORLD_SIZE" in env:
        return int(env["LOCAL_WORLD_SIZE"])
    for name in ("SLURM_STEP_TASKS_PER_NODE", "SLURM_NTASKS_PER_NODE", "SLURM_TASKS_PER_NODE"):
        if env.get(name):
            return int(env[name].split("(")[0].split(",")[0])
    return world


def choose_backend(cuda_devices: int, local_world: int) -> str:
    """NCCL when every local rank has a GPU of its own (NCCL refuses two ranks on one device); else gloo,
    which also runs ranks that share a GPU (e.g. `--nproc 2` on a one-GPU machine)."""
    return "nccl" if cuda_devices > 0 and local_world <= cuda_devices else "gloo"


def cuda_index(local_rank: int, cuda_devices: int) -> int:
    """The GPU of a local rank: its own, or shared round-robin when there are more ranks than GPUs."""
    return local_rank % cuda_devices


def init_distributed() -> DistInfo:
    import torch
    import torch.distributed as dist

    rank, world, local_rank = env_ranks(os.environ)
    if world == 1:
        return DistInfo()
    devices = torch.cuda.device_count() if torch.cuda.is_available() else 0
    backend = choose_backend(devices, local_world_size(os.environ, world))
    addr = os.environ.setdefault("MASTER_ADDR", LOOPBACK)
    port = int(os.environ.setdefault("MASTER_PORT", DEFAULT_MASTER_PORT))
    if addr in (LOOPBACK, "localhost") and backend == "gloo":
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # a single-node run talks over loopback only
    if devices:
        torch.cuda.set_device(cuda_index(local_rank, devices))
    store = None
    if (
        addr == LOOPBACK and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True"
    ):  # torchrun's agent has one
        store = loopback_store(port, rank, world)
    dist.init_process_group(backend=backend, rank=rank, world_size=world, store=store)
    return DistInfo(rank, world, local_rank, backend)


def loopback_store(port: int, rank: int, world: int) -> TCPStore:
    """The process group's store for a run on one machine (Slurm's tasks without torchrun): rank 0 serves
    it on 127.0.0.1 only, where TCPStore by itself would listen on every interface."""
    from torch.distributed import TCPStore
    from torch.distributed.constants import default_pg_timeout

    if rank != 0:
        return TCPStore(LOOPBACK, port, world, is_master=False, timeout=default_pg_timeout)
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((LOOPBACK, port))
    listener.listen(max(128, world))
    return TCPStore(
        LOOPBACK,
        port,
        world,
        is_master=True,
        timeout=default_pg_timeout,
        wait_for_workers=False,
        master_listen_fd=listener.detach(),
    )


def device_for(info: DistInfo) -> torch.device:
    import torch

    if not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device(f"cuda:{cuda_index(info.local_rank, torch.cuda.device_count())}")


def cleanup(info: DistInfo) -> None:
    import torch.distributed as dist

    if info.backend is not None and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_mean(value: float, info: DistInfo, device: torch.device) -> float:
    if not info.distributed:
        return value
    import torch
    import torch.distributed as dist

    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t.item()) / info.world_size


def barrier(info: DistInfo) -> None:
    if info.distributed:
        import torch.distributed as dist

        dist.barrier()
