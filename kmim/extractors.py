"""Patch feature extractors: `pixel` (the identity on normalised patches) and `timm:MODEL` (a ViT).

Both take the uint8 views [B, S, S, 3] of the shared contract and return float32 features
[B, L, D] in patchify order. Shared by the extract and tokenize stages and by the trainer's `online`
targets, so that a codebook is always applied with the extractor it was built from.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import tempfile
from dataclasses import asdict, dataclass

import numpy as np
import torch

from kmim import fs
from kmim.contract import streams
from kmim.contract.manifest import digest
from kmim.contract.patches import grid_size
from kmim.contract.views import normalize
from kmim.errors import ConfigError, InputError

log = logging.getLogger(__name__)

RANDOM_INIT_SEED = streams.seed_state("extractor_init")


@dataclass(frozen=True)
class ExtractorSpec:
    """What produces the features; its fingerprint ties codebooks and tokens to it."""

    name: str  # "pixel" or "timm:<model name>"
    image_size: int
    patch_size: int
    weights: str | None = None  # local path or fsspec URL (.safetensors, or .pth/.pt loaded weights_only)
    weights_sha256: str | None = None
    # timm only: the block whose output is the feature (negative: from the end; None: the last block) and
    # whether the model's final norm is applied to it. Recorded (and fingerprinted) only when not the default,
    # so specs made before these existed keep their fingerprints.
    layer: int | None = None
    final_norm: bool = True

    def __post_init__(self) -> None:
        if self.name != "pixel" and not (self.name.startswith("timm:") and len(self.name) > 5):
            raise ConfigError(f"extractor must be 'pixel' or 'timm:MODEL', got {self.name!r}")
        if self.name == "pixel" and self.weights:
            raise ConfigError("the pixel extractor takes no weights")
        if self.name == "pixel" and (self.layer is not None or not self.final_norm):
            raise ConfigError(
                "the pixel extractor has no layers: --layer and --no-final-norm are for timm:MODEL"
            )
        try:
            grid_size(self.image_size, self.patch_size)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        if self.model_name is not None:
            import timm

            if not timm.is_model(self.model_name):
                raise ConfigError(f"timm has no model called {self.model_name!r}")

    @property
    def model_name(self) -> str | None:
        return self.name[5:] if self.name.startswith("timm:") else None

    def _fields(self) -> dict:
        """Every field, less the later ones at their defaults (older specs had none of them)."""
        out = asdict(self)
        if self.layer is None:
            out.pop("layer")
        if self.final_norm:
            out.pop("final_norm")
        return out

    @property
    def fingerprint(self) -> str:
        ident = self._fields()
        ident.pop("weights")  # where the file lives does not matter, its content does
        return digest(ident)

    def with_weights_hash(self) -> ExtractorSpec:
        """The same spec with the weights file hashed (done once, on the driver)."""
        if not self.weights or self.weights_sha256:
            return self
        if not fs.exists(self.weights):
            raise InputError(self.weights, "weights file not found")
        return dataclasses.replace(self, weights_sha256=fs.sha256_of(self.weights))

    def to_json(self) -> dict:
        return {**self._fields(), "fingerprint": self.fingerprint}

    @classmethod
    def from_json(cls, d: dict) -> ExtractorSpec:
        layer = d.get("layer")
        return cls(
            d["name"],
            int(d["image_size"]),
            int(d["patch_size"]),
            d.get("weights"),
            d.get("weights_sha256"),
            None if layer is None else int(layer),
            bool(d.get("final_norm", True)),
        )


class PixelExtractor:
    """K-MIM PIXEL: a patch's feature is its normalised pixels (p*p*3 values).

    Equal, bit for bit, to `patchify(normalize(views))`, computed as a lookup: uint8 patches index a
    [256, 3] table made by `normalize` itself (3x faster than normalising every pixel in float).
    """

    def __init__(self, spec: ExtractorSpec):
        self.spec = spec
        self.dim = spec.patch_size**2 * 3
        levels = torch.arange(256, dtype=torch.uint8).view(1, 256, 1, 1).expand(1, 256, 1, 3)
        self.table = normalize(levels.contiguous())[0, :, :, 0].T.contiguous().numpy()  # [256, 3]
        self.channel = np.arange(self.dim) % 3  # patchify puts the channel last: (p, q, c)

    def __call__(self, views: np.ndarray) -> torch.Tensor:
        n, height, width, c = views.shape  # any H x W of whole patches (grid renders are not square)
        p = self.spec.patch_size
        gh, gw = height // p, width // p
        patches = views.reshape(n, gh, p, gw, p, c).transpose(0, 1, 3, 2, 4, 5).reshape(n, gh * gw, p * p * c)
        return torch.from_numpy(self.table[patches, self.channel])  # [B, L, p*p*3] float32


def load_state_dict(url: str) -> dict[str, torch.Tensor]:
    """Weights from a local path or fsspec URL, never unpickling arbitrary objects."""
    filesystem, path = fs.get_fs(url)
    suffix = os.path.splitext(path)[1].lower()
    with contextlib.ExitStack() as stack:
        local = path
        if fs.protocol_of(filesystem) not in ("file", "local"):
            tmp = stack.enter_context(tempfile.TemporaryDirectory())
            local = os.path.join(tmp, "weights" + suffix)
            filesystem.get(path, local)
        try:
            if suffix == ".safetensors":
                from safetensors.torch import load_file

                sd = load_file(local)
            else:
                sd = torch.load(local, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - any loader failure is a bad file for the user
            raise InputError(url, f"cannot load weights ({type(e).__name__}: {e})") from None
    for wrapper in ("model", "state_dict", "teacher", "module"):  # common checkpoint wrappers (DINO: teacher)
        if isinstance(sd, dict) and wrapper in sd and isinstance(sd[wrapper], dict):
            sd = sd[wrapper]
    prefixes = ("module.", "backbone.", "encoder.")
    return {
        next((k[len(p) :] for p in prefixes if k.startswith(p)), k): v
        for k, v in sd.items()
        if torch.is_tensor(v)
    }


class TimmExtractor:
    """Patch tokens of any timm ViT, prefix tokens removed: of the last block after the final norm, or of block
    `spec.layer` (the forward pass stops there, so early layers cost less), with the final norm or without."""

    def __init__(self, spec: ExtractorSpec, device: str = "cpu", any_size: bool = False):
        import timm

        self.spec = spec
        self.device = torch.device(device)
        try:
            # Without weights the model is a random init; seeding it makes every worker build the same one.
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(streams.seed_state("extractor_init"))
                # any_size (grid views): position embeddings resampled to the input's grid; at image_size
                # itself the features are the same as without it
                extra = {"dynamic_img_size": True} if any_size else {}
                model = timm.create_model(
                    spec.model_name, pretrained=False, num_classes=0, img_size=spec.image_size, **extra
                )
        except Exception as e:  # noqa: BLE001
            raise ConfigError(f"cannot build timm model {spec.model_name!r}: {e}") from None
        model_patch = getattr(getattr(model, "patch_embed", None), "patch_size", None)
        if model_patch is None or not hasattr(model, "num_prefix_tokens"):
            raise ConfigError(f"timm model {spec.model_name!r} is not a ViT with patch tokens")
        if tuple(model_patch) != (spec.patch_size, spec.patch_size):
            raise ConfigError(
                f"timm model {spec.model_name!r} has patch size {model_patch[0]}, not {spec.patch_size}"
            )
        if spec.weights:
            self._load(model, spec.weights)
        else:
            log.warning(
                "timm extractor %s has no --weights: features of a random init (seed %d)",
                spec.model_name,
                RANDOM_INIT_SEED,
            )
        depth = len(getattr(model, "blocks", ()))
        if spec.layer is not None and not -depth <= spec.layer < depth:
            raise ConfigError(
                f"timm model {spec.model_name!r} has {depth} blocks: layer must be in [{-depth}, {depth})"
            )
        self.layer = None if spec.layer is None else spec.layer % depth  # the block index, counted from 0
        if self.layer is None and not spec.final_norm:
            self.layer = depth - 1
        self.model = model.eval().to(self.device)
        self.dim = model.num_features

    @staticmethod
    def _load(model: torch.nn.Module, url: str) -> None:
        from timm.models.vision_transformer import checkpoint_filter_fn

        sd = load_state_dict(url)
        try:
            sd = checkpoint_filter_fn(sd, model)  # resamples position embeddings, converts known layouts
            missing, unexpected = model.load_state_dict(sd, strict=False)
        except (RuntimeError, KeyError, ValueError) as e:
            raise InputError(
                url, f"weights do not fit the model: {str(e).strip().splitlines()[-1]}"
            ) from None
        missing = [k for k in missing if not k.startswith(("head", "fc_norm"))]
        if missing:
            raise InputError(
                url, f"weights do not fit the model: missing {missing[:5]}{'...' if len(missing) > 5 else ''}"
            )
        if unexpected:
            log.info("ignoring %d unexpected keys in %s (e.g. %s)", len(unexpected), url, unexpected[:3])

    @torch.inference_mode()
    def __call__(self, views: np.ndarray) -> torch.Tensor:
        x = normalize(torch.from_numpy(views).to(self.device))
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.device.type == "cuda"):
            if self.layer is None:
                tokens = self.model.forward_features(x)[:, self.model.num_prefix_tokens :]  # [B, L, D]
            else:  # timm's own intermediate output, blocks after `layer` never run
                (tokens,) = self.model.forward_intermediates(
                    x,
                    indices=[self.layer],
                    norm=self.spec.final_norm,
                    stop_early=True,
                    output_fmt="NLC",
                    intermediates_only=True,
                )  # [B, L, D], prefix tokens removed
        return tokens.float().cpu()  # [B, L, D]


def build_extractor(
    spec: ExtractorSpec, device: str = "cpu", any_size: bool = False
) -> PixelExtractor | TimmExtractor:
    """any_size: views of any whole-patch H x W, not only image_size (grid views)."""
    return PixelExtractor(spec) if spec.name == "pixel" else TimmExtractor(spec, device, any_size)
