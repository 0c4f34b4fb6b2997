"""One writer per output: a `_lock.json` in the folder names its holder (pid, host, start time).

A second writer is refused with a message naming the holder. A lock whose process is gone (same host, pid
no longer running) is taken over. Child processes of the holder (the DDP ranks `kmim run --nproc` starts)
inherit `KMIM_LOCK_IDS` and pass. On object stores the file is written then read back: two writers
starting within the same instant on S3 are not excluded, anything slower is.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
import uuid
from collections.abc import Iterator

from kmim import fs
from kmim.errors import KmimError

LOCK_NAME = "_lock.json"
ENV = "KMIM_LOCK_IDS"


class LockedError(KmimError):
    """Another live process writes to this output."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _inherited() -> set[str]:
    return set(filter(None, os.environ.get(ENV, "").split(",")))


def _read(url: str) -> dict | None:
    try:
        return fs.read_json(url)
    except (FileNotFoundError, KmimError):
        return None


def _create_exclusive(url: str, holder: dict) -> bool:
    filesystem, path = fs.get_fs(url)
    data = json.dumps(holder).encode()
    if fs.protocol_of(filesystem) in ("file", "local"):
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        return True
    if filesystem.exists(path):
        return False
    filesystem.pipe_file(path, data)
    return (_read(url) or {}).get("id") == holder["id"]


class Lock:
    """A held lock; `release()` removes the file if it is still ours (a crash leaves it to be taken over)."""

    def __init__(self, url: str, holder: dict | None):
        self.url, self.holder = url, holder  # holder None: held by this process or its parent already

    def release(self) -> None:
        if self.holder is None:
            return
        ids = _inherited() - {self.holder["id"]}
        os.environ[ENV] = ",".join(sorted(ids))
        if (_read(self.url) or {}).get("id") == self.holder["id"]:
            fs.remove(self.url)
        self.holder = None


def take_lock(folder: str, what: str) -> Lock:
    """Take `folder`'s lock, or raise LockedError naming the live process that holds it."""
    fs.makedirs(folder)
    url = fs.join(folder, LOCK_NAME)
    holder = {
        "id": uuid.uuid4().hex,
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "what": what,
    }
    for _ in range(3):
        if _create_exclusive(url, holder):
            os.environ[ENV] = ",".join(sorted(_inherited() | {holder["id"]}))  # children of ours pass
            return Lock(url, holder)
        current = _read(url)
        if current is None:
            continue  # removed between our two looks
        if current.get("id") in _inherited() or (
            current.get("pid") == os.getpid() and current.get("host") == holder["host"]
        ):
            return Lock(url, None)  # our parent's or our own lock: this process is part of that writer
        if current.get("host") == holder["host"] and not _alive(int(current.get("pid", -1))):
            fs.remove(url)  # its process is gone: take the lock over
            continue
        raise LockedError(
            f"{folder}: in use by {current.get('what', 'another kmim process')} (pid "
            f"{current.get('pid')} on {current.get('host')} since {current.get('started_at')}); "
            f"wait for it to finish, or delete {url} if that process is gone"
        )
    raise LockedError(f"{folder}: could not take {url} after 3 attempts")


@contextlib.contextmanager
def output_lock(folder: str, what: str) -> Iterator[None]:
    """Hold `folder`'s lock for the block."""
    lock = take_lock(folder, what)
    try:
        yield
    finally:
        lock.release()
