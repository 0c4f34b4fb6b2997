"""`kmim verify`: are a dataset's or a stage's files still the bytes their index and manifest recorded?

Run it after copying shards between stores. For a folder with `shards.json`: every shard exists with the
recorded size and sha256. For a stage folder with `manifest.json`: every output file likewise (sizes where
recorded). For a `kmim run` root: every stage folder under it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from kmim import fs
from kmim.contract.manifest import MANIFEST_NAME
from kmim.contract.schemas import INDEX_NAME, ShardIndex
from kmim.errors import InputError

RUN_STAGES = ("data", "extract", "cluster", "tokenize")


@dataclass
class VerifyReport:
    checked: int = 0
    bytes: int = 0
    problems: list[dict] = field(default_factory=list)  # {"file", "reason"}

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_json(self) -> dict:
        return {
            "ok": self.ok,
            "files_checked": self.checked,
            "bytes_checked": self.bytes,
            "problems": self.problems,
        }


def _check(report: VerifyReport, url: str, size: int | None, sha256: str | None) -> None:
    report.checked += 1
    if not fs.exists(url):
        report.problems.append({"file": url, "reason": "missing"})
        return
    filesystem, path = fs.get_fs(url)
    actual = int(filesystem.size(path))
    report.bytes += actual
    if size is not None and actual != size:
        report.problems.append({"file": url, "reason": f"size is {actual} bytes, recorded {size}"})
    elif sha256 and fs.sha256_of(url) != sha256:
        report.problems.append({"file": url, "reason": "sha256 differs from the recorded one"})


def _resolve(folder: str, url: str) -> str:
    return url if "://" in url or url.startswith("/") else fs.join(folder, url)


def verify_folder(folder: str, report: VerifyReport) -> bool:
    """One dataset or stage folder; False when it holds neither an index nor a manifest."""
    found = False
    if fs.exists(fs.join(folder, INDEX_NAME)):
        found = True
        for entry in ShardIndex.read(fs.join(folder, INDEX_NAME)).shards:
            _check(report, _resolve(folder, entry.url), entry.bytes, entry.sha256)
    if fs.exists(fs.join(folder, MANIFEST_NAME)):
        found = True
        indexed = set()
        if fs.exists(fs.join(folder, INDEX_NAME)):
            indexed = {e.url for e in ShardIndex.read(fs.join(folder, INDEX_NAME)).shards}
        for out in fs.read_json(fs.join(folder, MANIFEST_NAME)).get("outputs", []):
            if out.get("url") and out["url"] not in indexed:
                _check(report, _resolve(folder, out["url"]), out.get("bytes"), out.get("sha256"))
    return found


def verify(target: str) -> VerifyReport:
    report = VerifyReport()
    if verify_folder(target, report):
        return report
    folders = []
    for stage in RUN_STAGES:  # a `kmim run` root
        stage_dir = fs.join(target, stage)
        if fs.exists(stage_dir):
            filesystem, path = fs.get_fs(stage_dir)
            folders += [
                fs.join(stage_dir, p.rstrip("/").rsplit("/", 1)[-1])
                for p in sorted(filesystem.ls(path, detail=False))
            ]
    if not folders:
        raise InputError(
            target, f"nothing to verify: no {INDEX_NAME}, no {MANIFEST_NAME}, not a `kmim run` root"
        )
    for folder in folders:
        verify_folder(folder, report)
    return report
