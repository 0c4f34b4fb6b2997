"""The one dataset reader every stage uses.

A dataset is given as a WebDataset brace pattern, a directory of shards, a `shards.json` index, a
single tar, or an image folder (`class/xxx.jpg`), on any fsspec URL. It is listed as `ShardRef`s
(the unit of work of every pipeline stage) and read sample by sample. Per-sample problems (an image
that does not decode, a missing label where one is required) are skips, counted and listed in
`ReadStats`; problems with a whole shard (empty file, truncated tar) raise `ShardReadError` naming the
file.
"""

from __future__ import annotations

import posixpath
import tarfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

from braceexpand import braceexpand
from PIL import Image

from kmim import fs
from kmim.contract.images import IMAGE_EXTENSIONS, ImageDecodeError, decode_rgb
from kmim.contract.manifest import InputRef, digest
from kmim.contract.schemas import INDEX_NAME, LABEL_MEMBER, ShardIndex
from kmim.data.tar import split_member
from kmim.errors import InputError, ShardReadError

DEFAULT_FOLDER_SHARD_SIZE = 1000
# The one label rule: a label is an integer in [0, MAX_CLASSES), or absent. Anything else (negative, huge,
# not a number) is a counted skip where labels are read, never a row of a co-occurrence matrix.
MAX_CLASSES = 65536


def unsafe_key(key: str) -> str | None:
    """Why a sample key cannot become a member name of a tar we write (None: it can)."""
    if key.startswith("/") or "\\" in key:
        return "key is an absolute or Windows path"
    if any(part in ("", ".", "..") for part in key.removeprefix("./").split("/")):  # `tar -C dir .` writes ./
        return "key has an empty, '.' or '..' path component"
    if any(ord(c) < 32 for c in key):
        return "key holds control characters"
    return None


@dataclass(frozen=True)
class ShardRef:
    """A unit of work: one tar, or one slice of an image folder."""

    name: str  # stem used to name this shard's outputs, e.g. "train-000003"
    url: str  # the tar; for a folder slice, the folder root
    size: int | None = None
    sha256: str | None = None
    etag: str | None = None
    samples: int | None = None
    files: tuple[str, ...] = ()  # folder slice: image URLs
    labels: tuple[int | None, ...] = ()  # folder slice: label per file
    split: str | None = None  # from the index, when it says

    @property
    def is_folder(self) -> bool:
        return bool(self.files)

    def input_ref(self) -> InputRef:
        return InputRef(
            url=self.url if not self.is_folder else f"{self.url}#{self.name}",
            size=self.size or 0,
            sha256=self.sha256,
            etag=self.etag,
        )


@dataclass
class Dataset:
    spec: str
    shards: list[ShardRef]
    classes: list[str] | None = None
    skipped: list[dict] = field(default_factory=list)  # found while listing (symlinks not followed)

    @property
    def num_samples(self) -> int | None:
        counts = [s.samples for s in self.shards]
        return None if any(c is None for c in counts) else sum(counts)  # type: ignore[arg-type]


@dataclass
class RawSample:
    key: str
    image: bytes
    ext: str
    label: int | None
    shard: str
    extra: dict[str, bytes] = field(default_factory=dict)


@dataclass
class ReadStats:
    samples: int = 0
    skipped: list[dict] = field(default_factory=list)
    keys: list[str] = field(
        default_factory=list, repr=False
    )  # of the samples read, for the cross-shard check

    def skip(self, key: str, shard: str, reason: str) -> None:
        self.skipped.append({"key": key, "shard": shard, "reason": reason})

    @property
    def num_skipped(self) -> int:
        return len(self.skipped)

    def merge(self, other: ReadStats) -> None:
        self.samples += other.samples
        self.skipped.extend(other.skipped)
        self.keys.extend(other.keys)

    def to_json(self) -> dict:
        return {"samples": self.samples, "num_skipped": self.num_skipped, "skipped": list(self.skipped)}


# --- listing ----------------------------------------------------------------------------------------


def open_dataset(
    spec: str, *, split: str | None = None, folder_shard_size: int = DEFAULT_FOLDER_SHARD_SIZE
) -> Dataset:
    """List the shards of a dataset given in any of the supported forms."""
    spec = spec.rstrip("/") if spec not in ("/",) else spec
    if "{" in spec:
        ds = Dataset(spec, [_tar_ref(url) for url in braceexpand(spec)])
    elif spec.endswith(".json"):
        ds = _from_index(spec, split)
    else:
        filesystem, path = fs.get_fs(spec)
        if not filesystem.exists(path):
            raise InputError(spec, "no such file or directory")
        if filesystem.isfile(path):
            if not path.endswith(".tar"):
                raise InputError(spec, "a single file must be a .tar shard or a shards.json index")
            ds = Dataset(spec, [_tar_ref(spec)])
        elif filesystem.exists(posixpath.join(path, INDEX_NAME)):
            ds = _from_index(fs.join(spec, INDEX_NAME), split)
        else:
            tars = sorted(
                p
                for p in filesystem.glob(posixpath.join(path, "*.tar"))
                if not posixpath.basename(p).startswith(fs.TMP_PREFIX)
            )
            if tars:
                ds = Dataset(spec, [_tar_ref(fs.unstrip(filesystem, p)) for p in tars])
            else:
                ds = _from_folder(spec, folder_shard_size)
    if not ds.shards:
        raise InputError(
            spec, "empty dataset: no shards or images found" + (f" for split {split!r}" if split else "")
        )
    names = [s.name for s in ds.shards]
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise InputError(spec, f"shard names repeat ({', '.join(dup[:3])}); outputs are named after shards")
    return ds


