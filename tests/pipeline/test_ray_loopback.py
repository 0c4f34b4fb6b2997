"""The embedded Ray listens on loopback only: every listening socket of its processes is 127.0.0.1."""

import os
from pathlib import Path

import ray

LOOPBACK = {"0100007F", "0000000000000000FFFF00000100007F"}  # 127.0.0.1 as /proc/net/tcp{,6} print it


def _descendants(root: int) -> set[int]:
    parent = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parent[int(stat.parent.name)] = int(fields[1])
    found, frontier = set(), {root}
    while frontier:
        frontier = {p for p, pp in parent.items() if pp in frontier} - found
        found |= frontier
    return found


def _listening_inodes() -> dict[str, str]:
    inodes = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            cols = line.split()
            if cols[3] == "0A":  # LISTEN
                inodes[cols[9]] = cols[1].split(":")[0]
    return inodes


def test_embedded_ray_listens_on_loopback_only(ray_local):
    @ray.remote
    def touch() -> int:
        return os.getpid()

    ray.get([touch.remote() for _ in range(2)])  # workers up, with their own ports
    listening = _listening_inodes()
    seen = {}
    for pid in _descendants(os.getpid()):
        try:
            links = [os.readlink(fd) for fd in Path(f"/proc/{pid}/fd").iterdir()]
        except OSError:
            continue
        for link in links:
            if link.startswith("socket:[") and link[8:-1] in listening:
                seen[(pid, (Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0]).decode())] = listening[
                    link[8:-1]
                ]
    assert len(seen) >= 3, seen  # GCS, raylet and workers at least
    assert {addr for addr in seen.values()} <= LOOPBACK, {k: v for k, v in seen.items() if v not in LOOPBACK}
