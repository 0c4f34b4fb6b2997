"""Shard-at-a-time execution on Ray actors, with bounded retries and durable progress.

A stage gives a worker class whose `process(shard)` returns a result dict `{"ok": bool, "stats": ...,
"error": str}` rather than raising (img2dataset's convention). Each worker writes its shard's output and
then its per-shard stats file, the shard's commit marker; shards already committed are skipped, so a
killed stage resumes where it stopped. Failed shards are retried up to `max_retries` times (a dead
worker is replaced), then reported.
"""

from __future__ import annotations

import logging
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import ray
from ray.exceptions import RayActorError, RayTaskError, WorkerCrashedError

from kmim.data.reader import ShardRef
from kmim.progress import ProgressReporter

log = logging.getLogger(__name__)


@dataclass
class StageRun:
    done: dict[str, dict] = field(default_factory=dict)  # shard name -> stats, this run
    reused: dict[str, dict] = field(default_factory=dict)  # shard name -> stats, from an earlier run
    failed: dict[str, str] = field(default_factory=dict)  # shard name -> last error
    retries: int = 0

    @property
    def all_stats(self) -> dict[str, dict]:
        return {**self.reused, **self.done}


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

    def process_shard(self, shard: ShardRef) -> dict:
        raise NotImplementedError

    def process(self, shard: ShardRef) -> dict:
        if self.setup_error is not None:
            return {"ok": False, "fatal": True, "error": f"worker setup failed: {self.setup_error}"}
        try:
            return {"ok": True, "stats": self.process_shard(shard)}
        except Exception as e:  # noqa: BLE001 - reported per shard, retried by the driver
            log.debug("shard %s failed:\n%s", shard.name, traceback.format_exc())
            return {"ok": False, "error": f"{type(e).__name__}: {e}"}


def _process_in_task(worker_cls: type, worker_args: tuple, shard: ShardRef) -> dict:
    return worker_cls(*worker_args).process(shard)


def run_shards(
    description: str,
    shards: list[ShardRef],
    worker_cls: type,
    worker_args: tuple[Any, ...],
    *,
    committed: Callable[[ShardRef], dict | None],
    num_workers: int,
    ray_options: dict[str, Any],
    use_actors: bool = True,
    max_retries: int = 2,
    count_items: Callable[[dict], int] = lambda s: int(s.get("samples", 0)),
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
                result = {"ok": False, "error": f"worker died: {type(e).__name__}"}
                discard(worker)
                idle.append(new_worker())
            except RayTaskError as e:
                result = {"ok": False, "error": str(e).splitlines()[-1] if str(e) else type(e).__name__}
                idle.append(worker)
            if result["ok"]:
                run.done[shard.name] = result["stats"]
                progress.advance(1, count_items(result["stats"]))
            elif result.get("fatal"):
                run.failed[shard.name] = result["error"]
                todo.clear()
                for ref in in_flight:
                    ray.cancel(ref, force=True)
                idle.extend(w for w, _, _ in in_flight.values())
                in_flight.clear()
            elif attempt < max_retries:
                run.retries += 1
                log.warning("%s: shard %s failed (%s); retry %d/%d", description, shard.name, result["error"], attempt + 1, max_retries)
                todo.append((shard, attempt + 1))
            else:
                log.error("%s: shard %s failed after %d attempts: %s", description, shard.name, attempt + 1, result["error"])
                run.failed[shard.name] = result["error"]
                progress.advance(1, 0)
    for worker in idle:
        discard(worker)
    return run
