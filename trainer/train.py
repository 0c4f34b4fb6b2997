"""Pretraining: the masked image model, AdamW (warmup + cosine), its data and loss, run by the shared
loop (trainer/loop.py: DDP, accumulation, clipping, bf16 autocast, atomic checkpoints with exact resume,
JSONL + TensorBoard metrics)."""

from __future__ import annotations

import contextlib
import json
import logging
import time
from dataclasses import dataclass

import torch

from kmim import fs
from kmim.contract import streams
from kmim.contract.config import fingerprint_config
from kmim.contract.views import normalize
from kmim.errors import ConfigError, InputError
from kmim.trainer.checkpoint import list_checkpoints, load_checkpoint
from kmim.trainer.config import TrainConfig, config_from_json
from kmim.trainer.data import TrainStream, check_shards_match_model, make_loader, open_train_shards
from kmim.trainer.distributed import DistInfo, all_reduce_mean, cleanup, device_for, init_distributed
from kmim.trainer.loop import MetricsLog, TrainLoop, WarmupCosine, autocast_dtype
from kmim.trainer.model import MaskedImageModel

__all__ = ["MetricsLog", "Plan", "autocast_dtype", "make_plan", "masking_generator", "param_groups", "train"]

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


def same_data(a: str, b: str) -> bool:
    """Whether two `data.train` specs name the same shards: the same string, or indexes listing the same
    shard bytes (sha256) in the same order, e.g. one folder spelled as a relative and an absolute path."""
    if a == b:
        return True
    try:
        first, second = open_train_shards(a), open_train_shards(b)
    except InputError:
        return False
    return None not in first.sha256 and first.sha256 == second.sha256


