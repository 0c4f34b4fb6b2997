"""Benchmark `kmim pipeline extract` against plain single-process loops on the same shards, interleaved.

Each pair runs in rotation, once per round (bench/harness.py), and each ratio is taken within a round:
1. pixel: extract of all patches vs a loop that only reads and decodes the images  (target >= 0.8)
2. disk:  feature bytes written per second by that extract vs the output disk's sequential write
          bandwidth: the same number of bytes written with plain open(...,'wb').write of a large buffer
          + fsync, in the same folder, in the same rounds                              (target >= 0.5)
3. timm:  extract throughput vs a plain batched torch forward loop over the same views (target >= 0.8)

The embedded Ray is started before timing (on a cluster it is already up) and a first small extract
warms its worker processes; both are printed apart. Default inputs are ImageNet-like: 400-px JPEGs
(ImageNet averages about 400x350) viewed at 224 with 16-px patches. With tiny images (--image-size 64 --view-size 64) the stage writes
~12x the bytes it reads and the pixel ratio falls to about 0.5: the features, not the reading, dominate.
Run: uv run python -m bench.extract [--images 2000] [--model vit_small_patch16_224 --timm-images 2000]
     [--no-timm] [--rounds 3] [--out bench/results/extract.json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import ray
import torch

from bench.harness import Result, add_common_args, interleave
from kmim.contract import streams
from kmim.contract.images import decode_rgb
from kmim.contract.views import ViewSpec, apply_view, center_view, to_uint8_array
from kmim.data.reader import ReadStats, iter_samples, open_dataset
from kmim.data.synthetic import SyntheticConfig, write_synthetic
from kmim.extractors import ExtractorSpec, TimmExtractor
from kmim.pipeline.extract import ExtractConfig, extract
from kmim.pipeline.ray_runtime import ray_session


def read_decode_loop(data: str) -> tuple[int, float]:
    start = time.perf_counter()
    n = 0
    stats = ReadStats()
    for shard in open_dataset(data).shards:
        for sample in iter_samples(shard, stats):
            decode_rgb(sample.image)
            n += 1
    return n, time.perf_counter() - start


def torch_forward_loop(data: str, model: str, image_size: int, batch: int) -> tuple[int, float]:
    start = time.perf_counter()
    extractor = TimmExtractor(ExtractorSpec(f"timm:{model}", image_size, 16))
    spec = ViewSpec(image_size)
    n, views = 0, []
    stats = ReadStats()
    for shard in open_dataset(data).shards:
        for sample in iter_samples(shard, stats):
            img = decode_rgb(sample.image)
            views.append(to_uint8_array(apply_view(img, center_view(img.width, img.height, spec))))
            if len(views) == batch:
                extractor(np.stack(views))
                n, views = n + len(views), []
    if views:
        extractor(np.stack(views))
        n += len(views)
    return n, time.perf_counter() - start


def timed_extract(data: str, out: str, config: ExtractConfig) -> tuple[int, float]:
    start = time.perf_counter()
    m = extract(data, out, config).manifest
    return m.stats["samples"], time.perf_counter() - start


def feature_bytes(out: str) -> int:
    """Bytes of the feature files an extract wrote (every file but its JSON stats and manifest)."""
    return sum(p.stat().st_size for p in Path(out).rglob("*") if p.is_file() and p.suffix != ".json")


def write_fsync(path: str, nbytes: int, buffer: bytes) -> float:
    """Seconds to write `nbytes` sequentially with plain writes of `buffer`, fsync included."""
    start = time.perf_counter()
    with open(path, "wb") as f:
        left = nbytes
        while left > 0:
            left -= f.write(buffer[: min(left, len(buffer))])
        f.flush()
        os.fsync(f.fileno())
    seconds = time.perf_counter() - start
    os.remove(path)
    return seconds


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--image-size", type=int, default=400, help="side of the stored JPEGs")
    ap.add_argument("--view-size", type=int, default=224, help="side of view 0 (extract --image-size)")
    ap.add_argument("--shard-size", type=int, default=200)
    ap.add_argument("--model", default="vit_small_patch16_224")
    ap.add_argument("--timm-images", type=int, default=2000)
    ap.add_argument("--timm-image-size", type=int, default=112)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--no-timm", action="store_true", help="skip the timm comparison")
    add_common_args(ap, "extract")
    args = ap.parse_args(argv)
    result = Result("extract", args)
    info: dict = {"torch_threads": torch.get_num_threads()}
    with tempfile.TemporaryDirectory() as tmp:
        data = f"{tmp}/pixels"
        write_synthetic(
            data,
            SyntheticConfig(
                num_images=args.images, image_size=args.image_size, shard_size=args.shard_size, format="jpg"
            ),
        )
        timm_data = f"{tmp}/timm"
        if not args.no_timm:
            write_synthetic(
                timm_data,
                SyntheticConfig(
                    num_images=args.timm_images,
                    image_size=args.timm_image_size,
                    shard_size=args.shard_size,
                    format="jpg",
                ),
            )
        t0 = time.perf_counter()
        with ray_session():
            info["ray_startup_s"] = round(time.perf_counter() - t0, 2)
            cores = int(ray.cluster_resources().get("CPU", 1))
            pixel = ExtractConfig(image_size=args.view_size, patch_size=16, batch_size=args.batch_size)
            info["worker_warmup_s"] = round(
                timed_extract(data + "/train-000000.tar", f"{tmp}/f_warm", pixel)[1], 2
            )
            runs = iter(range(10**9))
            written: list[int] = []
            images: list[int] = []
            buffer = streams.rng("bench_features", 0).bytes(16 * 1024**2)  # incompressible, made once

            def pixel_extract() -> float:
                out = f"{tmp}/f_pixel_{next(runs)}"
                n, seconds = timed_extract(data, out, pixel)
                images.append(n)
                written.append(feature_bytes(out))
                shutil.rmtree(out)
                return seconds

            def read_decode() -> float:
                return read_decode_loop(data)[1]

            print(f"pixel: {args.images} JPEGs of {args.image_size} px, view {args.view_size}", flush=True)
            t = interleave(
                {
                    "extract": pixel_extract,
                    "read_decode": read_decode,
                    "disk_write": lambda: write_fsync(f"{tmp}/disk_write.bin", written[-1], buffer),
                },
                args.rounds,
                args.spread_limit,
            )
            result.timings("pixel", t)
            result.add(
                t.ratio("extract", "read_decode", rate=True, name="pixel extract / read+decode loop"),
                ">= 0.8",
            )
            result.add(
                t.ratio(
                    "extract",
                    "disk_write",
                    rate=True,
                    name="extract feature bytes/s / sequential write+fsync bytes/s",
                ),
                ">= 0.5",
            )
            n = images[-1]
            ours = t.median("extract")
            info["pixel"] = {
                "images": n,
                "source_px": args.image_size,
                "view_px": args.view_size,
                "feature_bytes": written[-1],
                "extract_img_s": round(n / ours, 1),
                "read_decode_loop_img_s": round(n / t.median("read_decode"), 1),
                "extract_feature_mb_s": round(written[-1] / ours / 1e6, 1),
                "disk_write_mb_s": round(written[-1] / t.median("disk_write") / 1e6, 1),
            }
            result.data["rates"] = {  # what bench/report.py projects from
                "extract_images_per_s_per_core": n / ours / cores,
                "extract_view_px": args.view_size,
                "extract_source_px": args.image_size,
                "cores": cores,
            }
            if not args.no_timm:
                timm = ExtractConfig(
                    extractor=f"timm:{args.model}",
                    image_size=args.timm_image_size,
                    patch_size=16,
                    batch_size=args.batch_size,
                )

                def timm_extract() -> float:
                    out = f"{tmp}/f_timm_{next(runs)}"
                    seconds = timed_extract(timm_data, out, timm)[1]
                    shutil.rmtree(out)
                    return seconds

                def torch_loop() -> float:
                    return torch_forward_loop(timm_data, args.model, args.timm_image_size, args.batch_size)[1]

                print(
                    f"timm: {args.timm_images} images, {args.model} at {args.timm_image_size} px", flush=True
                )
                t = interleave(
                    {"extract": timm_extract, "torch_loop": torch_loop}, args.rounds, args.spread_limit
                )
                result.timings("timm", t)
                result.add(
                    t.ratio("extract", "torch_loop", rate=True, name="timm extract / torch forward loop"),
                    ">= 0.8",
                )
                info["timm"] = {
                    "model": args.model,
                    "images": args.timm_images,
                    "extract_img_s": round(args.timm_images / t.median("extract"), 1),
                    "torch_loop_img_s": round(args.timm_images / t.median("torch_loop"), 1),
                }
    result.data["info"] = info
    print(json.dumps(info, indent=2))
    result.write(args.out)
    return result.data


if __name__ == "__main__":
    main()
