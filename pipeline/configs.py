"""The configs of the three Ray stages, each field declared once (kmim/contract/config.py): its default, its
help (which is also its `kmim pipeline ...` option), its bounds, and whether it changes the output.

Saved as `config.json` in every stage output; the fingerprinted part (`fingerprint_config`) is what
`claim_output` and `kmim run` hash.
"""

from __future__ import annotations

from dataclasses import dataclass

from kmim import fs
from kmim.contract.codebook import centers_file
from kmim.contract.config import Config, execution_field, output_field
from kmim.contract.grid import GridSpec
from kmim.contract.views import ViewSpec
from kmim.errors import ConfigError
from kmim.extractors import ExtractorSpec
from kmim.tcas import FORMS

INITS = ("kmeans++", "kmeans-parallel", "random")
DTYPES = ("float16", "float32")


@dataclass(frozen=True)
class ExtractConfig(Config):
    extractor: str = output_field(
        "pixel",
        folded=True,
        help="'pixel', 'timm:MODEL' (any timm ViT), or 'run:RUN_DIR' (the encoder of a finished `kmim train` "
        "run, exported to RUN_DIR/encoder.safetensors and fingerprinted by its sha256).",
    )
    weights: str | None = output_field(
        None,
        folded=True,
        help="timm weights: local path or fsspec URL (.safetensors, .pth); enters the "
        "fingerprint by its sha256, not its path.",
    )
    layer: int | None = output_field(
        None,
        folded=True,
        added=True,
        help="timm: features of this block (0-based; negative from the end, -1 the last); the forward pass "
        "stops there. Default: the last block.",
    )
    final_norm: bool = output_field(
        True, folded=True, added=True, help="timm: apply the model's final norm to the features."
    )
    image_size: int = output_field(224, help="Side of view 0 (Resize + CenterCrop).", ge=1)
    patch_size: int = output_field(16, help="Patch side in pixels.", ge=1)
    crop_pct: float = output_field(
        0.875, help="Center-crop share of view 0, as in MAE evaluation.", gt=0.0, le=1.0
    )
    patches_per_image: int | None = output_field(
        None, help="Keep a deterministic sample of N patches per image.", ge=1
    )
    dtype: str = output_field("float16", help="Stored feature type.", choices=DTYPES)
    seed: int = output_field(0, help="Seed of the patch sample.", ge=0)
    batch_size: int = execution_field(64, help="Images per extractor call.", ge=1)
    gpus_per_worker: float = execution_field(0.0, help="GPUs per Ray actor (bf16 autocast on GPU).", ge=0.0)
    cpus_per_worker: float = execution_field(1.0, help="CPUs per Ray actor.", gt=0.0)
    max_retries: int = execution_field(2, help="Retries of a failed shard before it is reported.", ge=0)

    def __post_init__(self) -> None:
        super().__post_init__()
        self.extractor_spec()  # validates name / sizes
        ViewSpec(self.image_size, self.crop_pct)

    def extractor_spec(self) -> ExtractorSpec:
        name, weights = self.extractor, self.weights
        if name.startswith("run:"):  # our own encoder: a finished `kmim train` run, by its weights' content
            from kmim.trainer.export import run_extractor

            if weights:
                raise ConfigError(
                    f"--weights does not go with --extractor {name}: the run's encoder is the weights"
                )
            name, weights = run_extractor(name[4:])
        return ExtractorSpec(
            name, self.image_size, self.patch_size, weights, None, self.layer, self.final_norm
        )

    def fingerprint_extra(self) -> dict:
        """The extractor as the stage records it: name, sizes, weights path and sha256 (the fingerprint counts
        the sha256 only: kmim/contract/manifest.py `by_content`)."""
        return {"extractor": self.extractor_spec().with_weights_hash().to_json()}


