"""Fault drills: SIGKILL the `kmim run` driver in the middle of each pipeline stage, rerun, and get exactly
the artifacts of an uninterrupted run, each stage resuming where it stopped (finished shards reused, k-means
from its last epoch checkpoint); SIGKILL one Ray worker process mid-stage and the stage completes. These are
the stages' kill-and-resume tests too: one drill per stage, through the command users run."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kmim.lineage.recipe import load_recipe
from kmim.lineage.runner import run_recipe

RECIPE = str(Path(__file__).resolve().parents[2] / "manifests" / "recipes" / "digits.yaml")
SETS = ["data.shard_size=64", "cluster.epochs=40"]
PIPELINE = "data,extract,cluster,tokenize"


def _run_cmd(root):
    cmd = [sys.executable, "-m", "kmim", "run", RECIPE, "--root", str(root), "--stages", PIPELINE]
    return cmd + [a for s in SETS for a in ("--set", s)]


def _kill_when(cmd, env, ready, log, timeout=240):
    """Start cmd (output to log), SIGKILL its whole process group as soon as ready() holds; False if it ended first."""
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if ready():
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                return True
            time.sleep(0.01)
        return False
    finally:
        subprocess.run(["pkill", "-9", "-f", env["RAY_TMPDIR"]], check=False)  # its Ray processes


def _stage_dir(root, stage):
    dirs = list((Path(root) / stage).glob("*")) if (Path(root) / stage).exists() else []
    return dirs[0] if dirs else None


def _has(root, stage, pattern, n=1):
    d = _stage_dir(root, stage)
    return d is not None and len(list(d.glob(pattern))) >= n


def _epochs_done(root):
    """Lloyd epochs in the cluster stage's checkpoint (safetensors header metadata), -1 if none yet."""
    d = _stage_dir(root, "cluster")
    try:
        raw = (d / "_checkpoint.safetensors").read_bytes()
        header = json.loads(raw[8 : 8 + int.from_bytes(raw[:8], "little")])
        return json.loads(header["__metadata__"]["state"])["epochs_done"]
    except (TypeError, OSError, ValueError, KeyError):  # no folder or file yet, or caught mid-rename
        return -1


def _outputs(root, stage):
    m = json.loads((_stage_dir(root, stage) / "manifest.json").read_text())
    return m["outputs"], m["stats"]["samples"] if "samples" in m["stats"] else None


@pytest.mark.slow
def test_killing_the_driver_mid_stage_then_rerunning_gives_the_uninterrupted_artifacts(ray_local, tmp_path):
    reference = tmp_path / "reference"
    run_recipe(load_recipe(RECIPE, SETS), str(reference), stages=PIPELINE.split(","))

    root = tmp_path / "drilled"
    env = {**os.environ, "RAY_TMPDIR": f"/tmp/rd{os.getpid()}", "RAY_ADDRESS": ""}
    drills = [
        ("extract", lambda: _has(root, "extract", "*_stats.json", 2)),
        ("cluster", lambda: _epochs_done(root) >= 3),
        ("tokenize", lambda: _has(root, "tokenize", "*_stats.json", 2)),
    ]
    for stage, ready in drills:
        killed = _kill_when(_run_cmd(root), env, ready, tmp_path / f"kill-{stage}.log")
        assert killed, f"the run ended before the {stage} drill could kill it"
        assert not (_stage_dir(root, stage) / "manifest.json").exists(), f"{stage} finished before the kill"
        if stage == "cluster":
            epochs_at_kill = _epochs_done(root)
    final = subprocess.run(_run_cmd(root), env=env, capture_output=True, text=True, timeout=600)
    assert final.returncode == 0, final.stderr[-3000:]
    assert "tokenize: resuming" in final.stdout

    # each stage went on from where it was killed: the run after each kill resumed it
    assert "extract: resuming" in (tmp_path / "kill-cluster.log").read_text()
    assert 3 <= epochs_at_kill < 40
    assert (
        f"cluster: resuming after epoch {epochs_at_kill} of 40"
        in (tmp_path / "kill-tokenize.log").read_text()
    )
    extract_stats = json.loads((_stage_dir(root, "extract") / "manifest.json").read_text())["stats"]
    tokenize_stats = json.loads((_stage_dir(root, "tokenize") / "manifest.json").read_text())["stats"]
    assert extract_stats["shards_reused"] >= 2 and tokenize_stats["shards_reused"] >= 2
    assert not [p for p in Path(root).rglob("_tmp.*")]  # nothing half-written left behind

    for stage in ("extract", "cluster", "tokenize"):
        assert _stage_dir(root, stage).name == _stage_dir(reference, stage).name  # same content-derived path
        got, want = _outputs(root, stage), _outputs(reference, stage)
        assert got == want, stage  # every shard: same samples, bytes and sha256; none lost, none doubled
    assert (_stage_dir(root, "cluster") / "codebook.safetensors").read_bytes() == (
        _stage_dir(reference, "cluster") / "codebook.safetensors"
    ).read_bytes()
    meta, ref_meta = (
        json.loads((_stage_dir(r, "cluster") / "codebook.json").read_text()) for r in (root, reference)
    )
    assert meta["inertia_per_epoch"] == ref_meta["inertia_per_epoch"] and len(meta["inertia_per_epoch"]) == 40
    samples = sum(o["samples"] for o in _outputs(root, "tokenize")[0])
    assert samples == 1438


def _ray_worker_pids(ray_tmp, title):
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().decode(errors="replace")
            environ = (entry / "environ").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if cmdline.startswith(title) and f"RAY_TMPDIR={ray_tmp}" in environ:
            pids.append(int(entry.name))
    return pids


@pytest.mark.slow
def test_a_killed_ray_worker_does_not_fail_the_stage(digits_dir, tmp_path):
    out = tmp_path / "features"
    ray_tmp = f"/tmp/rw{os.getpid()}"
    env = {**os.environ, "RAY_TMPDIR": ray_tmp, "RAY_ADDRESS": ""}
    cmd = [
        sys.executable,
        "-m",
        "kmim",
        "pipeline",
        "extract",
        str(digits_dir / "train.shards.json"),
        str(out),
        "--extractor",
        "timm:test_vit",
        "--image-size",
        "48",
        "--patch-size",
        "16",
        "--batch-size",
        "16",
    ]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    killed = None
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and proc.poll() is None and killed is None:
            workers = _ray_worker_pids(ray_tmp, "ray::ExtractWorker")
            if workers and list(out.glob("*_stats.json")):
                killed = workers[0]
                os.kill(killed, signal.SIGKILL)
            time.sleep(0.05)
        stdout, stderr = proc.communicate(timeout=300)
    finally:
        subprocess.run(["pkill", "-9", "-f", ray_tmp], check=False)
    assert killed is not None, "no Ray worker was seen mid-stage"
    assert proc.returncode == 0, stderr[-3000:]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["stats"]["retries"] >= 1 and manifest["stats"]["samples"] == 1438
    assert "worker died" in stderr
