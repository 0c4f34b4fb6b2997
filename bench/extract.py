"""Benchmark `kmim pipeline extract` against plain single-process loops on the same shards, same run.

1. pixel: extract throughput vs a loop that only reads and decodes the images   (target >= 0.8)
2. timm:  extract throughput vs a plain batched torch forward loop over the same views (target >= 0.8)

The embedded Ray is started before timing (on a cluster it is already up) and a first small extract
warms its worker processes; both are printed apart. Default inputs are ImageNet-like: 400-px JPEGs
(ImageNet averages about 400x350) viewed at 224 with 16-px patches. With tiny images (--image-size 64 --view-size 64) the stage writes
~12x the bytes it reads and the pixel ratio falls to about 0.5: the features, not the reading, dominate.
Run: uv run python -m bench.extract [--images 2000] [--model vit_small_patch16_224 --timm-images 2000]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

import numpy as np
import torch

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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--image-size", type=int, default=400, help="side of the stored JPEGs")
    ap.add_argument("--view-size", type=int, default=224, help="side of view 0 (extract --image-size)")
    ap.add_argument("--shard-size", type=int, default=200)
    ap.add_argument("--model", default="vit_small_patch16_224")
    ap.add_argument("--timm-images", type=int, default=2000)
    ap.add_argument("--timm-image-size", type=int, default=112)
    ap.add_argument("--batch-size", type=int, default=32)
    args = ap.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        data = f"{tmp}/pixels"
        write_synthetic(
            data,
            SyntheticConfig(
                num_images=args.images, image_size=args.image_size, shard_size=args.shard_size, format="jpg"
            ),
        )
        timm_data = f"{tmp}/timm"
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
            results["ray_startup_s"] = round(time.perf_counter() - t0, 2)
            warm = ExtractConfig(image_size=args.view_size, patch_size=16, batch_size=args.batch_size)
            results["worker_warmup_s"] = round(
                timed_extract(data + "/train-000000.tar", f"{tmp}/f_warm", warm)[1], 2
            )
            n, base = read_decode_loop(data)
            _, ours = timed_extract(data, f"{tmp}/f_pixel", warm)
            results["pixel"] = {
                "images": n,
                "source_px": args.image_size,
                "view_px": args.view_size,
                "read_decode_loop_img_s": round(n / base, 1),
                "extract_img_s": round(n / ours, 1),
                "ratio": round(base / ours, 3),
            }
            n, base = torch_forward_loop(timm_data, args.model, args.timm_image_size, args.batch_size)
            _, ours = timed_extract(
                timm_data,
                f"{tmp}/f_timm",
                ExtractConfig(
                    extractor=f"timm:{args.model}",
                    image_size=args.timm_image_size,
                    patch_size=16,
                    batch_size=args.batch_size,
                ),
            )
            results["timm"] = {
                "model": args.model,
                "images": n,
                "torch_loop_img_s": round(n / base, 1),
                "extract_img_s": round(n / ours, 1),
                "ratio": round(base / ours, 3),
            }
    results["torch_threads"] = torch.get_num_threads()
    print(json.dumps(results, indent=2))
    print(f"pixel extract / read+decode loop: {results['pixel']['ratio']:.2f} (target >= 0.8)")
    print(f"timm extract / torch forward loop: {results['timm']['ratio']:.2f} (target >= 0.8)")


if __name__ == "__main__":
    main()
