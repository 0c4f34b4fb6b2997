"""The pretraining loop: DDP, AdamW with warmup + cosine, accumulation, clipping, bf16 autocast,
atomic checkpoints with exact resume, JSONL + TensorBoard metrics."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from dataclasses import dataclass

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel

from kmim import fs
from kmim.contract.views import normalize
from kmim.errors import ConfigError
from kmim.progress import ProgressReporter
from kmim.trainer.checkpoint import list_checkpoints, load_checkpoint, rng_state, save_checkpoint, set_rng_state
from kmim.trainer.config import TrainConfig, config_from_json
from kmim.trainer.data import TrainStream, check_shards_match_model, make_loader, open_train_shards
from kmim.trainer.distributed import (
    DistInfo, all_reduce_mean, barrier, cleanup, device_for, init_distributed,
)
from kmim.trainer.model import MaskedImageModel

log = logging.getLogger(__name__)


@dataclass
class Plan:
    """Derived sizes of a run, the same on every rank."""

    steps_per_epoch: int  # micro-batches per rank per epoch
    total_steps: int
    optimizer_steps: int
    global_batch: int  # per optimizer step, over all ranks
    lr: float
    warmup_steps: int


def make_plan(cfg: TrainConfig, samples: int, world: int) -> Plan:
    o, d = cfg.optim, cfg.data
    per_epoch = d.samples_per_epoch or samples
    steps = max(o.accum_steps, (per_epoch // (d.batch_size * world)) // o.accum_steps * o.accum_steps)
    global_batch = d.batch_size * world * o.accum_steps
    optimizer_steps = steps * o.epochs // o.accum_steps
    return Plan(steps, steps * o.epochs, optimizer_steps, global_batch,
                o.lr if o.lr is not None else o.blr * global_batch / 256,
                int(round(o.warmup_epochs * steps / o.accum_steps)))


def lr_factor(step: int, plan: Plan, min_ratio: float) -> float:
    """Linear warmup, then half-cosine to min_lr, per optimizer step."""
    if step < plan.warmup_steps:
        return (step + 1) / plan.warmup_steps
    progress = (step - plan.warmup_steps) / max(1, plan.optimizer_steps - plan.warmup_steps)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on weight matrices only: not on norms, biases, tokens or position embeddings."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 or name.endswith(("cls_token", "reg_token", "mask_token", "pos_embed")) else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def autocast_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    if amp == "off":
        return None
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    if amp == "bf16":
        return torch.bfloat16  # CPU bf16 autocast: works, rarely faster
    return None


def masking_generator(seed: int, step: int, rank: int) -> torch.Generator:
    """Masks are a pure function of (seed, step, rank): a resumed run draws the same masks."""
    return torch.Generator().manual_seed(int(np.random.SeedSequence([seed, step, rank]).generate_state(1)[0]))


class MetricsLog:
    """metrics.jsonl and TensorBoard events, written by rank 0 only."""

    def __init__(self, run_dir: str, enabled: bool):
        self.enabled = enabled
        self.url = fs.join(run_dir, "metrics.jsonl")
        self.tb = None
        if enabled:
            fs.makedirs(run_dir)
            filesystem, path = fs.get_fs(run_dir)
            if fs.protocol_of(filesystem) in ("file", "local"):
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(fs.join(run_dir, "tensorboard"))

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        filesystem, path = fs.get_fs(self.url)
        with filesystem.open(path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for key in ("loss", "lr", "images_per_s"):
                if key in record:
                    self.tb.add_scalar(f"train/{key}", record[key], record["step"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def train(cfg: TrainConfig, resume: bool = False) -> dict:
    info = init_distributed()
    try:
        return _train(cfg, info, resume)
    finally:
        cleanup(info)


def _train(cfg: TrainConfig, info: DistInfo, resume: bool) -> dict:
    device = device_for(info)
    run_dir = cfg.output
    checkpoints = list_checkpoints(run_dir)
    if checkpoints and not resume:
        raise ConfigError(f"{run_dir} already holds checkpoints; pass --resume to continue it or choose another --output")
    shards = open_train_shards(cfg.data.train)
    tokenizer = None
    if cfg.model.target == "tokens":
        if not shards.has_tokens:
            raise ConfigError(f"model.target 'tokens' needs token shards (a `kmim pipeline tokenize` output), got {cfg.data.train}")
        k = check_shards_match_model(shards, cfg.model.image_size, cfg.model.patch_size)
    elif cfg.model.target == "online":
        from kmim.tokenizer import Tokenizer

        tokenizer = Tokenizer.from_codebook(cfg.data.codebook, cfg.data.weights)  # type: ignore[arg-type]
        if (tokenizer.view_spec.image_size, tokenizer.patch_size) != (cfg.model.image_size, cfg.model.patch_size):
            raise ConfigError(f"codebook views are {tokenizer.view_spec.image_size}px / patch {tokenizer.patch_size}, "
                              f"the model's {cfg.model.image_size}px / patch {cfg.model.patch_size}")
        k = tokenizer.k
    else:
        check_shards_match_model(shards, cfg.model.image_size, cfg.model.patch_size)
        k = None
    torch.manual_seed(cfg.seed)
    model = MaskedImageModel(cfg.model, k).to(device)
    ddp = DistributedDataParallel(model) if info.distributed else model
    plan = make_plan(cfg, shards.samples, info.world_size)
    optimizer = torch.optim.AdamW(param_groups(model, cfg.optim.weight_decay), lr=plan.lr, betas=cfg.optim.betas)
    min_ratio = cfg.optim.min_lr / plan.lr if plan.lr else 0.0
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, plan, min_ratio))
    amp_dtype = autocast_dtype(cfg.optim.amp, device)

    step = 0
    if checkpoints and resume:
        state = load_checkpoint(checkpoints[-1][1])
        saved = config_from_json(json.loads(state["config"]))
        if saved.to_json() != cfg.to_json():
            raise ConfigError(f"{checkpoints[-1][1]} was made with another config; resume with the same recipe and overrides")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        set_rng_state(state["rng"])
        step = int(state["step"])
        log.info("resuming %s at step %d of %d", run_dir, step, plan.total_steps)
    if info.is_main:
        fs.makedirs(run_dir)
        cfg.save(fs.join(run_dir, "config.json"))
        fs.write_json_atomic(fs.join(run_dir, "plan.json"), {**plan.__dict__, "world_size": info.world_size,
                                                            "num_tokens": k, "target": cfg.model.target})
    metrics = MetricsLog(run_dir, info.is_main)
    stream = TrainStream(shards, info.rank, info.world_size, cfg.data.batch_size, plan.steps_per_epoch,
                         cfg.model.image_size, cfg.seed, cfg.data.shuffle_buffer, need_tokens=cfg.model.target == "tokens")

    def checkpoint() -> None:
        if info.is_main:
            save_checkpoint(run_dir, step, {
                "model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "scaler": None, "step": step, "epoch": step // plan.steps_per_epoch,
                "batch_in_epoch": step % plan.steps_per_epoch, "rng": rng_state(), "config": json.dumps(cfg.to_json()),
            }, cfg.checkpoint.keep)
        barrier(info)

    last_loss = float("nan")
    start_images = step * cfg.data.batch_size * info.world_size
    with ProgressReporter("train", plan.total_steps, unit="steps", item="images", live=None if info.is_main else False,
                          log_every=10.0 if info.is_main else float("inf")) as progress:
        progress.advance(step, 0)
        t_window, window_images = time.monotonic(), 0
        stream.set_start(*divmod(step, plan.steps_per_epoch))
        loader = make_loader(stream, cfg.data.num_workers)
        ddp.train()
        while step < plan.total_steps:
            for views, tokens, _ in loader:  # one pass = the rest of one epoch
                imgs = normalize(views.to(device, non_blocking=True))  # [B, 3, S, S]
                if tokenizer is not None:
                    tokens = torch.from_numpy(tokenizer(views.numpy()))  # online targets, from this very batch
                tokens = tokens.to(device, non_blocking=True)
                micro = step % cfg.optim.accum_steps
                sync = micro == cfg.optim.accum_steps - 1
                context = ddp.no_sync() if info.distributed and not sync else contextlib.nullcontext()
                with context:
                    with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
                        loss = ddp(imgs, tokens, generator=masking_generator(cfg.seed, step, info.rank))
                    (loss / cfg.optim.accum_steps).backward()
                if sync:
                    if cfg.optim.clip_grad:
                        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.clip_grad)
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                    scheduler.step()
                step += 1
                window_images += len(views) * info.world_size
                log_now = step % cfg.log_every == 0 or step == plan.total_steps
                if log_now:
                    last_loss = all_reduce_mean(float(loss.detach()), info, device)
                    progress.note = f"loss {last_loss:.4f}, lr {optimizer.param_groups[0]['lr']:.2e}"
                progress.advance(1, len(views) * info.world_size)
                if log_now:
                    now = time.monotonic()
                    metrics.write({"step": step, "epoch": step / plan.steps_per_epoch, "loss": last_loss,
                                   "lr": optimizer.param_groups[0]["lr"],
                                   "images_per_s": window_images / max(now - t_window, 1e-9), "time": time.time()})
                    t_window, window_images = now, 0
                if sync and (step // cfg.optim.accum_steps) % cfg.checkpoint.every_steps == 0:
                    checkpoint()
                if step == plan.total_steps:
                    break
    if not list_checkpoints(run_dir) or list_checkpoints(run_dir)[-1][0] != step:
        checkpoint()
    metrics.close()
    images = step * cfg.data.batch_size * info.world_size - start_images
    summary = {"steps": step, "final_loss": last_loss, "images": images, "seconds": round(progress.elapsed, 3),
               "images_per_s": round(images / max(progress.elapsed, 1e-9), 2), "world_size": info.world_size}
    if info.is_main:
        fs.write_json_atomic(fs.join(run_dir, "train_summary.json"), summary)
        log.info(progress.summary())
    return summary

