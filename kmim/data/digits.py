"""scikit-learn's bundled handwritten digits (1,797 real 8x8 images, 10 classes) as WebDataset shards."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from kmim.contract import streams
from kmim.contract.config import Config, output_field
from kmim.contract.images import encode_png
from kmim.data.writer import DatasetWriteResult, ShardedDatasetWriter, chunked, label_bytes
from kmim.errors import ConfigError
from kmim.progress import ProgressReporter


@dataclass(frozen=True)
class DigitsConfig(Config):
    image_size: int = output_field(32, help="Side of the upsampled RGB images (the digits are 8x8).", ge=8)
    val_fraction: float = output_field(0.2, help="Share of each class held out as `val`.")
    seed: int = output_field(0, help="Seed of the train/val split.", ge=0)
    shard_size: int = output_field(256, help="Samples per shard.", ge=1)

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 <= self.val_fraction < 1:
            raise ConfigError(f"val_fraction must be in [0, 1), got {self.val_fraction}")


def digits_split(labels: np.ndarray, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic stratified split: per class, a seeded permutation, the first share goes to val."""
    rng = streams.rng("data_split", seed)
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
                [
                    (
                        f"digits-{i:04d}",
                        {"png": digit_png(images[i], config.image_size), "cls": label_bytes(labels[i])},
                    )
                    for i in chunk
                ]
                for chunk in chunks
            )
            writer.write_split(split, samples, progress)
    return writer.finish()
