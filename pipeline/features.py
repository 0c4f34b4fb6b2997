"""Reading the extract stage's output: the list of feature files, and their features as float32.

Both feature formats are read (kmim/contract/schemas.py), told apart by the file's magic bytes, not its
name: version 2, Arrow IPC files (memory-mapped when local), and version 1, the Parquet of older kmim.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from kmim import fs
from kmim.contract.manifest import InputRef, StageManifest
from kmim.contract.schemas import FEATURE_MAGIC, feature_format_of
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
        try:
            with _open_feature_file(f.url) as (version, source):
                schema = pq.read_schema(source) if version == 1 else pa.ipc.open_file(source).schema
                field = schema.field("feature")
        except (OSError, KeyError, ValueError, pa.ArrowException) as e:
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


class NotAFeatureFile(ValueError):
    """A file that starts with neither feature format's magic bytes."""


@contextlib.contextmanager
def _open_feature_file(url: str) -> Iterator[tuple[int, pa.NativeFile]]:
    """(format version, the open file) of one feature file: a memory map when local, else via fsspec."""
    filesystem, path = fs.get_fs(url)
    if fs.protocol_of(filesystem) in ("file", "local"):
        source = pa.memory_map(path)
    else:
        source = pa.PythonFile(filesystem.open(path, "rb"), mode="r")
    with source:
        head = source.read(max(len(m) for m in FEATURE_MAGIC.values()))
        version = feature_format_of(head)
        if version is None:
            raise NotAFeatureFile(f"starts with {head!r}: neither Parquet nor Arrow IPC")
        source.seek(0)
        yield version, source


def _feature_columns(version: int, source: pa.NativeFile, batch_rows: int) -> Iterator[pa.Array]:
    """The 'feature' column of each record batch (IPC) or batch of `batch_rows` rows (Parquet)."""
    if version == 1:
        for batch in pq.ParquetFile(source).iter_batches(batch_size=batch_rows, columns=["feature"]):
            yield batch.column(0)
    else:
        reader = pa.ipc.open_file(source)
        for i in range(reader.num_record_batches):
            yield reader.get_batch(i).column("feature")


def iter_feature_batches(url: str, dim: int, batch_rows: int = 65536) -> Iterator[np.ndarray]:
    """float32 [rows, dim] batches of one feature file, streamed from storage.

    Every batch holds exactly `batch_rows` rows but the last, whatever the file's own batches (so what is
    computed from them does not depend on the format or on the extract batch size); each is a new,
    writable array, the only copy of the data made on a local version 2 file.
    """
    with _open_feature_file(url) as (version, source):
        pending: list[np.ndarray] = []  # views into the file's batches, fewer than batch_rows rows in all
        held = 0
        for column in _feature_columns(version, source, batch_rows):
            x = column.flatten().to_numpy(zero_copy_only=False).reshape(-1, dim)
            while len(x):
                take = min(batch_rows - held, len(x))
                pending.append(x[:take])
                held += take
                x = x[take:]
                if held == batch_rows:
                    yield _float32(pending)
                    pending, held = [], 0
        if held:
            yield _float32(pending)


def _float32(parts: list[np.ndarray]) -> np.ndarray:
    if len(parts) == 1:
        return parts[0].astype(np.float32)  # a copy even when already float32: the caller may write to it
    return np.concatenate(parts, dtype=np.float32)


def read_feature_file(url: str, dim: int) -> np.ndarray:
    parts = list(iter_feature_batches(url, dim))
    return np.concatenate(parts) if parts else np.zeros((0, dim), np.float32)
