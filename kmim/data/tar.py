"""Deterministic WebDataset tar writing: same samples in, same bytes out (fixed mtime/owner/mode).

Shards are written under a temporary name and committed by rename, so a killed writer leaves no tar
that looks finished.
"""

from __future__ import annotations

import contextlib
import io
import posixpath
import tarfile
from collections.abc import Iterator

from kmim import fs
from kmim.contract.schemas import ShardEntry


def split_member(name: str) -> tuple[str, str] | None:
    """WebDataset's rule: key = path up to the first '.' of the basename, ext = the rest."""
    parent, base = posixpath.split(name)
    if "." not in base or base.startswith("."):
        return None
    stem, ext = base.split(".", 1)
    return posixpath.join(parent, stem), ext


def check_key(key: str) -> None:
    base = posixpath.basename(key)
    if not key or not base or "." in base:
        raise ValueError(f"sample key {key!r} is not usable in a WebDataset tar (empty or holds a '.')")
    if key.startswith("/") or any(part in ("", ".", "..") for part in key.removeprefix("./").split("/")):
        raise ValueError(f"sample key {key!r} would write outside the shard's own names (absolute or '..')")


class TarSink:
    """Appends samples to an open tar stream; one call per sample, members in a fixed order."""

    def __init__(self, tar: tarfile.TarFile):
        self._tar = tar
        self.samples = 0

    def write(self, key: str, members: dict[str, bytes]) -> None:
        check_key(key)
        for ext, data in members.items():
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size = len(data)
            info.mode = 0o444
            info.mtime = 0
            info.uname = info.gname = ""
            self._tar.addfile(info, io.BytesIO(data))
        self.samples += 1


@contextlib.contextmanager
def write_tar_shard(url: str, split: str | None = None) -> Iterator[TarSink]:
    """Write one shard atomically. After the `with` block, `sink.entry` describes the committed file."""
    with fs.atomic_open(url) as raw:
        with tarfile.open(fileobj=raw, mode="w|", format=tarfile.PAX_FORMAT) as tar:
            sink = TarSink(tar)
            yield sink
    sink.entry = ShardEntry(  # type: ignore[attr-defined]
        url=fs.basename(url), samples=sink.samples, bytes=raw.nbytes, sha256=raw.hexdigest(), split=split
    )
