"""One prepared GPU check: environment, the `gpu` tests, and the four stages' figures, each timed and bounded.

Run: uv run python -m bench.gpu_check --out DIR [--cpu-smoke] [--budget-s 480] [--steps extract,kmeans]

Steps, in order (each under its own time limit, all under --budget-s; a failed step is recorded with its
error and the next one runs; a step that needs CUDA is `skipped`, with the reason, when CUDA is absent):
1. environment  torch / CUDA / driver versions, GPUs and their memory, faiss.get_num_gpus(), bf16, CPUs.
2. gpu_tests    `pytest -m gpu -q` in a subprocess: passed / failed / skipped counts.
3. extract      `kmim.pipeline.extract` (decode in the Ray actors) with timm ViT-S/16 and ViT-B/16 (random
                init, 224 px, bf16 autocast) in images/s per GPU, one actor per GPU and several actors sharing
                a GPU, against a plain batched torch forward over the same decoded views (ratio).
4. kmeans       one Lloyd epoch of `kmim.pipeline.cluster` (gpus_per_worker=1) on 2M x 768 features at
                K = 8,192, in multiply-adds per second (n*K*D / epoch seconds), against faiss.Kmeans(gpu=True,
                niter=1) from the same initial centers (ratio), and the agreement of the two final inertias.
5. tokenize     a ViT-S/16 codebook (features of a sample, a small K) then `kmim.pipeline.tokenize` with
                views=4, in images/s per GPU.
6. train        K-MIM ViT-S/16 at batch 256, bf16: steps/s and images/s of a direct loop of MaskedImageModel
                forward / backward / AdamW steps on random views (no data loader), with `tokens` targets and
                with `online` targets (the codebook's extractor run in every step, on CUDA and, as
                trainer/train.py builds it, on the CPU).
7. ddp          `kmim train --nproc 2` (NCCL with two GPUs, else gloo on the CPU) and a single-process run at
                the same global batch on a tiny token dataset; their final losses must agree.

--cpu-smoke runs every step on the CPU at tiny sizes (a few seconds each): a 32-px ViT for extract, 20,000 x
32 at K = 16 against faiss CPU for k-means, the pixel extractor for tokenize, vit_micro_patch4_32 at batch 8
in float32 for train. Without --cpu-smoke and without CUDA, steps 3-6 are skipped.

After every step DIR/gpu_check.json and DIR/gpu_check.md are rewritten, so a killed run leaves the results so
far. Every measured ratio is also listed under "ratios" as {name, median, min, max, rounds, target} (one round
here: median = min = max). Bulk data (the k-means features, datasets) goes to a scratch folder (--work,
default a temporary folder), removed at the end.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
STEPS = ("environment", "gpu_tests", "extract", "kmeans", "tokenize", "train", "ddp")
NEEDS_CUDA = ("extract", "kmeans", "tokenize", "train")  # at full size; --cpu-smoke runs them on the CPU
MIN_STEP_S = 5.0  # a step is not started with less budget than this left
CLEANUP_RESERVE_S = 20.0  # the steps end this long before --budget-s: Ray's shutdown, the scratch folder

TARGETS = {  # the repo's own bench targets (bench/extract.py, bench/kmeans.py, bench/train.py)
    "extract": ">= 0.8",
    "kmeans_rate": ">= 0.8",  # our epoch at most 1.25 x faiss's
    "kmeans_inertia": "within 0.5 %",
    "train_tokens_vs_online": ">= 1.8",
}


@dataclass(frozen=True)
class Sizes:
    """Every size of the check; FULL on a GPU, SMOKE on the CPU."""

    # extract
    extract_models: tuple[str, ...]
    extract_images: int
    extract_source_px: int
    extract_view_px: int
    extract_patch: int
    extract_batch: int
    extract_shard: int
    # kmeans
    kmeans_n: int
    kmeans_dim: int
    kmeans_k: int
    kmeans_files: int
    # tokenize
    tokenize_extractor: str
    tokenize_view_px: int
    tokenize_patch: int
    tokenize_images: int
    tokenize_feature_shards: int  # the shards features are taken from for the codebook
    tokenize_patches_per_image: int
    tokenize_k: int
    tokenize_views: int
    tokenize_batch: int
    # train
    train_encoder: str
    train_view_px: int
    train_patch: int
    train_batch: int
    train_k: int
    train_decoder: tuple[int, int, int]  # embed dim, depth, heads
    train_online_extractor: str
    train_warmup: int
    train_steps: int
    train_online_cpu_steps: int
    # ddp
    ddp_images: int
    ddp_global_batch: int
    ddp_steps: int
    ddp_lr: float
    ddp_rtol: float
    # per-step limits (seconds)
    limits: dict[str, float] = field(default_factory=dict)


FULL = Sizes(
    extract_models=("vit_small_patch16_224", "vit_base_patch16_224"),
    extract_images=2048,
    extract_source_px=224,
    extract_view_px=224,
    extract_patch=16,
    extract_batch=128,
    extract_shard=128,
    kmeans_n=2_000_000,
    kmeans_dim=768,
    kmeans_k=8192,
    kmeans_files=16,
    tokenize_extractor="timm:vit_small_patch16_224",
    tokenize_view_px=224,
    tokenize_patch=16,
    tokenize_images=2048,
    tokenize_feature_shards=2,
    tokenize_patches_per_image=64,
    tokenize_k=256,
    tokenize_views=4,
    tokenize_batch=256,
    train_encoder="vit_small_patch16_224",
    train_view_px=224,
    train_patch=16,
    train_batch=256,
    train_k=1024,
    train_decoder=(512, 8, 16),
    train_online_extractor="timm:vit_small_patch16_224",
    train_warmup=3,
    train_steps=10,
    train_online_cpu_steps=2,
    ddp_images=96,
    ddp_global_batch=64,
    ddp_steps=8,
    ddp_lr=1e-3,
    ddp_rtol=0.05,
    limits={
        "environment": 60,
        "gpu_tests": 150,
        "extract": 160,
        "kmeans": 200,
        "tokenize": 120,
        "train": 100,
        "ddp": 150,
    },
)

SMOKE = Sizes(
    extract_models=("vit_tiny_patch16_224",),
    extract_images=16,
    extract_source_px=32,
    extract_view_px=32,
    extract_patch=16,
    extract_batch=8,
    extract_shard=16,
    kmeans_n=20_000,
    kmeans_dim=32,
    kmeans_k=16,
    kmeans_files=4,
    tokenize_extractor="pixel",
    tokenize_view_px=32,
    tokenize_patch=4,
    tokenize_images=32,
    tokenize_feature_shards=2,
    tokenize_patches_per_image=32,
    tokenize_k=16,
    tokenize_views=4,
    tokenize_batch=64,
    train_encoder="vit_micro_patch4_32",
    train_view_px=32,
    train_patch=4,
    train_batch=8,
    train_k=16,
    train_decoder=(64, 2, 4),
    train_online_extractor="pixel",
    train_warmup=1,
    train_steps=3,
    train_online_cpu_steps=0,  # the online step already runs its extractor on the CPU
    ddp_images=32,
    ddp_global_batch=64,
    ddp_steps=8,
    ddp_lr=1e-3,
    ddp_rtol=0.05,
    limits={
        "environment": 30,
        "gpu_tests": 120,
        "extract": 90,
        "kmeans": 60,
        "tokenize": 90,
        "train": 60,
        "ddp": 150,
    },
)


# --- results ---------------------------------------------------------------------------------------


class StepTimeout(BaseException):
    """Raised in the main thread when a step's time limit is reached (a BaseException, like
    KeyboardInterrupt, so that no `except Exception` on the way swallows it)."""


class SkipStep(Exception):
    """Raised by a step that cannot run here (say, faiss without GPU support); its message is the reason."""


@dataclass
class StepRecord:
    index: int
    name: str
    status: str = "pending"  # pending | running | ok | failed | skipped | timeout
    seconds: float | None = None
    limit_s: float | None = None
    key_figures: list[str] = field(default_factory=list)  # short, for the table
    figures: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    skipped_parts: list[dict[str, str]] = field(default_factory=list)
    reason: str | None = None  # why the whole step was skipped
    error: str | None = None  # one line
    traceback: list[str] = field(default_factory=list)  # its last lines

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


class Results:
    """The check's JSON and markdown, rewritten whenever something is recorded."""

    def __init__(self, out: Path, mode: str, budget_s: float, sizes: Sizes, argv: list[str]):
        self.out = out
        self.started = time.monotonic()
        self.lock = threading.RLock()
        self.steps = [StepRecord(i + 1, name) for i, name in enumerate(STEPS)]
        self.ratios: list[dict[str, Any]] = []
        self.data: dict[str, Any] = {
            "check": "gpu_check",
            "mode": mode,
            "command": "uv run python -m bench.gpu_check " + " ".join(argv),
            "started_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "finished_at": None,
            "complete": False,
            "budget_s": budget_s,
            "elapsed_s": 0.0,
            "host": platform.node(),
            "sizes": asdict(sizes),
        }

    def step(self, name: str) -> StepRecord:
        return self.steps[STEPS.index(name)]

    def add_ratio(self, name: str, value: float, target: str | None) -> None:
        """One measured ratio, one round. The targets are for full sizes: a smoke run records none."""
        if self.data["mode"] != "full":
            target = None
        with self.lock:
            self.ratios = [r for r in self.ratios if r["name"] != name]
            v = float(value)
            self.ratios.append({"name": name, "median": v, "min": v, "max": v, "rounds": 1, "target": target})

    def write(self) -> None:
        with self.lock:
            self.out.mkdir(parents=True, exist_ok=True)
            self.data["elapsed_s"] = round(time.monotonic() - self.started, 2)
            doc = {**self.data, "steps": [s.to_json() for s in self.steps], "ratios": self.ratios}
            _write_atomic(
                self.out / "gpu_check.json", json.dumps(doc, indent=2, default=_json_default) + "\n"
            )
            _write_atomic(self.out / "gpu_check.md", self.markdown())

    def markdown(self) -> str:
        d = self.data
        state = "complete" if d["complete"] else "incomplete (killed or still running)"
        lines = [
            f"# gpu_check ({d['mode']})",
            "",
            f"`{d['command']}` on {d['host']}, started {d['started_at']}, {d['elapsed_s']:.0f} s of a "
            f"{d['budget_s']:.0f} s budget; {state}.",
            "",
            "| step | status | seconds | key figures | notes |",
            "|---|---|---|---|---|",
        ]
        for s in self.steps:
            notes = list(s.notes)
            notes += [f"skipped {p['part']}: {p['reason']}" for p in s.skipped_parts]
            if s.reason:
                notes.insert(0, s.reason)
            if s.error:
                notes.insert(0, f"error: {s.error}")
            seconds = "" if s.seconds is None else f"{s.seconds:.1f}"
            lines.append(
                f"| {s.index}. {s.name} | {s.status} | {seconds} | {_cell('; '.join(s.key_figures))} | "
                f"{_cell('; '.join(notes))} |"
            )
        return "\n".join(lines) + "\n"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _json_default(o: Any) -> Any:
    if hasattr(o, "item"):
        return o.item()
    if isinstance(o, (set, tuple)):
        return list(o)
    return str(o)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def _fmt(x: float, unit: str = "") -> str:
    """A rate or count in 3 significant figures with k / M / G / T."""
    if x is None or not math.isfinite(x):
        return f"{x}{unit}"
    for scale, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= scale:
            return f"{x / scale:.3g}{prefix}{unit}"
    return f"{x:.3g}{unit}"


