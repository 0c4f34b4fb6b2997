"""Ranks from torchrun's or Slurm's variables, the torchrun relaunch, shard arithmetic, and two real
`kmim train` processes started as Slurm tasks (no torchrun, no RANK)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kmim.trainer.distributed import (
    choose_backend,
    command_args,
    cuda_index,
    env_ranks,
    free_port,
    is_main_process,
    local_rank_env,
    local_world_size,
    loopback_store,
    process_info,
    shards_for,
    split_evenly,
    under_launcher,
    wants_relaunch,
)

RECIPE = str(Path(__file__).resolve().parents[2] / "manifests" / "recipes" / "digits-tiny.yaml")


def test_env_ranks_from_torchrun_slurm_or_nothing():
    assert env_ranks({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1"}) == (3, 8, 1)
    assert env_ranks({"SLURM_PROCID": "5", "SLURM_NTASKS": "16", "SLURM_LOCALID": "1"}) == (5, 16, 1)
    assert env_ranks({"RANK": "0", "WORLD_SIZE": "2", "SLURM_PROCID": "9", "SLURM_NTASKS": "16"}) == (0, 2, 0)
    assert env_ranks({}) == (0, 1, 0)


def test_nccl_only_when_every_local_rank_has_its_own_gpu():
    assert choose_backend(cuda_devices=0, local_world=1) == "gloo"
    assert choose_backend(cuda_devices=8, local_world=8) == "nccl"
    assert (
        choose_backend(cuda_devices=1, local_world=2) == "gloo"
    )  # `--nproc 2` on one GPU: NCCL would refuse
    assert [cuda_index(r, 1) for r in range(2)] == [0, 0] and [cuda_index(r, 4) for r in range(6)] == [
        0,
        1,
        2,
        3,
        0,
        1,
    ]
    assert local_world_size({"LOCAL_WORLD_SIZE": "2", "SLURM_TASKS_PER_NODE": "8"}, 16) == 2
    assert local_world_size({"SLURM_STEP_TASKS_PER_NODE": "4(x2)"}, 8) == 4
    assert local_world_size({"SLURM_TASKS_PER_NODE": "3,2"}, 5) == 3
    assert local_world_size({}, 4) == 4


def test_shards_for_covers_every_shard_once_per_epoch_when_enough():
    order = [4, 2, 7, 0, 1, 3, 6, 5, 8, 9, 10]
    slices = [shards_for(11, r, 2, w, 2, order) for r in range(2) for w in range(2)]
    flat = sorted(s for sl in slices for s in sl)
    assert flat == sorted(order)
    assert max(map(len, slices)) - min(map(len, slices)) <= 1


def test_shards_for_wraps_when_there_are_fewer_shards_than_slots():
    slices = [shards_for(3, r, 4, w, 2, [2, 0, 1]) for r in range(4) for w in range(2)]
    assert all(len(s) == 1 for s in slices) and {s[0] for s in slices} == {0, 1, 2}


def test_split_evenly():
    assert [split_evenly(10, 3, i) for i in range(3)] == [4, 3, 3]
    assert sum(split_evenly(7, 4, i) for i in range(4)) == 7


def test_who_am_i_under_torchrun_slurm_or_alone():
    slurm = {"SLURM_PROCID": "1", "SLURM_NTASKS": "2", "SLURM_LOCALID": "1"}
    assert (
        process_info(slurm).rank == 1 and process_info(slurm).world_size == 2 and not is_main_process(slurm)
    )
    assert under_launcher(slurm) and not wants_relaunch(
        4, slurm
    )  # srun started the ranks: --nproc starts none
    one_task = {
        "SLURM_PROCID": "0",
        "SLURM_NTASKS": "1",
    }  # `srun -n 1 kmim train --nproc 4`: torchrun starts 4
    assert not under_launcher(one_task) and wants_relaunch(4, one_task) and is_main_process(one_task)
    assert under_launcher({"RANK": "0", "WORLD_SIZE": "1"}) and not wants_relaunch(
        2, {"RANK": "0", "WORLD_SIZE": "1"}
    )
    assert not wants_relaunch(1, {}) and wants_relaunch(2, {}) and is_main_process({})


def test_the_relaunch_drops_nproc_and_gives_each_rank_a_loopback_store():
    assert command_args(["train", "--nproc", "2", "a=1", "--nproc=3", "--run", "x"]) == [
        "train",
        "a=1",
        "--run",
        "x",
    ]
    env = local_rank_env(2, 1, 29123, {"TORCHELASTIC_USE_AGENT_STORE": "True", "PATH": "/bin"})
    assert {k: env[k] for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")} == {
        "RANK": "1",
        "LOCAL_RANK": "1",
        "WORLD_SIZE": "2",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": "29123",
    }
    assert "TORCHELASTIC_USE_AGENT_STORE" not in env and under_launcher(env) and not wants_relaunch(2, env)


def _listening(port: int) -> list[str]:
    """Local addresses (hex, as the kernel lists them) of the TCP sockets listening on `port`."""
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            address, hex_port = fields[1].rsplit(":", 1)
            if fields[3] == "0A" and int(hex_port, 16) == port:
                found.append(address)
    return found


@pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="reads Linux's socket table")
def test_a_one_machine_run_serves_its_store_on_loopback_only():
    port = free_port()
    server, client = loopback_store(port, 0, 2), loopback_store(port, 1, 2)
    client.set("key", "value")
    assert server.get("key") == b"value"
    assert _listening(port) == ["0100007F"]  # 127.0.0.1, not 0.0.0.0 or ::


@pytest.mark.slow
def test_two_slurm_tasks_without_torchrun_form_one_world_and_only_rank_0_reports(digits_dir, tmp_path):
    """`srun -n 2 kmim train ...`: SLURM_PROCID / SLURM_NTASKS and no RANK; `--nproc 2` must not relaunch."""
    out = tmp_path / "run"
    cmd = [
        sys.executable,
        "-m",
        "kmim",
        "train",
        "--config",
        RECIPE,
        "--data",
        str(digits_dir / "train.shards.json"),
        "--output",
        str(out),
        "--nproc",
        "2",
        "model.target=pixel",
        "optim.epochs=1",
        "data.samples_per_epoch=256",
        "data.loader_workers=0",
        "log_every=1",
        "checkpoint.every_steps=1",
    ]
    base = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("SLURM_", "TORCHELASTIC_", "MASTER_"))
        and k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")
    }
    base.update(SLURM_NTASKS="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), OMP_NUM_THREADS="1")
    procs = [
        subprocess.Popen(
            cmd,
            env={**base, "SLURM_PROCID": str(rank), "SLURM_LOCALID": str(rank)},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in (0, 1)
    ]
    try:
        outputs = [p.communicate(timeout=150) for p in procs]
    finally:
        for p in procs:
            p.kill()
    for p, (_, err) in zip(procs, outputs):
        assert p.returncode == 0, err[-3000:]
    plan = json.loads((out / "plan.json").read_text())
    summary = json.loads((out / "train_summary.json").read_text())
    assert plan["world_size"] == summary["world_size"] == 2 and summary["steps"] == 256 // (64 * 2)
    assert "on 2 process(es)" in outputs[0][0] and "train:" not in outputs[1][0]
    metrics = (out / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in metrics] == [1, 2]  # one writer: no line twice
    assert sorted(p.name for p in out.glob("checkpoint-*.pt")) == [
        "checkpoint-00000001.pt",
        "checkpoint-00000002.pt",
    ]
