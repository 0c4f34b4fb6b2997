"""Evaluation protocols on frozen features: the MAE linear probe and DINO's weighted k-NN.

Linear: `BatchNorm1d(affine=False)` + a linear head on the frozen encoder's features (cls token by
default), SGD (or LARS), warmup then cosine, run by the shared loop (trainer/loop.py). MAE's LARS with
blr 0.1 assumes its batch of 16,384 (lr 6.4): at the small batches of small datasets its trust ratio
leaves steps of ~1e-4 and the head underfits (24 % where SGD reaches 99 % on planted features), so SGD
is the default here and `optimizer="lars"` wants a larger blr (10 works); features are computed once
per view and cached, so a probe on digits takes seconds. k-NN: cosine similarity on L2-normalised
features, k = 20, votes weighted by exp(sim / 0.07). Each writes `eval-<protocol>.json` (top-1, top-5,
config, encoder fingerprint).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict

import torch
import torch.nn.functional as F
from torch import nn

from kmim import __version__, fs
from kmim.contract import streams
from kmim.trainer.config import KnnConfig, LinearConfig
from kmim.trainer.distributed import DistInfo, cleanup, init_distributed
from kmim.trainer.encoder import labelled_features, load_encoder
from kmim.trainer.loop import TrainLoop, WarmupCosine


class LARS(torch.optim.Optimizer):
    """LARS as in MAE's linear probe: layer-wise trust ratio on weight matrices, momentum SGD."""

    def __init__(
        self,
        params,
        lr: float = 0.0,
        weight_decay: float = 0.0,
        momentum: float = 0.9,
        trust_coefficient: float = 0.001,
    ):
        super().__init__(
            params,
            dict(lr=lr, weight_decay=weight_decay, momentum=momentum, trust_coefficient=trust_coefficient),
        )

    @torch.no_grad()
    def step(self, closure=None):  # noqa: ANN001
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                dp = p.grad
                if p.ndim > 1:  # not for biases and norms
                    dp = dp.add(p, alpha=group["weight_decay"])
                    pn, un = torch.norm(p), torch.norm(dp)
                    one = torch.ones_like(pn)
                    dp = dp.mul(
                        torch.where(
                            pn > 0, torch.where(un > 0, group["trust_coefficient"] * pn / un, one), one
                        )
                    )
                mu = self.state[p].setdefault("mu", torch.zeros_like(p))
                mu.mul_(group["momentum"]).add_(dp)
                p.add_(mu, alpha=-group["lr"])


def topk_accuracy(scores: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    top = scores.topk(min(5, scores.shape[1]), dim=1).indices
    hit = top == labels[:, None]
    return {"top1": float(hit[:, 0].float().mean()), "top5": float(hit.any(dim=1).float().mean())}


def linear_probe(
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    val_x: torch.Tensor,
    val_y: torch.Tensor,
    num_classes: int,
    cfg: LinearConfig,
) -> dict:
    torch.manual_seed(streams.seed_state("model_init", cfg.seed))
    head = nn.Sequential(
        nn.BatchNorm1d(train_x.shape[1], affine=False, eps=1e-6), nn.Linear(train_x.shape[1], num_classes)
    )
    nn.init.trunc_normal_(head[1].weight, std=0.01)
    nn.init.zeros_(head[1].bias)
    lr = cfg.blr * cfg.batch_size / 256
    opt = (
        LARS(head.parameters(), lr=lr, weight_decay=cfg.weight_decay)
        if cfg.optimizer == "lars"
        else torch.optim.SGD(head.parameters(), lr=lr, momentum=0.9, weight_decay=cfg.weight_decay)
    )
    steps_per_epoch = math.ceil(len(train_x) / cfg.batch_size)
    total = cfg.epochs * steps_per_epoch
    schedule = WarmupCosine(opt, cfg.warmup_epochs * steps_per_epoch, total, angle_first=True)
    loop = TrainLoop("linear probe", head, opt, schedule, total, device=train_x.device, progress=False)
    generator = streams.torch_generator("probe_order", cfg.seed)

    def epoch() -> tuple[torch.Tensor, ...]:  # a new order of the (cached) features every epoch
        head.train()
        return torch.randperm(len(train_x), generator=generator).split(cfg.batch_size)

    def step_fn(idx: torch.Tensor) -> tuple:
        return (lambda: F.cross_entropy(head(train_x[idx]), train_y[idx])), len(idx)

    loss = loop.run(epoch, step_fn)
    head.eval()
    with torch.no_grad():
        return {**topk_accuracy(head(val_x), val_y), "final_train_loss": float(loss)}


def knn_classify(
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    val_x: torch.Tensor,
    val_y: torch.Tensor,
    num_classes: int,
    cfg: KnnConfig,
) -> dict:
    train_n, val_n = F.normalize(train_x, dim=1), F.normalize(val_x, dim=1)
    scores = torch.zeros(len(val_x), num_classes)
    for start in range(0, len(val_x), 1024):
        sim = val_n[start : start + 1024] @ train_n.T  # [b, N_train]
        top_sim, top_idx = sim.topk(min(cfg.k, len(train_x)), dim=1)
        weights = (top_sim / cfg.temperature).exp()
        scores[start : start + 1024].scatter_add_(1, train_y[top_idx], weights)
    return topk_accuracy(scores, val_y)


def evaluate(protocol: str, source: str, train: str, val: str, cfg: LinearConfig | KnnConfig) -> dict:
    """Run one protocol on an encoder (run folder or exported file); writes eval-<protocol>.json.

    Under torchrun (`--nproc N`) the ranks share the feature extraction, the expensive part; the probe
    itself runs on the gathered features, on every rank alike, and rank 0 writes the report."""
    info = init_distributed()
    try:
        return _evaluate(protocol, source, train, val, cfg, info)
    finally:
        cleanup(info)


def _evaluate(
    protocol: str, source: str, train: str, val: str, cfg: LinearConfig | KnnConfig, info: DistInfo
) -> dict:
    start = time.monotonic()
    encoder = load_encoder(source)
    train_x, train_y, train_info = labelled_features(encoder, train, cfg.pool, info=info)
    val_x, val_y, val_info = labelled_features(encoder, val, cfg.pool, info=info)
    num_classes = int(max(train_y.max(), val_y.max())) + 1
    result = (linear_probe if protocol == "linear" else knn_classify)(
        train_x, train_y, val_x, val_y, num_classes, cfg
    )  # type: ignore[arg-type]
    report = {
        "protocol": protocol,
        **result,
        "encoder": encoder.name,
        "encoder_fingerprint": encoder.fingerprint,
        "source": source,
        "train": train,
        "val": val,
        "train_samples": len(train_y),
        "val_samples": len(val_y),
        "classes": num_classes,
        "config": asdict(cfg),
        "features_cached": train_info["cached"] and val_info["cached"],
        "skipped": train_info["skipped"] + val_info["skipped"],
        "seconds": round(time.monotonic() - start, 3),
        "kmim_version": __version__,
        "world_size": info.world_size,
    }
    if info.is_main:
        fs.write_json_atomic(fs.join(encoder.home, f"eval-{protocol}.json"), report)
    return report
