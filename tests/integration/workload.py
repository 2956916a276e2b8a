"""A self-checking mixed workload, run by threads and by spawned processes.

Every value written is a uint64 array whose element 0 is a *seed* naming
(key, writer, sequence number) and whose remaining elements (and length)
are drawn from ``np.random.default_rng(seed)``. A reader regenerates the
array from element 0, so any answer can be checked on its own: it must be
None (a miss) or exactly a value some writer put under that very key. A torn
read (stripes of two puts), a stripe from another key, a truncated or padded
payload all fail the check.

Kept free of pytest so ``multiprocessing`` "spawn" children import it cheaply.
"""

from __future__ import annotations

import random
import time
import traceback
from dataclasses import dataclass, field

import numpy as np

import tensorcache

KEYS = 18
STRIPE_SIZE = 256 * 1024
# Elements (uint64) by key class: small entries; medium single entries just
# under the stripe size; large values of 3-4 stripes, each big enough for
# the co-located read path (256 KiB) but the ragged last one.
SIZES = [(0, 2_000), (12_000, 32_000), (75_000, 130_000)]


def key_name(prefix: str, k: int) -> str:
    return f"{prefix}{k}"


def make_value(k: int, writer: int, seq: int) -> np.ndarray:
    seed = (k << 40) | (writer << 24) | seq
    rng = np.random.default_rng(seed)
    n = int(rng.integers(*SIZES[k % len(SIZES)]))
    out = np.empty(n + 1, dtype=np.uint64)
    out[0] = seed
    out[1:] = rng.integers(0, 2**64 - 1, size=n, dtype=np.uint64, endpoint=True)
    return out


def check(k: int, got: object) -> str | None:
    """None when ``got`` is a miss or a value put under key ``k``; else what is wrong."""
    if got is None:
        return None
    if not isinstance(got, np.ndarray) or got.dtype != np.uint64 or got.ndim != 1:
        return f"key {k}: not a 1-d uint64 array: {type(got).__name__} {getattr(got, 'dtype', '')}"
    if got.size == 0:
        return f"key {k}: empty array"
    seed = int(got[0])
    owner, writer, seq = seed >> 40, (seed >> 24) & 0xFFFF, seed & 0xFFFFFF
    if owner != k:
        return f"key {k}: holds a value written for key {owner} (writer {writer}, seq {seq})"
    want = make_value(k, writer, seq)
    if got.shape != want.shape or not np.array_equal(got, want):
        return f"key {k}: value of writer {writer} seq {seq} is corrupt (len {got.size})"
    return None


@dataclass
class Report:
    writer: int
    ops: int = 0
    hits: int = 0
    mismatches: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


def run(client: object, prefix: str, writer: int, ops: int, deadline: float) -> Report:
    """``ops`` random operations on the shared keys, or fewer if ``deadline`` passes."""
    c = client
    rnd = random.Random(writer)
    report = Report(writer)
    for seq in range(ops):
        if time.time() > deadline:
            break
        k = rnd.randrange(KEYS)
        op = rnd.random()
        try:
            if op < 0.40:
                c.put(key_name(prefix, k), make_value(k, writer, seq))  # type: ignore[attr-defined]
            elif op < 0.80:
                got = c.get(key_name(prefix, k))  # type: ignore[attr-defined]
                report.hits += got is not None
                if (bad := check(k, got)) is not None:
                    report.mismatches.append(bad)
            elif op < 0.88:
                c.delete(key_name(prefix, k))  # type: ignore[attr-defined]
            elif op < 0.94:
                ks = rnd.sample(range(KEYS), 3)
                c.put_many(  # type: ignore[attr-defined]
                    {key_name(prefix, j): make_value(j, writer, seq) for j in ks}
                )
            else:
                ks = rnd.sample(range(KEYS), 5)
                got_many = c.get_many([key_name(prefix, j) for j in ks])  # type: ignore[attr-defined]
                for j in ks:
                    got = got_many[key_name(prefix, j)]
                    report.hits += got is not None
                    if (bad := check(j, got)) is not None:
                        report.mismatches.append(bad)
        except Exception:
            report.errors.append(traceback.format_exc(limit=3))
        report.ops += 1
    return report


def run_process(
    router: str, prefix: str, writer: int, ops: int, deadline: float, options: dict
) -> Report:
    """Entry point of a spawned process: its own connection, then the workload."""
    with tensorcache.connect(router, stripe_size=STRIPE_SIZE, **options) as c:
        return run(c, prefix, writer, ops, deadline)