# --- running steps ---------------------------------------------------------------------------------


class Context:
    """What the steps share: sizes, devices, the scratch folder, one embedded Ray, small cached inputs."""

    def __init__(self, args: argparse.Namespace, results: Results):
        import torch

        self.smoke: bool = args.cpu_smoke
        self.sizes = SMOKE if self.smoke else FULL
        self.results = results
        self.cuda = torch.cuda.is_available()
        self.gpus = torch.cuda.device_count() if self.cuda else 0
        self.use_cuda = self.cuda and not self.smoke
        self.cpus = os.cpu_count() or 1
        self.work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="gpu_check_"))
        self.work.mkdir(parents=True, exist_ok=True)
        self.own_work = not args.work
        self.stack = contextlib.ExitStack()
        self.ray_resources: dict | None = None
        self.datasets: dict[tuple, str] = {}
        self.tiny_tokens_dir: str | None = None
        self.procs: list[subprocess.Popen] = []  # children to stop if the watchdog fires
        if self.smoke:
            # Smoke figures check that things run, not speed: one thread keeps a busy 2-core machine from
            # stalling in OpenMP barriers (the Ray workers and the DDP ranks use one thread each too).
            torch.set_num_threads(1)

    def ray(self) -> dict:
        """One embedded Ray on 127.0.0.1 for every stage of the check (tests/conftest.py's ray_local does the
        same)."""
        if self.ray_resources is None:
            from kmim.pipeline.ray_runtime import ray_session

            self.ray_resources = self.stack.enter_context(ray_session(num_cpus=self.cpus))
        return self.ray_resources

    def synthetic(self, n: int, size: int, shard: int) -> str:
        """Synthetic JPEGs (kmim.data.synthetic), written once per (n, size, shard)."""
        key = (n, size, shard)
        if key not in self.datasets:
            from kmim.data.synthetic import SyntheticConfig, write_synthetic

            out = str(self.work / f"synthetic-{n}-{size}-{shard}")
            write_synthetic(
                out, SyntheticConfig(num_images=n, image_size=size, shard_size=shard, format="jpg", classes=5)
            )
            self.datasets[key] = out
        return self.datasets[key]

    def close(self) -> None:
        self.stack.close()
        if self.own_work:
            shutil.rmtree(self.work, ignore_errors=True)


