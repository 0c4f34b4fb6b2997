"""Streaming training data: token shards (or plain image shards) read with webdataset.

Per epoch the shard order is a permutation seeded by (seed, epoch); each data worker of each rank reads
its slice of it (`shards_for`), cycling if it runs out, and yields exactly its quota of samples, so
every rank gets the same number of batches whatever the shard sizes (uneven shards never hang DDP).
Each sample cycles through its V stored views, each once per block of V epochs in a permutation seeded by
(seed, cycle, key) (`choose_view`); the trainer replays that
view's recorded crop/flip with the shared contract, so the targets are exactly the tokens of the
patches the encoder sees. Grid-view shards (token format 2) instead give a patch-aligned window of one render
per sample and epoch (`kmim/contract/grid.py`). Worker processes decode.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from kmim import fs
from kmim.contract import streams
from kmim.contract.grid import Render, check_grid, draw_window, render_image, split_tokens
from kmim.contract.images import IMAGE_EXTENSIONS, ImageDecodeError, decode_rgb
from kmim.contract.manifest import StageManifest
from kmim.contract.schemas import (
    GRID_MEMBER,
    GRID_META_MEMBER,
    INDEX_NAME,
    LABEL_MEMBER,
    TOKENS_MEMBER,
    VIEWS_MEMBER,
    ShardIndex,
)
from kmim.contract.views import ViewParams, ViewSpec, apply_view, key_hash, random_view, to_uint8_array
from kmim.errors import ConfigError, InputError
from kmim.trainer.distributed import shards_for, split_evenly


@dataclass(frozen=True)
class TrainShards:
    urls: list[str]
    samples: int
    manifest: StageManifest | None  # the tokenize manifest, when these are token shards
    sha256: tuple[str | None, ...] = ()  # per url, from shards.json: checked as each shard is read through

    @property
    def has_tokens(self) -> bool:
        return self.manifest is not None and self.manifest.stage == "tokenize"


def open_train_shards(spec: str) -> TrainShards:
    """A tokenize output folder, its shards.json or a split index; or any indexed image shards."""
    index_url = spec if spec.endswith(".json") else fs.join(spec, INDEX_NAME)
    if not fs.exists(index_url):
        raise InputError(spec, "no shards.json: expected a `kmim pipeline tokenize` output or indexed shards")
    index = ShardIndex.read(index_url)
    root = fs.dirname(index_url)
    urls = [e.url if "://" in e.url or e.url.startswith("/") else fs.join(root, e.url) for e in index.shards]
    if not urls or index.total_samples == 0:
        raise InputError(spec, "empty dataset: no samples in the index")
    return TrainShards(
        urls,
        index.total_samples,
        StageManifest.read_if_committed(root),
        tuple(e.sha256 for e in index.shards),
    )


class _HashingReader(io.RawIOBase):
    """Reads through to the wrapped stream, hashing every byte."""

    def __init__(self, stream):  # noqa: ANN001
        self.stream, self.hash = stream, hashlib.sha256()

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        data = self.stream.read(size)
        self.hash.update(data)
        return data

    def readinto(self, buffer) -> int:  # noqa: ANN001
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def drain(self) -> str:
        while self.read(1 << 20):
            pass
        return self.hash.hexdigest()


def _fsspec_streams(urls: list[str], sha256: dict[str, str | None]) -> Iterator[dict]:
    for url in urls:
        filesystem, path = fs.get_fs(url)
        with filesystem.open(path, "rb") as stream:
            reader = _HashingReader(stream)
            yield {"url": url, "stream": reader}
            # Read through: a shard whose bytes changed since it was indexed is an error naming it.
            expected = sha256.get(url)
            if expected and reader.drain() != expected:
                raise InputError(
                    url,
                    "bytes do not match the sha256 in shards.json (changed or corrupted since it "
                    "was indexed); run `kmim verify` on the dataset",
                )


def choose_view(seed: int, epoch: int, key: str, num_views: int) -> int:
    """The stored view a sample trains on in `epoch`: epochs come in cycles of V, and in each cycle the
    sample visits its V views once, in a permutation seeded by (seed, cycle, key). So no view repeats before
    all were used, and the view of any epoch is known without replaying the earlier ones (exact resume)."""
    if num_views == 1:
        return 0
    cycle, position = divmod(epoch, num_views)
    return int(streams.rng("view_cycle", seed, cycle, key_hash(key)).permutation(num_views)[position])


class TrainStream(IterableDataset):
    """Yields (uint8 view [S, S, 3], tokens [L] int64 or -1s, label or -1) for one rank and epoch."""

    def __init__(
        self,
        shards: TrainShards,
        rank: int,
        world: int,
        batch_size: int,
        steps: int,
        image_size: int,
        seed: int,
        shuffle_buffer: int,
        need_tokens: bool,
        num_tokens: int | None = None,
        grid: int | None = None,
    ):
        self.shards, self.rank, self.world = shards, rank, world
        self.num_tokens, self.grid = num_tokens, grid  # K and patches per side: every sample is checked
        self.batch_size, self.steps, self.seed = batch_size, steps, seed
        self.view_spec = ViewSpec(image_size)
        self.shuffle_buffer, self.need_tokens = shuffle_buffer, need_tokens
        self.start_epoch = 0
        self.start_skip = 0  # batches of the first epoch already consumed (resume)
        self._passes = 0  # iterations of this copy: with persistent workers, the epochs it has served
        self.epoch = 0
        self.skip_batches = 0

    def set_start(self, epoch: int, skip_batches: int) -> None:
        """Where the first pass begins; each later pass over the dataset is the next epoch."""
        self.start_epoch, self.start_skip = epoch, skip_batches

    def _worker(self) -> tuple[int, int]:
        """(logical worker, workers). The DataLoader takes batch i from worker i % W and always starts
        at worker 0; after `skip_batches`, DataLoader worker j plays the part of worker j + skip."""
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        return (worker + self.skip_batches) % workers, workers

    def _raw(self, worker: int, workers: int) -> Iterator[dict]:
        n = len(self.shards.urls)
        order = streams.rng("shard_order", self.seed, self.epoch).permutation(n).tolist()
        mine = shards_for(n, self.rank, self.world, worker, workers, order)
        cycle = 0
        while True:  # cycle through this worker's shards until the quota is met
            urls = [
                self.shards.urls[i]
                for i in streams.rng(
                    "shard_cycle", self.seed, self.epoch, cycle, worker, self.rank
                ).permutation(mine)
            ]
            files = wds.tariterators.tar_file_expander(
                _fsspec_streams(urls, dict(zip(self.shards.urls, self.shards.sha256)))
            )
            yield from wds.tariterators.group_by_keys(files)
            cycle += 1

    def __iter__(self) -> Iterator[tuple[np.ndarray, np.ndarray, int]]:
        self.epoch = self.start_epoch + self._passes
        self.skip_batches = self.start_skip if self._passes == 0 else 0
        self._passes += 1
        worker, workers = self._worker()
        # Batches go round-robin over workers in the DataLoader: this worker makes batches w, w+W, ...
        batches = split_evenly(self.steps, workers, worker)
        skip = split_evenly(self.skip_batches, workers, worker)
        quota = (batches - skip) * self.batch_size
        if quota <= 0:
            return
        rng = streams.rng("shuffle_buffer", self.seed, self.epoch, self.rank, worker)
        capacity = max(1, min(self.shuffle_buffer, batches * self.batch_size))
        to_skip = skip * self.batch_size
        buffer: list[dict] = []
        produced = 0
        for sample in self._raw(worker, workers):
            buffer.append(sample)
            if len(buffer) < capacity:
                continue
            chosen = buffer.pop(int(rng.integers(len(buffer))))
            if to_skip:  # resume: replay the shuffle exactly, but do not decode what was consumed
                to_skip -= 1
                continue
            item = self._decode(chosen)
            if item is not None:
                yield item
                produced += 1
                if produced == quota:
                    return

    def _checked_tokens(self, sample: dict) -> tuple[np.ndarray, list]:
        """A token shard is made by the pipeline: a sample that breaks the format fails the run, naming it."""
        where = f"{sample.get('__url__')}:{sample['__key__']}"
        try:
            tokens = np.load(io.BytesIO(sample[TOKENS_MEMBER]), allow_pickle=False)
            views = json.loads(sample[VIEWS_MEMBER]).get("views")
        except (ValueError, OSError, AttributeError, json.JSONDecodeError) as e:
            raise InputError(where, f"unreadable tokens.npy / views.json ({type(e).__name__}: {e})") from None
        problem = check_tokens(tokens, views, self.num_tokens, self.grid)
        if problem:
            raise InputError(where, f"{problem}; run `kmim verify` on the shards")
        return tokens, views  # type: ignore[return-value]

    def _decode(self, sample: dict) -> tuple[np.ndarray, np.ndarray, int] | None:
        key = sample["__key__"]
        ext = next((e for e in sample if e.lower() in IMAGE_EXTENSIONS), None)
        if ext is None:
            raise InputError(f"{sample.get('__url__')}:{key}", "sample has no image member")
        try:
            img = decode_rgb(sample[ext])
        except ImageDecodeError:
            return None  # counted by the pipeline stage that wrote the shard; here it is only skipped
        label = parse_label(sample.get(LABEL_MEMBER))
        if GRID_MEMBER in sample and GRID_META_MEMBER in sample:
            return self._grid_window(sample, img, label)
        if TOKENS_MEMBER in sample and VIEWS_MEMBER in sample:
            tokens, views = self._checked_tokens(sample)
            v = choose_view(self.seed, self.epoch, key, len(views))
            pixels = to_uint8_array(apply_view(img, ViewParams.from_json(views[v])))
            return pixels, tokens[v].reshape(-1).astype(np.int64), label
        if self.need_tokens:
            raise InputError(f"{sample.get('__url__')}:{key}", "no tokens.npy/views.json: not a token shard")
        view = random_view(img.width, img.height, self.view_spec, self.seed, key, 1 + self.epoch)
        pixels = to_uint8_array(apply_view(img, view))
        return pixels, np.full(1, -1, dtype=np.int64), label

    def _grid_window(self, sample: dict, img, label: int) -> tuple[np.ndarray, np.ndarray, int]:  # noqa: ANN001
        """Grid views (token format 2): this epoch's render and G x G window, cut from the tokens and from the
        same render's pixels, so the encoder sees exactly the patches whose tokens are the targets."""
        where = f"{sample.get('__url__')}:{sample['__key__']}"
        try:
            flat = np.load(io.BytesIO(sample[GRID_MEMBER]), allow_pickle=False)
            meta = json.loads(sample[GRID_META_MEMBER])
        except (ValueError, OSError, json.JSONDecodeError) as e:
            raise InputError(where, f"unreadable grid.npy / grid.json ({type(e).__name__}: {e})") from None
        problem = check_grid(flat, meta, self.num_tokens, self.grid)
        if problem:
            raise InputError(where, f"{problem}; run `kmim verify` on the shards")
        renders = [Render.from_json(r) for r in meta["renders"]]
        g, p = int(meta["grid"]), int(meta["patch_size"])
        r, top, left = draw_window(self.seed, self.epoch, sample["__key__"], renders, g)
        tokens = split_tokens(flat, renders)[r][top : top + g, left : left + g]
        rendered = to_uint8_array(render_image(img, ViewParams.from_json(meta["box"]), renders[r], p))
        pixels = np.ascontiguousarray(rendered[top * p : (top + g) * p, left * p : (left + g) * p])
        return pixels, tokens.reshape(-1).astype(np.int64), label


