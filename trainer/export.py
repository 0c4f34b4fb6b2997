"""`kmim export`: the pretrained encoder as a timm-loadable safetensors file.

`timm.create_model(NAME, pretrained=True, pretrained_cfg_overlay=dict(file=OUT), num_classes=0,
img_size=...)` loads it; the keys are exactly the timm model's own (no head).
"""

from __future__ import annotations

import json

from safetensors.torch import save

from kmim import fs
from kmim.errors import InputError
from kmim.trainer.checkpoint import list_checkpoints, load_checkpoint
from kmim.trainer.config import config_from_json
from kmim.trainer.model import build_encoder


def export_encoder(run_dir: str, out: str) -> dict:
    checkpoints = list_checkpoints(run_dir)
    if not checkpoints:
        raise InputError(run_dir, "no checkpoint-*.pt: not a `kmim train` run folder")
    step, url = checkpoints[-1]
    state = load_checkpoint(url)
    cfg = config_from_json(json.loads(state["config"]))
    prefix = "encoder."
    weights = {k[len(prefix) :]: v.contiguous() for k, v in state["model"].items() if k.startswith(prefix)}
    expected = set(build_encoder(cfg.model).state_dict())
    if set(weights) != expected:
        raise InputError(
            url, f"encoder keys differ from {cfg.model.encoder}: {sorted(set(weights) ^ expected)[:5]}"
        )
    meta = {
        "encoder": cfg.model.encoder,
        "image_size": str(cfg.model.image_size),
        "patch_size": str(cfg.model.patch_size),
        "target": cfg.model.target,
        "step": str(step),
        "run": run_dir,
    }
    fs.write_bytes_atomic(out, save(weights, metadata=meta))
    return {
        "out": out,
        "encoder": cfg.model.encoder,
        "tensors": len(weights),
        "step": step,
        "image_size": cfg.model.image_size,
    }
