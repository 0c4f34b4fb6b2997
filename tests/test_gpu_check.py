"""bench/gpu_check.py: the CPU smoke run end to end (every step, in order, in a subprocess), the full run's skips
without CUDA, and how a step that fails or overruns its limit is recorded while the next one still runs."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from bench import gpu_check

REPO = Path(__file__).resolve().parents[1]
RATIO_KEYS = {"name", "median", "min", "max", "rounds", "target"}


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check")
    start = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "bench.gpu_check", "--cpu-smoke", "--out", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=540,  # the script's own --budget-s (480 s) and its watchdog end it first
    )
    return proc, out, time.monotonic() - start


@pytest.mark.slow
def test_cpu_smoke_runs_every_step_in_order_and_records_its_figures(smoke):
    proc, out, seconds = smoke
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    doc = json.loads((out / "gpu_check.json").read_text())
    steps = doc["steps"]
    assert [s["name"] for s in steps] == list(gpu_check.STEPS)
    assert [s["index"] for s in steps] == list(range(1, len(gpu_check.STEPS) + 1))
    assert doc["mode"] == "cpu-smoke" and doc["complete"] and doc["elapsed_s"] <= seconds
    by = {s["name"]: s for s in steps}
    bad = {n: (s["status"], s["error"]) for n, s in by.items() if s["status"] != "ok"}
    assert not bad, bad
    assert all(s["seconds"] is not None and s["key_figures"] for s in steps)

    # the CUDA-only parts are skipped, each with its reason
    for name in ("extract", "kmeans", "tokenize", "train", "ddp"):
        assert by[name]["skipped_parts"] and all(p["reason"] for p in by[name]["skipped_parts"]), name
    if not torch.cuda.is_available():
        env = by["environment"]["figures"]
        assert env["cuda_available"] is False and env["gpus"] == [] and by["environment"]["skipped_parts"]
        counts = by["gpu_tests"]["figures"]["counts"]
        assert counts["skipped"] >= 3 and counts["passed"] == counts["failed"] == 0

    # the CPU-runnable figures
    extract = by["extract"]["figures"]["models"]["vit_tiny_patch16_224"]
    assert extract["torch_loop_img_s"] > 0 and extract["runs"][0]["steady_img_s"] > 0
    assert extract["runs"][0]["images"] == gpu_check.SMOKE.extract_images
    km = by["kmeans"]["figures"]
    assert km["macs_ratio_vs_faiss"] > 0 and km["ours_macs_per_s"] > 0 and km["faiss_gpu"] is False
    assert abs(km["inertia_rel_diff"]) < 1e-4  # same data, same initial centers, one Lloyd epoch each
    assert by["tokenize"]["figures"]["runs"][0]["steady_img_s"] > 0
    train = by["train"]["figures"]
    assert train["tokens"]["steps_per_s"] > 0 and train["online"]["steps_per_s"] > 0
    assert math.isfinite(train["tokens"]["final_loss"]) and math.isfinite(train["online"]["final_loss"])
    ddp = by["ddp"]["figures"]
    assert ddp["losses_equal"] and ddp["rel_diff"] <= ddp["rtol"]
    assert ddp["ddp"]["world_size"] == 2 and ddp["single"]["world_size"] == 1
    assert ddp["ddp"]["steps"] == ddp["single"]["steps"] == gpu_check.SMOKE.ddp_steps
    assert math.isfinite(ddp["final_loss_ddp"]) and math.isfinite(ddp["final_loss_single"])

    # every ratio in the shape bench/report.py reads: one round, median = min = max; no targets in smoke
    names = {r["name"] for r in doc["ratios"]}
    assert {"kmeans_macs_vs_faiss", "kmeans_inertia_vs_faiss", "train_tokens_vs_online"} <= names
    assert "ddp_loss_vs_single" in names and any(n.startswith("extract_vit_t16") for n in names)
    for r in doc["ratios"]:
        assert set(r) == RATIO_KEYS and r["rounds"] == 1 and r["median"] == r["min"] == r["max"] > 0
        assert r["target"] is None

    md = (out / "gpu_check.md").read_text()
    assert "| step | status | seconds | key figures | notes |" in md
    assert all(f"| {i}. {n} | ok |" in md for i, n in enumerate(gpu_check.STEPS, 1))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the skips of a machine without CUDA")
def test_without_cuda_the_full_size_steps_are_skipped_with_the_reason(tmp_path, monkeypatch):
    monkeypatch.setattr(gpu_check, "ray_auth_env", lambda: None)  # no Ray starts here
    code = gpu_check.main(["--out", str(tmp_path), "--steps", "extract,kmeans,tokenize,train"])
    doc = json.loads((tmp_path / "gpu_check.json").read_text())
    assert code == 0 and doc["mode"] == "full" and doc["complete"]
    status = {s["name"]: (s["status"], s["reason"]) for s in doc["steps"]}
    for name in ("extract", "kmeans", "tokenize", "train"):
        assert status[name][0] == "skipped" and "needs CUDA" in status[name][1]
    for name in ("environment", "gpu_tests", "ddp"):
        assert status[name] == ("skipped", "not selected (--steps)")
    assert doc["ratios"] == [] and "| 3. extract | skipped |" in (tmp_path / "gpu_check.md").read_text()


def test_a_failing_or_overrunning_step_is_recorded_and_the_next_one_runs(tmp_path):
    sizes = SimpleNamespace(limits={"environment": 1.0, "gpu_tests": 60.0, "extract": 60.0})
    results = gpu_check.Results(tmp_path, "cpu-smoke", 60.0, gpu_check.SMOKE, ["--cpu-smoke"])
    ctx = SimpleNamespace(sizes=sizes, results=results, smoke=True, cuda=False)
    selected = set(gpu_check.STEPS)
    end = time.monotonic() + 60

    def overrun(ctx, rec):
        rec.key_figures.append("started")
        time.sleep(10)

    def fail(ctx, rec):
        rec.figures["before"] = 1
        raise ValueError("no such thing\nsecond line")

    def fine(ctx, rec):
        rec.key_figures.append("42 things/s")

    for name, fn in (("environment", overrun), ("gpu_tests", fail), ("extract", fine)):
        gpu_check.run_step(ctx, name, fn, selected, end)
        doc = json.loads((tmp_path / "gpu_check.json").read_text())  # rewritten after every step
        assert doc["steps"][gpu_check.STEPS.index(name)]["status"] != "running"
    by = {s["name"]: s for s in doc["steps"]}
    assert by["environment"]["status"] == "timeout" and by["environment"]["seconds"] < 5
    assert "time limit" in by["environment"]["error"] and by["environment"]["key_figures"] == ["started"]
    assert by["gpu_tests"]["status"] == "failed" and by["gpu_tests"]["error"] == "ValueError: no such thing"
    assert by["gpu_tests"]["traceback"] and by["gpu_tests"]["figures"] == {"before": 1}
    assert by["extract"]["status"] == "ok" and by["kmeans"]["status"] == "pending"
    md = (tmp_path / "gpu_check.md").read_text()
    assert "| 1. environment | timeout |" in md and "error: ValueError: no such thing" in md