def parse_label(raw: bytes | None) -> int:
    """The label rule of the reader (kmim/data/reader.py): an integer in [0, MAX_CLASSES), else -1 (none)."""
    from kmim.data.reader import MAX_CLASSES

    if raw is None:
        return -1
    try:
        label = int(raw)
    except ValueError:
        return -1
    return label if 0 <= label < MAX_CLASSES else -1


def check_tokens(tokens: np.ndarray, views: object, num_tokens: int | None, grid: int | None) -> str | None:
    """Why a sample's tokens.npy / views.json cannot be trained on (None: they can)."""
    if not isinstance(views, list) or not views:
        return "views.json lists no views"
    if tokens.dtype.kind not in "ui":
        return f"tokens.npy holds {tokens.dtype}, not integer token ids"
    if tokens.ndim != 3 or tokens.shape[0] != len(views) or (grid and tokens.shape[1:] != (grid, grid)):
        expected = f"[{len(views)}, {grid}, {grid}]" if grid else f"[{len(views)}, H, W]"
        return f"tokens.npy has shape {list(tokens.shape)}, expected {expected} (views x patch grid)"
    if tokens.size and (
        int(tokens.min()) < 0 or (num_tokens is not None and int(tokens.max()) >= num_tokens)
    ):
        return f"token ids span [{int(tokens.min())}, {int(tokens.max())}], outside the codebook's [0, {num_tokens})"
    return None


