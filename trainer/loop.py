"""The one training loop, shared by pretraining (`kmim train`), fine-tuning and the linear probe.

It owns what the three have in common: the learning-rate schedule (linear warmup, then a half-cosine
down to a floor), the optimizer step (gradient accumulation with DDP's no_sync between boundaries,
clipping, AMP autocast), checkpoints (written by rank 0, restored on resume), metrics (metrics.jsonl
and TensorBoard) and progress. Each caller supplies its model, optimizer, data and loss:
`TrainLoop.run(batches, step_fn)`, where `step_fn(batch)` returns the forward pass that computes the
loss and the number of images in the batch, plus hooks after every step and every epoch.
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch.nn.parallel import DistributedDataParallel

from kmim import fs
from kmim.progress import ProgressReporter
from kmim.trainer.checkpoint import rng_state, save_checkpoint, set_rng_state
from kmim.trainer.distributed import DistInfo, barrier

# From a batch: the forward pass returning the loss (run under autocast, and inside DDP's no_sync between
# accumulation boundaries) and the number of images in the batch on this rank.
StepFn = Callable[[Any], tuple[Callable[[], torch.Tensor], int]]


def warmup_cosine(
    step: int, warmup: int, total: int, min_ratio: float = 0.0, angle_first: bool = False
) -> float:
    """The lr factor of optimizer step `step` (from 0): linear warmup to 1 over `warmup` steps, then a
    half-cosine from 1 down to `min_ratio` at step `total`.

    `angle_first` computes the cosine's angle as pi * done / span, as fine-tuning and the linear probe always
    have, instead of pretraining's pi * (done / span): the two round differently in the last bit at some
    steps, and each keeps its own so that results stay bit-identical to those made before."""
    if step < warmup:
        return (step + 1) / warmup
    done, span = step - warmup, max(1, total - warmup)
    angle = math.pi * done / span if angle_first else math.pi * min(1.0, done / span)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(angle))


class WarmupCosine(torch.optim.lr_scheduler.LRScheduler):
    """`warmup_cosine` on every param group: lr = the group's initial lr * factor * its `lr_scale` (layer-wise
    decay; 1 when absent). As with any torch scheduler the optimizer holds the lr of its next step; the
    state_dict has LambdaLR's layout, so checkpoints written with LambdaLR resume here and the other way."""

    _SETTINGS = ("warmup", "total", "min_ratio", "angle_first")

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        warmup: int,
        total: int,
        min_ratio: float = 0.0,
        angle_first: bool = False,
    ):
        self.warmup, self.total, self.min_ratio, self.angle_first = warmup, total, min_ratio, angle_first
        super().__init__(optimizer)

    def get_lr(self) -> list[float]:
        factor = warmup_cosine(self.last_epoch, self.warmup, self.total, self.min_ratio, self.angle_first)
        return [
            base * factor * group.get("lr_scale", 1.0)
            for base, group in zip(self.base_lrs, self.optimizer.param_groups)
        ]

    def seek(self, step: int) -> None:
        """Set the lrs of optimizer step `step`: resuming from a checkpoint that holds no schedule state."""
        self.last_epoch = step
        for group, lr in zip(self.optimizer.param_groups, self.get_lr()):
            group["lr"] = lr
        self._last_lr = [group["lr"] for group in self.optimizer.param_groups]

    def state_dict(self) -> dict:
        state = {k: v for k, v in self.__dict__.items() if k != "optimizer" and k not in self._SETTINGS}
        state["lr_lambdas"] = [None] * len(self.base_lrs)  # LambdaLR's layout
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        self.__dict__.update({k: v for k, v in state_dict.items() if k != "lr_lambdas"})


def autocast_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    if amp == "off":
        return None
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    if amp == "bf16":
        return torch.bfloat16  # CPU bf16 autocast: works, rarely faster
    return None


class MetricsLog:
    """metrics.jsonl and TensorBoard events, written by rank 0 only."""

    def __init__(self, run_dir: str, enabled: bool):
        self.enabled = enabled
        self.url = fs.join(run_dir, "metrics.jsonl")
        self.tb = None
        if enabled:
            fs.makedirs(run_dir)
            filesystem, _ = fs.get_fs(run_dir)
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


