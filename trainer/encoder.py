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
from kmim.trainer.config import config_from_json

log = logging.getLogger(__name__)
POOLS = ("cls", "mean")


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
        weights, name, size, home = st_load_torch(raw), meta["encoder"], int(meta["image_size"]), fs.dirname(source)
    else:
        checkpoints = list_checkpoints(source)
        if not checkpoints:
            raise InputError(source, "neither a `kmim train` run folder nor an encoder .safetensors")
        state = load_checkpoint(checkpoints[-1][1])
        cfg = config_from_json(json.loads(state["config"]))
        weights = {k[len("encoder."):]: v for k, v in state["model"].items() if k.startswith("encoder.")}
        name, size, home = cfg.model.encoder, cfg.model.image_size, source
    model = timm.create_model(name, pretrained=False, num_classes=0, img_size=size)
    model.load_state_dict(weights, strict=True)
    fingerprint = hashlib.sha256(st_save_torch({k: v.contiguous() for k, v in sorted(weights.items())})).hexdigest()
    return FrozenEncoder(model.eval(), name, size, fingerprint, home)


def labelled_features(encoder: FrozenEncoder, data: str, pool: str, batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """(features [N, D], labels [N], info) of view 0 of every labelled image, cached in the encoder's home."""
    if pool not in POOLS:
        raise ConfigError(f"pool must be one of {POOLS}, got {pool!r}")
    dataset = open_dataset(data)
    key = digest({"encoder": encoder.fingerprint, "data": [s.input_ref().identity() for s in dataset.shards],
                  "pool": pool, "view": 0, "image_size": encoder.image_size})
    cache = fs.join(encoder.home, "feature-cache", f"{key[:24]}.safetensors")
    if fs.exists(cache):
        filesystem, path = fs.get_fs(cache)
        t = st_load_torch(filesystem.cat_file(path))
        return t["features"], t["labels"], {"cached": True, "samples": len(t["labels"]), "skipped": []}
    spec, stats = ViewSpec(encoder.image_size), ReadStats()
    feats, labels, views = [], [], []

    def flush() -> None:
        feats.append(encoder.features(np.stack(views), pool).float())
        views.clear()

    for shard in dataset.shards:
        for sample, img in iter_images(shard, stats, require_label=True):
            views.append(to_uint8_array(apply_view(img, center_view(img.width, img.height, spec))))
            labels.append(sample.label)
            if len(views) == batch_size:
                flush()
    if views:
        flush()
    if not labels:
        raise InputError(data, "has no labels: evaluation needs class labels (.cls members or class folders)")
    features, label_tensor = torch.cat(feats), torch.tensor(labels, dtype=torch.int64)
    fs.write_bytes_atomic(cache, st_save_torch({"features": features.contiguous(), "labels": label_tensor}))
    return features, label_tensor, {"cached": False, "samples": len(labels), "skipped": stats.skipped}