def _tail(tb: str, lines: int = 8) -> list[str]:
    return [line for line in tb.rstrip().splitlines() if line.strip()][-lines:]


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}".strip().rstrip(":")


def _on_alarm(signum, frame):  # noqa: ANN001
    raise StepTimeout()


def run_step(
    ctx: Context, name: str, fn: Callable[[Context, StepRecord], None], selected: set[str], budget_end: float
) -> None:
    rec = ctx.results.step(name)
    left = budget_end - time.monotonic()
    limit = min(ctx.sizes.limits.get(name, 120.0), left)
    rec.limit_s = round(max(limit, 0.0), 1)
    if name not in selected:
        rec.status, rec.reason = "skipped", "not selected (--steps)"
        ctx.results.write()
        return
    if left < MIN_STEP_S:
        rec.status, rec.reason = "skipped", f"budget exhausted ({max(left, 0):.0f} s left of --budget-s)"
        ctx.results.write()
        return
    if name in NEEDS_CUDA and not ctx.smoke and not ctx.cuda:
        rec.status = "skipped"
        rec.reason = "needs CUDA and torch.cuda.is_available() is False (--cpu-smoke runs the CPU variant)"
        ctx.results.write()
        return
    rec.status = "running"
    ctx.results.write()
    print(f"[gpu_check] step {rec.index} {name} (limit {limit:.0f} s)", file=sys.stderr, flush=True)
    start = time.monotonic()
    previous = signal.signal(signal.SIGALRM, _on_alarm)
    outer, _ = signal.setitimer(
        signal.ITIMER_REAL, limit
    )  # an alarm set before (pytest-timeout's) comes back
    try:
        fn(ctx, rec)
        rec.status = "ok" if rec.status == "running" else rec.status
    except SkipStep as e:
        rec.status, rec.reason = "skipped", str(e)
    except StepTimeout:
        rec.status = "timeout"
        rec.error = f"step time limit of {limit:.0f} s reached"
        rec.traceback = _tail(traceback.format_exc())
    except Exception as e:  # noqa: BLE001 - recorded; the next step runs
        rec.status = "failed"
        rec.error = _one_line(e)
        rec.traceback = _tail(traceback.format_exc())
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        rec.seconds = round(time.monotonic() - start, 2)
        if outer > 0:
            signal.setitimer(signal.ITIMER_REAL, max(outer - rec.seconds, 0.001))
        ctx.results.write()
    print(
        f"[gpu_check] step {rec.index} {name}: {rec.status} in {rec.seconds:.1f} s",
        file=sys.stderr,
        flush=True,
    )


