"""Shard-at-a-time execution on Ray actors, with bounded retries and durable progress.

A stage gives a worker class whose `process(shard)` returns a `ShardResult` (ok, the shard's `ShardStats`,
or the error) rather than raising (img2dataset's convention). Each worker writes its shard's output and
then its per-shard stats file (`ShardStats.commit`), the shard's commit marker; shards already committed
are skipped, so a killed stage resumes where it stopped. Failed shards are retried up to `max_retries`
times (a dead worker is replaced), then reported.
"""

from __future__ import annotations

import base64
import logging
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import ray
from ray.exceptions import RayActorError, RayTaskError, WorkerCrashedError

from kmim import fs
from kmim.contract.views import key_hash
from kmim.data.reader import ReadStats, ShardRef
from kmim.progress import ProgressReporter

log = logging.getLogger(__name__)

STATS_SUFFIX = "_stats.json"  # `<shard>_stats.json`: a shard's stats, written last (its commit marker)
_COMMON = ("shard", "input", "fingerprint", "samples", "num_skipped", "skipped", "seconds", "output")


KEY_HASHES = "key_hashes"  # a shard's sample keys, hashed: how a stage finds a key in two shards


def encode_key_hashes(keys: list[str]) -> str:
    """The sorted 64-bit hashes of a shard's keys as base64 (8 bytes a sample: 107 KB for 10,000)."""
    hashes = np.sort(np.array([key_hash(k) for k in keys], dtype=np.uint64))
    return base64.b64encode(hashes.astype("<u8").tobytes()).decode()


def decode_key_hashes(text: str) -> np.ndarray:
    return np.frombuffer(base64.b64decode(text), dtype="<u8")


def stats_name(shard_name: str) -> str:
    return f"{shard_name}{STATS_SUFFIX}"


@dataclass
class ShardStats:
    """One shard's stats, as `<shard>_stats.json` holds them (the same keys, in the same order, as kmim 0.1).

    `extra`: the stage's own keys (extract: `patches`, `dim`), written after `samples`. `arrays`: results
    kept in memory only, never written (tcas_report's token counts)."""

    shard: str
    input: str
    fingerprint: str
    samples: int
    num_skipped: int = 0
    skipped: list[dict] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)
    output: dict | None = None  # the committed output file: {"url", ...}; None when nothing is written
    extra: dict[str, Any] = field(default_factory=dict)
    arrays: dict[str, np.ndarray] = field(default_factory=dict, repr=False)

    def to_json(self) -> dict:
        return {
            "shard": self.shard,
            "input": self.input,
            "fingerprint": self.fingerprint,
            "samples": self.samples,
            **self.extra,
            "num_skipped": self.num_skipped,
            "skipped": self.skipped,
            "seconds": self.seconds,
            "output": self.output,
        }

    @classmethod
    def of_read(
        cls,
        shard: ShardRef,
        fingerprint: str,
        read: ReadStats,
        seconds: dict[str, float],
        start: float,
        output: dict | None,
        **extra: Any,
    ) -> ShardStats:
        """A worker's stats for one shard: what it read and skipped, its timings (plus the total since
        `start`, a perf_counter reading) and the file it committed."""
        timings = {
            **{k: round(v, 4) for k, v in seconds.items()},
            "total": round(time.perf_counter() - start, 4),
        }
        return cls(
            shard=shard.name,
            input=shard.url,
            fingerprint=fingerprint,
            samples=read.samples,
            num_skipped=read.num_skipped,
            skipped=read.skipped,
            seconds=timings,
            output=output,
            extra={**extra, KEY_HASHES: encode_key_hashes(read.keys)},
        )

    @classmethod
    def from_json(cls, d: dict) -> ShardStats:
        return cls(
            shard=d["shard"],
            input=d["input"],
            fingerprint=d["fingerprint"],
            samples=int(d["samples"]),
            num_skipped=int(d.get("num_skipped", 0)),
            skipped=list(d.get("skipped", [])),
            seconds=dict(d.get("seconds", {})),
            output=d.get("output"),
            extra={k: v for k, v in d.items() if k not in _COMMON},
        )

    def commit(self, out_url: str) -> None:
        """Write `<shard>_stats.json` into `out_url`: call it after the shard's output is complete."""
        fs.write_json_atomic(fs.join(out_url, stats_name(self.shard)), self.to_json())


@dataclass
class ShardResult:
    """What a worker answers for one shard: its stats, or why it failed (`fatal`: stop the stage now)."""

    ok: bool
    stats: ShardStats | None = None
    error: str | None = None
    fatal: bool = False


@dataclass
class StageRun:
    done: dict[str, ShardStats] = field(default_factory=dict)  # shard name -> stats, this run
    reused: dict[str, ShardStats] = field(default_factory=dict)  # shard name -> stats, from an earlier run
    failed: dict[str, str] = field(default_factory=dict)  # shard name -> last error
    retries: int = 0

    @property
    def all_stats(self) -> dict[str, ShardStats]:
        return {**self.reused, **self.done}

    def counts(self) -> dict[str, int]:
        """The manifest's `shards_reused`, `shards_run` and `retries`."""
        return {"shards_reused": len(self.reused), "shards_run": len(self.done), "retries": self.retries}


