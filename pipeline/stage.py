"""What every shard-at-a-time stage shares: claiming an output folder, resuming, and the manifest.

An output folder belongs to one stage fingerprint (inputs + config + version), recorded in
`_stage.json` when the stage starts. Per shard, the worker commits its output file and then
`<shard>_stats.json`; the driver writes `manifest.json` after every shard is committed.

`run_shard_stage` is that driver for every shard-at-a-time stage (extract, tokenize): claim the output,
run the uncommitted shards on Ray with retries (pipeline/executor.py), then finish the manifest. A stage
supplies a `ShardStage`: its config, inputs, worker class and what it adds to the manifest.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from kmim import fs
from kmim.contract.config import fingerprint_config
from kmim.contract.manifest import InputRef, StageManifest
from kmim.contract.views import key_hash
from kmim.data.reader import ReadStats, ShardRef, iter_samples
from kmim.errors import InputError, KmimError
from kmim.lock import Lock, take_lock
from kmim.pipeline.executor import (
    KEY_HASHES,
    ShardStats,
    StageRun,
    decode_key_hashes,
    run_shards,
    stats_name,
)
from kmim.pipeline.ray_runtime import ray_session, worker_count

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
    lock: Lock | None = None  # held while this process writes the folder (kmim/lock.py)

    def release(self) -> None:
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    def stats_url(self, shard_name: str) -> str:
        return fs.join(self.url, stats_name(shard_name))

    def committed(self, shard: ShardRef) -> ShardStats | None:
        """The shard's stats if it was committed by a run with this fingerprint."""
        url = self.stats_url(shard.name)
        if not fs.exists(url):
            return None
        stats = fs.read_json(url)
        if stats.get("fingerprint") != self.manifest.fingerprint:
            return None
        if not fs.exists(fs.join(self.url, stats["output"]["url"])):
            return None
        return ShardStats.from_json(stats)


@dataclass
class StageResult:
    manifest: StageManifest
    ran: bool  # False when the output was already complete and nothing was done


def claim_output(
    url: str, stage: str, config: Any, inputs: list[InputRef], derived: dict | None = None
) -> StageOutput:
    """Open `url` for this stage run: finished (same fingerprint), resumable, or refused (different).

    The fingerprinted config is `fingerprint_config(config)` (the one rule `kmim run` uses too), plus what
    the stage derives from its inputs (`derived`: tokenize's codebook identity)."""
    manifest = StageManifest.build(stage, {**fingerprint_config(config), **(derived or {})}, inputs)
    existing = StageManifest.read_if_committed(url)
    if existing is not None:
        if existing.fingerprint == manifest.fingerprint:
            return StageOutput(url, stage, existing, finished=True)
        raise InputError(
            url,
            f"already holds a finished {existing.stage} run with other inputs or config "
            f"(fingerprint {existing.fingerprint[:12]} vs {manifest.fingerprint[:12]}); use another output",
        )
    lock = take_lock(url, f"kmim pipeline {stage}")  # a second writer is refused here, naming the first
    claim_url = fs.join(url, STAGE_CLAIM)
    if fs.exists(claim_url):
        claim = fs.read_json(claim_url)
        if claim.get("fingerprint") != manifest.fingerprint:
            lock.release()
            raise InputError(
                url,
                f"holds an unfinished {claim.get('stage')} run with other inputs or config "
                f"(fingerprint {str(claim.get('fingerprint'))[:12]}); use another output or delete it",
            )
        log.info("%s: resuming the unfinished run in %s", stage, url)
    else:
        fs.write_json_atomic(
            claim_url, {"stage": stage, "fingerprint": manifest.fingerprint, "config": manifest.config}
        )
    removed = fs.remove_stale_temporaries(url)
    if removed:
        log.info("%s: removed %d partial files left by a killed run", stage, removed)
    return StageOutput(url, stage, manifest, lock=lock)


def sum_seconds(stats: list[ShardStats]) -> dict[str, float]:
    total: dict[str, float] = {}
    for s in stats:
        for k, v in s.seconds.items():
            total[k] = round(total.get(k, 0.0) + v, 3)
    return total


