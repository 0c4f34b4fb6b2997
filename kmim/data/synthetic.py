"""Deterministic synthetic images with class-dependent local structure, for scale and failure tests.

Each class has its own grating (orientation, frequency), palette and motif shape; every image mixes
its class's grating with motifs at random places and a little noise. Patches therefore carry class
information (pixel K-means tokens correlate with the class), unlike pure noise.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from PIL import Image

from kmim.contract import streams
from kmim.contract.config import Config, output_field
from kmim.data.writer import DatasetWriteResult, ShardedDatasetWriter, chunked, label_bytes
from kmim.errors import ConfigError
from kmim.progress import ProgressReporter

FORMATS = {"png": "PNG", "jpg": "JPEG"}


@dataclass(frozen=True)
class SyntheticConfig(Config):
    num_images: int = output_field(help="Number of images.", ge=1)
    image_size: int = output_field(64, help="Image side in pixels.", ge=4)
    classes: int = output_field(10, help="Number of classes.", ge=1)
    seed: int = output_field(0, help="Seed: same seed, same images.", ge=0)
    shard_size: int = output_field(1000, help="Samples per shard.", ge=1)
    format: str = output_field("png", help="Image encoding.", choices=tuple(sorted(FORMATS)))
    val_fraction: float = output_field(0.0, help="Share of images written as a `val` split.")

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 <= self.val_fraction < 1:
            raise ConfigError(f"val_fraction must be in [0, 1), got {self.val_fraction}")


def class_style(seed: int, label: int) -> dict:
    rng = streams.rng("synthetic_class", seed, label)
    return {
        "theta": rng.uniform(0, np.pi),
        "freq": rng.uniform(2.0, 8.0),
        "color_a": rng.uniform(0, 1, 3),
        "color_b": rng.uniform(0, 1, 3),
        "motif": int(rng.integers(0, 3)),  # 0 square, 1 disc, 2 cross
        "motif_color": rng.uniform(0, 1, 3),
    }


def synthetic_image(index: int, config: SyntheticConfig) -> tuple[np.ndarray, int]:
    """uint8 [S, S, 3] and its label, a pure function of (seed, index)."""
    label = index % config.classes
    style = class_style(config.seed, label)
    rng = streams.rng("synthetic_image", config.seed, index)
    s = config.image_size
    yy, xx = np.mgrid[0:s, 0:s].astype(np.float64) / s
    phase = rng.uniform(0, 2 * np.pi)
    wave = 0.5 + 0.5 * np.sin(
        2 * np.pi * style["freq"] * (xx * np.cos(style["theta"]) + yy * np.sin(style["theta"])) + phase
    )
    img = wave[..., None] * style["color_a"] + (1 - wave[..., None]) * style["color_b"]
    for _ in range(int(rng.integers(2, 6))):
        cy, cx = rng.uniform(0.1, 0.9, 2)
        r = rng.uniform(0.06, 0.15)
        if style["motif"] == 0:
            mask = (np.abs(yy - cy) < r) & (np.abs(xx - cx) < r)
        elif style["motif"] == 1:
            mask = (yy - cy) ** 2 + (xx - cx) ** 2 < r**2
        else:
            mask = ((np.abs(yy - cy) < r / 3) & (np.abs(xx - cx) < r)) | (
                (np.abs(xx - cx) < r / 3) & (np.abs(yy - cy) < r)
            )
        img[mask] = style["motif_color"]
    img = img + rng.normal(0, 0.04, img.shape)
    return np.clip(img * 255 + 0.5, 0, 255).astype(np.uint8), label


def encode(pixels: np.ndarray, fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels, mode="RGB").save(
        buf, format=FORMATS[fmt], **({"quality": 95} if fmt == "jpg" else {})
    )
    return buf.getvalue()


def write_synthetic(out: str, config: SyntheticConfig) -> DatasetWriteResult:
    n_val = int(round(config.num_images * config.val_fraction))
    splits = [("train", list(range(n_val, config.num_images))), ("val", list(range(n_val)))]
    splits = [(name, idx) for name, idx in splits if idx]
    writer = ShardedDatasetWriter(out, "data synthetic", config)
    total = sum(len(chunked(idx, config.shard_size)) for _, idx in splits)

    def sample(i: int) -> tuple[str, dict[str, bytes]]:
        pixels, label = synthetic_image(i, config)
        return f"synth-{i:08d}", {config.format: encode(pixels, config.format), "cls": label_bytes(label)}

    with ProgressReporter("synthetic", total, item="images") as progress:
        for split, idx in splits:
            chunks = chunked(idx, config.shard_size)
            writer.write_split(split, ((sample(i) for i in chunk) for chunk in chunks), progress)
    return writer.finish()
