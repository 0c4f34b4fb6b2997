"""IDX image/label files (MNIST, Fashion-MNIST, KMNIST, EMNIST) as labelled WebDataset shards.

An IDX file is a 4-byte magic (two zero bytes, a type code, the number of dimensions), one big-endian
uint32 per dimension, then the values in C order. Both files of a pair are read and checked whole before
any shard is written, so a bad file never leaves a partial dataset; gzip is recognised by its own magic, not
by the file name. Images are stored as 8-bit grey PNGs (the reader converts them to RGB), resized with
bicubic interpolation when `image_size` differs from the files' side.
"""

from __future__ import annotations

import gzip
import zlib
from dataclasses import dataclass

import numpy as np
from PIL import Image

from kmim import fs
from kmim.contract.config import Config, output_field
from kmim.contract.images import encode_png
from kmim.contract.schemas import ShardIndex
from kmim.data.reader import MAX_CLASSES
from kmim.data.writer import DatasetWriteResult, ShardedDatasetWriter, chunked, label_bytes
from kmim.errors import ConfigError, InputError
from kmim.progress import ProgressReporter

UBYTE = 0x08  # the only IDX value type image and label files use
FASHION_MNIST_SOURCE = "/usr/share/datasets/fashion-mnist"  # Debian's `dataset-fashion-mnist`
FASHION_MNIST_FILES = {  # split -> (images, labels), the names of the dataset's own download
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "val": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),  # the official 10,000 test images
}
FASHION_MNIST_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)


def _check_split(split: str) -> None:
    if not split.isidentifier():
        raise ConfigError(f"split must be a plain name, got {split!r}")


@dataclass(frozen=True)
class IdxConfig(Config):
    split: str = output_field("train", help="Split name used in shard names, keys and the index.")
    image_size: int = output_field(0, help="Side of the stored images; 0 keeps the files' own side.", ge=0)
    shard_size: int = output_field(2000, help="Samples per shard.", ge=1)

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_split(self.split)


@dataclass(frozen=True)
class FashionMnistConfig(Config):
    source: str = output_field(
        FASHION_MNIST_SOURCE,
        help="Folder or fsspec URL holding the four IDX files (gzip or raw).",
        folded=True,  # the files count by their bytes (`source_sha256`), not by where they are
    )
    image_size: int = output_field(32, help="Side of the stored images (the files are 28x28).", ge=1)
    shard_size: int = output_field(2000, help="Samples per shard.", ge=1)

    def fingerprint_extra(self) -> dict:
        return {"source_sha256": source_sha256(self.source)}


def read_idx(url: str, ndim: int) -> np.ndarray:
    """The uint8 array of an IDX file with `ndim` dimensions; any problem is one line naming the file."""
    if not fs.exists(url):
        raise InputError(url, "no such file")
    filesystem, path = fs.get_fs(url)
    with filesystem.open(path, "rb") as f:
        data = f.read()
    if data[:2] == b"\x1f\x8b":
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError, zlib.error) as e:
            raise InputError(url, f"corrupt or truncated gzip ({e})") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise InputError(
            url, f"not an IDX file: magic number {data[:4].hex() or 'missing'}, expected 0000xxyy"
        )
    if data[2] != UBYTE:
        raise InputError(url, f"IDX value type 0x{data[2]:02x}, expected 0x08 (unsigned bytes)")
    if data[3] != ndim:
        raise InputError(url, f"has {data[3]} dimensions, expected {ndim}")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise InputError(url, f"truncated: {len(data)} bytes, shorter than its {header}-byte header")
    shape = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    expected = header + int(np.prod(shape, dtype=np.int64))
    if len(data) != expected:
        what = "truncated" if len(data) < expected else "has trailing bytes"
        raise InputError(url, f"{what}: {len(data)} bytes, the header {list(shape)} says {expected}")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape)