def finish_stage(
    out: StageOutput,
    shards: list[ShardRef],
    shard_stats: dict[str, ShardStats],
    failed: dict[str, str],
    extra_stats: dict[str, Any],
    wall_seconds: float,
) -> StageManifest:
    """Write the manifest if every shard is committed; otherwise raise StageFailed listing the failures."""
    if failed:
        lines = "; ".join(f"{name}: {err}" for name, err in sorted(failed.items()))
        fs.write_json_atomic(fs.join(out.url, "_failures.json"), failed)
        out.release()
        raise StageFailed(
            f"{out.stage}: {len(failed)} of {len(shards)} shards failed after retries ({lines}); "
            f"rerun the same command to retry them"
        )
    ordered = [shard_stats[s.name] for s in shards]
    skipped = [item for s in ordered for item in s.skipped]
    m = out.manifest
    m.outputs = [{"shard": s.shard, **(s.output or {})} for s in ordered]
    m.stats = {
        "shards": len(ordered),
        "samples": sum(s.samples for s in ordered),
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
    out.release()
    return m


def check_unique_keys(stage: str, shards: list[ShardRef], stats: dict[str, ShardStats]) -> None:
    """Refuse a key found in two shards: one line naming the key and both shards, before any manifest.

    A shard drops its own repeated keys as skips (kmim/data/reader.py); across shards, which run in
    parallel, the first copy cannot be chosen, and both would be trained on and counted twice by TCAS."""
    hashes, owner = [], []
    for i, shard in enumerate(shards):
        text = stats[shard.name].extra.get(KEY_HASHES)
        if text is None:  # committed by kmim <= 0.2, which did not record keys
            continue
        h = decode_key_hashes(text)
        hashes.append(h)
        owner.append(np.full(len(h), i))
    if not hashes:
        return
    flat, who = np.concatenate(hashes), np.concatenate(owner)
    order = np.argsort(flat, kind="stable")
    flat, who = flat[order], who[order]
    repeated = np.flatnonzero(flat[1:] == flat[:-1])
    if len(repeated) == 0:
        return
    first, second = shards[who[repeated[0]]], shards[who[repeated[0] + 1]]
    wanted = int(flat[repeated[0]])
    key = next((s.key for s in iter_samples(first, ReadStats()) if key_hash(s.key) == wanted), "<unreadable>")
    raise InputError(
        second.url,
        f"{stage}: sample key {key!r} is also in {first.url} ({len(repeated)} keys are in two shards); "
        f"keys must be unique across a dataset, or the sample is trained on and counted twice",
    )


# --- the shard-at-a-time stage template ------------------------------------------------------------


@dataclass
class ShardStage:
    """What one shard-at-a-time stage gives `run_shard_stage`.

    `config` is the stage's config dataclass: `claim_output` fingerprints it (with `derived`, the values the
    stage derives from its inputs), and its `cpus_per_worker`, `gpus_per_worker` and `max_retries` place and
    retry the workers. `worker_args(fingerprint)` are the arguments of `worker.setup`. `summarize(run)` runs
    once every shard is committed: it may write the stage's own files and returns the manifest's extra stats.
    """

    stage: str
    config: Any
    shards: list[ShardRef]
    worker: type  # a ShardWorker subclass (pipeline/executor.py)
    worker_args: Callable[[str], tuple[Any, ...]]
    saved_config: dict  # written as config.json
    summarize: Callable[[StageRun], dict[str, Any]]
    derived: dict | None = None
    use_actors: bool = True
    committed: Callable[[StageOutput, ShardRef], ShardStats | None] = field(default=StageOutput.committed)


def run_shard_stage(spec: ShardStage, output: str, address: str | None = None) -> StageResult:
    """Run (or resume) a shard-at-a-time stage; an already complete output is returned as it is."""
    c = spec.config
    out = claim_output(output, spec.stage, c, [s.input_ref() for s in spec.shards], derived=spec.derived)
    if out.finished:
        log.info(
            "%s: %s is already complete (%d shards); nothing to do",
            spec.stage,
            output,
            len(out.manifest.outputs),
        )
        return StageResult(out.manifest, ran=False)
    try:
        fs.write_json_atomic(fs.join(output, "config.json"), spec.saved_config)
        start = time.monotonic()
        with ray_session(address) as resources:
            run = run_shards(
                spec.stage,
                spec.shards,
                spec.worker,
                spec.worker_args(out.manifest.fingerprint),
                committed=lambda shard: spec.committed(out, shard),
                num_workers=worker_count(resources, c.cpus_per_worker, c.gpus_per_worker, len(spec.shards)),
                max_retries=c.max_retries,
                use_actors=spec.use_actors,
                ray_options={"num_cpus": c.cpus_per_worker, "num_gpus": c.gpus_per_worker},
            )
        if run.reused:
            log.info("%s: %d shards were already committed by an earlier run", spec.stage, len(run.reused))
        if run.failed:  # raises StageFailed, naming them; committed shards stay for the rerun
            finish_stage(out, spec.shards, run.all_stats, run.failed, {}, time.monotonic() - start)
        check_unique_keys(spec.stage, spec.shards, run.all_stats)
        extra = spec.summarize(run)
        manifest = finish_stage(out, spec.shards, run.all_stats, {}, extra, time.monotonic() - start)
    finally:
        out.release()  # finish_stage released it already unless something raised on the way
    return StageResult(manifest, ran=True)