def make_plan(cfg: TrainConfig, samples: int, world: int) -> Plan:
    o, d = cfg.optim, cfg.data
    per_epoch = d.samples_per_epoch or samples
    steps = max(o.accum_steps, (per_epoch // (d.batch_size * world)) // o.accum_steps * o.accum_steps)
    global_batch = d.batch_size * world * o.accum_steps
    optimizer_steps = steps * o.epochs // o.accum_steps
    return Plan(
        steps,
        steps * o.epochs,
        optimizer_steps,
        global_batch,
        o.lr if o.lr is not None else o.blr * global_batch / 256,
        int(round(o.warmup_epochs * steps / o.accum_steps)),
    )


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on weight matrices only: not on norms, biases, tokens or position embeddings."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (
            no_decay
            if p.ndim <= 1 or name.endswith(("cls_token", "reg_token", "mask_token", "pos_embed"))
            else decay
        ).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def masking_generator(seed: int, step: int, rank: int) -> torch.Generator:
    """Masks are a pure function of (seed, step, rank): a resumed run draws the same masks."""
    return streams.torch_generator("mask", seed, step, rank)


def train(cfg: TrainConfig, resume: bool = False) -> dict:
    info = init_distributed()
    try:
        return _train(cfg, info, resume)
    finally:
        cleanup(info)


def _train(cfg: TrainConfig, info: DistInfo, resume: bool) -> dict:
    """Rank 0 holds the run folder's lock: a second `kmim train` into the same folder is refused, naming it."""
    from kmim.lock import output_lock

    with output_lock(cfg.output, "kmim train") if info.is_main else contextlib.nullcontext():
        return _train_locked(cfg, info, resume)


def _train_locked(cfg: TrainConfig, info: DistInfo, resume: bool) -> dict:
    device = device_for(info)
    run_dir = cfg.output
    checkpoints = list_checkpoints(run_dir)
    if checkpoints and not resume:
        raise ConfigError(
            f"{run_dir} already holds checkpoints; pass --resume to continue it or choose another --output"
        )
    shards = open_train_shards(cfg.data.train)
    tokenizer = None
    if cfg.model.target == "tokens":
        if not shards.has_tokens:
            raise ConfigError(
                f"model.target 'tokens' needs token shards (a `kmim pipeline tokenize` output), got {cfg.data.train}"
            )
        k = check_shards_match_model(shards, cfg.model.image_size, cfg.model.patch_size)
    elif cfg.model.target == "online":
        from kmim.tokenizer import Tokenizer

        # the extractor on the training device: on a GPU run, online targets must not run a ViT on the CPU
        tokenizer = Tokenizer.from_codebook(cfg.data.codebook, cfg.data.weights, str(device))  # type: ignore[arg-type]
        if (tokenizer.view_spec.image_size, tokenizer.patch_size) != (
            cfg.model.image_size,
            cfg.model.patch_size,
        ):
            raise ConfigError(
                f"codebook views are {tokenizer.view_spec.image_size}px / patch {tokenizer.patch_size}, "
                f"the model's {cfg.model.image_size}px / patch {cfg.model.patch_size}"
            )
        k = tokenizer.k
    else:
        check_shards_match_model(shards, cfg.model.image_size, cfg.model.patch_size)
        k = None
    torch.manual_seed(streams.seed_state("model_init", cfg.seed))
    model = MaskedImageModel(cfg.model, k).to(device)
    plan = make_plan(cfg, shards.samples, info.world_size)
    optimizer = torch.optim.AdamW(
        param_groups(model, cfg.optim.weight_decay), lr=plan.lr, betas=cfg.optim.betas
    )
    schedule = WarmupCosine(
        optimizer, plan.warmup_steps, plan.optimizer_steps, cfg.optim.min_lr / plan.lr if plan.lr else 0.0
    )
    loop = TrainLoop(
        "train",
        model,
        optimizer,
        schedule,
        plan.total_steps,
        info=info,
        device=device,
        accum_steps=cfg.optim.accum_steps,
        clip_grad=cfg.optim.clip_grad,
        amp_dtype=autocast_dtype(cfg.optim.amp, device),
        metrics_dir=run_dir,
    )
    if checkpoints and resume:
        state = load_checkpoint(checkpoints[-1][1])
        saved = config_from_json(json.loads(state["config"]))
        # execution-only settings (checkpoint cadence, loader prefetch, log cadence) may change on resume
        if fingerprint_config(saved) != fingerprint_config(cfg) or not same_data(
            saved.data.train, cfg.data.train
        ):
            raise ConfigError(
                f"{checkpoints[-1][1]} was made with another config; resume with the same recipe and overrides"
            )
        summary_url = fs.join(run_dir, "train_summary.json")
        if int(state["step"]) >= plan.total_steps and fs.exists(summary_url):
            log.info(
                "%s is already finished (step %d of %d); nothing to do",
                run_dir,
                int(state["step"]),
                plan.total_steps,
            )
            return fs.read_json(summary_url)  # a finished run is left exactly as it is
        loop.restore(state, int(state["step"]))
        log.info("resuming %s at step %d of %d", run_dir, loop.step, plan.total_steps)
    if info.is_main:
        fs.makedirs(run_dir)
        cfg.save(fs.join(run_dir, "config.json"))
        fs.write_json_atomic(
            fs.join(run_dir, "plan.json"),
            {**plan.__dict__, "world_size": info.world_size, "num_tokens": k, "target": cfg.model.target},
        )
    stream = TrainStream(
        shards,
        info.rank,
        info.world_size,
        cfg.data.batch_size,
        plan.steps_per_epoch,
        cfg.model.image_size,
        cfg.seed,
        cfg.data.shuffle_buffer,
        need_tokens=cfg.model.target == "tokens",
        num_tokens=k if cfg.model.target == "tokens" else None,
        grid=cfg.model.image_size // cfg.model.patch_size,
    )
    stream.set_start(*divmod(loop.step, plan.steps_per_epoch))
    loader = make_loader(stream, cfg.data.loader_workers)

    def step_fn(batch: tuple) -> tuple:
        views, tokens, _ = batch
        imgs = normalize(views.to(device, non_blocking=True))  # [B, 3, S, S]
        if tokenizer is not None:
            tokens = torch.from_numpy(tokenizer(views.numpy()))  # online targets, from this very batch
        tokens = tokens.to(device, non_blocking=True)
        generator = masking_generator(cfg.seed, loop.step, info.rank)
        return (lambda: loop.wrapped(imgs, tokens, generator=generator)), len(views)

    def checkpoint() -> None:
        loop.save(
            run_dir,
            cfg.checkpoint.keep,
            scaler=None,
            step=loop.step,
            epoch=loop.step // plan.steps_per_epoch,
            batch_in_epoch=loop.step % plan.steps_per_epoch,
            config=json.dumps(cfg.to_json()),
        )

    last_loss, window = (
        float("nan"),
        [time.monotonic(), 0],
    )  # the loss logged last; (start, images) of the window

    def after_step(loss: torch.Tensor, stepped: bool, images: int) -> None:
        nonlocal last_loss
        window[1] += images
        if loop.step % cfg.log_every == 0 or loop.step == plan.total_steps:
            last_loss = all_reduce_mean(float(loss.detach()), info, device)
            lr = optimizer.param_groups[0]["lr"]
            loop.progress.note = f"loss {last_loss:.4f}, lr {lr:.2e}"  # type: ignore[union-attr]
            now = time.monotonic()
            loop.log(
                {
                    "step": loop.step,
                    "epoch": loop.step / plan.steps_per_epoch,
                    "loss": last_loss,
                    "lr": lr,
                    "images_per_s": window[1] / max(now - window[0], 1e-9),
                    "time": time.time(),
                }
            )
            window[:] = [now, 0]
        if stepped and (loop.step // cfg.optim.accum_steps) % cfg.checkpoint.every_steps == 0:
            checkpoint()

    start_images = loop.step * cfg.data.batch_size * info.world_size
    loop.run(lambda: loader, step_fn, on_step=after_step)
    if not list_checkpoints(run_dir) or list_checkpoints(run_dir)[-1][0] != loop.step:
        checkpoint()
    progress = loop.progress
    images = loop.step * cfg.data.batch_size * info.world_size - start_images
    summary = {
        "steps": loop.step,
        "final_loss": last_loss,
        "images": images,
        "seconds": round(progress.elapsed, 3),
        "images_per_s": round(images / max(progress.elapsed, 1e-9), 2),
        "world_size": info.world_size,
    }
    if info.is_main:
        fs.write_json_atomic(fs.join(run_dir, "train_summary.json"), summary)
        log.info(progress.summary())
    return summary
