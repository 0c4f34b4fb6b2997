"""Frozen encoders for evaluation: from a `kmim train` run folder or an exported .safetensors file,
and their pooled features on labelled data (view 0), cached on disk per (encoder, data, pool)."""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass

import numpy as np
import timm
import torch
import torch.distributed as dist
from safetensors.torch import load as st_load_torch
from safetensors.torch import save as st_save_torch

from kmim import fs
from kmim.contract.manifest import digest
from kmim.contract.schemas import safetensors_metadata
from kmim.contract.views import ViewSpec, apply_view, center_view, normalize, to_uint8_array
from kmim.data.reader import ReadStats, iter_images, open_dataset
from kmim.errors import ConfigError, InputError
from kmim.trainer import model as _registers_micro_vit  # noqa: F401  (timm model registry)
from kmim.trainer.checkpoint import list_checkpoints, load_checkpoint
from kmim.trainer.config import POOLS, config_from_json
from kmim.trainer.distributed import DistInfo

log = logging.getLogger(__name__)


@dataclass
class FrozenEncoder:
    model: torch.nn.Module
    name: str
    image_size: int
    fingerprint: str  # sha256 of the weights
    home: str  # where eval-*.json files go: the run folder, or the export's folder

    @torch.inference_mode()
    def features(self, views: np.ndarray, pool: str) -> torch.Tensor:
        tokens = self.model.forward_features(normalize(torch.from_numpy(views)))  # [B, P + L, D]
        if pool == "cls":
            return tokens[:, 0]
        return tokens[:, self.model.num_prefix_tokens :].mean(dim=1)


def load_encoder(source: str) -> FrozenEncoder:
    """A run folder (its latest checkpoint) or an exported encoder .safetensors."""
    if source.endswith(".safetensors"):
        filesystem, path = fs.get_fs(source)
        if not filesystem.exists(path):
            raise InputError(source, "no such encoder file")
        raw = filesystem.cat_file(path)
        meta = safetensors_metadata(raw)
        if "encoder" not in meta:
            raise InputError(source, "no `encoder` metadata: not written by `kmim export`")
        weights, name, size, home = (
            st_load_torch(raw),
            meta["encoder"],
            int(meta["image_size"]),
            fs.dirname(source),
        )
    else:
        checkpoints = list_checkpoints(source)
        if not checkpoints:
            raise InputError(source, "neither a `kmim train` run folder nor an encoder .safetensors")
        state = load_checkpoint(checkpoints[-1][1])
        cfg = config_from_json(json.loads(state["config"]))
        weights = {k[len("encoder.") :]: v for k, v in state["model"].items() if k.startswith("encoder.")}
        name, size, home = cfg.model.encoder, cfg.model.image_size, source
    model = timm.create_model(name, pretrained=False, num_classes=0, img_size=size)
    model.load_state_dict(weights, strict=True)
    fingerprint = hashlib.sha256(
        st_save_torch({k: v.contiguous() for k, v in sorted(weights.items())})
    ).hexdigest()
    return FrozenEncoder(model.eval(), name, size, fingerprint, home)


def labelled_features(
    encoder: FrozenEncoder, data: str, pool: str, batch_size: int = 256, info: DistInfo = DistInfo()
) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """(features [N, D], labels [N], info) of view 0 of every labelled image, cached in the encoder's home."""
    if pool not in POOLS:
        raise ConfigError(f"pool must be one of {POOLS}, got {pool!r}")
    dataset = open_dataset(data)
    key = digest(
        {
            "encoder": encoder.fingerprint,
            "data": [s.input_ref().identity() for s in dataset.shards],
            "pool": pool,
            "view": 0,
            "image_size": encoder.image_size,
        }
    )
    cache = fs.join(encoder.home, "feature-cache", f"{key[:24]}.safetensors")
    if fs.exists(cache):
        filesystem, path = fs.get_fs(cache)
        t = st_load_torch(filesystem.cat_file(path))
        return t["features"], t["labels"], {"cached": True, "samples": len(t["labels"]), "skipped": []}
    spec, stats = ViewSpec(encoder.image_size), ReadStats()
    # Under DDP each rank embeds every world-th shard; the parts are gathered back into shard order.
    mine = list(range(info.rank, len(dataset.shards), info.world_size))
    parts: dict[int, tuple[torch.Tensor, list[int]]] = {}
    for i in mine:
        feats: list[torch.Tensor] = []
        labels: list[int] = []
        views: list[np.ndarray] = []
        for sample, img in iter_images(dataset.shards[i], stats, require_label=True):
            views.append(to_uint8_array(apply_view(img, center_view(img.width, img.height, spec))))
            labels.append(sample.label)  # type: ignore[arg-type]
            if len(views) == batch_size:
                feats.append(encoder.features(np.stack(views), pool).float())
                views.clear()
        if views:
            feats.append(encoder.features(np.stack(views), pool).float())
        parts[i] = (torch.cat(feats) if feats else torch.zeros(0), labels)
    skipped = stats.skipped
    if info.distributed:
        gathered: list = [None] * info.world_size
        dist.all_gather_object(
            gathered, (parts, stats.skipped)
        )  # our own ranks' tensors, not untrusted input
        parts = {i: p for g in gathered for i, p in g[0].items()}
        skipped = [s for g in gathered for s in g[1]]
    ordered = [parts[i] for i in range(len(dataset.shards)) if parts[i][1]]
    if not ordered:
        raise InputError(data, "has no labels: evaluation needs class labels (.cls members or class folders)")
    features = torch.cat([f for f, _ in ordered])
    label_tensor = torch.tensor([y for _, ys in ordered for y in ys], dtype=torch.int64)
    if info.is_main:
        fs.write_bytes_atomic(
            cache, st_save_torch({"features": features.contiguous(), "labels": label_tensor})
        )
    return features, label_tensor, {"cached": False, "samples": len(label_tensor), "skipped": skipped}
