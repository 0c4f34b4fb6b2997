"""Benchmark the trainer's input path and the value of precomputed tokens, one run, same model.

1. images/s of the same training steps fed by streaming token shards (webdataset, a decoding worker
   process) vs fed by in-memory tensors (target >= 0.9: the loader is never the bottleneck), and the
   loader's own throughput. On a 2-core CPU machine the decoding worker shares the cores that compute;
   with the model on a GPU it does not;
2. images/s with `tokens` targets (read from the shards) vs `online` targets (the codebook's ViT
   extractor run inside every step, what the authors' code does) (target >= 1.8x faster).
Run: uv run python -m bench.train [--steps 60] [--extractor vit_small_patch16_224]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

import torch

from kmim.contract import streams
from kmim.contract.views import normalize
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


def timed_steps(model, optimizer, batches, steps: int, warmup: int, tokenizer=None) -> float:
    """images/s over `steps` training steps after `warmup` untimed ones."""
    it = iter(batches)
    images, start = 0, None
    for step in range(warmup + steps):
        if step == warmup:
            start = time.perf_counter()
        views, tokens, _ = next(it)
        imgs = normalize(views)
        if tokenizer is not None:
            tokens = torch.from_numpy(tokenizer(views.numpy()))
        loss = model(imgs, tokens, generator=masking_generator(0, step, 0))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step >= warmup:
            images += len(views)
    return images / (time.perf_counter() - start)


def build(cfg: ModelConfig, k: int):
    torch.manual_seed(streams.seed_state("model_init", 0))
    model = MaskedImageModel(cfg, k)
    return model, torch.optim.AdamW(param_groups(model, 0.05), lr=1e-4, betas=(0.9, 0.95))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--encoder", default="vit_tiny_patch16_224")
    ap.add_argument("--extractor", default="vit_small_patch16_224")
    ap.add_argument("--k", type=int, default=64)
    args = ap.parse_args()
    r: dict = vars(args).copy()
    s = args.image_size
    with tempfile.TemporaryDirectory() as tmp:
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
        steps = args.steps + args.warmup

        def stream(workers: int):
            ts = TrainStream(shards, 0, 1, args.batch_size, steps, s, 0, 256, need_tokens=True)
            return make_loader(ts, workers)

        start = time.perf_counter()
        in_memory = list(stream(0))  # the very batches, decoded up front
        r["loader_only_img_s"] = round(len(in_memory) * args.batch_size / (time.perf_counter() - start), 1)
        model, opt = build(cfg, args.k)
        r["in_memory_img_s"] = round(timed_steps(model, opt, in_memory, args.steps, args.warmup), 1)
        model, opt = build(cfg, args.k)
        r["streaming_img_s"] = round(timed_steps(model, opt, stream(1), args.steps, args.warmup), 1)
        r["streaming_ratio"] = round(r["streaming_img_s"] / r["in_memory_img_s"], 3)
        tokenizer = Tokenizer.from_codebook(f"{tmp}/codebook")
        model, opt = build(ModelConfig(**{**cfg.__dict__, "target": "online"}), args.k)
        r["online_img_s"] = round(timed_steps(model, opt, stream(1), args.steps, args.warmup, tokenizer), 1)
        r["tokens_vs_online_speedup"] = round(r["streaming_img_s"] / r["online_img_s"], 3)
    r["torch_threads"] = torch.get_num_threads()
    print(json.dumps(r, indent=2))
    print(
        f"streaming token shards / in-memory tensors: {r['streaming_ratio']:.2f} (target >= 0.9); the loader alone, "
        f"in one process: {r['loader_only_img_s']:.0f} images/s vs {r['in_memory_img_s']:.0f} consumed"
    )
    print(f"tokens / online targets: {r['tokens_vs_online_speedup']:.2f}x faster (target >= 1.8x)")


if __name__ == "__main__":
    main()
