"""TCAS of K-MIM PIXEL codebooks against K on digits (the pattern of paper Table 7), and of random codebooks.

Pipeline as in manifests/recipes/digits.yaml (pixel features, 32 px images, 4 px patches, all 64 patches per
image, float16): the labelled train split is written with `write_digits`, extracted once, clustered for every
K by our distributed k-means (`kmim.pipeline.cluster`, k-means++ init, seed 0, the recipe's 20 epochs), and
each codebook scored by `kmim.pipeline.tokenize.tcas_report` (TCAS, paper eq. 8, form C_ii, over the center
view's tokens of the train split). Two random codebooks of K = 50 get no Lloyd epoch at all:
- `random-features`: 50 distinct feature vectors drawn uniformly (without replacement, seed 0) from all
  train-patch features, i.e. k-means' `random` initialisation and nothing else;
- `random-gaussian`: 50 draws of N(mean, std) of the features per dimension (diagonal, seed 0).
One embedded Ray serves every stage. Seconds: cluster wall time (extract is shared and reported once) and
the TCAS pass.

Run: uv run python -m bench.science.tcas_vs_k [--out DIR] [--ks 10,25,50,100,200] [--epochs 20]
Writes DIR/tcas_vs_k.json, .md and .png (default bench/science/out/tcas_vs_k/).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

RECIPE = "manifests/recipes/digits.yaml"  # relative to the repo root, which is where it is read from
RECIPE_PATH = str(Path(__file__).resolve().parents[2] / RECIPE)
DEFAULT_OUT = "bench/science/out/tcas_vs_k"
# Paper Table 7: TCAS of K-MIM PIXEL codebooks on ImageNet-100 (100 classes), plotted for the pattern only.
RANDOM_KINDS = ("random-features", "random-gaussian")
PAPER_TABLE7_PIXEL = {10: 0.69, 25: 0.60, 50: 0.56, 100: 0.52, 200: 0.49, 1000: 0.39}


def random_codebook(features_url: str, template: str, out: str, k: int, kind: str, seed: int) -> None:
    """A codebook folder `tcas_report` reads: `template`'s extractor and view, random centers, no Lloyd."""
    from safetensors.numpy import save as st_save

    from kmim import fs
    from kmim.contract import streams
    from kmim.contract.manifest import digest
    from kmim.contract.schemas import CODEBOOK_META, CODEBOOK_TENSOR, CODEBOOK_WEIGHTS
    from kmim.pipeline.features import open_features, read_feature_file

    features = open_features(features_url)
    x = np.concatenate([read_feature_file(f.url, features.dim) for f in features.files])
    rng = streams.rng("bench_random_codebook", seed)
    if kind == "random-features":
        centers = x[rng.choice(len(x), k, replace=False)]
        how = f"{k} feature vectors drawn uniformly without replacement (seed {seed}), no Lloyd epoch"
    elif kind == "random-gaussian":
        mean, std = x.mean(axis=0), x.std(axis=0)
        centers = mean + std * rng.standard_normal((k, features.dim))
        how = f"{k} draws of N(feature mean, feature std) per dimension (seed {seed}), no Lloyd epoch"
    else:
        raise ValueError(kind)
    centers = np.ascontiguousarray(centers, dtype=np.float32)
    fs.makedirs(out)
    meta = {
        **fs.read_json(fs.join(template, CODEBOOK_META)),
        "k": k,
        "init": f"{kind}: {how}",
        "epochs_run": 0,
        "seed": seed,
        "inertia_per_epoch": [],
        "cluster_sizes": None,
        "seconds_per_epoch": [],
    }
    fs.write_bytes_atomic(fs.join(out, CODEBOOK_WEIGHTS), st_save({CODEBOOK_TENSOR: centers}))
    fs.write_json_atomic(fs.join(out, CODEBOOK_META), meta)
    manifest = fs.read_json(fs.join(template, "manifest.json"))
    manifest.update(
        fingerprint=digest(
            {"random_codebook": kind, "k": k, "seed": seed, "features": features.manifest.fingerprint}
        ),
        config={"random": how},
        stats={"k": k, "dim": features.dim, "epochs_run": 0},
        outputs=[
            {"url": CODEBOOK_WEIGHTS, "sha256": fs.sha256_of(fs.join(out, CODEBOOK_WEIGHTS))},
            {"url": CODEBOOK_META},
        ],
    )
    fs.write_json_atomic(fs.join(out, "manifest.json"), manifest)


def row_from(report: dict, codebook: str, k: int, cluster_s: float | None, tcas_s: float) -> dict:
    t = report["tcas"]
    return {
        "codebook": codebook,
        "k": k,
        "tcas": round(t["tcas"], 4),
        "first_term": round(t["first_term"], 4),
        "second_term": round(t["second_term"], 4),
        "patch_weighted_first_term": round(t["patch_weighted_first_term"], 4),
        "used_codes": report["usage"]["used_codes"],
        "perplexity": round(report["usage"]["perplexity"], 1),
        "patches": report["usage"]["patches"],
        "cluster_s": None if cluster_s is None else round(cluster_s, 1),
        "tcas_s": round(tcas_s, 1),
    }


