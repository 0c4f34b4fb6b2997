"""The `kmim run` recipe: one YAML file for the whole K-MIM job (see manifests/recipes/digits.yaml).

Sections: `data` (`builtin: digits|fashion-mnist` with that dataset's settings, or `train` / `val` URLs), `extract`, `cluster`, `tokenize` (the stage
configs, validated by their own dataclasses), `train` (a `kmim train` config tree; `kmim train --config`
reads the same file), `runs` (named variants of `train` as dotted overrides) and `eval` (protocols and
their settings). Everything is validated when the recipe is loaded, before any stage runs.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from typing import Any

from kmim import fs
from kmim.contract.config import Config
from kmim.contract.patches import grid_size
from kmim.data.digits import DigitsConfig
from kmim.data.idx import FashionMnistConfig
from kmim.errors import ConfigError
from kmim.pipeline.cluster import ClusterConfig
from kmim.pipeline.extract import ExtractConfig
from kmim.pipeline.tokenize import TokenizeConfig
from kmim.trainer.config import TrainConfig, apply_overrides, build_config, read_recipe
from kmim.trainer.probe import KnnConfig, LinearConfig

STAGES = ("data", "extract", "cluster", "tokenize", "train", "eval")
BUILTINS: dict[str, type[Config]] = {"digits": DigitsConfig, "fashion-mnist": FashionMnistConfig}
SECTIONS = ("name", "data", "extract", "cluster", "tokenize", "train", "runs", "eval")
EVAL_CONFIGS = {"knn": KnnConfig, "linear": LinearConfig}


DEFAULT_POINTS_PER_CENTROID = 256


def sampled_patches(k: int, points_per_centroid: int, num_images: int) -> int:
    """Patches per image so that num_images x it >= k x points_per_centroid (at least 1)."""
    return max(1, -(-k * points_per_centroid // num_images))


def write_builtin(name: str, out: str, config: Config) -> None:
    """Write the builtin dataset `name` (a key of BUILTINS) into `out` with its config."""
    if name == "digits":
        from kmim.data.digits import write_digits  # scikit-learn's imports: only when digits are written

        write_digits(out, config)  # type: ignore[arg-type]
    else:
        from kmim.data.idx import write_fashion_mnist

        write_fashion_mnist(out, config)  # type: ignore[arg-type]


def flatten(d: dict, prefix: str = "") -> list[str]:
    """{"a": {"b": 1}, "c.d": 2} -> ["a.b=1", "c.d=2"]: variant overrides may be nested or dotted."""
    out = []
    for key, value in d.items():
        if isinstance(value, dict) and value:
            out += flatten(value, f"{prefix}{key}.")
        else:
            out.append(f"{prefix}{key}={json.dumps(value)}")
    return out


@dataclass(frozen=True)
class PipelineRecipe:
    name: str
    source: str  # the recipe file
    builtin: str | None
    train_data: str | None
    val_data: str | None
    dataset: Config  # the builtin's config (DigitsConfig, FashionMnistConfig); digits' defaults otherwise
    extract: ExtractConfig
    cluster: ClusterConfig
    tokenize: TokenizeConfig
    train_raw: dict
    runs: dict[str, list[str]]  # variant -> dotted overrides of `train`
    evals: dict[str, Any] = field(default_factory=dict)  # protocol -> KnnConfig | LinearConfig
    raw: dict = field(default_factory=dict)
    # `cluster.points_per_centroid`: how many patch features `kmim run` extracts for clustering, K times this
    # (faiss's max_points_per_centroid is 256 too); None: every patch of every image.
    points_per_centroid: int | None = DEFAULT_POINTS_PER_CENTROID

    def extract_for(self, num_images: int | None) -> ExtractConfig:
        """The extract config `kmim run` uses: with `points_per_centroid`, patches are sampled per image so
        that about K x points_per_centroid features reach clustering; an explicit
        `extract.patches_per_image` or an unknown image count leaves the config as written."""
        if self.points_per_centroid is None or self.extract.patches_per_image is not None or not num_images:
            return self.extract
        per_image = sampled_patches(self.cluster.k, self.points_per_centroid, num_images)
        if per_image >= grid_size(self.extract.image_size, self.extract.patch_size) ** 2:
            return self.extract
        return replace(self.extract, patches_per_image=per_image)

    def train_config(self, run: str, data_train: str, output: str) -> TrainConfig:
        """The variant's resolved config (validated), reading `data_train` and writing to `output`."""
        if run not in self.runs:
            raise ConfigError(f"{self.source}: no run {run!r} (runs: {', '.join(self.runs)})")
        raw = apply_overrides(json.loads(json.dumps(self.train_raw)), self.runs[run])
        raw = apply_overrides(
            raw, [f"data.train={data_train}", f"output={output}", f"name={self.name}/{run}"]
        )
        return build_config(TrainConfig, raw, f"{self.source}: runs.{run}")


