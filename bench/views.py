"""What augmentation costs in pre-tokenized shards (issue 18 item 3): V stored views vs grid views.

For each setting (V in {1, 2, 4, 8} stored views; grid views at scales 1.0,1.25,1.5 with and without mirrors)
on the same labelled data and the same pixel codebook: tokenize seconds per image (`kmim pipeline tokenize`,
local Ray), shard bytes per image, and the trainer's images/s over a fixed number of steps (vit_micro, 32 px,
patch 4, loader in the training process). Settings run in rotation, once per round (bench/harness.py), and
every figure is reported against V = 1 measured in the same round: median and min-max over rounds.
Default data: scikit-learn's digits (1,797 images); `--data DIR` takes any labelled shards of 32-px-able images.
Run: uv run python -m bench.views [--rounds 3] [--steps 40] [--data DIR] [--out bench/results/views.json]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from bench.harness import Ratio, Result, add_common_args, interleave
from kmim.data.digits import write_digits
from kmim.pipeline.cluster import ClusterConfig, cluster
from kmim.pipeline.extract import ExtractConfig, extract
from kmim.pipeline.ray_runtime import ray_session
from kmim.pipeline.tokenize import TokenizeConfig, tokenize
from kmim.trainer.config import load_config
from kmim.trainer.train import train

RECIPE = str(Path(__file__).resolve().parents[1] / "manifests" / "recipes" / "digits-tiny.yaml")
SETTINGS: dict[str, dict] = {
    "V=1": {"views": 1},
    "V=2": {"views": 2},
    "V=4": {"views": 4},
    "V=8": {"views": 8},
    "grid 1,1.25,1.5": {"views": 1, "grid_scales": "1.0,1.25,1.5"},
    "grid 1,1.25,1.5 +flip": {"views": 1, "grid_scales": "1.0,1.25,1.5", "grid_flip": True},
}


def shard_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("*.tar"))


def summarize(figures: dict[str, dict[str, list[float]]], limit: float) -> tuple[dict, list[Ratio]]:
    """Per setting and metric: the median over rounds, and the ratio to V = 1 within each round."""
    table, ratios = {}, []
    for name, f in figures.items():
        row = {}
        for metric, values in f.items():
            base = figures["V=1"][metric]
            ratio = Ratio(f"{name} {metric} / V=1", tuple(v / b for v, b in zip(values, base)), limit)
            row[metric] = {"median": float(statistics.median(values)), "vs_V1": ratio.to_json(None)}
            if name != "V=1":
                ratios.append(ratio)
        table[name] = row
    return table, ratios


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=None, help="labelled shards (default: digits, written here)")
    ap.add_argument("--k", type=int, default=50)
    ap.add_argument("--steps", type=int, default=40, help="training steps timed per setting and round")
    ap.add_argument("--batch-size", type=int, default=64)
    add_common_args(ap, "views")
    args = ap.parse_args(argv)
    result = Result("views", args)
    tmp = Path(tempfile.mkdtemp(prefix="kmim-views-"))
    try:
        data = args.data
        if data is None:
            data = str(tmp / "data")
            write_digits(data)
        with ray_session():
            extract(
                data, str(tmp / "features"), ExtractConfig(image_size=32, patch_size=4, patches_per_image=16)
            )
            cluster(str(tmp / "features"), str(tmp / "codebook"), ClusterConfig(k=args.k, epochs=5))
            figures: dict[str, dict[str, list[float]]] = {s: {} for s in SETTINGS}
            runs = iter(range(10**9))

            def case(name: str):  # noqa: ANN202
                def run() -> float:
                    out = tmp / f"tokens_{next(runs)}"
                    start = time.perf_counter()
                    r = tokenize(data, str(out), str(tmp / "codebook"), TokenizeConfig(**SETTINGS[name]))
                    seconds = time.perf_counter() - start
                    images = r.manifest.stats["samples"]
                    cfg = load_config(
                        RECIPE,
                        [
                            f"data.train={out / 'train.shards.json'}",
                            f"output={out}_run",
                            f"data.batch_size={args.batch_size}",
                            f"data.samples_per_epoch={args.steps * args.batch_size}",
                            "optim.epochs=1",
                            "data.loader_workers=0",
                            f"log_every={args.steps}",
                            f"checkpoint.every_steps={args.steps}",
                        ],
                    )
                    summary = train(cfg)
                    f = figures[name]
                    f.setdefault("tokenize_s_per_image", []).append(seconds / images)
                    f.setdefault("shard_bytes_per_image", []).append(shard_bytes(out) / images)
                    f.setdefault("train_images_per_s", []).append(summary["images_per_s"])
                    shutil.rmtree(out)
                    shutil.rmtree(f"{out}_run")
                    return seconds

                return run

            t = interleave({name: case(name) for name in SETTINGS}, args.rounds, args.spread_limit)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    result.timings("tokenize", t)
    table, ratios = summarize(figures, args.spread_limit)
    for ratio in ratios:
        result.add(ratio, None)
    result.data["info"] = {"settings": SETTINGS, "table": table}
    print(
        json.dumps(
            {n: {m: round(v["median"], 6) for m, v in row.items()} for n, row in table.items()}, indent=2
        )
    )
    result.write(args.out)
    return result.data


if __name__ == "__main__":
    main()
