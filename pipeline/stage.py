"""What every shard-at-a-time stage shares: claiming an output folder, resuming, and the manifest.

An output folder belongs to one stage fingerprint (inputs + config + version), recorded in
`_stage.json` when the stage starts. Per shard, the worker commits its output file and then
`<shard>_stats.json`; the driver writes `manifest.json` after every shard is committed.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

from kmim import fs
from kmim.contract.manifest import InputRef, StageManifest
from kmim.data.reader import ShardRef
from kmim.errors import InputError, KmimError

log = logging.getLogger(__name__)

STAGE_CLAIM = "_stage.json"


class StageFailed(KmimError):
    """Some shards failed after their retries; committed shards stay, a rerun retries the rest."""


@dataclass
class StageOutput:
    url: str
    stage: str
    manifest: StageManifest  # not yet written unless `finished`
    finished: bool = False

    def stats_url(self, shard_name: str) -> str:
        return fs.join(self.url, f"{shard_name}_stats.json")

    def committed(self, shard: ShardRef) -> dict | None:
        """The shard's stats if it was committed by a run with this fingerprint."""
        url = self.stats_url(shard.name)
        if not fs.exists(url):
            return None
        stats = fs.read_json(url)
        if stats.get("fingerprint") != self.manifest.fingerprint:
            return None
        if not fs.exists(fs.join(self.url, stats["output"]["url"])):
            return None
        return stats


@dataclass
class StageResult:
    manifest: StageManifest
    ran: bool  # False when the output was already complete and nothing was done


def claim_output(url: str, stage: str, config: dict, inputs: list[InputRef]) -> StageOutput:
    """Open `url` for this stage run: finished (same fingerprint), resumable, or refused (different)."""
    manifest = StageManifest.build(stage, config, inputs)
    existing = StageManifest.read_if_committed(url)
    if existing is not None:
        if existing.fingerprint == manifest.fingerprint:
            return StageOutput(url, stage, existing, finished=True)
        raise InputError(url, f"already holds a finished {existing.stage} run with other inputs or config "
                              f"(fingerprint {existing.fingerprint[:12]} vs {manifest.fingerprint[:12]}); use another output")
    claim_url = fs.join(url, STAGE_CLAIM)
    if fs.exists(claim_url):
        claim = fs.read_json(claim_url)
        if claim.get("fingerprint") != manifest.fingerprint:
            raise InputError(url, f"holds an unfinished {claim.get('stage')} run with other inputs or config "
                                  f"(fingerprint {str(claim.get('fingerprint'))[:12]}); use another output or delete it")
        log.info("%s: resuming the unfinished run in %s", stage, url)
    else:
        fs.makedirs(url)
        fs.write_json_atomic(claim_url, {"stage": stage, "fingerprint": manifest.fingerprint, "config": config})
    removed = fs.remove_stale_temporaries(url)
    if removed:
        log.info("%s: removed %d partial files left by a killed run", stage, removed)
    return StageOutput(url, stage, manifest)


def sum_seconds(stats: list[dict]) -> dict[str, float]:
    total: dict[str, float] = {}
    for s in stats:
        for k, v in s.get("seconds", {}).items():
            total[k] = round(total.get(k, 0.0) + v, 3)
    return total


def finish_stage(out: StageOutput, shards: list[ShardRef], shard_stats: dict[str, dict], failed: dict[str, str],
                 extra_stats: dict[str, Any], wall_seconds: float) -> StageManifest:
    """Write the manifest if every shard is committed; otherwise raise StageFailed listing the failures."""
    if failed:
        lines = "; ".join(f"{name}: {err}" for name, err in sorted(failed.items()))
        fs.write_json_atomic(fs.join(out.url, "_failures.json"), failed)
        raise StageFailed(f"{out.stage}: {len(failed)} of {len(shards)} shards failed after retries ({lines}); "
                          f"rerun the same command to retry them")
    ordered = [shard_stats[s.name] for s in shards]
    skipped = [item for s in ordered for item in s.get("skipped", [])]
    m = out.manifest
    m.outputs = [{"shard": s["shard"], **s["output"]} for s in ordered]
    m.stats = {
        "shards": len(ordered),
        "samples": sum(s["samples"] for s in ordered),
        "num_skipped": len(skipped),
        "skipped": skipped,
        "seconds": sum_seconds(ordered),
        "wall_seconds": round(wall_seconds, 3),
        **extra_stats,
    }
    m.created_at = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    if fs.exists(fs.join(out.url, "_failures.json")):  # failures of an earlier attempt, now retried
        fs.remove(fs.join(out.url, "_failures.json"))
    m.write(out.url)
    return m
