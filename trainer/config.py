"""The training run, described by a typed dataclass tree: loaded from a YAML recipe, overridden with
`key=value` (dotted keys), validated on construction, saved resolved as JSON in the run dir."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Any

import yaml

from kmim import fs
from kmim.contract.config import Config, build_config, execution_field, output_field
from kmim.errors import ConfigError

__all__ = [
    "AMP",
    "POOLS",
    "TARGETS",
    "CheckpointConfig",
    "DataConfig",
    "FinetuneConfig",
    "KnnConfig",
    "LinearConfig",
    "ModelConfig",
    "OptimConfig",
    "TrainConfig",
    "apply_overrides",
    "build_config",
    "config_from_json",
    "load_config",
    "read_recipe",
]

TARGETS = ("tokens", "pixel", "online")
AMP = ("auto", "bf16", "off")
POOLS = ("cls", "mean")
OPTIMIZERS = ("sgd", "lars")


@dataclass
class ModelConfig(Config):
    SECTION = "model"
    encoder: str = output_field("vit_micro_patch4_32", help="Any timm ViT.")
    image_size: int = output_field(32, help="Side of the training views.", ge=1)
    patch_size: int = output_field(4, help="Patch side in pixels.", ge=1)
    decoder_embed_dim: int = output_field(64, help="Width of the MAE-style decoder.", ge=1)
    decoder_depth: int = output_field(2, help="Decoder blocks.", ge=1)
    decoder_num_heads: int = output_field(4, help="Decoder attention heads.", ge=1)
    mask_ratio: float = output_field(0.75, help="Share of patches masked.", gt=0.0, lt=1.0)
    target: str = output_field(
        "tokens", help="tokens (K-MIM) | pixel (MAE) | online (tokens computed in the step).", choices=TARGETS
    )
    norm_pix_loss: bool = output_field(True, help="Pixel target only: normalise each target patch.")
    label_smoothing: float = output_field(0.0, help="Tokens / online targets.", ge=0.0, lt=1.0)
    drop_path: float = output_field(0.0, help="Stochastic depth of the encoder.", ge=0.0, lt=1.0)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.image_size % self.patch_size:
            raise ConfigError(
                f"model.image_size {self.image_size} is not a multiple of patch_size {self.patch_size}"
            )
        if self.decoder_embed_dim % self.decoder_num_heads:
            raise ConfigError("model.decoder_embed_dim must be divisible by decoder_num_heads")


@dataclass
class DataConfig(Config):
    SECTION = "data"
    # The input: `kmim run` replaces it in the fingerprint by the fingerprint of the stage that made it.
    train: str = output_field(
        "",
        folded=True,
        help="Token shards (a tokenize output, its shards.json or a split "
        "index), or images for the pixel target.",
    )
    samples_per_epoch: int | None = output_field(None, help="Default: the index's sample count.", ge=1)
    batch_size: int = output_field(64, help="Per rank.", ge=1)
    # Output-determining: data-loader worker w of rank r reads shard slot r * loader_workers + w, so the
    # worker count changes the sample order (trainer/distributed.py shards_for).
    loader_workers: int = output_field(
        1, aliases=("num_workers",), help="Data-loader processes per rank.", ge=0
    )
    shuffle_buffer: int = output_field(1000, help="Samples in the shuffle buffer.", ge=1)
    codebook: str | None = output_field(None, help="Online target: the codebook applied in the step.")
    weights: str | None = execution_field(
        None, help="Online target: its extractor weights (checked by the codebook's hash)."
    )


@dataclass
class OptimConfig(Config):
    SECTION = "optim"
    epochs: int = output_field(10, help="Passes over samples_per_epoch.", ge=1)
    blr: float = output_field(1.5e-4, help="Base lr: lr = blr * global batch / 256.", gt=0.0)
    lr: float | None = output_field(None, help="Absolute lr; overrides blr.", gt=0.0)
    min_lr: float = output_field(0.0, help="Floor of the cosine schedule.", ge=0.0)
    weight_decay: float = output_field(
        0.05, help="AdamW weight decay (not on norms, biases, tokens).", ge=0.0
    )
    betas: tuple[float, float] = output_field((0.9, 0.95), help="AdamW betas.")
    warmup_epochs: float = output_field(1.0, help="Linear warmup, then cosine.", ge=0.0)
    accum_steps: int = output_field(1, help="Micro-batches per optimizer step.", ge=1)
    clip_grad: float | None = output_field(None, help="Max gradient norm (off when unset).", gt=0.0)
    amp: str = output_field(
        "auto", help="auto: bf16 autocast on CUDA when supported, off on CPU.", choices=AMP
    )

    def __post_init__(self) -> None:
        self.betas = tuple(self.betas)  # type: ignore[assignment]
        super().__post_init__()
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ConfigError(f"optim.betas must be two numbers in [0, 1), got {list(self.betas)}")


@dataclass
class CheckpointConfig(Config):
    SECTION = "checkpoint"
    every_steps: int = execution_field(500, help="Optimizer steps between checkpoints.", ge=1)
    keep: int = execution_field(2, help="Checkpoints kept.", ge=1)


@dataclass
class TrainConfig(Config):
    model: ModelConfig = output_field(default_factory=ModelConfig, help="The masked image model.")
    data: DataConfig = output_field(default_factory=DataConfig, help="Training data.")
    optim: OptimConfig = output_field(default_factory=OptimConfig, help="Optimizer and schedule.")
    checkpoint: CheckpointConfig = output_field(default_factory=CheckpointConfig, help="Checkpoint cadence.")
    output: str = execution_field("runs/default", help="Run folder.")
    seed: int = output_field(0, help="Seed of init, data order and masks.", ge=0)
    log_every: int = execution_field(10, help="Steps between metric lines.", ge=1)
    name: str = execution_field("", help="A label for logs and config.json.")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.model.target == "online" and not self.data.codebook:
            raise ConfigError("model.target 'online' needs data.codebook")

    def to_json(self) -> dict:
        return asdict(self)

    def save(self, url: str) -> None:
        fs.write_json_atomic(url, self.to_json())


@dataclass(frozen=True)
class FinetuneConfig(Config):
    epochs: int = output_field(50, help="Fine-tuning epochs.", ge=1)
    batch_size: int = output_field(64, help="Batch size per process.", ge=1)
    blr: float = output_field(
        1e-3, help="Base lr: lr = blr * global batch / 256 (MAE's fine-tuning rule).", gt=0.0
    )
    min_lr: float = output_field(1e-6, help="Floor of the cosine schedule.", ge=0.0)
    weight_decay: float = output_field(
        0.05, help="AdamW weight decay (not on norms, biases, tokens).", ge=0.0
    )
    layer_decay: float = output_field(
        0.75, help="Layer-wise lr decay: block i of L gets lr * decay^(L - i).", gt=0.0, le=1.0
    )
    drop_path: float = output_field(0.1, help="Stochastic depth rate.", ge=0.0, lt=1.0)
    label_smoothing: float = output_field(
        0.1, help="Label smoothing (also applied to mixup targets).", ge=0.0, lt=1.0
    )
    mixup: float = output_field(0.0, help="Mixup alpha (MAE: 0.8); 0 = off.", ge=0.0)
    cutmix: float = output_field(0.0, help="CutMix alpha (MAE: 1.0); 0 = off.", ge=0.0)
    warmup_epochs: float = output_field(5.0, help="Linear warmup epochs, then cosine.", ge=0.0)
    pool: str = output_field(
        "mean", help="mean of patch tokens + fc_norm (MAE fine-tuning), or cls.", choices=POOLS
    )
    clip_grad: float | None = output_field(None, help="Max gradient norm (off when unset).", gt=0.0)
    num_classes: int | None = output_field(None, help="Default: 1 + the largest val label.", ge=2)
    samples_per_epoch: int | None = output_field(
        None, help="Default: the training data's sample count.", ge=1
    )
    loader_workers: int = output_field(
        1, aliases=("num_workers",), help="Data-loader processes per rank (they set the sample order).", ge=0
    )
    shuffle_buffer: int = output_field(1000, help="Samples in the shuffle buffer.", ge=1)
    amp: str = output_field(
        "auto", help="auto: bf16 autocast on CUDA when supported, off on CPU.", choices=AMP
    )
    seed: int = output_field(0, help="Seed of the head init, data order and augmentation.", ge=0)

    def __post_init__(self) -> None:
        super().__post_init__()
        if (self.mixup or self.cutmix) and self.batch_size % 2:
            raise ConfigError(
                f"mixup / cutmix mix pairs of samples: batch_size must be even, got {self.batch_size}"
            )


@dataclass(frozen=True)
class LinearConfig(Config):
    epochs: int = output_field(100, help="Probe epochs (on cached features).", ge=1)
    batch_size: int = output_field(256, help="Probe batch size.", ge=1)
    blr: float = output_field(0.1, help="Base lr: lr = blr * batch / 256 (MAE).", gt=0.0)
    weight_decay: float = output_field(0.0, help="Weight decay of the head.", ge=0.0)
    warmup_epochs: int = output_field(10, help="Linear warmup epochs, then cosine.", ge=0)
    optimizer: str = output_field(
        "sgd", help="sgd, or lars (MAE's; needs a larger blr at small batch sizes).", choices=OPTIMIZERS
    )
    pool: str = output_field("cls", help="cls token or mean of patch tokens.", choices=POOLS)
    seed: int = output_field(0, help="Seed of the head init and batch order.", ge=0)


@dataclass(frozen=True)
class KnnConfig(Config):
    k: int = output_field(20, help="Neighbours.", ge=1)
    temperature: float = output_field(0.07, help="Vote weight exp(similarity / T).", gt=0.0)
    pool: str = output_field("cls", help="cls token or mean of patch tokens.", choices=POOLS)


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


class UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping (plain YAML keeps the last silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: set = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} is given twice", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def read_recipe(recipe: str) -> dict:
    """A recipe file (local path or fsspec URL) as a mapping of sections."""
    filesystem, path = fs.get_fs(recipe)
    if not filesystem.exists(path):
        raise ConfigError(f"{recipe}: no such recipe file")
    with filesystem.open(path, "r") as f:
        text = f.read()
    try:
        loaded = yaml.load(text, Loader=UniqueKeyLoader) or {}  # noqa: S506 - a SafeLoader subclass
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        raise ConfigError(f"{recipe}: not valid YAML{where}: {e.problem or e.context}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{recipe}: not valid YAML: {e}") from None
    if not isinstance(loaded, dict):
        raise ConfigError(f"{recipe}: a recipe is a mapping of sections")
    return loaded


def load_config(recipe: str | None, overrides: list[str] = ()) -> TrainConfig:
    raw: dict = {}
    if recipe:
        loaded = read_recipe(recipe)
        raw = loaded.get("train", loaded)  # a full pipeline recipe keeps the trainer under `train:`
        if not isinstance(raw, dict):
            raise ConfigError(f"{recipe}: `train` must be a mapping of sections, got {raw!r}")
        if raw is not loaded and "name" in loaded:
            raw = {"name": loaded["name"], **raw}
    raw = apply_overrides(json.loads(json.dumps(raw)), list(overrides))
    return build_config(TrainConfig, raw, "config")


def config_from_json(d: dict) -> TrainConfig:
    return build_config(TrainConfig, d, "config")