def read_idx_pair(
    images_url: str, labels_url: str, num_classes: int = MAX_CLASSES
) -> tuple[np.ndarray, np.ndarray]:
    """(images [N, H, W] uint8, labels [N] uint8), checked against each other and `num_classes`."""
    images = read_idx(images_url, 3)
    labels = read_idx(labels_url, 1)
    if len(images) == 0:
        raise InputError(images_url, "holds no images")
    if len(images) != len(labels):
        raise InputError(
            labels_url, f"holds {len(labels)} labels but {images_url} holds {len(images)} images"
        )
    bad = np.flatnonzero(labels >= num_classes)
    if len(bad):
        raise InputError(
            labels_url,
            f"label {int(labels[bad[0]])} at index {int(bad[0])} is outside 0..{num_classes - 1} "
            f"({len(bad)} such labels)",
        )
    return images, labels


def grey_png(pixels: np.ndarray, image_size: int) -> bytes:
    img = Image.fromarray(pixels, mode="L")
    if image_size and (image_size, image_size) != img.size:
        img = img.resize((image_size, image_size), Image.Resampling.BICUBIC)
    return encode_png(img)


def _write(
    writer: ShardedDatasetWriter,
    split: str,
    images: np.ndarray,
    labels: np.ndarray,
    image_size: int,
    shard_size: int,
    progress: ProgressReporter,
) -> None:
    chunks = chunked(list(range(len(images))), shard_size)
    samples = (
        [
            (f"{split}-{i:06d}", {"png": grey_png(images[i], image_size), "cls": label_bytes(labels[i])})
            for i in chunk
        ]
        for chunk in chunks
    )
    writer.write_split(split, samples, progress)


def write_idx(
    images_url: str, labels_url: str, out: str, config: IdxConfig = IdxConfig()
) -> DatasetWriteResult:
    """One split from an IDX pair. Other splits already in `out` stay in its index (write `train`, then
    `val`, into one folder)."""
    images, labels = read_idx_pair(images_url, labels_url)
    index = fs.join(out, "shards.json")
    kept = []
    if fs.exists(index):
        kept = [e for e in ShardIndex.read(index).shards if e.split != config.split]
    writer = ShardedDatasetWriter(out, "data idx", config)
    with ProgressReporter(f"idx {config.split}", -(-len(images) // config.shard_size), item="images") as p:
        _write(writer, config.split, images, labels, config.image_size, config.shard_size, p)
    return writer.finish(kept)


def fashion_mnist_files(source: str) -> dict[str, tuple[str, str]]:
    """split -> (images URL, labels URL) under `source`; a raw (un-gzipped) copy is taken where present."""
    found = {}
    for split, names in FASHION_MNIST_FILES.items():
        urls = []
        for name in names:
            gz, raw = fs.join(source, name), fs.join(source, name.removesuffix(".gz"))
            urls.append(gz if fs.exists(gz) or not fs.exists(raw) else raw)
        found[split] = (urls[0], urls[1])
    return found


def source_sha256(source: str) -> dict[str, str]:
    """The four files' sha256, by file name: the dataset's identity in fingerprints."""
    return {
        fs.basename(u): fs.sha256_of(u)
        for pair in fashion_mnist_files(source).values()
        for u in pair
        if fs.exists(u)
    }


def write_fashion_mnist(out: str, config: FashionMnistConfig = FashionMnistConfig()) -> DatasetWriteResult:
    """`train` (60,000) and `val` (the official 10,000 test images) shards, labels 0..9, `classes.json`."""
    files = fashion_mnist_files(config.source)
    pairs = {
        split: read_idx_pair(*urls, num_classes=len(FASHION_MNIST_CLASSES)) for split, urls in files.items()
    }  # every file read and checked before the first shard
    writer = ShardedDatasetWriter(out, "data fashion-mnist", config)
    total = sum(-(-len(images) // config.shard_size) for images, _ in pairs.values())
    with ProgressReporter("fashion-mnist", total, item="images") as progress:
        for split, (images, labels) in pairs.items():
            _write(writer, split, images, labels, config.image_size, config.shard_size, progress)
    fs.write_json_atomic(
        fs.join(writer.out, "classes.json"),
        {
            "classes": list(FASHION_MNIST_CLASSES),
            "class_to_idx": {c: i for i, c in enumerate(FASHION_MNIST_CLASSES)},
        },
    )
    return writer.finish()
