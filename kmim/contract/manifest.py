"""Stage manifests: what a stage made, from what, with which config. Written last = the commit marker.

A stage's fingerprint hashes the fingerprint of its inputs (shard urls, sizes, sha256 or etag), its
config and the package version; identical fingerprints mean interchangeable outputs.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass, field, is_dataclass
from typing import Any

from kmim import __version__, fs
from kmim.contract.schemas import FORMAT_VERSION
from kmim.errors import InputError

MANIFEST_NAME = "manifest.json"


def canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def digest(obj: Any) -> str:
    return hashlib.sha256(canonical_json(obj).encode()).hexdigest()


@dataclass(frozen=True)
class InputRef:
    """One input file as the fingerprint sees it: sha256 when known, else the store's etag."""

    url: str
    size: int
    sha256: str | None = None
    etag: str | None = None

    def identity(self) -> dict:
        # The url is part of the identity by name only: the same bytes moved elsewhere keep the hash.
        return {"name": fs.basename(self.url), "size": self.size, "sha256": self.sha256, "etag": self.etag}


def fingerprint_inputs(inputs: list[InputRef]) -> str:
    return digest([i.identity() for i in inputs])


def stage_fingerprint(stage: str, input_fingerprint: str, config: Any) -> str:
    """The one fingerprint of a stage's output, used by the stage itself (`claim_output`) and by `kmim run`.

    `config` is a config dataclass (its `fingerprint_config`: execution-only fields left out) or the dict a
    stage derived from one. A file is identified by its content: where a dict holds `X` and `X_sha256`, the
    path `X` is left out (a moved weights file changes nothing, replaced bytes change everything)."""
    from kmim.contract.config import fingerprint_config

    if is_dataclass(config):
        config = fingerprint_config(config)
    return digest(
        {"stage": stage, "inputs": input_fingerprint, "config": by_content(config), "version": __version__}
    )


def by_content(obj: Any) -> Any:
    """`obj` without the paths of files whose sha256 sits next to them."""
    if isinstance(obj, dict):
        return {k: by_content(v) for k, v in obj.items() if not obj.get(f"{k}_sha256")}
    if isinstance(obj, list):
        return [by_content(v) for v in obj]
    return obj


@dataclass
class StageManifest:
    stage: str
    config: dict
    inputs: list[dict]
    input_fingerprint: str
    fingerprint: str
    outputs: list[dict] = field(default_factory=list)
    stats: dict = field(default_factory=dict)
    kmim_version: str = __version__
    format_version: int = FORMAT_VERSION
    created_at: str = field(default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))

    @classmethod
    def build(cls, stage: str, config: dict, inputs: list[InputRef], **kw: Any) -> StageManifest:
        input_fp = fingerprint_inputs(inputs)
        return cls(
            stage=stage,
            config=config,
            inputs=[asdict(i) for i in inputs],
            input_fingerprint=input_fp,
            fingerprint=stage_fingerprint(stage, input_fp, config),
            **kw,
        )

    def write(self, out_dir: str) -> None:
        fs.write_json_atomic(fs.join(out_dir, MANIFEST_NAME), asdict(self))

    @classmethod
    def read(cls, out_dir: str) -> StageManifest:
        url = fs.join(out_dir, MANIFEST_NAME)
        d = fs.read_json(url)
        if d.get("format_version", FORMAT_VERSION) > FORMAT_VERSION:
            raise InputError(url, f"format_version {d['format_version']} is newer than this kmim understands")
        try:
            return cls(**d)
        except TypeError as e:
            raise InputError(url, f"not a stage manifest ({e})") from None

    @classmethod
    def read_if_committed(cls, out_dir: str) -> StageManifest | None:
        return cls.read(out_dir) if fs.exists(fs.join(out_dir, MANIFEST_NAME)) else None
