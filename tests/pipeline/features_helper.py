"""Build a finished extract output from given arrays, with the stage's own writer and manifest."""

from __future__ import annotations

import numpy as np

from kmim import fs
from kmim.contract.config import fingerprint_config
from kmim.contract.manifest import InputRef, StageManifest
from kmim.contract.schemas import FEATURE_EXTENSIONS, FEATURE_FORMAT_VERSION
from kmim.pipeline.extract import ExtractConfig, FeatureShardWriter


def write_feature_set(
    out: str, parts: list[np.ndarray], dtype: str = "float32", format_version: int = FEATURE_FORMAT_VERSION
) -> str:
    """`part-NNNNNN.arrow` per part (`.parquet` with format_version=1, as older kmim wrote)."""
    config = ExtractConfig(image_size=32, patch_size=4, dtype=dtype)
    outputs = []
    for i, x in enumerate(parts):
        name = f"part-{i:06d}.{FEATURE_EXTENSIONS[format_version]}"
        with fs.atomic_open(fs.join(out, name)) as sink:
            writer = FeatureShardWriter(sink, x.shape[1], dtype, format_version)
            if len(x):
                keys = [f"p{i}-{j}" for j in range(len(x))]
                writer.write(keys, [None] * len(x), [np.array([0])] * len(x), [row[None] for row in x])
            writer.close()
        outputs.append(
            {"shard": name, "url": name, "rows": len(x), "bytes": sink.nbytes, "sha256": sink.hexdigest()}
        )
    m = StageManifest.build(
        "extract",
        fingerprint_config(config),
        [InputRef(f"in-{i}.tar", 1, sha256=str(i)) for i in range(len(parts))],
    )
    m.outputs = outputs
    m.write(out)
    return out


def blobs(n_per: int, centers: np.ndarray, sigma: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = np.concatenate([c + sigma * rng.standard_normal((n_per, centers.shape[1])) for c in centers])
    return x[rng.permutation(len(x))].astype(np.float32)