def _shard_name(url: str) -> str:
    base = fs.basename(url)
    return base[: -len(".tar")] if base.endswith(".tar") else base


def _tar_ref(url: str) -> ShardRef:
    filesystem, path = fs.get_fs(url)
    try:
        info = filesystem.info(path)
    except FileNotFoundError:
        raise InputError(url, "no such shard") from None
    etag = info.get("ETag") or info.get("etag")
    return ShardRef(
        name=_shard_name(url), url=url, size=int(info["size"]), etag=str(etag).strip('"') if etag else None
    )


def _from_index(index_url: str, split: str | None) -> Dataset:
    index = ShardIndex.read(index_url)
    root = fs.dirname(index_url)
    refs = [
        ShardRef(
            name=_shard_name(e.url),
            url=e.url if "://" in e.url or e.url.startswith("/") else fs.join(root, e.url),
            size=e.bytes,
            sha256=e.sha256,
            samples=e.samples,
            split=e.split,
        )
        for e in index.shards
        if split is None or e.split == split
    ]
    classes_url = fs.join(root, "classes.json")
    classes = fs.read_json(classes_url).get("classes") if fs.exists(classes_url) else None
    return Dataset(index_url, refs, classes)


def _from_folder(root: str, shard_size: int) -> Dataset:
    filesystem, root_path = fs.get_fs(root)
    found = filesystem.find(root_path, detail=True, withdirs=True)
    skipped, inside = [], posixpath.realpath(root_path) + "/"
    for p, info in sorted(found.items()):  # symlinks: followed only to files inside the folder itself
        if not info.get("islink"):
            continue
        target = posixpath.realpath(p)
        if not posixpath.isfile(target) or not target.startswith(inside):
            what = "folder" if posixpath.isdir(target) else "file"
            skipped.append(
                {
                    "key": posixpath.relpath(p, root_path),
                    "shard": root,
                    "reason": f"symlink to a {what} outside the folder ({target}): not followed",
                }
            )
            found.pop(p)
    images = sorted(
        (p, info)
        for p, info in found.items()
        if info.get("type") != "directory"
        and posixpath.splitext(p)[1].lower().lstrip(".") in IMAGE_EXTENSIONS
        and not posixpath.basename(p).startswith((".", fs.TMP_PREFIX))
    )
    rel = [posixpath.relpath(p, root_path) for p, _ in images]
    class_names = sorted({r.split("/", 1)[0] for r in rel if "/" in r})
    class_to_idx = {c: i for i, c in enumerate(class_names)}
    keys: dict[str, str] = {}
    for r in rel:
        key = folder_key(r)
        if key in keys:
            raise InputError(root, f"files {keys[key]!r} and {r!r} map to the same sample key {key!r}")
        keys[key] = r
    refs = []
    for start in range(0, len(images), shard_size):
        chunk = images[start : start + shard_size]
        chunk_rel = rel[start : start + shard_size]
        labels = tuple(class_to_idx[r.split("/", 1)[0]] if "/" in r else None for r in chunk_rel)
        identity = [
            (r, int(info["size"]), str(info.get("ETag") or info.get("mtime") or ""))
            for r, (_, info) in zip(chunk_rel, chunk)
        ]
        refs.append(
            ShardRef(
                name=f"folder-{start // shard_size:06d}",
                url=root,
                size=sum(int(info["size"]) for _, info in chunk),
                etag=digest(identity),
                samples=len(chunk),
                files=tuple(fs.unstrip(filesystem, p) for p, _ in chunk),
                labels=labels,
            )
        )
    return Dataset(root, refs, class_names or None, skipped)


def folder_key(relpath: str) -> str:
    """Sample key for an image folder file: its relative path without extension, tar-safe."""
    stem = posixpath.splitext(relpath)[0]
    return "/".join(part.replace(".", "_").replace(" ", "_") for part in stem.split("/"))


# --- reading ----------------------------------------------------------------------------------------


