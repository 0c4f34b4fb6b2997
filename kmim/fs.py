"""fsspec helpers shared by every stage: URL joining, hashing, and atomic commits.

Every output is written under a temporary name and renamed into place once complete, so a killed
writer never leaves a file that a later run could take as finished. On object stores the rename is a
copy + delete; readers only trust files listed by an index or manifest that is itself written last.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import posixpath
import uuid
from collections.abc import Iterator
from typing import IO, Any

import fsspec
from fsspec.core import url_to_fs

TMP_PREFIX = "_tmp."


def get_fs(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """(filesystem, path inside it) for any fsspec URL or local path."""
    return url_to_fs(url)


def protocol_of(fs: fsspec.AbstractFileSystem) -> str:
    proto = fs.protocol
    return proto[0] if isinstance(proto, (tuple, list)) else proto


def unstrip(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """The URL of `path` on `fs` (fsspec paths lose their protocol)."""
    return fs.unstrip_protocol(path) if protocol_of(fs) not in ("file", "local") else path


def join(url: str, *parts: str) -> str:
    """Join URL path parts with '/', keeping any `proto://` prefix."""
    if "://" in url:
        proto, rest = url.split("://", 1)
        return f"{proto}://" + posixpath.join(rest, *parts)
    return posixpath.join(url, *parts)


def dirname(url: str) -> str:
    if "://" in url:
        proto, rest = url.split("://", 1)
        return f"{proto}://" + posixpath.dirname(rest)
    return posixpath.dirname(url) or "."


def basename(url: str) -> str:
    return posixpath.basename(url.rstrip("/"))


def makedirs(url: str) -> None:
    fs, path = get_fs(url)
    fs.makedirs(path, exist_ok=True)


def exists(url: str) -> bool:
    fs, path = get_fs(url)
    return fs.exists(path)


class HashingWriter:
    """File-like wrapper that counts bytes and computes sha256 while writing (no second read)."""

    def __init__(self, raw: IO[bytes]):
        self.raw = raw
        self.sha256 = hashlib.sha256()
        self.nbytes = 0

    def write(self, data: bytes) -> int:
        self.sha256.update(data)
        self.nbytes += len(data)
        return self.raw.write(data)

    def flush(self) -> None:
        self.raw.flush()

    def tell(self) -> int:
        return self.nbytes

    def hexdigest(self) -> str:
        return self.sha256.hexdigest()

    # pyarrow's writers probe `closed` and call `close()`; the real file is closed by `atomic_open`.
    closed = False

    def close(self) -> None:
        self.closed = True

    def writable(self) -> bool:
        return True


@contextlib.contextmanager
def atomic_open(url: str) -> Iterator[HashingWriter]:
    """Open `url` for binary writing under a temporary sibling name; commit by rename on success.

    On any exception the temporary file is removed and `url` is left untouched.
    """
    fs, path = get_fs(url)
    parent = posixpath.dirname(path)
    if parent:
        fs.makedirs(parent, exist_ok=True)
    tmp = posixpath.join(parent, f"{TMP_PREFIX}{uuid.uuid4().hex[:12]}.{posixpath.basename(path)}")
    try:
        with fs.open(tmp, "wb") as raw:
            writer = HashingWriter(raw)
            yield writer
        fs.mv(tmp, path)
    except BaseException:
        with contextlib.suppress(Exception):
            fs.rm(tmp)
        raise


def write_bytes_atomic(url: str, data: bytes) -> str:
    """Write `data` atomically; returns its sha256."""
    with atomic_open(url) as f:
        f.write(data)
    return f.hexdigest()


def write_json_atomic(url: str, obj: Any) -> None:
    write_bytes_atomic(url, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())


def read_json(url: str) -> Any:
    fs, path = get_fs(url)
    with fs.open(path, "rb") as f:
        raw = f.read()
    try:
        return json.loads(raw)
    except json.JSONDecodeError as e:
        from kmim.errors import InputError

        raise InputError(url, f"not valid JSON ({e})") from None


def remove(url: str) -> None:
    """Delete one file at any fsspec URL."""
    filesystem, path = get_fs(url)
    filesystem.rm(path)


def sha256_of(url: str, chunk: int = 1 << 22) -> str:
    fs, path = get_fs(url)
    h = hashlib.sha256()
    with fs.open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def remove_stale_temporaries(url: str) -> int:
    """Delete temporary files a killed writer left in directory `url`; returns how many."""
    fs, path = get_fs(url)
    if not fs.exists(path):
        return 0
    stale = [p for p in fs.ls(path, detail=False) if posixpath.basename(p).startswith(TMP_PREFIX)]
    for p in stale:
        fs.rm(p)
    return len(stale)
