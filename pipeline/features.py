"""Reading the extract stage's output: the list of feature files, and their features as float32."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from kmim import fs
from kmim.contract.manifest import InputRef, StageManifest
from kmim.errors import InputError


@dataclass(frozen=True)
class FeatureFile:
    index: int  # position in the extract manifest: fixes every per-file random draw
    url: str
    rows: int
    bytes: int
    sha256: str

    def input_ref(self) -> InputRef:
        return InputRef(self.url, self.bytes, sha256=self.sha256)


@dataclass(frozen=True)
class FeatureSet:
    url: str
    manifest: StageManifest
    files: list[FeatureFile]
    dim: int

    @property
    def rows(self) -> int:
        return sum(f.rows for f in self.files)


def open_features(url: str) -> FeatureSet:
    """The committed extract output at `url`, checked: not empty, one feature dimension."""
    manifest = StageManifest.read_if_committed(url)
    if manifest is None:
        raise InputError(url, "no manifest.json: not a finished `kmim pipeline extract` output")
    if manifest.stage != "extract":
        raise InputError(url, f"is a {manifest.stage} output, not extract features")
    files = [
        FeatureFile(i, fs.join(url, o["url"]), int(o["rows"]), int(o["bytes"]), o["sha256"])
        for i, o in enumerate(manifest.outputs)
    ]
    if sum(f.rows for f in files) == 0:
        raise InputError(url, "empty feature set: 0 patch features")
    dims = {}
    for f in files:
        filesystem, path = fs.get_fs(f.url)
        try:
            with filesystem.open(path, "rb") as handle:
                field = pq.read_schema(handle).field("feature")
        except (FileNotFoundError, KeyError, pa.ArrowException) as e:
            raise InputError(f.url, f"missing or not a feature file ({type(e).__name__}: {e})") from None
        if not pa.types.is_fixed_size_list(field.type) or not pa.types.is_floating(field.type.value_type):
            raise InputError(
                f.url,
                f"column 'feature' is {field.type}, expected fixed_size_list<float16 or float32>"
                "[dim] (docs/FORMATS.md)",
            )
        dims[f.url] = field.type.list_size
    if len(set(dims.values())) != 1:
        first, *rest = sorted(dims.items(), key=lambda kv: kv[0])
        other = next(kv for kv in rest if kv[1] != first[1])
        raise InputError(url, f"mixed feature dims: {first[0]} has {first[1]}, {other[0]} has {other[1]}")
    return FeatureSet(url, manifest, files, dims[files[0].url])


def iter_feature_batches(url: str, dim: int, batch_rows: int = 65536) -> Iterator[np.ndarray]:
    """float32 [rows, dim] batches of one feature file, streamed from storage."""
    filesystem, path = fs.get_fs(url)
    with filesystem.open(path, "rb") as handle:
        for batch in pq.ParquetFile(handle).iter_batches(batch_size=batch_rows, columns=["feature"]):
            values = batch.column(0).flatten().to_numpy(zero_copy_only=False)
            yield values.reshape(-1, dim).astype(np.float32, copy=False)


def read_feature_file(url: str, dim: int) -> np.ndarray:
    parts = list(iter_feature_batches(url, dim))
    return np.concatenate(parts) if parts else np.zeros((0, dim), np.float32)
