"""Timing loops, memory probes and test data shared by every benchmark case.

Nothing here knows about a particular system: a case hands in callables.
Every loop is bounded twice, by a repetition count and by a time budget, so
a slow peer makes a run longer but never endless.
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import crc32c
import numpy as np

GB = 1e9
KIB = 1024
MIB = 1024 * 1024
GIB = 1024 * MIB


@dataclass(frozen=True)
class Budget:
    """How long one case may run: at least ``min_repeats``, then until
    ``seconds`` of timed work are spent; never more than ``max_repeats``, and
    no repetition starts once ``max_seconds`` are spent (a slow peer gets
    fewer repetitions rather than an endless run)."""

    seconds: float
    min_repeats: int
    max_repeats: int
    max_seconds: float

    def __post_init__(self) -> None:
        if self.seconds < 0 or self.min_repeats < 1 or self.max_repeats < self.min_repeats:
            raise ValueError("need seconds >= 0 and 1 <= min_repeats <= max_repeats")
        if self.max_seconds < self.seconds:
            raise ValueError("max_seconds must be >= seconds")

    def more(self, done: int, spent: float) -> bool:
        """Whether to run another repetition after ``done`` took ``spent`` seconds."""
        if done >= self.max_repeats or (done > 0 and spent >= self.max_seconds):
            return False
        return done < self.min_repeats or spent < self.seconds


def repeat(
    fn: Callable[[], object],
    budget: Budget,
    setup: Callable[[], object] | None = None,
) -> list[float]:
    """Seconds of each timed call of ``fn``; ``setup`` runs before each, untimed."""
    times: list[float] = []
    spent = 0.0
    while budget.more(len(times), spent):
        if setup is not None:
            setup()
        t0 = time.perf_counter()
        fn()
        dt = time.perf_counter() - t0
        times.append(dt)
        spent += dt
    return times


def rates(work: float, times: list[float]) -> tuple[float, float]:
    """(median, best) of ``work`` per second over the repetitions."""
    per = [work / t for t in times]
    return statistics.median(per), max(per)


def percentile(values: Iterable[float], q: float) -> float:
    """The ``q``-th percentile (0..100), nearest-rank; values need not be sorted."""
    s = sorted(values)
    if not s:
        raise ValueError("percentile of no values")
    rank = max(1, min(len(s), round(q / 100 * len(s) + 0.5)))
    return s[rank - 1]


# ---------------------------------------------------------------- memory
def proc_kib(pid: int | str, field: str) -> int | None:
    """A ``VmRSS``/``VmHWM``-style line of /proc/<pid>/status in KiB; None if unreadable."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def reset_peak(pid: int | str) -> bool:
    """Reset a process's VmHWM to its current RSS (Linux: "5" > clear_refs).

    Lets one long-lived process report the peak of each case separately.
    Returns False where the kernel or permissions do not allow it.
    """
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return True


def mem_available() -> int | None:
    """MemAvailable of /proc/meminfo in bytes; None where there is none."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * KIB
    except (OSError, ValueError, IndexError):
        return None
    return None


def loadavg() -> float:
    return os.getloadavg()[0]


# ---------------------------------------------------------------- data
def random_array(nbytes: int, seed: int) -> np.ndarray:
    """Random uint8 data (writable, C-contiguous), generated once per size."""
    rng = np.random.default_rng(seed)
    out = np.empty(nbytes, np.uint8)
    step = 64 * MIB
    for off in range(0, nbytes, step):
        n = min(step, nbytes - off)
        out[off : off + n] = np.frombuffer(rng.bytes(n), np.uint8)
    return out


def checksum(a: np.ndarray) -> int:
    """CRC32C of an array's bytes; compares results without keeping the source."""
    return crc32c.crc32c(memoryview(np.ascontiguousarray(a).reshape(-1).view(np.uint8)))


def touched(nbytes: int) -> np.ndarray:
    """A uint8 array whose pages are already faulted in (a warm destination)."""
    a = np.empty(nbytes, np.uint8)
    a.fill(1)
    return a


def progress(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')} load {loadavg():.1f}] {msg}", file=sys.stderr, flush=True)
