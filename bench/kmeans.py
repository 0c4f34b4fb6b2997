"""Benchmark `kmim pipeline cluster` against faiss.Kmeans and scikit-learn KMeans, same data, interleaved.

Same features (made on the spot), same initial centers, same number of Lloyd iterations. Every case runs
once per round, in rotation (bench/harness.py), and each ratio is taken within a round:
- seconds per epoch, ours (local Ray, 2 workers, features cached in memory) vs the faster of faiss.Kmeans
  (one process, no subsampling) and scikit-learn KMeans: target <= 1.0, at every K of --ks;
- final inertia of our codebook vs faiss's, both evaluated by the same exact faiss search: within 0.1 %;
- our epoch with the features streamed from storage (memory_per_worker_gb=0) vs cached: target <= 1.5;
- assignment rate (2·n·K·D FLOP per epoch over our epoch's seconds) vs a float32 GEMM of the same
  shapes timed in the same rounds: target >= 0.5.
Run: uv run python -m bench.kmeans [--n 500000 --dim 768 --ks 256,4096 --iters 5] [--no-sklearn]
     [--rounds 3] [--out bench/results/kmeans.json]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import tempfile
import time
from collections.abc import Callable

import faiss
import numpy as np
import torch
from safetensors.numpy import save_file

from bench.harness import Case, Ratio, Result, add_common_args, interleave
from kmim.contract import streams
from kmim.contract.codebook import Assigner, Codebook
from kmim.pipeline.cluster import ClusterConfig, cluster
from kmim.pipeline.ray_runtime import ray_session


def make_features(n: int, dim: int, seed: int) -> np.ndarray:
    """A mixture of 1,000 anisotropic Gaussians: structure for K-means to find, not uniform noise."""
    rng = streams.rng("bench_features", seed)
    means = rng.standard_normal((1000, dim)).astype(np.float32) * 2
    x = np.empty((n, dim), np.float32)
    for start in range(0, n, 50_000):
        m = min(50_000, n - start)
        x[start : start + m] = means[rng.integers(0, 1000, m)] + rng.standard_normal(
            (m, dim), dtype=np.float32
        )
    return x


def write_features(out: str, x: np.ndarray, parts: int) -> None:
    from tests.pipeline.features_helper import write_feature_set  # the repo root is on sys.path under -m

    write_feature_set(out, np.array_split(x, parts), dtype="float32")


def inertia(x: np.ndarray, centers: np.ndarray) -> float:
    assigner = Assigner(centers)  # the search every stage uses, for every codebook alike
    total = 0.0
    for start in range(0, len(x), 65536):
        d2, _ = assigner.assign(x[start : start + 65536])
        total += float(d2.astype(np.float64).sum())
    return total


def gemm_seconds_per_epoch(n: int, dim: int, k: int, min_seconds: float = 0.5) -> float:
    """Seconds a float32 GEMM [rows, D] x [D, K] takes for one epoch's 2·n·K·D FLOP, at its measured rate."""
    rows = int(min(65536, max(1024, 2e10 / (2 * dim * k))))
    a, b = torch.randn(rows, dim), torch.randn(dim, k)
    torch.mm(a, b)  # warm-up
    reps, start = 0, time.perf_counter()
    while reps == 0 or time.perf_counter() - start < min_seconds:
        torch.mm(a, b)
        reps += 1
    return (time.perf_counter() - start) * n / (rows * reps)


