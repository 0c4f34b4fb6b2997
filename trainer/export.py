"""`kmim export`: the pretrained encoder as a timm-loadable safetensors file.

`timm.create_model(NAME, pretrained=True, pretrained_cfg_overlay=dict(file=OUT), num_classes=0,
img_size=...)` loads it; the keys are exactly the timm model's own (no head).
"""

from __future__ import annotations

import json

from safetensors.torch import save

from kmim import fs
from kmim.contract.schemas import canonical_safetensors
from kmim.errors import InputError
from kmim.trainer.checkpoint import list_checkpoints, load_checkpoint
from kmim.trainer.config import config_from_json
from kmim.trainer.model import build_encoder


def export_encoder(run_dir: str, out: str, record_run: bool = True) -> dict:
    """record_run=False leaves the run's path out of the file's metadata: the same run gives the same bytes
    wherever it lives (its sha256 is what fingerprints an extractor made from it)."""
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
    }
    if record_run:
        meta["run"] = run_dir
    fs.write_bytes_atomic(out, canonical_safetensors(save(weights, metadata=meta)))  # same run, same bytes
    return {
        "out": out,
        "encoder": cfg.model.encoder,
        "tensors": len(weights),
        "step": step,
        "image_size": cfg.model.image_size,
    }


RUN_PREFIX = "run:"
RUN_ENCODER = "encoder.safetensors"


def run_extractor(run_dir: str) -> tuple[str, str]:
    """`--extractor run:RUN_DIR`: (the timm extractor name, its weights file) of a finished `kmim train` run,
    its encoder exported once to RUN_DIR/encoder.safetensors (no path inside, so the bytes, and with them the
    extractor's fingerprint, depend on the weights alone)."""
    if not fs.exists(fs.join(run_dir, "train_summary.json")):
        raise InputError(run_dir, "not a finished `kmim train` run (no train_summary.json): finish it first")
    cfg = config_from_json(fs.read_json(fs.join(run_dir, "config.json")))
    out = fs.join(run_dir, RUN_ENCODER)
    if not fs.exists(out):
        export_encoder(run_dir, out, record_run=False)
    return f"timm:{cfg.model.encoder}", out