@dataclass(frozen=True)
class ClusterConfig(Config):
    k: int = output_field(help="Number of centers (codebook size).", ge=1)
    epochs: int = output_field(20, help="Full passes over all features (the paper's unit).", ge=1)
    init: str = output_field(
        "kmeans++", help="kmeans++ (on a sample), kmeans-parallel (k-means||), or random.", choices=INITS
    )
    sample_for_init: int = output_field(65536, help="Points sampled for k-means++.", ge=1)
    spherical: bool = output_field(False, help="Cosine k-means: unit-normalise features and centers.")
    minibatch: int | None = output_field(
        None, help="Mini-batch k-means (Sculley) with this batch size.", ge=1
    )
    seed: int = output_field(0, help="Seed of every random draw.", ge=0)
    tol: float = output_field(
        0.0, help="Stop when the relative inertia gain of an epoch falls below this.", ge=0.0
    )
    parallel_rounds: int = output_field(
        5, help="k-means|| rounds (init kmeans-parallel), oversampling 2K points per round.", ge=1
    )
    init_from: str | None = output_field(
        None,
        folded=True,
        help="Start from given centers: a codebook folder or .safetensors (enters the "
        "fingerprint by its sha256).",
    )
    init_from_sha256: str | None = output_field(
        None, folded=True, derived=True, help="sha256 of the init_from centers (filled in by the stage)."
    )
    ray_workers: int | None = execution_field(
        None,
        aliases=("num_workers",),
        help="Ray actors (default: one per CPU or GPU, at most one per file).",
        ge=1,
    )
    gpus_per_worker: float = execution_field(0.0, help="GPUs per actor (faiss GPU index).", ge=0.0)
    cpus_per_worker: float = execution_field(1.0, help="CPUs per actor.", gt=0.0)
    memory_per_worker_gb: float | None = execution_field(
        None,
        help="Cache features in memory up to this size per actor, else stream them (0: always stream).",
        ge=0.0,
    )

    def fingerprint_extra(self) -> dict:
        sha = self.init_from_sha256
        if sha is None and self.init_from:
            sha = fs.sha256_of(centers_file(self.init_from))
        return {"init_from_sha256": sha}


@dataclass(frozen=True)
class TokenizeConfig(Config):
    views: int = output_field(
        2, help="Views per image: view 0 = center crop, the rest RandomResizedCrop + flip.", ge=1
    )
    seed: int = output_field(0, help="Seed of the random views.", ge=0)
    grid_scales: str | None = output_field(
        None,
        added=True,
        help="Grid views (kmim/contract/grid.py) instead of stored views: render view 0's box at these "
        "scales (comma-separated, >= 1, with 1.0) and tokenize each whole patch grid; training draws a "
        "patch-aligned window. Needs views = 1.",
    )
    grid_aspects: str = output_field(
        "1.0",
        added=True,
        help="Grid views: window width/height ratios (comma-separated, with 1.0), one render each.",
    )
    grid_flip: bool = output_field(
        False, added=True, help="Grid views: a mirrored render of each scale and aspect too."
    )
    tcas_form: str = output_field(
        "C", help="TCAS first term: 'C' ((1 - C_ii)^2) or 'norm' ((1 - ||R_i||)^2).", choices=FORMS
    )
    # Only locates the file: the codebook records the weights' sha256, which is what the fingerprint holds.
    weights: str | None = execution_field(
        None, help="The extractor weights the codebook was built with (checked by hash)."
    )
    batch_size: int = execution_field(64, help="Views per extractor call.", ge=1)
    gpus_per_worker: float = execution_field(0.0, help="GPUs per Ray actor.", ge=0.0)
    cpus_per_worker: float = execution_field(1.0, help="CPUs per Ray actor.", gt=0.0)
    max_retries: int = execution_field(2, help="Retries of a failed shard before it is reported.", ge=0)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.grid_spec() is not None and self.views != 1:
            raise ConfigError(
                f"tokenize.views must be 1 with grid_scales (the grid renders replace stored views), got {self.views}"
            )

    def grid_spec(self) -> GridSpec | None:
        """The grid renders asked for, or None (stored views)."""
        if self.grid_scales is None:
            return None
        return GridSpec.parse(str(self.grid_scales), str(self.grid_aspects), bool(self.grid_flip))