class TrainLoop:
    """Steps a model over micro-batches: forward under autocast, backward scaled by 1 / accum_steps, and on
    each accumulation boundary gradient clipping, the optimizer step and the schedule step. `step` counts
    micro-batches, over all epochs and across a resume."""

    def __init__(
        self,
        name: str,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        schedule: WarmupCosine,
        total_steps: int,
        *,
        info: DistInfo | None = None,
        device: torch.device | None = None,
        accum_steps: int = 1,
        clip_grad: float | None = None,
        amp_dtype: torch.dtype | None = None,
        metrics_dir: str | None = None,
        progress: bool = True,
    ):
        self.name, self.model, self.optimizer, self.schedule = name, model, optimizer, schedule
        self.total_steps, self.info, self.device = (
            total_steps,
            info or DistInfo(),
            device or torch.device("cpu"),
        )
        self.accum_steps, self.clip_grad, self.amp_dtype = accum_steps, clip_grad, amp_dtype
        self.metrics_dir, self.show_progress = metrics_dir, progress
        # what the forward passes call: DDP syncs gradients in backward
        self.wrapped = DistributedDataParallel(model) if self.info.distributed else model
        self.step = 0
        self.lrs = [group["lr"] for group in optimizer.param_groups]  # the lrs of the latest optimizer step
        self.progress: ProgressReporter | None = None
        self.metrics: MetricsLog | None = None

    def autocast(self) -> torch.autocast:
        return torch.autocast(
            self.device.type, dtype=self.amp_dtype or torch.float32, enabled=self.amp_dtype is not None
        )

    def micro_step(self, forward: Callable[[], torch.Tensor]) -> tuple[torch.Tensor, bool]:
        """One micro-batch; returns its loss and whether the optimizer stepped."""
        sync = (self.step + 1) % self.accum_steps == 0
        no_sync = self.wrapped.no_sync() if self.info.distributed and not sync else contextlib.nullcontext()
        with no_sync:
            with self.autocast():
                loss = forward()
            (loss / self.accum_steps).backward()
        if sync:
            if self.clip_grad:
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip_grad)
            self.lrs = [group["lr"] for group in self.optimizer.param_groups]
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.schedule.step()
        self.step += 1
        return loss, sync

    def run(
        self,
        batches: Callable[[], Iterable],
        step_fn: StepFn,
        on_step: Callable[[torch.Tensor, bool, int], None] | None = None,
        on_epoch: Callable[[torch.Tensor], None] | None = None,
    ) -> torch.Tensor | None:
        """Steps until `total_steps`; each pass over `batches()` is (the rest of) one epoch. `on_step(loss,
        stepped, images on all ranks)` follows every micro-batch, `on_epoch(last loss)` every pass. Returns
        the last micro-batch's loss (None when there was nothing left to do)."""
        loss = None
        main = self.info.is_main
        self.metrics = MetricsLog(self.metrics_dir, main) if self.metrics_dir is not None else None
        reporter = (
            ProgressReporter(
                self.name,
                self.total_steps,
                unit="steps",
                item="images",
                live=None if main else False,
                log_every=10.0 if main else float("inf"),
            )
            if self.show_progress
            else None
        )
        with reporter or contextlib.nullcontext():
            self.progress = reporter
            self._advance(self.step, 0)
            self.wrapped.train()
            while self.step < self.total_steps:
                for batch in batches():
                    forward, images = step_fn(batch)
                    loss, stepped = self.micro_step(forward)
                    if on_step is not None:
                        on_step(loss, stepped, images * self.info.world_size)
                    self._advance(1, images * self.info.world_size)
                    if self.step == self.total_steps:
                        break
                if on_epoch is not None:
                    on_epoch(loss)  # type: ignore[arg-type]
        if self.metrics is not None:
            self.metrics.close()
        return loss

    def _advance(self, steps: int, images: int) -> None:
        if self.progress is not None:
            self.progress.advance(steps, images)

    def log(self, record: dict) -> None:
        if self.metrics is not None:
            self.metrics.write(record)

    def save(self, run_dir: str, keep: int, with_schedule: bool = True, **extra: Any) -> None:
        """A checkpoint at this step: model, optimizer, (schedule,) RNG states and `extra`, written by rank 0;
        every rank waits for it."""
        if self.info.is_main:
            state = {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict()}
            if with_schedule:
                state["scheduler"] = self.schedule.state_dict()
            save_checkpoint(run_dir, self.step, {**state, **extra, "rng": rng_state()}, keep)
        barrier(self.info)

    def restore(self, state: dict, step: int) -> None:
        """Continue from a checkpoint taken after micro-batch `step`; without a saved schedule (fine-tuning's
        checkpoints) the lrs are those of its optimizer step."""
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if "scheduler" in state:
            self.schedule.load_state_dict(state["scheduler"])
        else:
            self.schedule.seek(step // self.accum_steps)
        set_rng_state(state["rng"])
        self.step = step
