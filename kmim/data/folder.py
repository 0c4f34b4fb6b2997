"""An ImageNet-style folder (`class/xxx.jpg`) into labelled WebDataset shards + `classes.json`.

Image bytes pass through unchanged (no re-encoding); every image is decoded once to check it, and
those that do not decode are skipped, counted and listed in `_stats.json`.
"""

from __future__ import annotations

from dataclasses import dataclass

from kmim import fs
from kmim.contract.config import Config, output_field
from kmim.data.reader import ReadStats, ShardRef, iter_images, open_dataset
from kmim.data.writer import DatasetWriteResult, ShardedDatasetWriter, label_bytes
from kmim.errors import ConfigError, InputError
from kmim.progress import ProgressReporter


@dataclass(frozen=True)
class FolderShardConfig(Config):
    shard_size: int = output_field(1000, help="Samples per shard.", ge=1)
    split: str = output_field("train", help="Split name used in shard names and the index.")

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.split.isidentifier():
            raise ConfigError(f"split must be a plain name, got {self.split!r}")


def _checked_samples(shard: ShardRef, stats: ReadStats):
    for sample, _ in iter_images(shard, stats):  # decoded once, only to check it
        members = {("jpg" if sample.ext.lower() == "jpeg" else sample.ext.lower()): sample.image}
        if sample.label is not None:
            members["cls"] = label_bytes(sample.label)
        yield sample.key, members


def shard_folder(src: str, out: str, config: FolderShardConfig = FolderShardConfig()) -> DatasetWriteResult:
    dataset = open_dataset(src, folder_shard_size=config.shard_size)
    if not dataset.shards[0].is_folder:
        raise InputError(src, "is already sharded (tars or shards.json); expected an image folder")
    if not dataset.classes:
        raise InputError(src, "no class folders: expected SRC/<class>/<image>")
    writer = ShardedDatasetWriter(out, "data shard", config)
    stats = writer.result.stats
    read = ReadStats()
    with ProgressReporter("shard", len(dataset.shards), item="images") as progress:
        writer.write_split(config.split, (_checked_samples(s, read) for s in dataset.shards), progress)
    stats.skipped.extend(dataset.skipped + read.skipped)
    fs.write_json_atomic(
        fs.join(writer.out, "classes.json"),
        {"classes": dataset.classes, "class_to_idx": {c: i for i, c in enumerate(dataset.classes)}},
    )
    return writer.finish()
