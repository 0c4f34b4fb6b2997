"""Benchmark `kmim pipeline tokenize` against a plain single-process loop on the same shards, interleaved.

The loop does the same work minus the writing: read, decode, render the V views, extract features and
search the nearest center with faiss. Target: tokenize throughput >= 0.7 x the loop on 2 cores. The two
run in rotation, once per round (bench/harness.py), and the ratio is taken within each round.
The embedded Ray is started before timing (on a cluster it is up already); the stage's own actor
start-up (loading the codebook and extractor) is inside the timing.
Run: uv run python -m bench.tokenize [--images 2000 --image-size 256 --view-size 224 --k 256 --views 2]
     [--rounds 3] [--out bench/results/tokenize.json]
"""

from __future__ import annotations

import os
import sys

# This file's name shadows the standard library's `tokenize` (which `inspect` imports) while its folder
# leads sys.path; drop that entry before anything imports it.
if sys.path and os.path.abspath(sys.path[0]) == os.path.dirname(os.path.abspath(__file__)):
    sys.path.pop(0)

import argparse  # noqa: E402
import json
import shutil
import tempfile
import time

import numpy as np
import ray

from bench.harness import Result, add_common_args, interleave
from kmim.contract.images import decode_rgb
from kmim.contract.views import apply_view, make_views, to_uint8_array
from kmim.data.reader import ReadStats, iter_samples, open_dataset
from kmim.data.synthetic import SyntheticConfig, write_synthetic
from kmim.pipeline.cluster import ClusterConfig, cluster
from kmim.pipeline.extract import ExtractConfig, extract
from kmim.pipeline.ray_runtime import ray_session
from kmim.pipeline.tokenize import TokenizeConfig, tokenize
from kmim.tokenizer import Tokenizer


def plain_loop(data: str, codebook: str, views: int, seed: int, batch: int) -> tuple[int, float]:
    start = time.perf_counter()
    tok = Tokenizer.from_codebook(codebook)
    n, pending = 0, []
    stats = ReadStats()
    for shard in open_dataset(data).shards:
        for sample in iter_samples(shard, stats):
            img = decode_rgb(sample.image)
            for p in make_views(img.width, img.height, tok.view_spec, seed, sample.key, views):
                pending.append(to_uint8_array(apply_view(img, p)))
            n += 1
            if len(pending) >= batch:
                tok(np.stack(pending))
                pending = []
    if pending:
        tok(np.stack(pending))
    return n, time.perf_counter() - start


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--image-size", type=int, default=256)
    ap.add_argument("--view-size", type=int, default=224)
    ap.add_argument("--k", type=int, default=256)
    ap.add_argument("--views", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=64)
    add_common_args(ap, "tokenize")
    args = ap.parse_args(argv)
    result = Result("tokenize", args)
    with tempfile.TemporaryDirectory() as tmp:
        data = f"{tmp}/data"
        write_synthetic(
            data,
            SyntheticConfig(num_images=args.images, image_size=args.image_size, shard_size=200, format="jpg"),
        )
        with ray_session():
            cores = int(ray.cluster_resources().get("CPU", 1))
            extract(
                data,
                f"{tmp}/features",
                ExtractConfig(image_size=args.view_size, patch_size=16, patches_per_image=16),
            )
            cluster(f"{tmp}/features", f"{tmp}/codebook", ClusterConfig(k=args.k, epochs=2))
            runs = iter(range(10**9))
            counted: list[int] = []

            def ours() -> None:
                out = f"{tmp}/tokens_{next(runs)}"
                config = TokenizeConfig(views=args.views, batch_size=args.batch_size)
                tokenize(data, out, f"{tmp}/codebook", config)
                shutil.rmtree(out)

            def loop() -> float:
                n, seconds = plain_loop(data, f"{tmp}/codebook", args.views, 0, args.batch_size)
                counted.append(n)
                return seconds

            t = interleave({"tokenize": ours, "plain_loop": loop}, args.rounds, args.spread_limit)
    result.timings("tokenize", t)
    result.add(t.ratio("tokenize", "plain_loop", rate=True, name="tokenize / plain loop"), ">= 0.7")
    n = counted[-1]
    info = {
        "loop_img_s": round(n / t.median("plain_loop"), 1),
        "tokenize_img_s": round(n / t.median("tokenize"), 1),
    }
    result.data["info"] = info
    result.data["rates"] = {  # what bench/report.py projects from
        "tokenize_images_per_s_per_core": n / t.median("tokenize") / cores,
        "tokenize_views": args.views,
        "tokenize_k": args.k,
        "tokenize_view_px": args.view_size,
        "cores": cores,
    }
    print(json.dumps(info, indent=2))
    result.write(args.out)
    return result.data


if __name__ == "__main__":
    main()
