"""Benchmark the trainer's input path and the value of precomputed tokens, interleaved, same model.

Cases run in rotation, once per round (bench/harness.py), and each ratio is taken within a round.
1. images/s of the same training steps fed by streaming token shards (webdataset, one decoding worker
   process) vs fed by in-memory tensors (target >= 0.9: the loader is never the bottleneck), and the
   fraction of a streaming step spent waiting for the next batch (reported, no target). On a 2-core CPU
   machine the decoding worker shares the cores that compute; with the model on a GPU it does not;
2. images/s with `tokens` targets (read from the shards) vs `online` targets (the codebook's ViT
   extractor run inside every step, what the authors' code does) (target >= 1.8x faster);
3. the token-shard loader alone, in one process on one core (torch threads 1), at --loader-image-size
   (224) from JPEG sources of --loader-source-size with V = --loader-views (4) stored views, vs a plain
   loop over the same JPEG files: PIL decode + torchvision RandomResizedCrop + flip + to-tensor
   (target >= 0.8 images/s).
--image-size is the side of the training steps (1 and 2); the loader comparison has its own size.
Run: uv run python -m bench.train [--steps 60] [--extractor vit_small_patch16_224] [--loader-images 512]
     [--rounds 3] [--out bench/results/train.json]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import torch
from PIL import Image
from torchvision import transforms

from bench.harness import Ratio, Result, add_common_args, interleave
from kmim.contract import streams
from kmim.contract.views import normalize
from kmim.data.reader import ReadStats, iter_samples, open_dataset
from kmim.data.synthetic import SyntheticConfig, write_synthetic
from kmim.pipeline.cluster import ClusterConfig, cluster
from kmim.pipeline.extract import ExtractConfig, extract
from kmim.pipeline.ray_runtime import ray_session
from kmim.pipeline.tokenize import TokenizeConfig, tokenize
from kmim.tokenizer import Tokenizer
from kmim.trainer.config import ModelConfig
from kmim.trainer.data import TrainStream, make_loader, open_train_shards
from kmim.trainer.model import MaskedImageModel
from kmim.trainer.train import masking_generator, param_groups


def timed_steps(model, optimizer, batches, steps: int, warmup: int, tokenizer=None) -> tuple[float, float]:
    """(seconds, seconds waiting for the next batch) of `steps` training steps after `warmup` untimed ones."""
    it = iter(batches)
    start, waited = 0.0, 0.0
    for step in range(warmup + steps):
        if step == warmup:
            start, waited = time.perf_counter(), 0.0
        t0 = time.perf_counter()
        views, tokens, _ = next(it)
        waited += time.perf_counter() - t0
        imgs = normalize(views)
        if tokenizer is not None:
            tokens = torch.from_numpy(tokenizer(views.numpy()))
        loss = model(imgs, tokens, generator=masking_generator(0, step, 0))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - start, waited


def build(cfg: ModelConfig, k: int):
    torch.manual_seed(streams.seed_state("model_init", 0))
    model = MaskedImageModel(cfg, k)
    return model, torch.optim.AdamW(param_groups(model, 0.05), lr=1e-4, betas=(0.9, 0.95))


def bench_steps(tmp: str, args: argparse.Namespace, result: Result) -> dict:
    """Training steps fed from memory, from streaming token shards, and with online targets, interleaved."""
    s = args.image_size
    n_images = args.batch_size * (args.steps + args.warmup)
    write_synthetic(
        f"{tmp}/data",
        SyntheticConfig(num_images=n_images, image_size=s + s // 4, shard_size=256, format="jpg"),
    )
    with ray_session():
        extract(
            f"{tmp}/data",
            f"{tmp}/features",
            ExtractConfig(
                extractor=f"timm:{args.extractor}", image_size=s, patch_size=16, patches_per_image=4
            ),
        )
        cluster(f"{tmp}/features", f"{tmp}/codebook", ClusterConfig(k=args.k, epochs=3))
        tokenize(f"{tmp}/data", f"{tmp}/tokens", f"{tmp}/codebook", TokenizeConfig(views=2))
    shards = open_train_shards(f"{tmp}/tokens")
    cfg = ModelConfig(
        encoder=args.encoder,
        image_size=s,
        patch_size=16,
        decoder_embed_dim=128,
        decoder_depth=2,
        decoder_num_heads=4,
        target="tokens",
    )
    online_cfg = ModelConfig(**{**cfg.__dict__, "target": "online"})
    steps = args.steps + args.warmup

    def stream(workers: int):
        ts = TrainStream(shards, 0, 1, args.batch_size, steps, s, 0, 256, need_tokens=True)
        return make_loader(ts, workers)

    start = time.perf_counter()
    in_memory = list(stream(0))  # the very batches, decoded up front
    loader_only_img_s = len(in_memory) * args.batch_size / (time.perf_counter() - start)
    tokenizer = Tokenizer.from_codebook(f"{tmp}/codebook")
    waits: list[float] = []

    def from_memory() -> float:
        return timed_steps(*build(cfg, args.k), in_memory, args.steps, args.warmup)[0]

    def streaming() -> float:
        seconds, waited = timed_steps(*build(cfg, args.k), stream(1), args.steps, args.warmup)
        waits.append(waited / seconds)
        return seconds

    def online() -> float:
        return timed_steps(*build(online_cfg, args.k), stream(1), args.steps, args.warmup, tokenizer)[0]

    print(f"steps: {args.steps} timed steps of {args.batch_size} images at {s} px", flush=True)
    t = interleave(
        {"in_memory": from_memory, "streaming": streaming, "online": online}, args.rounds, args.spread_limit
    )
    result.timings("steps", t)
    result.add(
        t.ratio(
            "streaming", "in_memory", rate=True, name="streaming token shards / in-memory tensors images/s"
        ),
        ">= 0.9",
    )
    result.add(t.ratio("streaming", "online", rate=True, name="tokens / online targets images/s"), ">= 1.8")
    result.add(
        Ratio(
            "share of a streaming step waiting for data (1 loader worker)", tuple(waits), args.spread_limit
        ),
        None,
    )
    images = args.steps * args.batch_size
    return {
        "loader_only_img_s": round(loader_only_img_s, 1),
        **{f"{c}_img_s": round(images / t.median(c), 1) for c in ("in_memory", "streaming", "online")},
        "wait_fraction": waits,
    }


class one_thread:
    """torch on one thread while the loader and its reference run: images/s per core."""

    def __enter__(self):
        self.threads = torch.get_num_threads()
        torch.set_num_threads(1)

    def __exit__(self, *exc):
        torch.set_num_threads(self.threads)


def make_loader_data(tmp: str, args: argparse.Namespace) -> tuple[str, list[str]]:
    """JPEG shards -> pixel codebook at the loader's size -> token shards with V views; the JPEGs as files."""
    s = args.loader_image_size
    write_synthetic(
        f"{tmp}/loader_data",
        SyntheticConfig(
            num_images=args.loader_images, image_size=args.loader_source_size, shard_size=256, format="jpg"
        ),
    )
    with ray_session():
        extract(
            f"{tmp}/loader_data",
            f"{tmp}/loader_features",
            ExtractConfig(image_size=s, patch_size=16, patches_per_image=4),
        )
        cluster(f"{tmp}/loader_features", f"{tmp}/loader_codebook", ClusterConfig(k=16, epochs=1))
        tokenize(
            f"{tmp}/loader_data",
            f"{tmp}/loader_tokens",
            f"{tmp}/loader_codebook",
            TokenizeConfig(views=args.loader_views),
        )
    os.makedirs(f"{tmp}/jpegs")
    files, stats = [], ReadStats()
    for shard in open_dataset(f"{tmp}/loader_data").shards:
        for sample in iter_samples(shard, stats):
            files.append(f"{tmp}/jpegs/{len(files):07d}.jpg")
            with open(files[-1], "wb") as f:
                f.write(sample.image)
    return f"{tmp}/loader_tokens", files


