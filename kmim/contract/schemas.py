"""On-disk formats shared by the pipeline and the trainer. Each carries FORMAT_VERSION.

See docs/FORMATS.md for the prose version of this module.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np
import pyarrow as pa

from kmim import fs
from kmim.errors import InputError

FORMAT_VERSION = 1

# --- shard index (`shards.json`) -------------------------------------------------------------------

INDEX_NAME = "shards.json"


@dataclass(frozen=True)
class ShardEntry:
    """One shard in an index. `url` is relative to the index's folder unless it holds `://`."""

    url: str
    samples: int
    bytes: int
    sha256: str
    split: str | None = None


@dataclass
class ShardIndex:
    shards: list[ShardEntry] = field(default_factory=list)
    format_version: int = FORMAT_VERSION

    @property
    def total_samples(self) -> int:
        return sum(s.samples for s in self.shards)

    def to_json(self) -> dict:
        return {
            "format_version": self.format_version,
            "total_samples": self.total_samples,
            "shards": [{k: v for k, v in asdict(s).items() if v is not None} for s in self.shards],
        }

    @classmethod
    def from_json(cls, d: dict, where: str) -> ShardIndex:
        if not isinstance(d, dict) or "shards" not in d:
            raise InputError(where, "not a shard index: no 'shards' list")
        version = d.get("format_version", FORMAT_VERSION)
        if version > FORMAT_VERSION:
            raise InputError(where, f"format_version {version} is newer than this kmim understands")
        try:
            shards = [
                ShardEntry(
                    url=s["url"],
                    samples=int(s["samples"]),
                    bytes=int(s["bytes"]),
                    sha256=s["sha256"],
                    split=s.get("split"),
                )
                for s in d["shards"]
            ]
        except (KeyError, TypeError, ValueError) as e:
            raise InputError(where, f"malformed shard entry ({e!r})") from None
        return cls(shards=shards, format_version=version)

    def write(self, url: str) -> None:
        fs.write_json_atomic(url, self.to_json())

    @classmethod
    def read(cls, url: str) -> ShardIndex:
        return cls.from_json(fs.read_json(url), url)


# --- patch features (one file per input shard) ------------------------------------------------------
# Version 1: Parquet, `<shard>.parquet` (zstd; written by kmim before feature format 2).
# Version 2: Arrow IPC file, `<shard>.arrow`, uncompressed, one record batch per extract batch.
# Readers tell them apart by the file's magic bytes and read both.

FEATURE_FORMAT_VERSION = 2
FEATURE_FORMAT_KEY = "kmim_feature_format"  # schema metadata key (version 2 on)
FEATURE_EXTENSIONS = {1: "parquet", 2: "arrow"}
FEATURE_MAGIC = {1: b"PAR1", 2: b"ARROW1"}
FEATURE_COLUMNS = ("key", "label", "patch", "feature")
FEATURE_DTYPES = {"float16": pa.float16(), "float32": pa.float32()}


def feature_format_of(head: bytes) -> int | None:
    """The feature format version of a file starting with `head` (its first 6 bytes), or None."""
    return next((v for v, magic in FEATURE_MAGIC.items() if head.startswith(magic)), None)


def feature_schema(dim: int, dtype: str, format_version: int = FEATURE_FORMAT_VERSION) -> pa.Schema:
    """key: sample key; label: class id or null; patch: index in patchify order; feature: [dim]."""
    if dtype not in FEATURE_DTYPES:
        raise ValueError(f"feature dtype must be one of {sorted(FEATURE_DTYPES)}, got {dtype!r}")
    if format_version not in FEATURE_EXTENSIONS:
        raise ValueError(
            f"feature format version must be one of {sorted(FEATURE_EXTENSIONS)}, got {format_version}"
        )
    metadata = {"kmim_format_version": str(FORMAT_VERSION)}
    if format_version >= 2:
        metadata[FEATURE_FORMAT_KEY] = str(format_version)
    return pa.schema(
        [
            pa.field("key", pa.string(), nullable=False),
            pa.field("label", pa.int32(), nullable=True),
            pa.field("patch", pa.int32(), nullable=False),
            pa.field("feature", pa.list_(FEATURE_DTYPES[dtype], dim), nullable=False),
        ],
        metadata=metadata,
    )


# --- codebook (`codebook.safetensors` + `codebook.json`) -------------------------------------------

CODEBOOK_TENSOR = "centers"  # float32 [K, D]


def safetensors_metadata(raw: bytes) -> dict[str, str]:
    """The `__metadata__` of a safetensors file's bytes (its header: 8-byte length, then JSON)."""
    import json

    length = int.from_bytes(raw[:8], "little")
    return json.loads(raw[8 : 8 + length]).get("__metadata__", {}) or {}


def canonical_safetensors(raw: bytes) -> bytes:
    """The same safetensors file with its header's keys sorted: safetensors writes `__metadata__` from a Rust
    HashMap, whose order changes from call to call, so two saves of the same tensors and metadata differ in
    bytes (and sha256) unless rewritten so. Tensor data and offsets are untouched; the header is padded with
    spaces to a multiple of 8 bytes, as safetensors itself does."""
    import json

    length = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + length])
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text + raw[8 + length :]


CODEBOOK_WEIGHTS = "codebook.safetensors"
CODEBOOK_META = "codebook.json"

# --- token shards (WebDataset tars) -----------------------------------------------------------------
# Per sample, with the same key and order as the input shard:
#   <key>.<ext>         source image bytes, passed through unchanged
#   <key>.cls           label as ASCII decimal (when the input has one)
#   <key>.tokens.npy    token ids [V, H/p, W/p], uint16 when K <= 65535 else int32
#   <key>.views.json    list of V recorded ViewParams

# Grid views (token shard format 2, kmim/contract/grid.py), instead of tokens.npy + views.json:
#   <key>.grid.npy      token ids of every render's whole patch grid, concatenated row-major (1-D)
#   <key>.grid.json     {"format": 2, "width", "height", "box": view 0's ViewParams, "patch_size", "grid",
#                        "renders": [{"render", "scale", "aspect", "flip", "rows", "cols"}, ...]}

TOKENS_MEMBER = "tokens.npy"
GRID_MEMBER = "grid.npy"
GRID_META_MEMBER = "grid.json"
VIEWS_MEMBER = "views.json"
LABEL_MEMBER = "cls"


def token_dtype(k: int) -> np.dtype:
    return np.dtype(np.uint16) if k <= 65535 else np.dtype(np.int32)
