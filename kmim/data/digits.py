"""scikit-learn's bundled handwritten digits (1,797 real 8x8 images, 10 classes) as WebDataset shards."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from kmim.contract.images import encode_png
from kmim.data.writer import DatasetWriteResult, ShardedDatasetWriter, chunked, label_bytes
from kmim.errors import ConfigError
from kmim.progress import ProgressReporter


@dataclass(frozen=True)
class DigitsConfig:
    image_size: int = 32
    val_fraction: float = 0.2
    seed: int = 0
    shard_size: int = 256

    def __post_init__(self) -> None:
        if self.image_size < 8:
            raise ConfigError(f"image_size must be >= 8 (the digits are 8x8), got {self.image_size}")
        if not 0 <= self.val_fraction < 1:
            raise ConfigError(f"val_fraction must be in [0, 1), got {self.val_fraction}")
        if self.shard_size < 1:
            raise ConfigError(f"shard_size must be >= 1, got {self.shard_size}")


def digits_split(labels: np.ndarray, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic stratified split: per class, a seeded permutation, the first share goes to val."""
    rng = np.random.default_rng(seed)
    val = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        val.extend(rng.permutation(idx)[: int(round(len(idx) * val_fraction))].tolist())
    is_val = np.zeros(len(labels), dtype=bool)
    is_val[val] = True
    return np.flatnonzero(~is_val), np.flatnonzero(is_val)


def digit_png(pixels8x8: np.ndarray, image_size: int) -> bytes:
    """0..16 ink levels -> 8-bit grey, bicubic upsampling, saved as RGB PNG."""
    grey = np.clip(np.round(pixels8x8 * (255.0 / 16.0)), 0, 255).astype(np.uint8)
    img = Image.fromarray(grey, mode="L").resize((image_size, image_size), Image.Resampling.BICUBIC)
    return encode_png(img.convert("RGB"))


def write_digits(out: str, config: DigitsConfig = DigitsConfig()) -> DatasetWriteResult:
    from sklearn.datasets import load_digits  # 3 s of imports: only when the digits are written

    digits = load_digits()
    images, labels = digits.images, digits.target
    train, val = digits_split(labels, config.val_fraction, config.seed)
    writer = ShardedDatasetWriter(out, "data digits", config)
    splits = [("train", train), ("val", val)]
    total_shards = sum(len(chunked(list(idx), config.shard_size)) for _, idx in splits if len(idx))
    with ProgressReporter("digits", total_shards, item="images") as progress:
        for split, idx in splits:
            chunks = chunked(list(idx), config.shard_size)
            samples = (
                [(f"digits-{i:04d}", {"png": digit_png(images[i], config.image_size), "cls": label_bytes(labels[i])})
                 for i in chunk]
                for chunk in chunks
            )
            writer.write_split(split, samples, progress)
    return writer.finish()