def bench_k(
    k: int,
    x: np.ndarray,
    tmp: str,
    args: argparse.Namespace,
    result: Result,
    exact_inertia: Callable[[np.ndarray], float],
) -> dict:
    """All cases at one K, interleaved; adds the four ratios to `result` and returns this K's numbers."""
    n, d, iters = args.n, args.dim, args.iters
    c0 = x[streams.rng("bench_kmeans_init").choice(n, k, replace=False)].copy()
    save_file({"centers": c0}, f"{tmp}/c0_{k}.safetensors")
    inertias: dict[str, list[float]] = {"ours": [], "faiss": []}
    runs = iter(range(10**9))

    def ours(memory_gb: float | None, keep: bool) -> float:
        out = f"{tmp}/codebook_{k}_{next(runs)}"
        config = ClusterConfig(
            k=k,
            epochs=iters,
            init_from=f"{tmp}/c0_{k}.safetensors",
            ray_workers=args.workers,
            memory_per_worker_gb=memory_gb,  # None: cached when it fits; 0: streamed every epoch
        )
        cluster(f"{tmp}/features", out, config)
        codebook = Codebook.load(out)
        shutil.rmtree(out)
        if keep:
            inertias["ours"].append(exact_inertia(codebook.centers))
        return float(np.median(codebook.get("seconds_per_epoch")))

    def faiss_kmeans() -> float:
        km = faiss.Kmeans(d, k, niter=iters, max_points_per_centroid=n, min_points_per_centroid=1, seed=1)
        start = time.perf_counter()
        km.train(x, init_centroids=c0)
        seconds = (time.perf_counter() - start) / iters
        inertias["faiss"].append(exact_inertia(km.centroids))
        return seconds

    def sklearn_kmeans() -> float:
        from sklearn.cluster import KMeans

        sk = KMeans(n_clusters=k, init=c0, n_init=1, max_iter=iters, tol=0.0, algorithm="lloyd")
        start = time.perf_counter()
        sk.fit(x)
        seconds = (time.perf_counter() - start) / max(sk.n_iter_, 1)
        inertias.setdefault("sklearn", []).append(exact_inertia(sk.cluster_centers_.astype(np.float32)))
        return seconds

    cases: dict[str, Case] = {
        "ours": lambda: ours(None, True),
        "ours_streamed": lambda: ours(0.0, False),
        "faiss": faiss_kmeans,
    }
    if not args.no_sklearn:
        cases["sklearn"] = sklearn_kmeans
    cases["gemm"] = lambda: gemm_seconds_per_epoch(n, d, k)
    print(f"K={k}: {n} x {d} features, {iters} Lloyd epochs, {args.rounds} rounds", flush=True)
    t = interleave(cases, args.rounds, args.spread_limit)
    result.timings(f"k{k}", t)
    refs = ["faiss"] if args.no_sklearn else ["faiss", "sklearn"]
    against = "faiss" if args.no_sklearn else "faster of faiss and sklearn"
    result.add(t.ratio("ours", refs, name=f"K={k} ours/{against} per epoch"), "<= 1.0")
    result.add(
        Ratio(
            f"K={k} final inertia ours/faiss",
            tuple(o / f for o, f in zip(inertias["ours"], inertias["faiss"])),
            args.spread_limit,
        ),
        "within 0.1 %",
    )
    result.add(t.ratio("ours_streamed", "ours", name=f"K={k} streamed/in-memory per epoch"), "<= 1.5")
    result.add(
        t.ratio("ours", "gemm", rate=True, name=f"K={k} assignment FLOP rate / float32 GEMM"), ">= 0.5"
    )
    ours_s = t.median("ours")
    return {
        "s_per_epoch_median": {c: round(t.median(c), 4) for c in cases},
        "ours_gflops": round(2 * n * k * d / ours_s / 1e9, 2),
        "gemm_gflops": round(2 * n * k * d / t.median("gemm") / 1e9, 2),
        "ours_multiply_adds_per_s_per_core": n * k * d / ours_s / args.workers,
        "inertia_last_round": {name: v[-1] for name, v in inertias.items()},
    }


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=500_000)
    ap.add_argument("--dim", type=int, default=768)
    ap.add_argument("--ks", default="256,4096", help="comma-separated K values")
    ap.add_argument("--k", type=int, default=None, help="one K (overrides --ks)")
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--files", type=int, default=16)
    ap.add_argument("--workers", type=int, default=2, help="Ray CPUs and cluster workers (1 thread each)")
    ap.add_argument("--no-sklearn", action="store_true")
    add_common_args(ap, "kmeans")
    args = ap.parse_args(argv)
    ks = [args.k] if args.k else [int(k) for k in args.ks.split(",") if k.strip()]
    result = Result("kmeans", args)
    x = make_features(args.n, args.dim, seed=0)
    inertia_of: dict[str, float] = {}

    def exact_inertia(centers: np.ndarray) -> float:  # one evaluation per distinct codebook
        key = hashlib.sha256(np.ascontiguousarray(centers, np.float32).tobytes()).hexdigest()
        if key not in inertia_of:
            inertia_of[key] = inertia(x, centers)
        return inertia_of[key]

    info: dict = {"torch_threads": torch.get_num_threads()}
    with tempfile.TemporaryDirectory() as tmp:
        write_features(f"{tmp}/features", x, args.files)
        with ray_session(num_cpus=args.workers):
            for k in ks:
                info[f"k{k}"] = bench_k(k, x, tmp, args, result, exact_inertia)
    by_k = {str(k): info[f"k{k}"]["ours_multiply_adds_per_s_per_core"] for k in ks}
    result.data["info"] = info
    result.data["rates"] = {  # what bench/report.py projects from: our epoch at the largest K
        "kmeans_multiply_adds_per_s_per_core": by_k[str(max(ks))],
        "kmeans_multiply_adds_per_s_per_core_by_k": by_k,
        "kmeans_dim": args.dim,
        "kmeans_k": max(ks),
        "cores": args.workers,
    }
    print(json.dumps(info, indent=2))
    result.write(args.out)
    return result.data


if __name__ == "__main__":
    main()