def iter_samples(shard: ShardRef, stats: ReadStats, *, require_label: bool = False) -> Iterator[RawSample]:
    """Raw samples of one shard in stored order; unusable ones are recorded in `stats` and skipped."""
    source = _iter_folder(shard) if shard.is_folder else _iter_tar(shard)
    seen: set[str] = set()
    for key, members in source:
        if key in seen:  # WebDataset groups consecutive members only: a key seen before is another sample
            stats.skip(key, shard.url, "duplicate key: an earlier sample of this shard has the same key")
            continue
        seen.add(key)
        duplicated = members.pop(_DUPLICATE, None)
        if duplicated:
            stats.skip(key, shard.url, f"member .{duplicated.decode()} is given twice in one sample")
            continue
        unsafe = unsafe_key(key)
        if unsafe:
            stats.skip(key, shard.url, unsafe)
            continue
        image_ext = next((ext for ext in members if ext.lower() in IMAGE_EXTENSIONS), None)
        if image_ext is None:
            stats.skip(key, shard.url, f"no image member (has: {', '.join(sorted(members)) or 'nothing'})")
            continue
        label = None
        if LABEL_MEMBER in members:
            raw = members[LABEL_MEMBER].strip()
            try:
                label = int(raw)
            except ValueError:
                stats.skip(key, shard.url, f"label is not an integer: {raw[:20]!r}")
                continue
            if not 0 <= label < MAX_CLASSES:
                stats.skip(key, shard.url, f"label {label} is outside [0, {MAX_CLASSES})")
                continue
        elif require_label:
            stats.skip(key, shard.url, "missing label (no .cls member)")
            continue
        image = members.pop(image_ext)
        members.pop(LABEL_MEMBER, None)
        stats.samples += 1
        stats.keys.append(key)
        yield RawSample(key=key, image=image, ext=image_ext, label=label, shard=shard.url, extra=members)


def iter_images(
    shard: ShardRef, stats: ReadStats, *, require_label: bool = False, seconds: dict[str, float] | None = None
) -> Iterator[tuple[RawSample, Image.Image]]:
    """Samples with their image decoded to RGB; samples that do not decode are skips.

    With `seconds`, time spent reading and decoding is added to its "read" and "decode" entries.
    """
    timing = seconds if seconds is not None else {"read": 0.0, "decode": 0.0}
    samples = iter_samples(shard, stats, require_label=require_label)
    while True:
        t0 = time.perf_counter()
        sample = next(samples, None)
        t1 = time.perf_counter()
        timing["read"] += t1 - t0
        if sample is None:
            return
        try:
            img = decode_rgb(sample.image)
        except ImageDecodeError as e:
            stats.samples -= 1
            stats.keys.pop()  # the sample just read: skipped, so it is in no output
            stats.skip(sample.key, shard.url, str(e))
            continue
        finally:
            timing["decode"] += time.perf_counter() - t1
        yield sample, img


_DUPLICATE = "\x00duplicate"  # set in a sample's members when a member name repeats


def _iter_folder(shard: ShardRef) -> Iterator[tuple[str, dict[str, bytes]]]:
    filesystem, root_path = fs.get_fs(shard.url)
    for url, label in zip(shard.files, shard.labels):
        _, path = fs.get_fs(url)
        rel = posixpath.relpath(path, root_path)
        with filesystem.open(path, "rb") as f:
            data = f.read()
        members = {posixpath.splitext(rel)[1].lower().lstrip("."): data}
        if label is not None:
            members[LABEL_MEMBER] = str(label).encode()
        yield folder_key(rel), members


def _iter_tar(shard: ShardRef) -> Iterator[tuple[str, dict[str, bytes]]]:
    filesystem, path = fs.get_fs(shard.url)
    try:
        size = int(filesystem.size(path))
    except FileNotFoundError:
        raise ShardReadError(shard.url, "no such file") from None
    if size == 0:
        raise ShardReadError(shard.url, "empty file (0 bytes)")
    if shard.size is not None and size != shard.size:
        raise ShardReadError(
            shard.url, f"size is {size} bytes but the index says {shard.size} (changed or truncated)"
        )
    complete = 0
    key, members = None, {}
    with filesystem.open(path, "rb") as f:
        try:
            tar = tarfile.open(fileobj=f, mode="r|")
            for info in tar:
                if not info.isfile():
                    continue
                parts = split_member(info.name)
                if parts is None:
                    continue
                member_key, ext = parts
                data = tar.extractfile(info).read()  # type: ignore[union-attr]
                if member_key != key:
                    if key is not None:
                        complete += 1
                        yield key, members
                    key, members = member_key, {}
                if ext in members:
                    members[_DUPLICATE] = ext.encode()
                members[ext] = data
            end = tar.offset
        except (tarfile.TarError, EOFError, OSError) as e:
            raise ShardReadError(
                shard.url, f"truncated or corrupt tar after {complete} samples ({e})"
            ) from None
    # tarfile stops quietly at a header cut short; the end-of-archive marker tells a complete archive.
    trailer = filesystem.cat_file(path, start=end, end=min(end + 512, size)) if end < size else b""
    if len(trailer) < 512 or trailer.count(0) != 512:
        raise ShardReadError(shard.url, f"truncated tar: no end-of-archive marker after {complete} samples")
    if key is not None:
        yield key, members
