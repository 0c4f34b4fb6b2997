"""Progress for long-running commands: a live bar on a terminal, periodic log lines elsewhere.

Both show items/s and an ETA; the non-terminal form keeps Ray job logs and CI output readable.
"""

from __future__ import annotations

import logging
import sys
import time

from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

log = logging.getLogger("kmim.progress")


def format_seconds(seconds: float) -> str:
    seconds = max(0, int(seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


class ProgressReporter:
    """Counts units of work (shards, steps) toward a total and items (images) as they go by."""

    def __init__(
        self,
        description: str,
        total: int,
        unit: str = "shards",
        item: str = "images",
        log_every: float = 10.0,
        live: bool | None = None,
    ):
        self.description, self.total, self.unit, self.item = description, total, unit, item
        self.done = 0
        self.items = 0
        self.start = time.monotonic()
        self._last_log = self.start
        self._log_every = log_every
        self._live = sys.stderr.isatty() if live is None else live
        self._bar: Progress | None = None
        self.note = ""  # free text shown after the rates, e.g. "loss 3.21, lr 1.2e-04"

    def __enter__(self) -> ProgressReporter:
        if self._live:
            self._bar = Progress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[rate]}"),
                TimeElapsedColumn(),
                TextColumn("ETA"),
                TimeRemainingColumn(),
                TextColumn("{task.fields[note]}"),
                transient=False,
            )
            self._bar.start()
            self._task = self._bar.add_task(self.description, total=self.total, rate="", note="")
        return self

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.stop()

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.start

    @property
    def rate(self) -> float:
        return self.items / self.elapsed if self.elapsed > 0 else 0.0

    def eta(self) -> float | None:
        if self.done == 0 or self.done >= self.total:
            return None if self.done == 0 else 0.0
        return self.elapsed / self.done * (self.total - self.done)

    def advance(self, units: int = 1, items: int = 0, note: str | None = None) -> None:
        self.done += units
        self.items += items
        if note is not None:
            self.note = note
        unit_rate = self.done / self.elapsed if self.elapsed > 0 else 0.0
        if self._bar is not None:
            self._bar.update(
                self._task,
                completed=self.done,
                note=self.note,
                rate=f"{unit_rate:.2f} {self.unit}/s, {self.rate:.1f} {self.item}/s",
            )
        now = time.monotonic()
        if not self._live and (now - self._last_log >= self._log_every or self.done >= self.total):
            self._last_log = now
            eta = self.eta()
            log.info(
                "%s: %d/%d %s (%.2f/s), %d %s, %.1f %s/s, ETA %s%s",
                self.description,
                self.done,
                self.total,
                self.unit,
                unit_rate,
                self.items,
                self.item,
                self.rate,
                self.item,
                format_seconds(eta) if eta is not None else "?",
                f", {self.note}" if self.note else "",
            )

    def summary(self) -> str:
        return (
            f"{self.description}: {self.done}/{self.total} {self.unit}, {self.items} {self.item} "
            f"in {format_seconds(self.elapsed)} ({self.rate:.1f} {self.item}/s)"
        )
