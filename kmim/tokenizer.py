"""A codebook applied with the extractor it was built from: views in, token ids out.

Used by `kmim pipeline tokenize`, `kmim eval tcas` and the trainer's `online` targets. The extractor,
image size and patch size come from the codebook's metadata, never from the user; when the codebook was
built from a weights file, the same file (checked by sha256) is required.
"""

from __future__ import annotations

import faiss
import numpy as np
from safetensors.numpy import load as st_load

from kmim import fs
from kmim.contract.schemas import CODEBOOK_META, CODEBOOK_TENSOR, CODEBOOK_WEIGHTS, FORMAT_VERSION
from kmim.contract.views import ViewSpec
from kmim.errors import InputError
from kmim.extractors import ExtractorSpec, build_extractor


def load_codebook(url: str) -> tuple[np.ndarray, dict]:
    """(centers [K, D] float32, metadata) of a finished cluster output."""
    meta_url = fs.join(url, CODEBOOK_META)
    if not fs.exists(meta_url) or not fs.exists(fs.join(url, "manifest.json")):
        raise InputError(url, "not a finished `kmim pipeline cluster` output (no codebook.json / manifest.json)")
    meta = fs.read_json(meta_url)
    if meta.get("format_version", FORMAT_VERSION) > FORMAT_VERSION:
        raise InputError(meta_url, f"format_version {meta['format_version']} is newer than this kmim understands")
    filesystem, path = fs.get_fs(fs.join(url, CODEBOOK_WEIGHTS))
    centers = st_load(filesystem.cat_file(path))[CODEBOOK_TENSOR]
    if centers.shape != (meta["k"], meta["dim"]):
        raise InputError(url, f"centers have shape {centers.shape}, codebook.json says ({meta['k']}, {meta['dim']})")
    return centers, meta


def codebook_extractor(meta: dict, weights: str | None, where: str) -> ExtractorSpec:
    """The codebook's extractor spec, with its weights file located and verified."""
    recorded = ExtractorSpec.from_json(meta["extractor"])
    if recorded.fingerprint != meta.get("extractor_fingerprint", recorded.fingerprint):
        raise InputError(where, "codebook.json's extractor does not match its recorded fingerprint")
    if not recorded.weights_sha256:
        if weights:
            raise InputError(weights, f"the codebook's extractor ({recorded.name}) was built without a weights file")
        return recorded
    path = weights or recorded.weights
    if not path or not fs.exists(path):
        raise InputError(where, f"the codebook was built with {recorded.name} weights (sha256 "
                                f"{recorded.weights_sha256[:12]}…); pass the same file with --weights")
    actual = fs.sha256_of(path)
    if actual != recorded.weights_sha256:
        raise InputError(path, f"is not the weights file this codebook was built with (sha256 {actual[:12]}… "
                               f"vs {recorded.weights_sha256[:12]}…)")
    return ExtractorSpec(recorded.name, recorded.image_size, recorded.patch_size, path, actual)


class Tokenizer:
    """uint8 views [N, S, S, 3] -> token ids [N, L] (int64), with the codebook's own extractor."""

    def __init__(self, centers: np.ndarray, meta: dict, spec: ExtractorSpec, device: str = "cpu"):
        self.meta, self.spec = meta, spec
        self.k = int(meta["k"])
        self.spherical = bool(meta.get("spherical"))
        self.view_spec = ViewSpec(meta["view"]["image_size"], meta["view"]["crop_pct"])
        self.patch_size = int(meta["view"]["patch_size"])
        self.extractor = build_extractor(spec, device)
        if self.extractor.dim != centers.shape[1]:
            raise InputError(spec.name, f"extractor features have dim {self.extractor.dim}, the codebook {centers.shape[1]}")
        self.index = faiss.IndexFlatL2(centers.shape[1])
        self.index.add(np.ascontiguousarray(centers, dtype=np.float32))

    @classmethod
    def from_codebook(cls, url: str, weights: str | None = None, device: str = "cpu") -> Tokenizer:
        centers, meta = load_codebook(url)
        return cls(centers, meta, codebook_extractor(meta, weights, url), device)

    def __call__(self, views: np.ndarray) -> np.ndarray:
        feats = self.extractor(views).numpy()  # [N, L, D]
        n, length, dim = feats.shape
        flat = feats.reshape(n * length, dim)
        if self.spherical:
            flat = flat / np.maximum(np.linalg.norm(flat, axis=1, keepdims=True), 1e-12)
        _, ids = self.index.search(np.ascontiguousarray(flat, dtype=np.float32), 1)
        return ids[:, 0].reshape(n, length)