def collate(
    items: list[tuple[np.ndarray, np.ndarray, int]],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    views = torch.from_numpy(np.stack([i[0] for i in items]))  # uint8 [B, S, S, 3]
    tokens = torch.from_numpy(np.stack([i[1] for i in items]))  # int64 [B, L]
    labels = torch.tensor([i[2] for i in items], dtype=torch.int64)
    return views, tokens, labels


def make_loader(stream: TrainStream, num_workers: int) -> DataLoader:
    """One loader for the whole run: persistent workers keep their process (and their count of epochs).

    Its own generator: otherwise starting the workers draws from the global torch RNG, at step 0 in a fresh
    run but at the resume step in a resumed one, and drop path after a resume would not match."""
    return DataLoader(
        stream,
        batch_size=stream.batch_size,
        num_workers=num_workers,
        collate_fn=collate,
        persistent_workers=num_workers > 0,
        prefetch_factor=4 if num_workers > 0 else None,
        generator=streams.torch_generator("loader", stream.seed),
    )


def check_shards_match_model(shards: TrainShards, image_size: int, patch_size: int) -> int | None:
    """Token shards' image size and patch size against the model config; returns their K."""
    if not shards.has_tokens:
        return None
    cfg = shards.manifest.config  # type: ignore[union-attr]
    problems = []
    if cfg["image_size"] != image_size:
        problems.append(f"image size {cfg['image_size']} vs model.image_size {image_size}")
    if cfg["patch_size"] != patch_size:
        problems.append(f"patch size {cfg['patch_size']} vs model.patch_size {patch_size}")
    if problems:
        raise ConfigError(f"token shards do not match the model: {'; '.join(problems)}")
    return int(cfg["k"])
