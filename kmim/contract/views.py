"""Views: the exact crops every stage and the trainer agree on.

Every view is one resized crop: a box in source-image pixels, resized to `size`×`size` with bicubic
resampling, then optionally mirrored. View 0 is the MAE evaluation geometry (Resize + CenterCrop with
`crop_pct`), realised as the equivalent centered box so that every view replays through the same
function. Views >= 1 are RandomResizedCrop (torchvision's sampling algorithm) + horizontal flip, their
parameters drawn from a generator seeded by (dataset seed, sample key, view index). Parameters are
recorded as JSON; replaying them gives bit-identical pixels.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import asdict, dataclass

import numpy as np
import torch
from PIL import Image

from kmim.contract import streams
from kmim.errors import ConfigError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class ViewSpec:
    """How views are drawn. Saved in every manifest that depends on it."""

    image_size: int = 224
    crop_pct: float = 0.875
    scale: tuple[float, float] = (0.2, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip: float = 0.5

    def __post_init__(self) -> None:
        object.__setattr__(self, "scale", tuple(float(s) for s in self.scale))
        object.__setattr__(self, "ratio", tuple(float(r) for r in self.ratio))
        if self.image_size < 1:
            raise ConfigError(f"image_size must be >= 1, got {self.image_size}")
        if not 0 < self.crop_pct <= 1:
            raise ConfigError(f"crop_pct must be in (0, 1], got {self.crop_pct}")
        if not 0 < self.scale[0] <= self.scale[1] <= 1:
            raise ConfigError(f"scale must satisfy 0 < min <= max <= 1, got {self.scale}")
        if not 0 < self.ratio[0] <= self.ratio[1]:
            raise ConfigError(f"ratio must satisfy 0 < min <= max, got {self.ratio}")
        if not 0 <= self.hflip <= 1:
            raise ConfigError(f"hflip must be a probability, got {self.hflip}")


@dataclass(frozen=True)
class ViewParams:
    """One recorded view: crop box (top, left, height, width) in source pixels, mirror flag, output size."""

    view: int
    top: float
    left: float
    height: float
    width: float
    flip: bool
    size: int

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> ViewParams:
        return cls(
            view=int(d["view"]),
            top=d["top"],
            left=d["left"],
            height=d["height"],
            width=d["width"],
            flip=bool(d["flip"]),
            size=int(d["size"]),
        )


def key_hash(key: str) -> int:
    """A stable 64-bit integer for a sample key (Python's hash() is salted per process)."""
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little")


def view_rng(seed: int, key: str, view: int) -> np.random.Generator:
    return streams.rng("view", int(seed), key_hash(key), int(view))


def center_view(width: int, height: int, spec: ViewSpec) -> ViewParams:
    """View 0: the box that Resize(short side -> size / crop_pct) + CenterCrop(size) would keep."""
    side = min(width, height) * spec.crop_pct
    return ViewParams(
        view=0,
        top=(height - side) / 2,
        left=(width - side) / 2,
        height=side,
        width=side,
        flip=False,
        size=spec.image_size,
    )


def random_view(width: int, height: int, spec: ViewSpec, seed: int, key: str, view: int) -> ViewParams:
    """RandomResizedCrop + flip, as torchvision samples them, from the (seed, key, view) generator."""
    rng = view_rng(seed, key, view)
    area = width * height
    log_ratio = (math.log(spec.ratio[0]), math.log(spec.ratio[1]))
    box = None
    for _ in range(10):
        target_area = area * rng.uniform(spec.scale[0], spec.scale[1])
        aspect = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            box = (top, left, h, w)
            break
    if box is None:  # fallback: central crop at the nearest allowed aspect ratio
        in_ratio = width / height
        if in_ratio < spec.ratio[0]:
            w, h = width, int(round(width / spec.ratio[0]))
        elif in_ratio > spec.ratio[1]:
            h, w = height, int(round(height * spec.ratio[1]))
        else:
            w, h = width, height
        box = ((height - h) // 2, (width - w) // 2, max(h, 1), max(w, 1))
    flip = bool(rng.random() < spec.hflip)
    top, left, h, w = box
    return ViewParams(view=view, top=top, left=left, height=h, width=w, flip=flip, size=spec.image_size)


def make_views(
    width: int, height: int, spec: ViewSpec, seed: int, key: str, num_views: int
) -> list[ViewParams]:
    """View 0 (center) followed by num_views - 1 random views for one sample."""
    if num_views < 1:
        raise ConfigError(f"num_views must be >= 1, got {num_views}")
    views = [center_view(width, height, spec)]
    views += [random_view(width, height, spec, seed, key, v) for v in range(1, num_views)]
    return views


def apply_view(img: Image.Image, params: ViewParams) -> Image.Image:
    """Render a view: crop the box, resize to size×size (bicubic), mirror if flagged."""
    box = (params.left, params.top, params.left + params.width, params.top + params.height)
    out = img.resize((params.size, params.size), resample=Image.Resampling.BICUBIC, box=box)
    if params.flip:
        out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return out


def to_uint8_array(img: Image.Image) -> np.ndarray:
    """RGB image -> uint8 [H, W, 3] (the form workers pass around: 4x smaller than float)."""
    return np.asarray(img.convert("RGB"), dtype=np.uint8)


def normalize(images: torch.Tensor) -> torch.Tensor:
    """uint8 [N, H, W, 3] (or [H, W, 3]) -> float32 [N, 3, H, W] scaled to [0, 1], ImageNet-normalized.

    This is the input normalisation of the trainer and of the `pixel` extractor alike.
    """
    if images.dim() == 3:
        images = images.unsqueeze(0)
    x = images.permute(0, 3, 1, 2).float().div_(255.0)
    mean = torch.tensor(IMAGENET_MEAN, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std