def run_proc(
    ctx: Context, cmd: list[str], env: dict[str, str] | None = None, cwd: Path = REPO
) -> tuple[int, str]:
    """A subprocess in its own session (its children die with it on a timeout); (exit code, output)."""
    proc = subprocess.Popen(
        cmd,
        cwd=str(cwd),
        env=child_env() if env is None else env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    ctx.procs.append(proc)
    try:
        out, _ = proc.communicate()
        return proc.returncode, out
    finally:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        ctx.procs.remove(proc)


# --- 1. environment --------------------------------------------------------------------------------


def step_environment(ctx: Context, rec: StepRecord) -> None:
    import faiss
    import ray
    import timm
    import torch

    f = rec.figures
    f.update(
        python=platform.python_version(),
        platform=platform.platform(),
        torch=torch.__version__,
        torch_cuda=torch.version.cuda,
        cudnn=torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        cuda_available=ctx.cuda,
        gpu_count=ctx.gpus,
        faiss=getattr(faiss, "__version__", None),
        faiss_gpu_build=hasattr(faiss, "StandardGpuResources"),
        faiss_num_gpus=int(faiss.get_num_gpus()),
        ray=ray.__version__,
        timm=timm.__version__,
        cpu_count=ctx.cpus,
        cpus_usable=len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else ctx.cpus,
        load_avg=list(os.getloadavg()),
        torch_threads=torch.get_num_threads(),
    )
    if ctx.cuda:
        gpus = []
        for i in range(ctx.gpus):
            p = torch.cuda.get_device_properties(i)
            gpus.append(
                {
                    "name": p.name,
                    "memory_gib": round(p.total_memory / 1024**3, 1),
                    "capability": f"{p.major}.{p.minor}",
                    "multiprocessors": p.multi_processor_count,
                }
            )
        f["gpus"] = gpus
        f["bf16_supported"] = bool(torch.cuda.is_bf16_supported())
        f["driver"] = _nvidia_smi_driver()
        rec.key_figures.append(
            f"{ctx.gpus} x {gpus[0]['name']} ({gpus[0]['memory_gib']} GiB), driver {f['driver']}, "
            f"CUDA {f['torch_cuda']}, bf16 {f['bf16_supported']}"
        )
    else:
        f.update(gpus=[], bf16_supported=None, driver=_nvidia_smi_driver())
        rec.skipped_parts.append({"part": "GPU properties, driver, bf16", "reason": "CUDA not available"})
        rec.key_figures.append("no CUDA")
    rec.key_figures.append(
        f"torch {f['torch']}, faiss {f['faiss']} ({f['faiss_num_gpus']} GPUs), {ctx.cpus} CPUs"
    )
    if ctx.cuda and not f["faiss_gpu_build"]:
        rec.notes.append(
            "faiss has no GPU support: the k-means GPU reference is skipped (install the gpu extra)"
        )


def _nvidia_smi_driver() -> str | None:
    if not shutil.which("nvidia-smi"):
        return None
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return out.strip().splitlines()[0] if out.strip() else None


# --- 2. the gpu-marked tests -----------------------------------------------------------------------

_COUNT = re.compile(r"(\d+) (passed|failed|skipped|deselected|errors?|xfailed|xpassed)\b")


def _gpu_test_files() -> list[str]:
    """The test files that use the `gpu` marker (a text search; smoke mode collects only these)."""
    found = []
    for p in sorted((REPO / "tests").rglob("test_*.py")):
        text = p.read_text(errors="replace")
        if "mark.gpu" in text:
            found.append(str(p.relative_to(REPO)))
    return found


def step_gpu_tests(ctx: Context, rec: StepRecord) -> None:
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider"]
    if ctx.smoke:
        files = _gpu_test_files()
        cmd += files
        rec.notes.append(f"smoke: collects only the files using the gpu marker ({', '.join(files)})")
    code, out = run_proc(ctx, cmd, env=child_env())
    summary = next((line for line in reversed(out.splitlines()) if _COUNT.search(line)), "")
    counts = {"passed": 0, "failed": 0, "skipped": 0, "deselected": 0, "errors": 0}
    for n, what in _COUNT.findall(summary):
        counts["errors" if what.startswith("error") else what] = int(n)
    rec.figures.update(counts=counts, exit_code=code, summary=summary.strip("= "), command=" ".join(cmd[1:]))
    rec.key_figures.append(
        f"{counts['passed']} passed, {counts['failed']} failed, {counts['skipped']} skipped"
    )
    if not ctx.cuda:
        rec.skipped_parts.append({"part": "gpu tests", "reason": "CUDA not available: they skip"})
    if code not in (0, 5) or counts["failed"] or counts["errors"]:
        rec.figures["output_tail"] = _tail(out, 30)
        raise RuntimeError(f"pytest -m gpu exited {code}: {summary.strip('= ') or 'no summary line'}")


# --- 3. extract ------------------------------------------------------------------------------------


def decoded_views(data: str, view_px: int):
    """Every image's view 0 as the extract stage makes it: uint8 [N, S, S, 3]."""
    import numpy as np

    from kmim.contract.views import ViewSpec, apply_view, center_view, to_uint8_array
    from kmim.data.reader import ReadStats, iter_images, open_dataset

    spec, stats, views = ViewSpec(view_px), ReadStats(), []
    for shard in open_dataset(data).shards:
        for _, img in iter_images(shard, stats):
            views.append(to_uint8_array(apply_view(img, center_view(img.width, img.height, spec))))
    return np.stack(views)


def plain_forward_rate(ctx: Context, model_name: str, views, batch: int, bf16: bool) -> tuple[float, float]:
    """(images/s, seconds) of a plain batched loop: the timm model (random init, as the extractor builds it),
    normalize, forward_features under autocast, patch tokens back to the host; the views already decoded."""
    import timm
    import torch

    from kmim.contract.views import normalize

    device = torch.device("cuda" if ctx.use_cuda else "cpu")
    model = timm.create_model(model_name, pretrained=False, num_classes=0, img_size=views.shape[1])
    model = model.eval().to(device)
    prefix = model.num_prefix_tokens

    def run(part) -> None:
        x = normalize(torch.from_numpy(part).to(device))
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
            tokens = model.forward_features(x)
        tokens[:, prefix:].float().cpu()

    with torch.inference_mode():
        run(views[:batch])  # warm-up: kernels, allocator
        if ctx.use_cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        for i in range(0, len(views), batch):
            run(views[i : i + batch])
        if ctx.use_cuda:
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
    return len(views) / seconds, seconds


def stage_rates(manifest, workers: int, gpus_used: float) -> dict[str, float]:
    """Images/s of a shard stage: end to end (its wall clock, actor start-up included) and steady (the
    shards' own processing seconds, summed over shards, spread over the workers), both per GPU."""
    s = manifest.stats
    images = s["samples"]
    busy = s["seconds"].get("total") or sum(v for k, v in s["seconds"].items() if k != "total")
    per = max(gpus_used, 1.0) if gpus_used else 1.0
    return {
        "images": images,
        "wall_s": s["wall_seconds"],
        "end_to_end_img_s": images / s["wall_seconds"] / per,
        "steady_img_s": images / (busy / workers) / per if busy else float("nan"),
        "seconds": s["seconds"],
    }


def gpu_worker_variants(ctx: Context) -> list[tuple[float, float]]:
    """(gpus_per_worker, cpus_per_worker): one actor per GPU, and several actors sharing each GPU (they
    decode in parallel); on the CPU (smoke), one CPU actor."""
    if not ctx.use_cuda:
        return [(0.0, 1.0)]
    per_gpu = max(1, (ctx.cpus - 1) // max(ctx.gpus, 1))
    variants = [(1.0, float(min(per_gpu, 4)))]
    share = 1 << (min(8, per_gpu).bit_length() - 1)  # a power of 2: 1 / share adds up to exactly one GPU
    if share > 1:
        variants.append((1.0 / share, 1.0))
    return variants


def _workers(ctx: Context, gpw: float, cpw: float, shards: int) -> tuple[int, float]:
    """(workers, GPUs they use) as kmim's worker_count places them."""
    from kmim.pipeline.ray_runtime import worker_count

    workers = worker_count(ctx.ray(), cpw, gpw, shards)
    return workers, (min(float(ctx.gpus), workers * gpw) if gpw else 0.0)


def step_extract(ctx: Context, rec: StepRecord) -> None:
    from kmim.data.reader import open_dataset
    from kmim.pipeline.extract import ExtractConfig, extract

    s = ctx.sizes
    bf16 = ctx.use_cuda and _bf16()
    if not bf16:
        rec.skipped_parts.append(
            {
                "part": "bf16 / per-GPU rates",
                "reason": "CPU smoke mode" if ctx.smoke else "no bf16 on this GPU",
            }
        )
    t0 = time.monotonic()
    data = ctx.synthetic(s.extract_images, s.extract_source_px, s.extract_shard)
    views = decoded_views(data, s.extract_view_px)
    shards = len(open_dataset(data).shards)
    rec.figures.update(
        images=len(views), source_px=s.extract_source_px, view_px=s.extract_view_px, shards=shards,
        batch=s.extract_batch, bf16=bf16, data_and_decode_s=round(time.monotonic() - t0, 2), models={},
    )  # fmt: skip
    ctx.ray()
    for model in s.extract_models:
        short = _short(model)
        plain, plain_s = plain_forward_rate(ctx, model, views, s.extract_batch, bf16)
        m: dict[str, Any] = {
            "torch_loop_img_s": round(plain, 1),
            "torch_loop_s": round(plain_s, 3),
            "runs": [],
        }
        rec.figures["models"][model] = m
        best = None
        for gpw, cpw in gpu_worker_variants(ctx):
            cfg = ExtractConfig(
                extractor=f"timm:{model}",
                image_size=s.extract_view_px,
                patch_size=s.extract_patch,
                batch_size=s.extract_batch,
                gpus_per_worker=gpw,
                cpus_per_worker=cpw,
                dtype="float16",
            )
            workers, gpus_used = _workers(ctx, gpw, cpw, shards)
            out = str(ctx.work / f"features-{short}-{gpw:g}")
            manifest = extract(data, out, cfg).manifest
            shutil.rmtree(out, ignore_errors=True)
            r = stage_rates(manifest, workers, gpus_used)
            ratio = r["steady_img_s"] / plain
            run = {
                "gpus_per_worker": gpw,
                "cpus_per_worker": cpw,
                "workers": workers,
                "gpus_used": gpus_used,
                **{k: (round(v, 2) if isinstance(v, float) else v) for k, v in r.items()},
                "ratio_vs_torch_loop": round(ratio, 3),
            }
            m["runs"].append(run)
            name = f"extract_{short}_gpw{gpw:g}_vs_torch_loop"
            ctx.results.add_ratio(name, ratio, TARGETS["extract"])
            if best is None or ratio > best[0]:
                best = (ratio, r["steady_img_s"], gpw, r["end_to_end_img_s"])
            ctx.results.write()
        assert best is not None
        unit = "img/s/GPU" if ctx.use_cuda else "img/s"
        rec.key_figures.append(
            f"{short}: {_fmt(best[1])} {unit} steady ({_fmt(best[3])} end to end, gpw {best[2]:g}) vs torch "
            f"loop {_fmt(plain)}, ratio {best[0]:.2f}"
        )
    rec.notes.append(
        "steady = the shards' own seconds (actor start-up excluded); the torch loop gets views decoded in "
        "advance; the stage writes every patch's feature (float16)"
    )


def _short(model: str) -> str:
    m = re.match(r"vit_(\w+?)_patch(\d+)", model)
    return f"vit_{m.group(1)[0]}{m.group(2)}" if m else model.replace("timm:", "")


def _bf16() -> bool:
    import torch

    return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())


# --- 4. k-means ------------------------------------------------------------------------------------


def make_features(n: int, dim: int, seed: int):
    """bench/kmeans.py's Gaussian mixture (imported here: that module pulls in Ray, faiss and the stages)."""
    from bench.kmeans import make_features as mixture

    return mixture(n, dim, seed)


def exact_inertia(x, centers, use_gpu: bool) -> float:
    """Σ min ||x - c||² by the one search every stage uses (kmim Assigner), for any set of centers alike."""
    import numpy as np

    from kmim.contract.codebook import Assigner

    assigner = Assigner(centers, use_gpu)
    total = 0.0
    for start in range(0, len(x), 65536):
        d2, _ = assigner.assign(x[start : start + 65536])
        total += float(d2.astype(np.float64).sum())
    return total


def step_kmeans(ctx: Context, rec: StepRecord) -> None:
    import faiss
    import numpy as np
    from safetensors.numpy import save_file

    from kmim.contract import streams
    from kmim.contract.codebook import Codebook
    from kmim.pipeline.cluster import ClusterConfig, cluster
    from tests.pipeline.features_helper import write_feature_set  # the repo root is on sys.path under -m

    s = ctx.sizes
    n, d, k = s.kmeans_n, s.kmeans_dim, s.kmeans_k
    faiss_gpu = ctx.use_cuda and hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0
    if ctx.use_cuda and not faiss_gpu:
        # kmim's Assigner would fall back to the CPU without a word, and the CPU search alone at these sizes
        # (2 x 13 T multiply-adds for the inertias) would not fit the step's time.
        raise SkipStep(
            "faiss here has no GPU support (faiss-cpu): install the `gpu` extra (faiss-gpu-cu12) for this step"
        )
    if not ctx.use_cuda:
        rec.skipped_parts.append(
            {"part": "GPU k-means and faiss GPU", "reason": "CPU smoke mode: ours and faiss run on the CPU"}
        )
    t0 = time.monotonic()
    x = make_features(n, d, seed=0)
    c0 = x[streams.rng("bench_kmeans_init").choice(n, k, replace=False)].copy()
    feats, book = ctx.work / "kmeans-features", ctx.work / "kmeans-codebook"
    write_feature_set(str(feats), np.array_split(x, s.kmeans_files), dtype="float32")
    save_file({"centers": c0}, str(ctx.work / "kmeans-c0.safetensors"))
    rec.figures.update(n=n, dim=d, k=k, files=s.kmeans_files, data_s=round(time.monotonic() - t0, 2))
    ctx.results.write()

    gpw = 1.0 if ctx.use_cuda else 0.0
    cpw = float(max(1, (ctx.cpus - 1) // max(ctx.gpus, 1))) if ctx.use_cuda else 1.0
    ctx.ray()
    try:
        start = time.perf_counter()
        cluster(
            str(feats),
            str(book),
            ClusterConfig(
                k=k,
                epochs=1,
                init_from=str(ctx.work / "kmeans-c0.safetensors"),
                gpus_per_worker=gpw,
                cpus_per_worker=cpw,
            ),
        )
        ours_wall = time.perf_counter() - start
    finally:
        shutil.rmtree(feats, ignore_errors=True)
    codebook = Codebook.load(str(book))
    ours_s = float(codebook.get("seconds_per_epoch")[0])
    macs = float(n) * k * d
    rec.figures.update(
        gpus_per_worker=gpw,
        cpus_per_worker=cpw,
        workers=codebook.get("workers"),
        ours_epoch_s=round(ours_s, 4),
        ours_wall_s=round(ours_wall, 2),
        ours_macs_per_s=macs / ours_s,
    )
    ctx.results.write()

    km = faiss.Kmeans(
        d, k, niter=1, gpu=bool(faiss_gpu), max_points_per_centroid=n, min_points_per_centroid=1, seed=1,
        verbose=False,
    )  # fmt: skip
    start = time.perf_counter()
    km.train(x, init_centroids=c0)
    faiss_s = time.perf_counter() - start
    ours_inertia = exact_inertia(x, codebook.centers, faiss_gpu)
    faiss_inertia = exact_inertia(x, km.centroids, faiss_gpu)
    rate_ratio = faiss_s / ours_s  # equal work: ours MACs/s over faiss's
    rel = (ours_inertia - faiss_inertia) / faiss_inertia
    rec.figures.update(
        faiss_gpu=bool(faiss_gpu),
        faiss_epoch_s=round(faiss_s, 4),
        faiss_macs_per_s=macs / faiss_s,
        macs_ratio_vs_faiss=round(rate_ratio, 4),
        ours_inertia=ours_inertia,
        faiss_inertia=faiss_inertia,
        inertia_rel_diff=rel,
        epoch_inertia_ours=codebook.get("inertia_per_epoch")[0],
        epoch_inertia_faiss=float(km.obj[-1]) if len(km.obj) else None,
    )
    ctx.results.add_ratio("kmeans_macs_vs_faiss", rate_ratio, TARGETS["kmeans_rate"])
    ctx.results.add_ratio("kmeans_inertia_vs_faiss", ours_inertia / faiss_inertia, TARGETS["kmeans_inertia"])
    where = "GPU" if faiss_gpu else "CPU"
    rec.key_figures.append(
        f"{n:,} x {d} at K={k}: ours {_fmt(macs / ours_s, 'MAC/s')} ({ours_s:.2f} s/epoch) vs faiss {where} "
        f"{_fmt(macs / faiss_s, 'MAC/s')}, ratio {rate_ratio:.2f}; inertia rel diff {rel:+.2e}"
    )
    rec.notes.append(
        "same data and initial centers, one Lloyd epoch each; ours = the epoch's seconds in codebook.json "
        "(features already loaded in the actors); inertias of both final centers by the same exact search"
    )


# --- 5. tokenize -----------------------------------------------------------------------------------


def tiny_tokens(ctx: Context, views: int) -> str:
    """A tiny token dataset (32 px, pixel extractor, patch 4, K = 16) for the trainer: synthetic images ->
    extract -> cluster -> tokenize, as tests/conftest.py's digits_tokens builds one."""
    from kmim.pipeline.cluster import ClusterConfig, cluster
    from kmim.pipeline.extract import ExtractConfig, extract
    from kmim.pipeline.tokenize import TokenizeConfig, tokenize

    if ctx.tiny_tokens_dir is not None:
        return ctx.tiny_tokens_dir
    s = ctx.sizes
    root = ctx.work / "tiny-tokens"
    data = ctx.synthetic(s.ddp_images, 40, max(8, s.ddp_images // 4))
    ctx.ray()
    extract(data, str(root / "features"), ExtractConfig(image_size=32, patch_size=4, patches_per_image=16))
    cluster(str(root / "features"), str(root / "codebook"), ClusterConfig(k=16, epochs=3))
    tokenize(data, str(root / "tokens"), str(root / "codebook"), TokenizeConfig(views=views))
    ctx.tiny_tokens_dir = str(root / "tokens")
    return ctx.tiny_tokens_dir


def step_tokenize(ctx: Context, rec: StepRecord) -> None:
    from kmim.data.reader import open_dataset
    from kmim.pipeline.cluster import ClusterConfig, cluster
    from kmim.pipeline.extract import ExtractConfig, extract
    from kmim.pipeline.tokenize import TokenizeConfig, tokenize

    s = ctx.sizes
    if not ctx.use_cuda:
        rec.skipped_parts.append({"part": "ViT-S/16 on the GPU", "reason": "CPU smoke mode: pixel extractor"})
    root = ctx.work / "tokenize"
    t0 = time.monotonic()
    data = ctx.synthetic(s.tokenize_images, max(s.tokenize_view_px, 40), s.extract_shard)
    shards = open_dataset(data).shards
    sample = (
        shards[0].url
        if s.tokenize_feature_shards <= 1 or len(shards) == 1
        else f"{data}/train-{{000000..{min(s.tokenize_feature_shards, len(shards)) - 1:06d}}}.tar"
    )
    ctx.ray()
    gpw0, cpw0 = gpu_worker_variants(ctx)[0]
    extract(
        sample,
        str(root / "features"),
        ExtractConfig(
            extractor=s.tokenize_extractor,
            image_size=s.tokenize_view_px,
            patch_size=s.tokenize_patch,
            patches_per_image=s.tokenize_patches_per_image,
            gpus_per_worker=gpw0,
            cpus_per_worker=cpw0,
            dtype="float32",
        ),
    )
    cluster(str(root / "features"), str(root / "codebook"), ClusterConfig(k=s.tokenize_k, epochs=3))
    rec.figures.update(
        extractor=s.tokenize_extractor, view_px=s.tokenize_view_px, k=s.tokenize_k, views=s.tokenize_views,
        images=s.tokenize_images, codebook_s=round(time.monotonic() - t0, 2), runs=[],
    )  # fmt: skip
    ctx.results.write()
    best = None
    for gpw, cpw in gpu_worker_variants(ctx):
        workers, gpus_used = _workers(ctx, gpw, cpw, len(shards))
        out = root / f"tokens-{gpw:g}"
        manifest = tokenize(
            data,
            str(out),
            str(root / "codebook"),
            TokenizeConfig(
                views=s.tokenize_views, batch_size=s.tokenize_batch, gpus_per_worker=gpw, cpus_per_worker=cpw
            ),
        ).manifest
        if ctx.smoke and ctx.tiny_tokens_dir is None:
            ctx.tiny_tokens_dir = str(out)  # 32 px, patch 4, K = 16: the DDP step trains on these
        else:
            shutil.rmtree(out, ignore_errors=True)
        r = stage_rates(manifest, workers, gpus_used)
        rec.figures["runs"].append(
            {
                "gpus_per_worker": gpw,
                "cpus_per_worker": cpw,
                "workers": workers,
                "gpus_used": gpus_used,
                **{k: (round(v, 2) if isinstance(v, float) else v) for k, v in r.items()},
            }
        )
        if best is None or r["steady_img_s"] > best[0]:
            best = (r["steady_img_s"], r["end_to_end_img_s"], gpw)
        ctx.results.write()
    assert best is not None
    unit = "img/s/GPU" if ctx.use_cuda else "img/s"
    rec.key_figures.append(
        f"{_short(s.tokenize_extractor)} K={s.tokenize_k}, {s.tokenize_views} views: {_fmt(best[0])} {unit} "
        f"steady ({_fmt(best[1])} end to end, gpw {best[2]:g})"
    )
    rec.notes.append(
        "images (not views) per second; the nearest-center search runs on the CPU (Tokenizer default)"
    )


# --- 6. train --------------------------------------------------------------------------------------


def random_codebook(k: int, dim: int, view_px: int, patch: int, extractor: str):
    """A codebook held in memory (random centers): enough for the cost of online targets."""
    import numpy as np

    from kmim.contract import streams
    from kmim.contract.codebook import Codebook

    centers = streams.rng("bench_random_codebook", 0).standard_normal((k, dim)).astype(np.float32)
    meta = {"view": {"image_size": view_px, "patch_size": patch, "crop_pct": 0.875}, "spherical": False}
    meta["extractor"] = {"name": extractor, "image_size": view_px, "patch_size": patch}
    return Codebook(centers, meta)


def timed_train_steps(ctx: Context, target: str, steps: int, warmup: int, tokenizer=None) -> dict[str, float]:
    """steps/s and images/s of K-MIM training steps: the trainer's model, optimizer, masks and autocast, on
    random uint8 views held on the host (as the loader delivers them); no data loader."""
    import torch

    from kmim.contract import streams
    from kmim.contract.views import normalize
    from kmim.trainer.config import ModelConfig
    from kmim.trainer.loop import autocast_dtype
    from kmim.trainer.model import MaskedImageModel
    from kmim.trainer.train import masking_generator, param_groups

    s = ctx.sizes
    device = torch.device("cuda" if ctx.use_cuda else "cpu")
    dim, depth, heads = s.train_decoder
    cfg = ModelConfig(
        encoder=s.train_encoder,
        image_size=s.train_view_px,
        patch_size=s.train_patch,
        decoder_embed_dim=dim,
        decoder_depth=depth,
        decoder_num_heads=heads,
        target=target,
    )
    torch.manual_seed(streams.seed_state("model_init", 0))
    model = MaskedImageModel(cfg, s.train_k).to(device)
    opt = torch.optim.AdamW(param_groups(model, 0.05), lr=1.5e-4, betas=(0.9, 0.95))
    amp = autocast_dtype("auto", device)
    gen = streams.torch_generator("mask", 0, 0, 0)
    b, px = s.train_batch, s.train_view_px
    grid = px // s.train_patch
    views = torch.randint(0, 256, (b, px, px, 3), dtype=torch.uint8, generator=gen)
    tokens = torch.randint(0, s.train_k, (b, grid * grid), generator=gen)
    if ctx.use_cuda:
        views = views.pin_memory()
    start, loss = 0.0, None
    for step in range(warmup + steps):
        if step == warmup:
            if ctx.use_cuda:
                torch.cuda.synchronize()
            start = time.perf_counter()
        imgs = normalize(views.to(device, non_blocking=True))
        t = torch.from_numpy(tokenizer(views.numpy())) if tokenizer is not None else tokens
        t = t.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
            loss = model(imgs, t, generator=masking_generator(0, step, 0))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    if ctx.use_cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    result = {
        "steps": steps,
        "steps_per_s": steps / seconds,
        "images_per_s": steps * b / seconds,
        "final_loss": float(loss),
        "autocast": str(amp).replace("torch.", "") if amp else "off (float32)",
    }
    del model, opt
    if ctx.use_cuda:
        torch.cuda.empty_cache()
    return result


def step_train(ctx: Context, rec: StepRecord) -> None:
    from kmim.extractors import ExtractorSpec
    from kmim.tokenizer import Tokenizer

    s = ctx.sizes
    if not ctx.use_cuda:
        rec.skipped_parts.append({"part": "bf16 on the GPU", "reason": "CPU smoke mode: float32 on the CPU"})
    spec = ExtractorSpec(s.train_online_extractor, s.train_view_px, s.train_patch)
    rec.figures.update(
        encoder=s.train_encoder, batch=s.train_batch, view_px=s.train_view_px, k=s.train_k,
        decoder=list(s.train_decoder), online_extractor=s.train_online_extractor, method=(
            "direct loop: MaskedImageModel forward + backward + AdamW step on random uint8 views and random "
            "token ids (masks and autocast as the trainer), no data loader"
        ),
    )  # fmt: skip
    tok = timed_train_steps(ctx, "tokens", s.train_steps, s.train_warmup)
    rec.figures["tokens"] = tok
    ctx.results.write()

    device = "cuda" if ctx.use_cuda else "cpu"
    extractor_dim = _extractor_dim(spec)
    book = random_codebook(s.train_k, extractor_dim, s.train_view_px, s.train_patch, spec.name)
    online = timed_train_steps(ctx, "online", s.train_steps, s.train_warmup, Tokenizer(book, spec, device))
    online["extractor_device"] = device
    rec.figures["online"] = online
    ratio = tok["images_per_s"] / online["images_per_s"]
    rec.figures["tokens_vs_online"] = round(ratio, 3)
    ctx.results.add_ratio("train_tokens_vs_online", ratio, TARGETS["train_tokens_vs_online"])
    ctx.results.write()
    rec.key_figures.append(
        f"{_short(s.train_encoder)} b{s.train_batch}: tokens {tok['steps_per_s']:.2f} steps/s "
        f"({tok['images_per_s']:.0f} img/s), online {online['steps_per_s']:.2f} steps/s "
        f"({online['images_per_s']:.0f} img/s, extractor on {device}); tokens/online {ratio:.2f}"
    )
    if ctx.use_cuda and s.train_online_cpu_steps:
        # trainer/train.py builds the online Tokenizer without a device: its extractor runs on the CPU.
        cpu = timed_train_steps(ctx, "online", s.train_online_cpu_steps, 1, Tokenizer(book, spec, "cpu"))
        cpu["extractor_device"] = "cpu"
        rec.figures["online_as_trainer_builds_it"] = cpu
        rec.key_figures.append(
            f"online as train.py builds it (extractor on the CPU): {cpu['steps_per_s']:.2f} steps/s"
        )
        rec.notes.append(
            "trainer/train.py calls Tokenizer.from_codebook(...) without a device, so `online` targets run "
            "their ViT on the CPU even when training on CUDA"
        )
    rec.notes.append(rec.figures["method"])


def _extractor_dim(spec) -> int:  # noqa: ANN001
    from kmim.extractors import build_extractor

    return int(build_extractor(spec, "cpu").dim)


# --- 7. DDP ----------------------------------------------------------------------------------------


def _run_losses(run_dir: Path) -> tuple[dict, list[float]]:
    summary = json.loads((run_dir / "train_summary.json").read_text())
    losses = [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return summary, losses


def step_ddp(ctx: Context, rec: StepRecord) -> None:
    s = ctx.sizes
    t0 = time.monotonic()
    tokens = tiny_tokens(ctx, views=2)
    rec.figures["data_s"] = round(time.monotonic() - t0, 2)
    env = {
        k: v
        for k, v in child_env().items()
        if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
        and not k.startswith(("SLURM_", "TORCHELASTIC_"))
    }
    if ctx.gpus >= 2 and not ctx.smoke:
        backend, where = "nccl", "2 GPUs"
    elif ctx.gpus == 1 and not ctx.smoke:
        # kmim's choose_backend: two local ranks on one GPU get gloo (NCCL refuses a shared device)
        backend, where = "gloo", "1 GPU shared by both ranks"
    else:
        backend, where = "gloo", "CPU"
        env["CUDA_VISIBLE_DEVICES"] = ""
        if ctx.smoke:
            env["OMP_NUM_THREADS"] = "1"
            rec.skipped_parts.append({"part": "NCCL on GPUs", "reason": "CPU smoke mode: gloo on the CPU"})
        elif ctx.gpus == 0:
            rec.skipped_parts.append(
                {"part": "NCCL on GPUs", "reason": "CUDA not available: gloo on the CPU"}
            )
    gb, steps = s.ddp_global_batch, s.ddp_steps
    common = [
        f"data.train={tokens}",
        "model.encoder=vit_micro_patch4_32",
        "model.image_size=32",
        "model.patch_size=4",
        "optim.epochs=1",
        f"optim.lr={s.ddp_lr}",
        "optim.warmup_epochs=0",
        f"data.samples_per_epoch={gb * steps}",
        "data.loader_workers=0",
        "log_every=1",
        f"checkpoint.every_steps={steps}",
    ]
    runs = {}
    for label, nproc in (("ddp", 2), ("single", 1)):
        out = ctx.work / f"ddp-{label}"
        overrides = [*common, f"output={out}", f"data.batch_size={gb // nproc}"]
        start = time.monotonic()
        if nproc == 1 and not ctx.cuda:
            # No CUDA in this process either: the single-process run needs no process of its own.
            from kmim.trainer.config import load_config
            from kmim.trainer.train import train

            train(load_config(None, overrides))
            how = "in this process"
        else:
            cmd = [sys.executable, "-m", "kmim", "train", "--nproc", str(nproc), *overrides]
            code, text = run_proc(ctx, cmd, env=env)
            if code != 0:
                rec.figures[f"{label}_output_tail"] = _tail(text, 30)
                raise RuntimeError(
                    f"kmim train --nproc {nproc} exited {code}: {_tail(text, 1)[0] if text else ''}"
                )
            how = f"kmim train --nproc {nproc}"
        summary, losses = _run_losses(out)
        runs[label] = {**summary, "losses": losses, "wall_s": round(time.monotonic() - start, 2), "how": how}
        rec.figures[label] = runs[label]
        ctx.results.write()
    a, b = runs["ddp"]["final_loss"], runs["single"]["final_loss"]
    half = max(1, steps // 2)
    ta, tb = (float(sum(runs[r]["losses"][-half:]) / half) for r in ("ddp", "single"))
    rel = abs(ta - tb) / abs(tb)
    equal = bool(rel <= s.ddp_rtol and runs["ddp"]["world_size"] == 2 and runs["ddp"]["steps"] == steps)
    rec.figures.update(
        backend=backend, where=where, global_batch=gb, steps=steps, lr=s.ddp_lr, final_loss_ddp=a,
        final_loss_single=b, tail_steps=half, tail_mean_ddp=ta, tail_mean_single=tb, rel_diff=rel,
        rtol=s.ddp_rtol, losses_equal=equal,
    )  # fmt: skip
    ctx.results.add_ratio("ddp_loss_vs_single", ta / tb, f"within {s.ddp_rtol * 100:g} %")
    rec.key_figures.append(
        f"{backend} on {where}, global batch {gb}, {steps} steps: final loss DDP {a:.4f} vs single {b:.4f}; "
        f"mean of the last {half} steps {ta:.4f} vs {tb:.4f} (rel diff {rel:.2%}, tolerance {s.ddp_rtol:.0%})"
    )
    rec.notes.append(
        "not bit-equal by design (each rank reads its own shards and draws masks seeded by its rank), and one "
        "step's loss is noisy at this size: the check compares the mean loss of the last half of the steps"
    )
    if not equal:
        raise RuntimeError(f"DDP and single-process losses differ by {rel:.2%} (> {s.ddp_rtol:.0%})")


# --- main ------------------------------------------------------------------------------------------

STEP_FNS: dict[str, Callable[[Context, StepRecord], None]] = {
    "environment": step_environment,
    "gpu_tests": step_gpu_tests,
    "extract": step_extract,
    "kmeans": step_kmeans,
    "tokenize": step_tokenize,
    "train": step_train,
    "ddp": step_ddp,
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="folder for gpu_check.json and gpu_check.md")
    ap.add_argument("--cpu-smoke", action="store_true", help="every step on the CPU at tiny sizes")
    ap.add_argument("--budget-s", type=float, default=480.0, help="the whole run's time limit (seconds)")
    ap.add_argument("--steps", default=",".join(STEPS), help=f"comma-separated subset of {','.join(STEPS)}")
    ap.add_argument("--work", default=None, help="scratch folder for bulk data (default: a temporary one)")
    args = ap.parse_args(argv)
    wanted = {s.strip() for s in args.steps.split(",") if s.strip()}
    unknown = wanted - set(STEPS)
    if unknown:
        ap.error(f"unknown steps {sorted(unknown)}; choose from {','.join(STEPS)}")
    args.selected = wanted
    return args


@contextlib.contextmanager
def watchdog(ctx: Context, results: Results, budget_end: float) -> Iterator[None]:
    """At the budget's end, record the running step as a timeout, stop the children and exit (the steps' own
    limits end them CLEANUP_RESERVE_S earlier: this is for a step stuck where no signal reaches it)."""

    def fire() -> None:
        with results.lock:
            for rec in results.steps:
                if rec.status == "running":
                    rec.status, rec.error = "timeout", "the run's --budget-s was exceeded (watchdog)"
            results.write()
        for proc in list(ctx.procs):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
        if ctx.own_work:
            shutil.rmtree(ctx.work, ignore_errors=True)
        print("[gpu_check] budget exceeded: results so far are written; exiting", file=sys.stderr, flush=True)
        os._exit(124)

    timer = threading.Timer(max(0.0, budget_end - time.monotonic()), fire)
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()


RAY_AUTH_SET: dict[str, str] = {}  # what main() put in the environment for the embedded Ray


def ray_auth_env() -> None:
    """Ray >= 2.52 turns token auth on for a new local cluster and, when it finds no token, writes one to
    ~/.ray/auth_token. As tests/test_jobs.py does for its head, give this run's Ray its own token: RAY_AUTH_MODE
    and RAY_AUTH_TOKEN, set before ray is first imported (its token loader reads them once)."""
    import secrets

    if "RAY_AUTH_MODE" in os.environ or "ray" in sys.modules:
        return
    RAY_AUTH_SET.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(16))
    os.environ.update(RAY_AUTH_SET)


def child_env(**extra: str) -> dict[str, str]:
    """The environment of a subprocess: this one's, less the Ray token made for this run."""
    env = {k: v for k, v in os.environ.items() if k not in RAY_AUTH_SET}
    env.update(extra)
    return env


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    ray_auth_env()
    argv = sys.argv[1:] if argv is None else argv
    mode = "cpu-smoke" if args.cpu_smoke else "full"
    results = Results(Path(args.out), mode, args.budget_s, SMOKE if args.cpu_smoke else FULL, argv)
    budget_end = results.started + args.budget_s
    results.write()
    ctx = Context(args, results)
    results.data["cuda_available"] = ctx.cuda
    try:
        with watchdog(ctx, results, budget_end):
            for name in STEPS:
                run_step(ctx, name, STEP_FNS[name], args.selected, budget_end - CLEANUP_RESERVE_S)
    finally:
        ctx.close()
        results.data["finished_at"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
        results.data["complete"] = True
        results.write()
    print(results.markdown())
    failed = [s.name for s in results.steps if s.status in ("failed", "timeout")]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
