"""Benchmark `kmim pipeline cluster` against faiss.Kmeans and scikit-learn KMeans, one run, same data.

Same features (made on the spot), same initial centers, same number of Lloyd iterations:
- seconds per epoch: ours (local Ray, 2 workers) vs faiss.Kmeans (one process, no subsampling) vs sklearn;
- final inertia of each codebook, all evaluated by the same exact faiss search, relative to faiss's;
- FLOP efficiency of our epoch (2·n·K·D per assignment) against a plain float32 matmul in the same run.
Targets: time per epoch <= 1.25 x faiss, inertia within 0.5 % of faiss.
Run: uv run python -m bench.kmeans [--n 500000 --dim 768 --k 256 --iters 5] [--no-sklearn]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

import faiss
import numpy as np
import torch
from safetensors.numpy import save_file

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


def matmul_flops(dim: int, k: int) -> float:
    a = torch.randn(65536, dim)
    b = torch.randn(dim, k)
    torch.mm(a, b)
    reps, start = 10, time.perf_counter()
    for _ in range(reps):
        torch.mm(a, b)
    return 2 * 65536 * dim * k * reps / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=500_000)
    ap.add_argument("--dim", type=int, default=768)
    ap.add_argument("--k", type=int, default=256)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--files", type=int, default=16)
    ap.add_argument("--no-sklearn", action="store_true")
    args = ap.parse_args()
    n, d, k, iters = args.n, args.dim, args.k, args.iters
    r: dict = {"n": n, "dim": d, "k": k, "iters": iters, "threads": torch.get_num_threads()}
    x = make_features(n, d, seed=0)
    c0 = x[streams.rng("bench_kmeans_init").choice(n, k, replace=False)].copy()
    flops_per_epoch = 2.0 * n * k * d

    with tempfile.TemporaryDirectory() as tmp:
        write_features(f"{tmp}/features", x, args.files)
        save_file({"centers": c0}, f"{tmp}/c0.safetensors")
        with ray_session(num_cpus=2):
            start = time.perf_counter()
            cluster(
                f"{tmp}/features",
                f"{tmp}/codebook",
                ClusterConfig(k=k, epochs=iters, init_from=f"{tmp}/c0.safetensors", ray_workers=2),
            )
            r["ours_wall_s"] = round(time.perf_counter() - start, 2)
        codebook = Codebook.load(f"{tmp}/codebook")
    ours = codebook.centers
    r["ours_s_per_epoch"] = round(float(np.median(codebook.get("seconds_per_epoch"))), 3)

    km = faiss.Kmeans(
        d, k, niter=iters, max_points_per_centroid=n, min_points_per_centroid=1, seed=1, verbose=False
    )
    start = time.perf_counter()
    km.train(x, init_centroids=c0)
    r["faiss_s_per_epoch"] = round((time.perf_counter() - start) / iters, 3)
    faiss_centers = km.centroids

    r["ours_inertia"] = inertia(x, ours)
    r["faiss_inertia"] = inertia(x, faiss_centers)
    if not args.no_sklearn:
        from sklearn.cluster import KMeans

        sk = KMeans(n_clusters=k, init=c0, n_init=1, max_iter=iters, tol=0.0, algorithm="lloyd")
        start = time.perf_counter()
        sk.fit(x)
        r["sklearn_s_per_epoch"] = round((time.perf_counter() - start) / max(sk.n_iter_, 1), 3)
        r["sklearn_inertia"] = inertia(x, sk.cluster_centers_.astype(np.float32))
        r["sklearn_vs_faiss_time"] = round(r["sklearn_s_per_epoch"] / r["faiss_s_per_epoch"], 3)

    peak = matmul_flops(d, k)
    r["matmul_gflops"] = round(peak / 1e9, 1)
    r["ours_gflops"] = round(flops_per_epoch / r["ours_s_per_epoch"] / 1e9, 1)
    r["faiss_gflops"] = round(flops_per_epoch / r["faiss_s_per_epoch"] / 1e9, 1)
    r["ours_flop_efficiency"] = round(r["ours_gflops"] / r["matmul_gflops"], 3)
    r["time_ratio_vs_faiss"] = round(r["ours_s_per_epoch"] / r["faiss_s_per_epoch"], 3)
    r["inertia_rel_diff_vs_faiss"] = round((r["ours_inertia"] - r["faiss_inertia"]) / r["faiss_inertia"], 6)
    print(json.dumps(r, indent=2))
    print(f"time per epoch, ours / faiss: {r['time_ratio_vs_faiss']:.2f} (target <= 1.25)")
    print(
        f"final inertia, ours vs faiss: {100 * r['inertia_rel_diff_vs_faiss']:+.3f} % (target within 0.5 %)"
    )
    print(f"assignment FLOP efficiency vs float32 matmul: {r['ours_flop_efficiency']:.2f}")


if __name__ == "__main__":
    main()