def markdown(rows: list[dict]) -> str:
    lines = [
        "| codebook | K | TCAS | 1st term | 2nd term | 1st term, patch-weighted | used codes | perplexity | cluster s | TCAS s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        cs = "-" if r["cluster_s"] is None else f"{r['cluster_s']:.1f}"
        lines.append(
            f"| {r['codebook']} | {r['k']} | {r['tcas']:.4f} | {r['first_term']:.4f} | {r['second_term']:.4f} | "
            f"{r['patch_weighted_first_term']:.4f} | {r['used_codes']}/{r['k']} | "
            f"{r['perplexity']:.1f} | {cs} | {r['tcas_s']:.1f} |"
        )
    return "\n".join(lines)


def plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    km = [r for r in rows if r["codebook"] == "k-means"]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([r["k"] for r in km], [r["tcas"] for r in km], "o-", label="k-means (ours, digits, 10 classes)")
    for r, marker in zip([r for r in rows if r["codebook"] != "k-means"], ["X", "s", "D", "^"]):
        ax.plot(
            [r["k"]], [r["tcas"]], marker, markersize=9, linestyle="none", label=f"{r['codebook']} (digits)"
        )
    ks = sorted(PAPER_TABLE7_PIXEL)
    ax.plot(
        ks,
        [PAPER_TABLE7_PIXEL[k] for k in ks],
        "--",
        color="grey",
        label="paper Table 7 (ImageNet-100, 100 classes)",
    )
    ax.set_xscale("log")
    ax.set_xlabel("K (codebook size)")
    ax.set_ylabel("TCAS (lower is better)")
    ax.set_title("TCAS vs K, K-MIM PIXEL codebooks")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def measure(
    ks: list[int], epochs: int, random_k: int, randoms: list[str], seed: int, work: str, num_cpus: int | None
) -> dict:
    from kmim.data.digits import write_digits
    from kmim.lineage.recipe import load_recipe
    from kmim.pipeline.cluster import cluster
    from kmim.pipeline.extract import extract
    from kmim.pipeline.ray_runtime import ray_session
    from kmim.pipeline.tokenize import tcas_report

    recipe = load_recipe(RECIPE_PATH)
    rows, times = [], {}
    start = time.perf_counter()
    t0 = time.perf_counter()
    write_digits(f"{work}/digits", recipe.dataset)
    times["data_s"] = round(time.perf_counter() - t0, 1)
    train = f"{work}/digits/train.shards.json"
    with ray_session(num_cpus=num_cpus) as resources:
        times["ray_cpus"] = resources.get("CPU")
        t0 = time.perf_counter()
        extract(train, f"{work}/features", recipe.extract)
        times["extract_s"] = round(time.perf_counter() - t0, 1)
        for k in ks:
            cfg = replace(recipe.cluster, k=k, epochs=epochs, seed=seed)
            t0 = time.perf_counter()
            cluster(f"{work}/features", f"{work}/codebook-k{k}", cfg)
            cluster_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            report = tcas_report(train, f"{work}/codebook-k{k}")
            rows.append(row_from(report, "k-means", k, cluster_s, time.perf_counter() - t0))
            print(f"K={k}: TCAS {rows[-1]['tcas']:.4f}, {rows[-1]['used_codes']} codes used", flush=True)
        for kind in randoms:
            out = f"{work}/codebook-{kind}"
            random_codebook(f"{work}/features", f"{work}/codebook-k{ks[0]}", out, random_k, kind, seed)
            t0 = time.perf_counter()
            report = tcas_report(train, out)
            rows.append(row_from(report, kind, random_k, None, time.perf_counter() - t0))
            print(f"{kind} K={random_k}: TCAS {rows[-1]['tcas']:.4f}", flush=True)
    times["wall_s"] = round(time.perf_counter() - start, 1)
    return {"rows": rows, "times": times, "samples": report["samples"], "classes": report["tcas"]["classes"]}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=DEFAULT_OUT)
    ap.add_argument("--ks", default="10,25,50,100,200", help="comma-separated codebook sizes")
    ap.add_argument("--epochs", type=int, default=None, help="k-means epochs (default: the recipe's)")
    ap.add_argument("--random-k", type=int, default=50)
    ap.add_argument(
        "--random", default=",".join(RANDOM_KINDS), help="random codebooks to score (comma-separated)"
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--num-cpus", type=int, default=None, help="CPUs of the embedded Ray (default: all)")
    args = ap.parse_args(argv)
    from kmim.lineage.recipe import load_recipe

    ks = sorted({int(k) for k in args.ks.split(",") if k.strip()})
    epochs = args.epochs or load_recipe(RECIPE_PATH).cluster.epochs
    randoms = [r for r in args.random.split(",") if r.strip()]
    unknown = sorted(set(randoms) - set(RANDOM_KINDS))
    if unknown:
        ap.error(f"--random: unknown {', '.join(unknown)} (known: {', '.join(RANDOM_KINDS)})")
    with tempfile.TemporaryDirectory(prefix="tcas_vs_k-") as work:
        result = measure(ks, epochs, args.random_k, randoms, args.seed, work, args.num_cpus)
    result = {
        "script": "bench.science.tcas_vs_k",
        "recipe": RECIPE,
        "ks": ks,
        "kmeans_epochs": epochs,
        "seed": args.seed,
        "random_k": args.random_k,
        "split": "train",
        "features": "pixel, 32 px, patch 4, 64 patches/image",
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        **result,
    }
    table = markdown(result["rows"])
    t = result["times"]
    print()
    print(table)
    print(
        f"\n{result['samples']} train images, {result['classes']} classes; k-means {epochs} epochs, seed {args.seed}; "
        f"data {t['data_s']}s, extract {t['extract_s']}s, total wall {t['wall_s']}s on {result['machine']}"
    )
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "tcas_vs_k.json"), "w") as f:
        json.dump(result, f, indent=2)
    with open(os.path.join(args.out, "tcas_vs_k.md"), "w") as f:
        f.write(table + "\n")
    plot(result["rows"], os.path.join(args.out, "tcas_vs_k.png"))
    print(f"wrote {args.out}/tcas_vs_k.json, .md, .png")
    return result


if __name__ == "__main__":
    main()
