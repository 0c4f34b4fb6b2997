"""What every bench shares: subject and reference timed in rotation, ratios with their spread, the machine.

A shared machine's speed drifts by 2-3x within minutes (the same k-means bench on the same commit gave
ours/faiss/sklearn 4.10/4.81/2.63 s per epoch once and 1.37/3.99/7.65 another time), so one subject run
against one reference run measures the neighbours as much as the code. `interleave` runs every case once
per round, always in the same order (A B C A B C ...), for at least 3 rounds; `Timings.ratio` takes the
ratio within each round (a subject against the reference timed next to it) and reports their median, min
and max. A ratio whose spread (max - min) / median exceeds the limit (default 0.25) is marked not
trustworthy, and its line says so instead of MET / NOT MET.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

SPREAD_LIMIT = 0.25
MIN_ROUNDS = 3
RESULTS_DIR = Path(__file__).resolve().parent / "results"

Case = Callable[[], float | None]


@dataclass(frozen=True)
class Ratio:
    """Per-round values of one ratio (each from one round of interleaved cases)."""

    name: str
    values: tuple[float, ...]
    limit: float = SPREAD_LIMIT  # spread above which the ratio is not trusted

    @property
    def rounds(self) -> int:
        return len(self.values)

    @property
    def median(self) -> float:
        return float(statistics.median(self.values))

    @property
    def min(self) -> float:
        return float(min(self.values))

    @property
    def max(self) -> float:
        return float(max(self.values))

    @property
    def spread(self) -> float:
        """(max - min) / median: 0 when every round agrees."""
        width = self.max - self.min
        if width == 0:
            return 0.0
        return width / abs(self.median) if self.median else math.inf

    @property
    def trustworthy(self) -> bool:
        return self.spread <= self.limit

    def met(self, target: str | None) -> bool | None:
        """Whether the median meets `target` ('<= 1.0', '>= 0.8', 'within 0.1 %' of 1); None: no target."""
        return target_met(self.median, target)

    def line(self, target: str | None = None) -> str:
        fmt = ".6f" if target and WITHIN.match(target) else ".3g"  # 'within 0.1 %' needs the digits
        head = (
            f"{self.name}: median {self.median:{fmt}} (min {self.min:{fmt}}, max {self.max:{fmt}}, "
            f"{self.rounds} rounds)"
        )
        if not self.trustworthy:
            verdict = f"SPREAD TOO WIDE ({self.spread:.2f}, limit {self.limit:g}) to trust"
        elif target is None:
            return f"{head} no target; spread {self.spread:.2f} (limit {self.limit:g})"
        else:
            verdict = (
                f"{'MET' if self.met(target) else 'NOT MET'} (spread {self.spread:.2f} <= {self.limit:g})"
            )
        return f"{head} target {target or 'none'}: {verdict}"

    def to_json(self, target: str | None = None) -> dict[str, Any]:
        return {
            "name": self.name,
            "median": self.median,
            "min": self.min,
            "max": self.max,
            "rounds": self.rounds,
            "values": list(self.values),
            "target": target,
            "met": self.met(target),
            "spread": self.spread if math.isfinite(self.spread) else None,
            "spread_limit": self.limit,
            "trustworthy": self.trustworthy,
        }


TARGET = re.compile(r"^\s*(<=|>=)\s*([0-9.eE+-]+)\s*x?\s*$")
WITHIN = re.compile(r"^\s*within\s+([0-9.eE+-]+)\s*%\s*$")


def target_met(value: float, target: str | None) -> bool | None:
    if target is None:
        return None
    if m := TARGET.match(target):
        bound = float(m.group(2))
        return value <= bound if m.group(1) == "<=" else value >= bound
    if m := WITHIN.match(target):
        return abs(value - 1.0) <= float(m.group(1)) / 100
    raise ValueError(f"target {target!r}: expected '<= X', '>= X' or 'within X %'")


@dataclass
class Timings:
    """Seconds per case per round, and the order the cases were called in."""

    seconds: dict[str, list[float]]
    order: list[str] = field(default_factory=list)
    limit: float = SPREAD_LIMIT

    @property
    def rounds(self) -> int:
        return min((len(v) for v in self.seconds.values()), default=0)

    def median(self, case: str) -> float:
        return float(statistics.median(self.seconds[case]))

    def ratio(
        self,
        subject: str,
        reference: str | Sequence[str],
        name: str | None = None,
        rate: bool = False,
        scale: float = 1.0,
    ) -> Ratio:
        """The subject against the reference in every round.

        rate=False: a time ratio, subject seconds / reference seconds (lower: the subject is faster).
        rate=True: a throughput ratio of equal work, reference seconds / subject seconds (higher: faster).
        Several references: the fastest of them in each round. `scale` multiplies every value (for work
        that differs between the two by a known factor)."""
        refs = [reference] if isinstance(reference, str) else list(reference)
        values = []
        for i in range(self.rounds):
            s = self.seconds[subject][i]
            r = min(self.seconds[ref][i] for ref in refs)
            values.append(scale * (r / s if rate else s / r))
        label = name or f"{subject}/{' or '.join(refs)}"
        return Ratio(label, tuple(values), self.limit)

    def to_json(self) -> dict[str, Any]:
        return {"seconds": self.seconds, "order": self.order}


def interleave(
    cases: dict[str, Case], rounds: int = MIN_ROUNDS, limit: float = SPREAD_LIMIT, verbose: bool = True
) -> Timings:
    """Run every case once per round, in the given order, for `rounds` rounds (at least 3).

    Each case returns the seconds it measured itself (say, seconds per epoch read from a stage's output)
    or None, in which case the whole call is timed."""
    if rounds < MIN_ROUNDS:
        raise ValueError(f"rounds = {rounds}: a spread needs at least {MIN_ROUNDS} rounds")
    t = Timings({name: [] for name in cases}, [], limit)
    for r in range(rounds):
        for name, case in cases.items():
            start = time.perf_counter()
            measured = case()
            elapsed = time.perf_counter() - start
            seconds = float(elapsed if measured is None else measured)
            t.seconds[name].append(seconds)
            t.order.append(name)
            if verbose:
                print(f"  round {r + 1}/{rounds} {name}: {seconds:.4g} s", file=sys.stderr, flush=True)
    return t


def machine() -> dict[str, Any]:
    """The machine as it is now: CPU model and count, load average, versions, date (UTC)."""
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        cpu = platform.processor() or "unknown"
    versions: dict[str, str | None] = {}
    for module in ("torch", "faiss", "numpy"):
        try:
            versions[module] = __import__(module).__version__
        except ImportError:
            versions[module] = None
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "cpu_model": cpu,
        "cpu_count": os.cpu_count(),
        "cpus_usable": usable,
        "load_start": list(os.getloadavg()),
        "load_end": None,  # filled by write_json
        "python": platform.python_version(),
        **versions,
        "platform": platform.platform(),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def command_line(module: str) -> str:
    return f"uv run python -m {module} {shlex.join(sys.argv[1:])}".strip()


def write_json(path: str | os.PathLike, result: dict[str, Any]) -> Path:
    """Write `result` as JSON (folders made); a `machine` entry gets its end-of-run load average here."""
    if isinstance(result.get("machine"), dict):
        result["machine"]["load_end"] = list(os.getloadavg())
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(p.name + ".tmp")
    tmp.write_text(json.dumps(result, indent=2, default=float) + "\n")
    tmp.replace(p)
    return p


def add_common_args(ap: argparse.ArgumentParser, name: str) -> None:
    ap.add_argument("--rounds", type=int, default=MIN_ROUNDS, help="interleaved rounds (at least 3)")
    ap.add_argument("--spread-limit", type=float, default=SPREAD_LIMIT, help="(max-min)/median to trust")
    ap.add_argument("--out", default=str(RESULTS_DIR / f"{name}.json"), help="where the JSON result goes")


class Result:
    """One bench's result: its parameters, the machine, every ratio with its target, written as JSON."""

    def __init__(self, bench: str, args: argparse.Namespace):
        self.bench = bench
        self.data: dict[str, Any] = {
            "bench": bench,
            "command": command_line(f"bench.{bench}"),
            "params": {k: v for k, v in vars(args).items() if k != "out"},
            "machine": machine(),
            "ratios": [],
            "rates": {},
            "timings": {},
            "info": {},
        }
        self.lines: list[str] = []

    def add(self, ratio: Ratio, target: str | None, note: str | None = None) -> Ratio:
        entry = ratio.to_json(target)
        if note:
            entry["note"] = note
        self.data["ratios"].append(entry)
        self.lines.append(ratio.line(target))
        print(self.lines[-1], flush=True)
        return ratio

    def timings(self, group: str, t: Timings) -> None:
        self.data["timings"][group] = t.to_json()

    def write(self, path: str | os.PathLike) -> Path:
        p = write_json(path, self.data)
        print(f"wrote {p}")
        return p