class ShardWorker:
    """Base of stage actors. Subclasses implement `setup(*args)` and `process_shard(shard) -> stats`.

    A setup error (a model that does not load, say) would otherwise kill the actor and lose its message;
    here it comes back with the first shard as a fatal result that stops the stage at once.
    """

    def __init__(self, *args: Any):
        self.setup_error: str | None = None
        try:
            self.setup(*args)
        except Exception as e:  # noqa: BLE001 - reported by the driver
            self.setup_error = f"{type(e).__name__}: {e}"

    def setup(self, *args: Any) -> None:
        raise NotImplementedError

    def process_shard(self, shard: ShardRef) -> ShardStats:
        raise NotImplementedError

    def process(self, shard: ShardRef) -> ShardResult:
        if self.setup_error is not None:
            return ShardResult(False, error=f"worker setup failed: {self.setup_error}", fatal=True)
        try:
            return ShardResult(True, stats=self.process_shard(shard))
        except Exception as e:  # noqa: BLE001 - reported per shard, retried by the driver
            log.debug("shard %s failed:\n%s", shard.name, traceback.format_exc())
            return ShardResult(False, error=f"{type(e).__name__}: {e}")


def _process_in_task(worker_cls: type, worker_args: tuple, shard: ShardRef) -> ShardResult:
    return worker_cls(*worker_args).process(shard)


def run_shards(
    description: str,
    shards: list[ShardRef],
    worker_cls: type,
    worker_args: tuple[Any, ...],
    *,
    committed: Callable[[ShardRef], ShardStats | None],
    num_workers: int,
    ray_options: dict[str, Any],
    use_actors: bool = True,
    max_retries: int = 2,
    count_items: Callable[[ShardStats], int] = lambda s: s.samples,
) -> StageRun:
    """Process every uncommitted shard with at most `num_workers` in flight.

    `use_actors`: one long-lived actor per worker, for workers that load something once (a model).
    Otherwise one Ray task per shard, which reuses Ray's warm worker processes.
    """
    run = StageRun()
    todo: list[tuple[ShardRef, int]] = []
    for shard in shards:
        stats = committed(shard)
        if stats is not None:
            run.reused[shard.name] = stats
        else:
            todo.append((shard, 0))
    if not todo:
        return run
    if use_actors:
        remote_cls = ray.remote(**ray_options)(worker_cls)

        def new_worker() -> Any:
            return remote_cls.remote(*worker_args)

        def submit(worker: Any, shard: ShardRef) -> ray.ObjectRef:
            return worker.process.remote(shard)

        def discard(worker: Any) -> None:
            ray.kill(worker, no_restart=True)
    else:
        remote_fn = ray.remote(**ray_options)(_process_in_task)

        def new_worker() -> Any:
            return None  # a slot: tasks need no handle

        def submit(worker: Any, shard: ShardRef) -> ray.ObjectRef:
            return remote_fn.remote(worker_cls, worker_args, shard)

        def discard(worker: Any) -> None:
            return None

    idle = [new_worker() for _ in range(min(num_workers, len(todo)))]
    in_flight: dict[ray.ObjectRef, tuple[Any, ShardRef, int]] = {}
    with ProgressReporter(description, len(todo), unit="shards", item="images") as progress:
        while todo or in_flight:
            while todo and idle:
                shard, attempt = todo.pop(0)
                worker = idle.pop()
                in_flight[submit(worker, shard)] = (worker, shard, attempt)
            ready, _ = ray.wait(list(in_flight), num_returns=1)
            worker, shard, attempt = in_flight.pop(ready[0])
            try:
                result = ray.get(ready[0])
                idle.append(worker)
            except (RayActorError, WorkerCrashedError) as e:
                result = ShardResult(False, error=f"worker died: {type(e).__name__}")
                discard(worker)
                idle.append(new_worker())
            except RayTaskError as e:
                result = ShardResult(False, error=str(e).splitlines()[-1] if str(e) else type(e).__name__)
                idle.append(worker)
            if result.ok:
                assert result.stats is not None, "a successful shard result carries its stats"
                run.done[shard.name] = result.stats
                progress.advance(1, count_items(result.stats))
            elif result.fatal:
                run.failed[shard.name] = str(result.error)
                todo.clear()
                for ref in in_flight:
                    ray.cancel(ref, force=True)
                idle.extend(w for w, _, _ in in_flight.values())
                in_flight.clear()
            elif attempt < max_retries:
                run.retries += 1
                log.warning(
                    "%s: shard %s failed (%s); retry %d/%d",
                    description,
                    shard.name,
                    result.error,
                    attempt + 1,
                    max_retries,
                )
                todo.append((shard, attempt + 1))
            else:
                log.error(
                    "%s: shard %s failed after %d attempts: %s",
                    description,
                    shard.name,
                    attempt + 1,
                    result.error,
                )
                run.failed[shard.name] = str(result.error)
                progress.advance(1, 0)
    for worker in idle:
        discard(worker)
    return run
