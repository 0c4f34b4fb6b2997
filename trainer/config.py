"""The training run, described by a typed dataclass tree: loaded from a YAML recipe, overridden with
`key=value` (dotted keys), validated on construction, saved resolved as JSON in the run dir."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import asdict, dataclass, field, fields
from typing import Any, get_type_hints

import yaml

from kmim import fs
from kmim.errors import ConfigError

TARGETS = ("tokens", "pixel", "online")
AMP = ("auto", "bf16", "off")


@dataclass
class ModelConfig:
    encoder: str = "vit_micro_patch4_32"  # any timm ViT
    image_size: int = 32
    patch_size: int = 4
    decoder_embed_dim: int = 64
    decoder_depth: int = 2
    decoder_num_heads: int = 4
    mask_ratio: float = 0.75
    target: str = "tokens"  # tokens (K-MIM) | pixel (MAE) | online (tokens computed in the step)
    norm_pix_loss: bool = True  # pixel target only
    label_smoothing: float = 0.0  # tokens / online targets
    drop_path: float = 0.0

    def __post_init__(self) -> None:
        if self.target not in TARGETS:
            raise ConfigError(f"model.target must be one of {TARGETS}, got {self.target!r}")
        if not 0 < self.mask_ratio < 1:
            raise ConfigError(f"model.mask_ratio must be in (0, 1), got {self.mask_ratio}")
        if self.image_size % self.patch_size:
            raise ConfigError(f"model.image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        if self.decoder_embed_dim % self.decoder_num_heads:
            raise ConfigError("model.decoder_embed_dim must be divisible by decoder_num_heads")
        if not 0 <= self.label_smoothing < 1:
            raise ConfigError(f"model.label_smoothing must be in [0, 1), got {self.label_smoothing}")


@dataclass
class DataConfig:
    train: str = ""  # token shards (a tokenize output, its shards.json or a split index), or images for pixel
    samples_per_epoch: int | None = None  # default: the index's sample count
    batch_size: int = 64  # per rank
    num_workers: int = 1
    shuffle_buffer: int = 1000
    codebook: str | None = None  # online target: the codebook applied in the step
    weights: str | None = None  # online target: its extractor weights

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.num_workers < 0 or self.shuffle_buffer < 1:
            raise ConfigError("data.batch_size >= 1, data.num_workers >= 0, data.shuffle_buffer >= 1 required")
        if self.samples_per_epoch is not None and self.samples_per_epoch < 1:
            raise ConfigError("data.samples_per_epoch must be >= 1")


@dataclass
class OptimConfig:
    epochs: int = 10
    blr: float = 1.5e-4  # lr = blr * global batch / 256
    lr: float | None = None  # absolute lr, overrides blr
    min_lr: float = 0.0
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.95)
    warmup_epochs: float = 1.0
    accum_steps: int = 1
    clip_grad: float | None = None
    amp: str = "auto"  # auto: bf16 autocast on CUDA when supported, off on CPU

    def __post_init__(self) -> None:
        self.betas = tuple(self.betas)  # type: ignore[assignment]
        if self.epochs < 1 or self.accum_steps < 1:
            raise ConfigError("optim.epochs and optim.accum_steps must be >= 1")
        if self.amp not in AMP:
            raise ConfigError(f"optim.amp must be one of {AMP}, got {self.amp!r}")
        if self.warmup_epochs < 0 or self.weight_decay < 0:
            raise ConfigError("optim.warmup_epochs and optim.weight_decay must be >= 0")


@dataclass
class CheckpointConfig:
    every_steps: int = 500
    keep: int = 2

    def __post_init__(self) -> None:
        if self.every_steps < 1 or self.keep < 1:
            raise ConfigError("checkpoint.every_steps and checkpoint.keep must be >= 1")


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    output: str = "runs/default"
    seed: int = 0
    log_every: int = 10
    name: str = ""

    def __post_init__(self) -> None:
        if self.model.target == "online" and not self.data.codebook:
            raise ConfigError("model.target 'online' needs data.codebook")

    def to_json(self) -> dict:
        return asdict(self)

    def save(self, url: str) -> None:
        fs.write_json_atomic(url, self.to_json())


def build_config(cls: type, values: dict, where: str) -> Any:
    hints = get_type_hints(cls)
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)} (known: {', '.join(sorted(known))})")
    kwargs = {}
    for name, value in values.items():
        typ = hints[name]
        if dataclasses.is_dataclass(typ):
            if not isinstance(value, dict):
                raise ConfigError(f"{where}.{name}: expected a mapping, got {value!r}")
            kwargs[name] = build_config(typ, value, f"{where}.{name}")
        else:
            kwargs[name] = _check_type(value, typ, f"{where}.{name}")
    try:
        return cls(**kwargs)
    except TypeError as e:
        raise ConfigError(f"{where}: {e}") from None
    except ConfigError as e:  # say which file / section the bad value came from
        raise ConfigError(str(e) if str(e).startswith(where) else f"{where}: {e}") from None


def _check_type(value: Any, typ: Any, where: str) -> Any:
    """Numbers where numbers are declared. YAML 1.1 reads `1e-3` (no dot) as a string: accept that as a float."""
    allowed = set(getattr(typ, "__args__", ())) or {typ}
    if value is None or isinstance(value, bool) and bool in allowed:
        return value
    if float in allowed and isinstance(value, (int, float)):
        return float(value) if not isinstance(value, bool) else value
    if float in allowed and isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            raise ConfigError(f"{where}: expected a number, got {value!r}") from None
    if int in allowed and not isinstance(value, int) or int in allowed and isinstance(value, bool):
        if not (str in allowed and isinstance(value, str)):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
    return value


def _parse_value(text: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """`a.b=value` pairs onto a nested dict (values parsed as YAML scalars)."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not key=value")
        key, value = item.split("=", 1)
        node = raw
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {part} is not a section")
        node[parts[-1]] = _parse_value(value)
    return raw


def read_recipe(recipe: str) -> dict:
    """A recipe file (local path or fsspec URL) as a mapping of sections."""
    filesystem, path = fs.get_fs(recipe)
    if not filesystem.exists(path):
        raise ConfigError(f"{recipe}: no such recipe file")
    with filesystem.open(path, "r") as f:
        loaded = yaml.safe_load(f) or {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"{recipe}: a recipe is a mapping of sections")
    return loaded


def load_config(recipe: str | None, overrides: list[str] = ()) -> TrainConfig:
    raw: dict = {}
    if recipe:
        loaded = read_recipe(recipe)
        raw = loaded.get("train", loaded)  # a full pipeline recipe keeps the trainer under `train:`
        if raw is not loaded and "name" in loaded:
            raw = {"name": loaded["name"], **raw}
    raw = apply_overrides(json.loads(json.dumps(raw)), list(overrides))
    return build_config(TrainConfig, raw, "config")


def config_from_json(d: dict) -> TrainConfig:
    return build_config(TrainConfig, d, "config")