def pil_loop(files: list[str], size: int, batch: int) -> None:
    """The plain reference: PIL decode + RandomResizedCrop + flip + to-tensor, stacked per batch."""
    augment = transforms.Compose(
        [transforms.RandomResizedCrop(size), transforms.RandomHorizontalFlip(), transforms.ToTensor()]
    )
    pending = []
    for path in files:
        with Image.open(path) as img:
            pending.append(augment(img.convert("RGB")))
        if len(pending) == batch:
            torch.stack(pending)
            pending = []
    if pending:
        torch.stack(pending)


def bench_loader(tmp: str, args: argparse.Namespace, result: Result) -> dict:
    tokens, files = make_loader_data(tmp, args)
    shards = open_train_shards(tokens)
    steps = max(1, len(files) // args.batch_size)
    n_loader = steps * args.batch_size

    def loader() -> None:
        ts = TrainStream(
            shards, 0, 1, args.batch_size, steps, args.loader_image_size, 0, 256, need_tokens=True
        )
        with one_thread():
            for _ in make_loader(ts, 0):
                pass

    def reference() -> None:
        with one_thread():
            pil_loop(files, args.loader_image_size, args.batch_size)

    print(
        f"loader: {len(files)} JPEGs of {args.loader_source_size} px, {args.loader_views} views, "
        f"{args.loader_image_size} px, one core",
        flush=True,
    )
    t = interleave({"loader": loader, "pil_loop": reference}, args.rounds, args.spread_limit)
    result.timings("loader", t)
    result.add(
        t.ratio(
            "loader",
            "pil_loop",
            rate=True,
            scale=n_loader / len(files),
            name="token-shard loader / PIL loop images/s per core",
        ),
        ">= 0.8",
    )
    return {
        "loader_images": n_loader,
        "pil_images": len(files),
        "loader_img_s_per_core": round(n_loader / t.median("loader"), 1),
        "pil_loop_img_s_per_core": round(len(files) / t.median("pil_loop"), 1),
    }


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--image-size", type=int, default=64, help="side of the training steps (parts 1, 2)")
    ap.add_argument("--encoder", default="vit_tiny_patch16_224")
    ap.add_argument("--extractor", default="vit_small_patch16_224")
    ap.add_argument("--k", type=int, default=64)
    ap.add_argument("--loader-image-size", type=int, default=224, help="view side of the loader comparison")
    ap.add_argument("--loader-source-size", type=int, default=400, help="side of its JPEG sources")
    ap.add_argument("--loader-views", type=int, default=4, help="V, views stored per image")
    ap.add_argument("--loader-images", type=int, default=512)
    ap.add_argument("--no-steps", action="store_true", help="only the loader comparison")
    ap.add_argument("--no-loader", action="store_true", help="only the training steps")
    add_common_args(ap, "train")
    args = ap.parse_args(argv)
    result = Result("train", args)
    info: dict = {"torch_threads": torch.get_num_threads()}
    with tempfile.TemporaryDirectory() as tmp:
        if not args.no_steps:
            info["steps"] = bench_steps(tmp, args, result)
        if not args.no_loader:
            info["loader"] = bench_loader(tmp, args, result)
            result.data["rates"] = {  # what bench/report.py projects from
                "loader_images_per_s_per_core": info["loader"]["loader_img_s_per_core"],
                "loader_view_px": args.loader_image_size,
                "loader_views": args.loader_views,
                "loader_source_px": args.loader_source_size,
            }
    result.data["info"] = info
    print(json.dumps(info, indent=2))
    result.write(args.out)
    return result.data


if __name__ == "__main__":
    main()