def _mapping(raw: dict, name: str, path: str) -> dict:
    value = raw.get(name) or {}
    if not isinstance(value, dict):
        raise ConfigError(f"{path}: `{name}` must be a mapping, got {value!r}")
    return value


def load_recipe(path: str, sets: list[str] = ()) -> PipelineRecipe:
    """Read and validate a recipe; `sets` are dotted `key=value` overrides of the recipe itself."""
    raw = apply_overrides(read_recipe(path), list(sets))
    unknown = sorted(set(raw) - set(SECTIONS))
    if unknown:
        raise ConfigError(f"{path}: unknown section(s) {', '.join(unknown)} (known: {', '.join(SECTIONS)})")
    for name in SECTIONS[1:]:  # every section but `name` is a mapping
        _mapping(raw, name, path)
    data = _mapping(raw, "data", path)
    builtin = data.get("builtin")
    if builtin is not None and builtin not in BUILTINS:
        raise ConfigError(f"{path}: data.builtin must be one of {', '.join(BUILTINS)}, got {builtin!r}")
    if builtin is None and not (data.get("train") and data.get("val")):
        raise ConfigError(
            f"{path}: data needs `builtin: {'|'.join(BUILTINS)}` or both `train` and `val` URLs"
        )

    def section(name: str, cls: type, extra: dict | None = None) -> Any:
        values = raw.get(name) or {}
        if not isinstance(values, dict):
            raise ConfigError(f"{path}: `{name}` must be a mapping")
        return build_config(cls, {**(extra or {}), **values}, f"{path}: {name}")

    cluster_raw = dict(_mapping(raw, "cluster", path))
    points_per_centroid = cluster_raw.pop("points_per_centroid", DEFAULT_POINTS_PER_CENTROID)
    if points_per_centroid is not None and (
        isinstance(points_per_centroid, bool)
        or not isinstance(points_per_centroid, int)
        or points_per_centroid < 1
    ):
        raise ConfigError(
            f"{path}: cluster.points_per_centroid must be an integer >= 1 or null (every patch), "
            f"got {points_per_centroid!r}"
        )
    runs_raw = raw.get("runs") or {"default": {}}
    if not isinstance(runs_raw, dict):
        raise ConfigError(f"{path}: `runs` maps variant names to overrides")
    runs = {str(name): flatten(overrides or {}) for name, overrides in runs_raw.items()}
    evals = {}
    for protocol, values in (raw.get("eval") or {}).items():
        if protocol not in EVAL_CONFIGS:
            raise ConfigError(
                f"{path}: eval.{protocol}: protocols are {', '.join(EVAL_CONFIGS)} "
                "(fine-tuning: `kmim eval finetune` on the run folder)"
            )
        evals[protocol] = build_config(EVAL_CONFIGS[protocol], values or {}, f"{path}: eval.{protocol}")
    recipe = PipelineRecipe(
        name=str(raw.get("name") or fs.basename(path).rsplit(".", 1)[0]),
        source=path,
        builtin=builtin,
        train_data=data.get("train"),
        val_data=data.get("val"),
        dataset=build_config(
            BUILTINS[builtin or "digits"],
            {k: v for k, v in data.items() if k not in ("builtin", "train", "val")},
            f"{path}: data",
        ),
        extract=section("extract", ExtractConfig),
        cluster=build_config(ClusterConfig, cluster_raw, f"{path}: cluster"),
        tokenize=section("tokenize", TokenizeConfig),
        train_raw=_mapping(raw, "train", path),
        runs=runs,
        evals=evals,
        raw=raw,
        points_per_centroid=points_per_centroid,
    )
    for run in runs:  # every variant must build a valid training config now, not after an hour of pipeline
        recipe.train_config(run, "<tokens>", "<output>")
    return recipe
