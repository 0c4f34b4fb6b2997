"""A codebook applied with the extractor it was built from: views in, token ids out.

Used by `kmim pipeline tokenize`, `kmim eval tcas` and the trainer's `online` targets. The extractor,
image size and patch size come from the codebook's metadata, never from the user; when the codebook was
built from a weights file, the same file (checked by sha256) is required.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from kmim import fs
from kmim.contract.codebook import Codebook
from kmim.errors import InputError
from kmim.extractors import ExtractorSpec, build_extractor


def load_codebook(url: str) -> tuple[np.ndarray, dict]:
    """(centers [K, D] float32, metadata) of a finished cluster output: `Codebook.load` as a tuple."""
    codebook = Codebook.load(url)
    return codebook.centers, codebook.meta


def codebook_extractor(meta: dict, weights: str | None, where: str) -> ExtractorSpec:
    """The codebook's extractor spec, with its weights file located and verified."""
    recorded = ExtractorSpec.from_json(meta["extractor"])
    if recorded.fingerprint != meta.get("extractor_fingerprint", recorded.fingerprint):
        raise InputError(where, "codebook.json's extractor does not match its recorded fingerprint")
    if not recorded.weights_sha256:
        if weights:
            raise InputError(
                weights, f"the codebook's extractor ({recorded.name}) was built without a weights file"
            )
        return recorded
    path = weights or recorded.weights
    if not path or not fs.exists(path):
        raise InputError(
            where,
            f"the codebook was built with {recorded.name} weights (sha256 "
            f"{recorded.weights_sha256[:12]}…); pass the same file with --weights",
        )
    actual = fs.sha256_of(path)
    if actual != recorded.weights_sha256:
        raise InputError(
            path,
            f"is not the weights file this codebook was built with (sha256 {actual[:12]}… "
            f"vs {recorded.weights_sha256[:12]}…)",
        )
    return dataclasses.replace(recorded, weights=path, weights_sha256=actual)  # layer and norm kept


class Tokenizer:
    """uint8 views [N, S, S, 3] -> token ids [N, L] (int64), with the codebook's own extractor.

    The nearest-center search runs on the CPU even when the extractor runs on a GPU (`gpu_search`
    opts in): the same views give the same tokens on every machine."""

    def __init__(
        self,
        codebook: Codebook,
        spec: ExtractorSpec,
        device: str = "cpu",
        gpu_search: bool = False,
        any_size: bool = False,
    ):
        self.codebook, self.spec, self.gpu_search = codebook, spec, gpu_search
        self.meta = codebook.meta
        self.k = codebook.k
        self.spherical = codebook.spherical
        self.view_spec = codebook.view_spec
        self.patch_size = codebook.patch_size
        self.extractor = build_extractor(spec, device, any_size)  # any_size: grid renders
        if self.extractor.dim != codebook.dim:
            raise InputError(
                spec.name, f"extractor features have dim {self.extractor.dim}, the codebook {codebook.dim}"
            )
        codebook.assigner(gpu_search)  # build the index now, not on the first batch

    @classmethod
    def from_codebook(cls, url: str, weights: str | None = None, device: str = "cpu") -> Tokenizer:
        codebook = Codebook.load(url)
        return cls(codebook, codebook_extractor(codebook.meta, weights, url), device)

    def __call__(self, views: np.ndarray) -> np.ndarray:
        feats = self.extractor(views).numpy()  # [N, L, D]
        n, length, dim = feats.shape
        return self.codebook.assign(feats.reshape(n * length, dim), self.gpu_search).reshape(n, length)
