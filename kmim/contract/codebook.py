"""The codebook: K centers `[K, D]` and their metadata, the one type every stage and the trainer use.

On disk (docs/FORMATS.md, unchanged since format_version 1): a cluster output folder holds
`codebook.safetensors` (one float32 tensor `centers` [K, D]), `codebook.json` (K, D, extractor, view,
spherical, init, seed, ... as the cluster stage writes them) and the stage's `manifest.json`. A bare
`.safetensors` file holding `centers` is a codebook without metadata (cluster's `init_from`).

`Codebook.load` is the only reader of that format and checks it (one `InputError` naming the file and the
reason); `Codebook.save` writes it; `Assigner` is the only nearest-center search (exact L2: faiss, a GPU
index when asked for and available, or a blocked torch matmul + argmin, on CUDA when faiss has no GPU); `normalize_rows` is the only row normalisation (spherical k-means).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from kmim import fs
from kmim.contract.schemas import CODEBOOK_META, CODEBOOK_TENSOR, CODEBOOK_WEIGHTS, FORMAT_VERSION
from kmim.contract.views import ViewSpec
from kmim.errors import InputError

MANIFEST = "manifest.json"  # the cluster stage's commit marker (kmim/contract/manifest.py)


def normalize_rows(x: np.ndarray) -> np.ndarray:
    """Unit L2 norm per row (spherical k-means: features and centers); zero rows stay zero."""
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


class Assigner:
    """Nearest center by exact L2 search: faiss (a GPU index when asked for and faiss has GPUs), or a
    blocked matmul + argmin in torch (`backend="torch"`; on CUDA when a GPU is asked for and faiss has none,
    so a GPU worker never searches on the CPU behind the user's back)."""

    BLOCK_ELEMENTS = 1 << 22  # rows x K scores per torch block: 16 MB of float32

    def __init__(self, centers: np.ndarray, use_gpu: bool = False, backend: str = "auto"):
        import faiss  # here, not at import: the contract is imported by processes that never search

        if backend not in ("auto", "faiss", "torch"):
            raise ValueError(f"backend must be auto, faiss or torch, got {backend!r}")
        k, dim = centers.shape
        self.k = k
        centers = np.ascontiguousarray(centers, dtype=np.float32)
        faiss_gpu = hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0
        if backend == "auto":
            backend = "torch" if use_gpu and not faiss_gpu and _cuda_available() else "faiss"
        self.backend = backend
        if backend == "torch":
            import torch

            self.device = torch.device("cuda" if use_gpu and _cuda_available() else "cpu")
            self.on_gpu = self.device.type == "cuda"
            self._centers = torch.from_numpy(centers).to(self.device)
            self._center_sq = (self._centers * self._centers).sum(1)
            return
        index = faiss.IndexFlatL2(dim)
        self.on_gpu = bool(use_gpu and faiss_gpu)
        if self.on_gpu:
            self._res = faiss.StandardGpuResources()
            index = faiss.index_cpu_to_gpu(self._res, 0, index)
        index.add(centers)
        self.index = index

    def assign(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(squared distance [n] float32, label [n] int64)."""
        x = np.ascontiguousarray(x, dtype=np.float32)
        if self.backend == "torch":
            return self._torch_assign(x)
        d2, labels = self.index.search(x, 1)
        return np.maximum(d2[:, 0], 0), labels[:, 0]

    def _torch_assign(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        import torch

        d2 = np.empty(len(x), np.float32)
        labels = np.empty(len(x), np.int64)
        block = max(1, self.BLOCK_ELEMENTS // self.k)
        with torch.no_grad():
            for start in range(0, len(x), block):
                xb = torch.from_numpy(x[start : start + block]).to(self.device)
                # ||c||² - 2 x·c in one GEMM (addmm); ||x||² is the same for every center, added after argmin
                scores = torch.addmm(self._center_sq, xb, self._centers.T, beta=1, alpha=-2)
                best, idx = scores.min(1)
                d2[start : start + len(xb)] = (best + (xb * xb).sum(1)).clamp_(min=0).cpu().numpy()
                labels[start : start + len(xb)] = idx.cpu().numpy()
        return d2, labels


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def centers_file(url: str) -> str:
    """The centers file of a codebook folder, or `url` itself when it is a bare `.safetensors` file."""
    return url if url.endswith(".safetensors") else fs.join(url, CODEBOOK_WEIGHTS)


def _read_centers(path: str) -> np.ndarray:
    from safetensors import SafetensorError
    from safetensors.numpy import load as st_load

    if not fs.exists(path):
        raise InputError(path, "no such centers file")
    filesystem, p = fs.get_fs(path)
    try:
        tensors = st_load(filesystem.cat_file(p))
    except (SafetensorError, ValueError, TypeError) as e:
        raise InputError(
            path, f"not a safetensors file ({str(e).splitlines()[0] if str(e) else type(e).__name__})"
        ) from None
    if CODEBOOK_TENSOR not in tensors:
        raise InputError(path, f"no '{CODEBOOK_TENSOR}' tensor (has: {', '.join(sorted(tensors)) or 'none'})")
    centers = tensors[CODEBOOK_TENSOR]
    if centers.dtype.kind != "f":
        raise InputError(path, f"'{CODEBOOK_TENSOR}' is {centers.dtype}, not floating point")
    if centers.ndim != 2 or 0 in centers.shape:
        raise InputError(
            path, f"'{CODEBOOK_TENSOR}' has shape {centers.shape}, expected [K, D] with K, D >= 1"
        )
    finite = np.isfinite(centers).all(axis=1)
    if not finite.all():
        raise InputError(
            path, f"{int((~finite).sum())} centers hold NaN or Inf (first: row {int(np.argmin(finite))})"
        )
    return centers.astype(np.float32, copy=False)


@dataclass(eq=False)
class Codebook:
    """Centers `[K, D]` float32 and the metadata of `codebook.json` (empty for a bare centers file)."""

    centers: np.ndarray
    meta: dict[str, Any] = field(default_factory=dict)
    url: str | None = None  # where it was loaded from
    _assigners: dict[bool, Assigner] = field(default_factory=dict, repr=False)

    # --- reading and writing ------------------------------------------------------------------------

    @classmethod
    def load(cls, url: str, require_manifest: bool = True) -> Codebook:
        """A codebook folder (`require_manifest`: a finished cluster output, its manifest.json written) or a
        bare `.safetensors` file holding `centers`; every check failure is one InputError naming the file."""
        if url.endswith(".safetensors"):
            return cls(_read_centers(url), {}, url)
        needed = [CODEBOOK_META, CODEBOOK_WEIGHTS] + ([MANIFEST] if require_manifest else [])
        missing = [name for name in needed if not fs.exists(fs.join(url, name))]
        if missing:
            raise InputError(url, f"not a finished `kmim pipeline cluster` output (no {' / '.join(missing)})")
        meta_url = fs.join(url, CODEBOOK_META)
        try:
            meta = fs.read_json(meta_url)
        except ValueError as e:
            raise InputError(meta_url, f"not valid JSON ({e})") from None
        if not isinstance(meta, dict):
            raise InputError(meta_url, "not a JSON object")
        if meta.get("format_version", FORMAT_VERSION) > FORMAT_VERSION:
            raise InputError(
                meta_url, f"format_version {meta['format_version']} is newer than this kmim understands"
            )
        for key in ("k", "dim"):
            if not isinstance(meta.get(key), int) or isinstance(meta.get(key), bool):
                raise InputError(meta_url, f"'{key}' is missing or not an integer")
        weights_url = fs.join(url, CODEBOOK_WEIGHTS)
        centers = _read_centers(weights_url)
        if centers.shape != (meta["k"], meta["dim"]):
            raise InputError(
                weights_url,
                f"centers have shape {centers.shape}, codebook.json says ({meta['k']}, {meta['dim']})",
            )
        return cls(centers, meta, url)

    def save(self, url: str) -> None:
        """`codebook.safetensors` then `codebook.json` into folder `url` (the cluster stage then commits its
        manifest). The bytes depend on the centers and the metadata only."""
        from safetensors.numpy import save as st_save

        meta = dict(self.meta)
        for key, value in (("format_version", FORMAT_VERSION), ("k", self.k), ("dim", self.dim)):
            meta.setdefault(key, value)
        if (meta["k"], meta["dim"]) != (self.k, self.dim):
            raise ValueError(f"metadata says ({meta['k']}, {meta['dim']}), centers are {self.centers.shape}")
        fs.write_bytes_atomic(
            fs.join(url, CODEBOOK_WEIGHTS), st_save({CODEBOOK_TENSOR: self.centers.astype(np.float32)})
        )
        fs.write_json_atomic(fs.join(url, CODEBOOK_META), meta)

    # --- metadata -----------------------------------------------------------------------------------

    @property
    def k(self) -> int:
        return int(self.centers.shape[0])

    @property
    def dim(self) -> int:
        return int(self.centers.shape[1])

    @property
    def spherical(self) -> bool:
        return bool(self.meta.get("spherical"))

    @property
    def extractor(self) -> dict | None:
        """The extractor spec as recorded (`ExtractorSpec.to_json()`); None for a bare centers file."""
        return self.meta.get("extractor")

    @property
    def extractor_fingerprint(self) -> str | None:
        return self.meta.get("extractor_fingerprint")

    @property
    def view(self) -> dict | None:
        """{image_size, patch_size, crop_pct} of the features the centers were made from."""
        return self.meta.get("view")

    @property
    def init(self) -> str | None:
        return self.meta.get("init")

    @property
    def seed(self) -> int | None:
        return self.meta.get("seed")

    @property
    def view_spec(self) -> ViewSpec:
        return ViewSpec(self._view()["image_size"], self._view()["crop_pct"])

    @property
    def patch_size(self) -> int:
        return int(self._view()["patch_size"])

    def _view(self) -> dict:
        if not self.view:
            raise InputError(self.url or "codebook", "records no view (a bare centers file has no metadata)")
        return self.view

    def get(self, key: str, default: Any = None) -> Any:
        return self.meta.get(key, default)

    # --- assignment ---------------------------------------------------------------------------------

    def prepare(self, x: np.ndarray) -> np.ndarray:
        """Features as the centers see them: unit rows for a spherical codebook, unchanged otherwise."""
        return normalize_rows(x) if self.spherical else x

    def assigner(self, use_gpu: bool = False) -> Assigner:
        """The search index over the centers, built once per codebook and device."""
        if use_gpu not in self._assigners:
            self._assigners[use_gpu] = Assigner(self.centers, use_gpu)
        return self._assigners[use_gpu]

    def assign(self, x: np.ndarray, use_gpu: bool = False) -> np.ndarray:
        """The nearest center of each row of x [n, D] (int64 [n]), spherical codebooks on unit rows."""
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"features have shape {x.shape}, the codebook's dim is {self.dim}")
        return self.assigner(use_gpu).assign(self.prepare(x))[1]
