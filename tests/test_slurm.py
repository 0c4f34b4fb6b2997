"""`kmim train` under a live Slurm (slurmctld + slurmd + munged on 127.0.0.1, started here): the CPU variant of
manifests/slurm/train.sbatch through `sbatch`, `srun -n 2` without torchrun, and `scancel` then resubmit."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from kmim.trainer.distributed import free_port
from tests.slurm_cluster import PACKAGES, SlurmCluster, missing_binaries

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "manifests" / "slurm" / "train-cpu.sbatch"
RECIPE = REPO / "manifests" / "recipes" / "digits-tiny.yaml"
# 2 ranks x 64 x 5 steps per epoch, 8 epochs: 40 steps, a checkpoint every 2
OVERRIDES = [
    "model.target=pixel",
    "optim.epochs=8",
    "data.samples_per_epoch=640",
    "data.loader_workers=0",
    "log_every=1",
    "checkpoint.every_steps=2",
]
STEPS = 40

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        bool(missing_binaries()),
        reason=f"needs Slurm and munge (apt-get install {PACKAGES}); missing: {', '.join(missing_binaries())}",
    ),
]


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    cluster = SlurmCluster(tmp_path_factory.mktemp("slurm"))
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


def _job_env(digits_dir, output: Path) -> dict[str, str]:
    return {
        "KMIM": f"{sys.executable} -m kmim",
        "KMIM_RECIPE": str(RECIPE),
        "KMIM_DATA": str(digits_dir / "train.shards.json"),
        "KMIM_OUTPUT": str(output),
        "MASTER_PORT": str(free_port()),
    }


def _submit(slurm, digits_dir, output: Path) -> tuple[str, Path]:
    log_dir = output.parent
    job = slurm.sbatch(
        f"--chdir={log_dir}",
        f"--output={log_dir}/%x-%j.out",
        str(SCRIPT),
        *OVERRIDES,
        env=_job_env(digits_dir, output),
    )
    return job, log_dir / f"kmim-cpu-{job}.out"


def _rank_losses(text: str) -> dict[int, tuple[int, float]]:
    """rank -> (steps, final loss) from the lines every rank prints at the end."""
    found = re.findall(r"^rank (\d+) of 2: step (\d+), final loss (\S+)$", text, flags=re.M)
    return {int(rank): (int(steps), float(loss)) for rank, steps, loss in found}


def _losses(run_dir: Path) -> dict[int, float]:
    last = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        last[r["step"]] = r["loss"]  # a resumed run rewrites the steps it redoes: keep the last
    return last


@pytest.fixture(scope="module")
def batch_run(slurm, digits_dir, tmp_path_factory):
    """The uninterrupted sbatch run: (run folder, its job log's text)."""
    output = tmp_path_factory.mktemp("sbatch") / "run"
    job, log = _submit(slurm, digits_dir, output)
    state = slurm.wait(job, timeout=300)
    text = log.read_text() if log.exists() else "(no job log)"
    assert state == "COMPLETED", f"job {job} ended {state}:\n{text[-3000:]}"
    return output, text


def test_sbatch_of_the_cpu_script_completes_with_both_ranks_agreeing(batch_run):
    output, text = batch_run
    ranks = _rank_losses(text)
    assert sorted(ranks) == [0, 1], text[-3000:]
    assert ranks[0] == ranks[1] and ranks[0][0] == STEPS  # the same final loss, to the last digit
    assert text.count("train: 40 steps") == 1  # only rank 0 prints the run's line
    summary = json.loads((output / "train_summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == STEPS
    assert summary["final_loss"] == ranks[0][1]
    # one writer: each step's metrics once, the checkpoints one rank made (keep: 2)
    steps = [json.loads(line)["step"] for line in (output / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, STEPS + 1))
    assert sorted(p.name for p in output.glob("checkpoint-*.pt")) == [
        "checkpoint-00000038.pt",
        "checkpoint-00000040.pt",
    ]


def test_srun_without_torchrun_trains_the_same_run(slurm, batch_run, digits_dir, tmp_path):
    reference, _ = batch_run
    output = tmp_path / "run"
    env = {**slurm.env, **_job_env(digits_dir, output), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "kmim", "train", "--config", str(RECIPE), "--data", env["KMIM_DATA"]]
    proc = subprocess.run(
        ["srun", "-n", "2", "--kill-on-bad-exit=1", *cmd, "--output", str(output), *OVERRIDES],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = _rank_losses(proc.stdout)
    assert sorted(ranks) == [0, 1] and ranks[0] == ranks[1], proc.stdout[-3000:]
    ref, got = _losses(reference), _losses(output)
    assert sorted(got) == sorted(ref) == list(range(1, STEPS + 1))
    np.testing.assert_allclose([got[s] for s in ref], [ref[s] for s in ref], rtol=1e-5)


def test_scancel_mid_run_then_resubmit_resumes_and_ends_like_the_uninterrupted_run(
    slurm, batch_run, digits_dir, tmp_path
):
    reference, _ = batch_run
    output = tmp_path / "run"
    job, _ = _submit(slurm, digits_dir, output)
    state = slurm.wait(job, timeout=300, until=lambda: (output / "checkpoint-00000008.pt").exists())
    assert state == "RUNNING", f"job {job} ended ({state}) before the cancel"
    slurm.run("scancel", job)
    deadline = time.monotonic() + 60
    while slurm.job_state(job) not in ("CANCELLED", "COMPLETED", "FAILED") and time.monotonic() < deadline:
        time.sleep(0.2)
    assert slurm.job_state(job) == "CANCELLED"
    made = sorted(p.name for p in output.glob("checkpoint-*.pt"))
    assert made and made[-1] != f"checkpoint-{STEPS:08d}.pt", made  # cancelled mid-run
    assert not (output / "train_summary.json").exists()

    again, log = _submit(slurm, digits_dir, output)
    assert slurm.wait(again, timeout=300) == "COMPLETED", log.read_text()[-3000:]
    text = log.read_text()
    assert re.search(r"resuming .* at step \d+ of 40", text), text[-3000:]
    ranks = _rank_losses(text)
    ref, got = _losses(reference), _losses(output)
    assert sorted(got) == sorted(ref) == list(range(1, STEPS + 1))
    np.testing.assert_allclose([got[s] for s in ref], [ref[s] for s in ref], rtol=1e-5)
    np.testing.assert_allclose(ranks[0][1], ref[STEPS], rtol=1e-5)
    assert ranks[0] == ranks[1]
