"""The shared contract between pipeline stages and the trainer (documented in docs/FORMATS.md):
views and their replay, the patch order, the named random streams, on-disk schemas, and stage manifests."""

from kmim.contract.images import ImageDecodeError, decode_rgb, to_rgb
from kmim.contract.manifest import InputRef, StageManifest, fingerprint_inputs, stage_fingerprint
from kmim.contract.patches import grid_size, patchify, unpatchify
from kmim.contract.schemas import (
    FEATURE_FORMAT_VERSION,
    FORMAT_VERSION,
    ShardEntry,
    ShardIndex,
    feature_schema,
    token_dtype,
)
from kmim.contract.streams import STREAMS, Stream
from kmim.contract.views import (
    ViewParams,
    ViewSpec,
    apply_view,
    center_view,
    make_views,
    normalize,
    random_view,
    to_uint8_array,
)

__all__ = [
    "FEATURE_FORMAT_VERSION",
    "FORMAT_VERSION",
    "STREAMS",
    "ImageDecodeError",
    "InputRef",
    "ShardEntry",
    "ShardIndex",
    "StageManifest",
    "Stream",
    "ViewParams",
    "ViewSpec",
    "apply_view",
    "center_view",
    "decode_rgb",
    "feature_schema",
    "fingerprint_inputs",
    "grid_size",
    "make_views",
    "normalize",
    "patchify",
    "random_view",
    "stage_fingerprint",
    "to_rgb",
    "to_uint8_array",
    "token_dtype",
    "unpatchify",
]
