"""End-to-end fine-tuning of a pretrained encoder (MAE's protocol, paper Table 3's "fine-tuning").

The encoder (a `kmim train` run folder or an exported .safetensors) gets a fresh classification head and
is trained in full with AdamW, layer-wise lr decay (0.75: block i of L gets lr * 0.75^(L - i), the patch
embedding the smallest), drop path, label smoothing, optional mixup / cutmix (timm's), warmup then
cosine, under DDP by the loop `kmim train` runs (trainer/loop.py; gloo on CPU, NCCL on GPU). Pooling defaults to the mean of patch
tokens with a fresh `fc_norm`, as MAE fine-tunes (its linear probe uses the cls token).

Training data is streamed from any labelled shards or image folder through the shared reader, with the
same per-rank quotas as pretraining, so uneven shards never hang DDP. A checkpoint is written after every
epoch in `<run>/finetune/`; `resume=True` continues from the last one. Validation splits the val shards
over ranks and sums the hits. Writes `eval-finetune.json` and `finetune/metrics.jsonl` in the run.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from dataclasses import asdict

import numpy as np
import timm
import torch
import torch.distributed as dist
from timm.data import Mixup
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.optim._param_groups import param_groups_layer_decay

from kmim import __version__, fs
from kmim.contract import streams
from kmim.contract.views import ViewSpec, apply_view, center_view, normalize, to_uint8_array
from kmim.data.reader import Dataset, ReadStats, iter_images, iter_samples, open_dataset
from kmim.errors import ConfigError, InputError
from kmim.trainer.checkpoint import list_checkpoints, load_checkpoint
from kmim.trainer.config import FinetuneConfig
from kmim.trainer.data import TrainShards, TrainStream, make_loader
from kmim.trainer.distributed import DistInfo, all_reduce_mean, cleanup, device_for, init_distributed
from kmim.trainer.encoder import load_encoder
from kmim.trainer.loop import TrainLoop, WarmupCosine, autocast_dtype

log = logging.getLogger(__name__)


class LabelledStream(TrainStream):
    """TrainStream over any labelled data the shared reader opens (indexed shards, tars, image folders):
    same per-rank quotas, shuffle and view seeding; each sample is a random crop + flip of its image."""

    def __init__(self, dataset: Dataset, samples: int, **kwargs):
        super().__init__(
            TrainShards([s.url for s in dataset.shards], samples, None), need_tokens=False, **kwargs
        )
        self.refs = dataset.shards

    def _raw(self, worker: int, workers: int) -> Iterator[dict]:
        from kmim.trainer.distributed import shards_for

        n = len(self.refs)
        order = streams.rng("shard_order", self.seed, self.epoch).permutation(n).tolist()
        mine = shards_for(n, self.rank, self.world, worker, workers, order)
        cycle, stats, reported = 0, ReadStats(), 0
        while True:
            for i in streams.rng("shard_cycle", self.seed, self.epoch, cycle, worker, self.rank).permutation(
                mine
            ):
                for s in iter_samples(self.refs[int(i)], stats, require_label=True):
                    yield {"__key__": s.key, "__url__": s.shard, s.ext: s.image, "cls": str(s.label).encode()}
                for skip in stats.skipped[reported:]:  # unusable samples are named, not silently dropped
                    log.warning("finetune: skipped %s in %s: %s", skip["key"], skip["shard"], skip["reason"])
                reported = len(stats.skipped)
            if stats.samples == 0:
                raise InputError(self.shards.urls[mine[0]], "no labelled samples to fine-tune on")
            cycle += 1


def build_classifier(source: str, num_classes: int, cfg: FinetuneConfig) -> tuple[torch.nn.Module, dict]:
    """The pretrained encoder with a fresh head; with mean pooling the final norm becomes a fresh fc_norm."""
    encoder = load_encoder(source)
    weights = encoder.model.state_dict()
    model = timm.create_model(
        encoder.name,
        pretrained=False,
        num_classes=num_classes,
        img_size=encoder.image_size,
        global_pool="avg" if cfg.pool == "mean" else "token",
        drop_path_rate=cfg.drop_path,
    )
    if cfg.pool == "mean":  # MAE: global pooling replaces the final norm by fc_norm after the pool
        weights = {k: v for k, v in weights.items() if not k.startswith("norm.")}
    missing, unexpected = model.load_state_dict(weights, strict=False)
    fresh = [k for k in missing if not k.startswith(("head.", "fc_norm."))]
    if fresh or unexpected:
        raise ConfigError(
            f"{source}: encoder weights do not fit {encoder.name} (missing {fresh}, unexpected {unexpected})"
        )
    torch.nn.init.trunc_normal_(model.head.weight, std=2e-5)  # MAE's head init
    torch.nn.init.zeros_(model.head.bias)
    return model, {
        "encoder": encoder.name,
        "encoder_fingerprint": encoder.fingerprint,
        "home": encoder.home,
        "image_size": encoder.image_size,
    }


def _val_labels(dataset: Dataset) -> tuple[int, int]:
    """(samples, 1 + largest label) of labelled data, reading members without decoding images."""
    stats, top = ReadStats(), -1
    for shard in dataset.shards:
        for s in iter_samples(shard, stats, require_label=True):
            top = max(top, s.label)  # type: ignore[type-var]
    if stats.samples == 0:
        raise InputError(
            dataset.spec, "has no labels: evaluation needs class labels (.cls members or class folders)"
        )
    return stats.samples, top + 1


@torch.inference_mode()
def evaluate_classifier(
    model: torch.nn.Module,
    dataset: Dataset,
    image_size: int,
    info: DistInfo,
    device: torch.device,
    batch_size: int = 256,
) -> dict:
    """top-1 / top-5 on the center view of every labelled val image; shards are split over ranks."""
    model.eval()
    spec, stats = ViewSpec(image_size), ReadStats()
    hits = torch.zeros(3, dtype=torch.float64, device=device)  # top-1, top-5, samples
    views: list[np.ndarray] = []
    labels: list[int] = []

    def flush() -> None:
        logits = model(normalize(torch.from_numpy(np.stack(views))).to(device)).float()
        y = torch.tensor(labels, device=device)
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices
        hits[0] += (top[:, 0] == y).sum()
        hits[1] += (top == y[:, None]).any(dim=1).sum()
        hits[2] += len(y)
        views.clear()
        labels.clear()

    for shard in dataset.shards[info.rank :: info.world_size]:
        for sample, img in iter_images(shard, stats, require_label=True):
            views.append(to_uint8_array(apply_view(img, center_view(img.width, img.height, spec))))
            labels.append(int(sample.label))  # type: ignore[arg-type]
            if len(views) == batch_size:
                flush()
    if views:
        flush()
    if info.distributed:
        dist.all_reduce(hits)
    model.train()
    n = max(1.0, float(hits[2]))
    return {
        "top1": float(hits[0]) / n,
        "top5": float(hits[1]) / n,
        "val_samples": int(hits[2]),
        "skipped": stats.skipped,
    }


def finetune(source: str, train: str, val: str, cfg: FinetuneConfig, resume: bool = False) -> dict:
    info = init_distributed()
    try:
        return _finetune(source, train, val, cfg, info, resume)
    finally:
        cleanup(info)


def _finetune(source: str, train: str, val: str, cfg: FinetuneConfig, info: DistInfo, resume: bool) -> dict:
    start = time.monotonic()
    device = device_for(info)
    train_data, val_data = open_dataset(train), open_dataset(val)
    _, val_classes = _val_labels(val_data)
    num_classes = cfg.num_classes or val_classes
    samples = cfg.samples_per_epoch or train_data.num_samples
    if samples is None:  # raw tars without an index: count once
        samples = sum(
            1 for shard in train_data.shards for _ in iter_samples(shard, ReadStats(), require_label=True)
        )
    torch.manual_seed(streams.seed_state("model_init", cfg.seed))
    np.random.seed(streams.seed_state("mixup", cfg.seed, info.rank))  # timm's Mixup draws from it
    model, meta = build_classifier(source, num_classes, cfg)
    model.to(device)
    out_dir = fs.join(meta["home"], "finetune")
    checkpoints = list_checkpoints(out_dir)
    if checkpoints and not resume:
        raise ConfigError(f"{out_dir} already holds fine-tuning checkpoints; pass --resume to continue")

    global_batch = cfg.batch_size * info.world_size
    steps_per_epoch = max(1, samples // global_batch)
    lr = cfg.blr * global_batch / 256
    groups = param_groups_layer_decay(
        model, cfg.weight_decay, layer_decay=cfg.layer_decay, no_weight_decay_list=model.no_weight_decay()
    )
    optimizer = torch.optim.AdamW(groups, lr=lr)
    schedule = WarmupCosine(
        optimizer,
        round(cfg.warmup_epochs * steps_per_epoch),
        cfg.epochs * steps_per_epoch,
        cfg.min_lr / lr if lr else 0.0,
        angle_first=True,
    )
    loop = TrainLoop(
        "finetune",
        model,
        optimizer,
        schedule,
        cfg.epochs * steps_per_epoch,
        info=info,
        device=device,
        clip_grad=cfg.clip_grad,
        amp_dtype=autocast_dtype(cfg.amp, device),
        metrics_dir=out_dir,
    )
    mixup = (
        Mixup(
            mixup_alpha=cfg.mixup,
            cutmix_alpha=cfg.cutmix,
            label_smoothing=cfg.label_smoothing,
            num_classes=num_classes,
        )
        if cfg.mixup or cfg.cutmix
        else None
    )
    criterion = (
        SoftTargetCrossEntropy()
        if mixup
        else LabelSmoothingCrossEntropy(cfg.label_smoothing)
        if cfg.label_smoothing
        else torch.nn.CrossEntropyLoss()
    )
    config_json = json.dumps(
        {**asdict(cfg), "source": source, "train": train, "val": val, "num_classes": num_classes}
    )

    epoch = 0
    if checkpoints and resume:
        state = load_checkpoint(checkpoints[-1][1])
        if state["config"] != config_json or state["world_size"] != info.world_size:
            raise ConfigError(
                f"{checkpoints[-1][1]} was made with another config or world size; resume with the same ones"
            )
        epoch = int(state["epoch"])
        loop.restore(state, epoch * steps_per_epoch)
        log.info("resuming fine-tuning in %s after epoch %d of %d", out_dir, epoch, cfg.epochs)
    stream = LabelledStream(
        train_data,
        samples,
        rank=info.rank,
        world=info.world_size,
        batch_size=cfg.batch_size,
        steps=steps_per_epoch,
        image_size=meta["image_size"],
        seed=cfg.seed,
        shuffle_buffer=cfg.shuffle_buffer,
    )
    stream.set_start(epoch, 0)
    loader = make_loader(stream, cfg.loader_workers)

    def step_fn(batch: tuple) -> tuple:
        views, _, labels = batch
        if int(labels.max()) >= num_classes:
            raise ConfigError(
                f"{train}: label {int(labels.max())} but {num_classes} classes; pass num_classes"
            )
        imgs, labels = normalize(views.to(device, non_blocking=True)), labels.to(device, non_blocking=True)
        if mixup is not None:
            imgs, labels = mixup(imgs, labels)
        return (lambda: criterion(loop.wrapped(imgs), labels)), len(views)

    loss_value = float("nan")

    def after_epoch(loss: torch.Tensor) -> None:  # a checkpoint and a metrics line per epoch
        nonlocal loss_value
        epoch = loop.step // steps_per_epoch
        loss_value = all_reduce_mean(float(loss.detach()), info, device)
        loop.progress.note = f"epoch {epoch}, loss {loss_value:.4f}"  # type: ignore[union-attr]
        loop.save(
            out_dir, keep=1, with_schedule=False, epoch=epoch, world_size=info.world_size, config=config_json
        )
        loop.log(
            {"epoch": epoch, "step": loop.step, "loss": loss_value, "lr": loop.lrs[-1], "time": time.time()}
        )

    loop.run(lambda: loader, step_fn, on_epoch=after_epoch)
    result = evaluate_classifier(model, val_data, meta["image_size"], info, device)
    report = {
        "protocol": "finetune",
        "top1": result["top1"],
        "top5": result["top5"],
        "final_train_loss": loss_value,
        "encoder": meta["encoder"],
        "encoder_fingerprint": meta["encoder_fingerprint"],
        "source": source,
        "train": train,
        "val": val,
        "train_samples_per_epoch": samples,
        "val_samples": result["val_samples"],
        "classes": num_classes,
        "steps": loop.step,
        "world_size": info.world_size,
        "config": asdict(cfg),
        "skipped": result["skipped"],
        "seconds": round(time.monotonic() - start, 3),
        "kmim_version": __version__,
    }
    if info.is_main:
        fs.write_json_atomic(fs.join(meta["home"], "eval-finetune.json"), report)
    return report
