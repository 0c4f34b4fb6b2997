"""How time and memory grow with the dataset: the pipeline at N and at 4N images (issue 17 item 5).

Synthetic 224-px JPEG datasets of N and FACTOR x N images (`kmim data synthetic`) go through the three Ray
stages, each run as its own `kmim pipeline ...` process on an embedded Ray, as a user runs them:
extract (timm ViT-S/16, random init, a sample of patches per image), cluster (K = 1,024) and tokenize
(V = 4 views). While a stage runs, its process tree is polled (psutil, every 0.2 s): peak RSS of the driver,
of each stage worker (the largest one) and of Ray's own processes. Reported per stage and size: seconds,
images/s, peak RSS, bytes written per image; and the growth from N to FACTOR x N against the targets: peak
RSS within 1.2 x, time within 1.1 x FACTOR (4.4 x for 4N).

Run: uv run python -m bench.scale [--n 5000] [--factor 4] [--model vit_small_patch16_224] [--k 1024]
     [--views 4] [--patches-per-image 16] [--cluster-epochs 3] [--work DIR] [--out bench/results/scale.json]
A small check: --n 200 --image-size 64 --model vit_tiny_patch16_224 --k 64 (a minute or two).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil

from bench.harness import machine, write_json

RSS_TARGET = 1.2  # peak RSS at FACTOR x N within this multiple of its value at N
TIME_SLACK = 1.1  # time at FACTOR x N within TIME_SLACK x FACTOR of its value at N


class TreeMemory:
    """Peak RSS of a process and its descendants, by role, sampled on a thread until stopped."""

    def __init__(self, pid: int, every: float = 0.2):
        self.root = psutil.Process(pid)
        self.every = every
        self.peak = {"driver": 0, "worker": 0, "ray": 0}
        self.workers: set[int] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def role(proc: psutil.Process) -> str:
        cmd = " ".join(proc.cmdline())
        if "Worker" in cmd and "ray::" in cmd or "default_worker.py" in cmd:
            return "worker"
        return "ray"

    def _sample(self) -> None:
        try:
            self.peak["driver"] = max(self.peak["driver"], self.root.memory_info().rss)
            for child in self.root.children(recursive=True):
                try:
                    role = self.role(child)
                    rss = child.memory_info().rss
                except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                    continue
                self.peak[role] = max(self.peak[role], rss)
                if role == "worker":
                    self.workers.add(child.pid)
        except psutil.NoSuchProcess:
            pass

    def _run(self) -> None:
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(self.every)

    def __enter__(self) -> TreeMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def folder_bytes(path: str) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def run_stage(name: str, argv: list[str], out: str, images: int) -> dict:
    """One `kmim ...` command in its own process, timed and memory-sampled."""
    print(f"  {name}: kmim {' '.join(argv)}", flush=True)
    start = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-m", "kmim", *argv], stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    with TreeMemory(proc.pid) as memory:
        output = proc.communicate()[0].decode(errors="replace")
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{name} failed ({proc.returncode}):\n{output[-3000:]}")
    written = folder_bytes(out)
    row = {
        "stage": name,
        "seconds": round(seconds, 2),
        "images": images,
        "images_per_s": round(images / seconds, 2),
        "peak_rss_mb": {k: round(v / 2**20, 1) for k, v in memory.peak.items()},
        "workers_seen": len(memory.workers),
        "bytes_written": written,
        "bytes_per_image": round(written / images, 1),
    }
    print(
        f"    {seconds:.1f}s, {row['images_per_s']} images/s, peak RSS MB {row['peak_rss_mb']}, "
        f"{row['bytes_per_image']:.0f} bytes/image",
        flush=True,
    )
    return row


def pipeline_at(n: int, args: argparse.Namespace, work: str) -> list[dict]:
    root = f"{work}/n{n}"
    data = f"{root}/data"
    if not os.path.exists(f"{data}/shards.json"):
        subprocess.run(
            [sys.executable, "-m", "kmim", "data", "synthetic", data, "--num-images", str(n), "--image-size",
             str(args.image_size), "--format", "jpg", "--shard-size", str(args.shard_size)],
            check=True,
            stdout=subprocess.DEVNULL,
        )  # fmt: skip
    for stale in ("features", "codebook", "tokens"):  # a finished output would be reused, not timed
        shutil.rmtree(f"{root}/{stale}", ignore_errors=True)
    model = f"timm:{args.model}"
    rows = [
        run_stage(
            "extract",
            ["pipeline", "extract", data, f"{root}/features", "--extractor", model, "--image-size",
             str(args.image_size), "--patch-size", "16", "--patches-per-image", str(args.patches_per_image)],
            f"{root}/features",
            n,
        ),
        run_stage(
            "cluster",
            ["pipeline", "cluster", f"{root}/features", f"{root}/codebook", "--k", str(args.k), "--epochs",
             str(args.cluster_epochs)],
            f"{root}/codebook",
            n,
        ),
        run_stage(
            "tokenize",
            ["pipeline", "tokenize", data, f"{root}/tokens", "--codebook", f"{root}/codebook", "--views",
             str(args.views)],
            f"{root}/tokens",
            n,
        ),
    ]  # fmt: skip
    return rows


def growth(small: list[dict], large: list[dict], factor: int) -> list[dict]:
    out = []
    for a, b in zip(small, large):
        for role in ("driver", "worker"):
            if a["peak_rss_mb"][role]:
                ratio = b["peak_rss_mb"][role] / a["peak_rss_mb"][role]
                out.append(
                    {
                        "name": f"{a['stage']} peak RSS of the {role}, {factor}N / N",
                        "median": round(ratio, 3),
                        "min": round(ratio, 3),
                        "max": round(ratio, 3),
                        "rounds": 1,
                        "target": f"<= {RSS_TARGET}",
                        "met": ratio <= RSS_TARGET,
                    }
                )
        ratio = b["seconds"] / a["seconds"]
        out.append(
            {
                "name": f"{a['stage']} seconds, {factor}N / N",
                "median": round(ratio, 3),
                "min": round(ratio, 3),
                "max": round(ratio, 3),
                "rounds": 1,
                "target": f"<= {TIME_SLACK * factor:.1f}",
                "met": ratio <= TIME_SLACK * factor,
            }
        )
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=5000)
    ap.add_argument("--factor", type=int, default=4)
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--model", default="vit_small_patch16_224")
    ap.add_argument("--k", type=int, default=1024)
    ap.add_argument("--views", type=int, default=4)
    ap.add_argument("--patches-per-image", type=int, default=16)
    ap.add_argument("--cluster-epochs", type=int, default=3)
    ap.add_argument("--shard-size", type=int, default=500)
    ap.add_argument("--work", default="bench/results/scale-work", help="datasets and stage outputs (reused)")
    ap.add_argument("--out", default="bench/results/scale.json")
    args = ap.parse_args(argv)
    start = time.perf_counter()
    sizes = [args.n, args.n * args.factor]
    stages = {}
    for n in sizes:
        print(f"N = {n}", flush=True)
        stages[n] = pipeline_at(n, args, args.work)
    ratios = growth(stages[sizes[0]], stages[sizes[1]], args.factor)
    for r in ratios:
        print(f"{r['name']}: {r['median']:.2f} (target {r['target']}): {'MET' if r['met'] else 'NOT MET'}")
    result = {
        "bench": "scale",
        "command": " ".join(sys.argv),
        "args": vars(args),
        "stages": {str(n): rows for n, rows in stages.items()},
        "ratios": ratios,
        "wall_s": round(time.perf_counter() - start, 1),
        "machine": machine(),
    }
    write_json(args.out, result)
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
