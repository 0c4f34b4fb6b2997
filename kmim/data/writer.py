"""Writing a dataset of WebDataset shards: numbered tars per split, a sidecar index, stats, config.

Order of commits: every tar (atomically), then `_stats.json` and `config.json`, then the indexes;
`shards.json` is the last file written and marks the dataset as complete.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field

from kmim import __version__, fs
from kmim.contract.schemas import INDEX_NAME, ShardEntry, ShardIndex
from kmim.data.reader import ReadStats
from kmim.data.tar import write_tar_shard
from kmim.progress import ProgressReporter

Sample = tuple[str, dict[str, bytes]]  # (key, {ext: bytes})


@dataclass
class DatasetWriteResult:
    out: str
    entries: list[ShardEntry] = field(default_factory=list)
    stats: ReadStats = field(default_factory=ReadStats)
    seconds: float = 0.0

    def samples(self, split: str | None = None) -> int:
        return sum(e.samples for e in self.entries if split is None or e.split == split)


def chunked(items: list, size: int) -> list[list]:
    return [items[i : i + size] for i in range(0, len(items), size)]


class ShardedDatasetWriter:
    """Writes shards `{split}-{n:06d}.tar` into `out`; call `finish` once all splits are written."""

    def __init__(self, out: str, command: str, config: object):
        self.out = out.rstrip("/")
        self.command = command
        self.config = config
        self.result = DatasetWriteResult(out=self.out)
        self._start = time.monotonic()
        fs.makedirs(self.out)
        fs.remove_stale_temporaries(self.out)

    def write_split(
        self, split: str, shards: Iterable[Iterable[Sample]], progress: ProgressReporter | None = None
    ) -> None:
        for n, samples in enumerate(shards):
            with write_tar_shard(fs.join(self.out, f"{split}-{n:06d}.tar"), split=split) as sink:
                for key, members in samples:
                    sink.write(key, members)
            self.result.entries.append(sink.entry)  # type: ignore[attr-defined]
            self.result.stats.samples += sink.samples
            if progress is not None:
                progress.advance(1, sink.samples)

    def finish(self, kept: list[ShardEntry] | None = None) -> DatasetWriteResult:
        """Stats, config, then the indexes (`kept`: entries of other splits already in `out`, listed first)."""
        r = self.result
        r.seconds = time.monotonic() - self._start
        splits = sorted({e.split for e in r.entries if e.split})
        stats = {
            "command": self.command,
            "kmim_version": __version__,
            "seconds": round(r.seconds, 3),
            "shards": len(r.entries),
            "samples_per_split": {s: r.samples(s) for s in splits},
            **r.stats.to_json(),
            "samples": r.samples(),  # written shards, after the reader's own count
        }
        fs.write_json_atomic(fs.join(self.out, "_stats.json"), stats)
        fs.write_json_atomic(
            fs.join(self.out, "config.json"), {"command": self.command, **asdict(self.config)}
        )  # type: ignore[call-overload]
        write_indexes(self.out, (kept or []) + r.entries)
        return r


def write_indexes(out: str, entries: list[ShardEntry]) -> None:
    """`{split}.shards.json` per split, then `shards.json` with every shard (written last)."""
    for split in sorted({e.split for e in entries if e.split}):
        ShardIndex([e for e in entries if e.split == split]).write(fs.join(out, f"{split}.{INDEX_NAME}"))
    ShardIndex(list(entries)).write(fs.join(out, INDEX_NAME))


def summary_line(result: DatasetWriteResult) -> str:
    per_split = ", ".join(
        f"{s}: {result.samples(s)}" for s in sorted({e.split for e in result.entries if e.split})
    )
    return (
        f"wrote {result.samples()} samples in {len(result.entries)} shards ({per_split}) to {result.out} "
        f"in {result.seconds:.1f}s; skipped {result.stats.num_skipped}"
    )


def label_bytes(label: int) -> bytes:
    return str(int(label)).encode()
