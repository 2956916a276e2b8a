"""One client process of the checker (test_checker.py): a writer or a reader.

Run as ``python checker_worker.py --router HOST:PORT --role writer --id 0
--out FILE ...``; it connects, runs its loop until ``--seconds`` pass or
``--max-ops`` operations are done, and appends every operation to ``FILE``
as one JSON line (format: checker_history.py), flushed as it goes, so a
history survives whatever happens to the process.

Every value is self-describing: a uint64 array whose elements 0..3 are a
magic number, the writer id, the writer's sequence number and the key's
index, the rest drawn from a generator seeded by (writer, seq). A writer
records the checksum of each value before it puts it; a reader decodes
(writer, seq) from what it reads and records the checksum of the bytes it
got, so the analysis can tell exactly which put a read returned, and
whether the bytes are that put's.

Kept free of pytest and of the test package: it runs as a plain script.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import sys
import time
from typing import Any, TextIO

import numpy as np

import tensorcache

MAGIC = 0x7E57_C0DE_C4EC_0001
PREFIXES = ("ns-a/", "ns-b/")
KEYS_PER_PREFIX = 8
#: Keys whose values are striped: 256 KiB against the checker's 64 KiB stripes.
STRIPE_SIZE = "64KiB"
LARGE_ELEMENTS = 32 * 1024
LARGE_INDEX = KEYS_PER_PREFIX - 1  # the last key of each prefix
KEYS = [f"{p}{i}" for p in PREFIXES for i in range(KEYS_PER_PREFIX)]


def is_large(key: str) -> bool:
    return key.endswith(f"/{LARGE_INDEX}")


def make_value(key: str, writer: int, seq: int) -> np.ndarray:
    """The value ``writer`` puts as its ``seq``-th put, under ``key``."""
    rng = np.random.default_rng((writer << 32) | seq)
    n = LARGE_ELEMENTS if is_large(key) else int(rng.integers(256, 1024))  # 2-8 KiB
    out = rng.integers(0, 2**64 - 1, size=n, dtype=np.uint64, endpoint=True)
    out[:4] = [MAGIC, writer, seq, KEYS.index(key)]
    return out


def checksum(value: np.ndarray) -> str:
    """Over dtype, shape and bytes: a value read must match its put in all three."""
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{value.dtype.str}{value.shape}".encode())
    h.update(np.ascontiguousarray(value).tobytes())
    return h.hexdigest()


def identify(value: object) -> tuple[int | None, int | None]:
    """(writer, seq) a value claims to be, or (None, None) if it is not one of ours."""
    if (
        isinstance(value, np.ndarray)
        and value.dtype == np.uint64
        and value.ndim == 1
        and value.size >= 4
        and int(value[0]) == MAGIC
    ):
        return int(value[1]), int(value[2])
    return None, None


def describe(exc: BaseException) -> str:
    """ "Type: message"; anything not a TensorCacheError is marked unexpected."""
    name = type(exc).__name__
    if not isinstance(exc, tensorcache.TensorCacheError):
        name = f"unexpected {name}"
    return f"{name}: {str(exc)[:300]}"


class Log:
    def __init__(self, out: TextIO, worker: str) -> None:
        self.out = out
        self.worker = worker

    def write(self, **rec: Any) -> None:
        self.out.write(json.dumps({"worker": self.worker, **rec}) + "\n")
        self.out.flush()


def connect(
    router: str, seconds: float, near_cache: str | None = None, mode: str = "strict"
) -> tensorcache.Client:
    """Connect, retrying while the cluster settles (bounded)."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            # retries: enough attempts to ride out a dead replica's lease
            # (ttl 3 s) on the way to a new ring, without waiting forever.
            return tensorcache.connect(
                router,
                stripe_size=STRIPE_SIZE,
                near_cache=near_cache,
                near_cache_mode=mode,
                retries=12,
                timeout_s=20.0,
            )
        except tensorcache.TensorCacheError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def run_writer(c: tensorcache.Client, log: Log, args: argparse.Namespace) -> int:
    rnd = random.Random(args.seed)
    deadline = time.monotonic() + args.seconds
    ops = 0
    for seq in range(args.max_ops):
        if time.monotonic() > deadline:
            break
        key = rnd.choice(KEYS)
        value = make_value(key, args.id, seq)
        log.write(
            op="put",
            phase="begin",
            writer=args.id,
            seq=seq,
            key=key,
            checksum=checksum(value),
            start=time.monotonic_ns(),
        )
        try:
            version = c.put(key, value)
        except Exception as exc:
            log.write(op="put", phase="end", seq=seq, end=time.monotonic_ns(), error=describe(exc))
        else:
            log.write(op="put", phase="end", seq=seq, end=time.monotonic_ns(), version=version)
        ops += 1
    return ops


def run_reader(c: tensorcache.Client, log: Log, args: argparse.Namespace) -> int:
    rnd = random.Random(args.seed)
    deadline = time.monotonic() + args.seconds
    every = args.invalidate_every
    next_invalidation = time.monotonic() + every if args.invalidate else float("inf")
    ops = 0
    while ops < args.max_ops and time.monotonic() <= deadline:
        if time.monotonic() >= next_invalidation:
            next_invalidation = time.monotonic() + every
            start = time.monotonic_ns()
            try:
                generation = c.invalidate(args.invalidate)
            except Exception as exc:
                log.write(
                    op="invalidate",
                    prefix=args.invalidate,
                    start=start,
                    end=time.monotonic_ns(),
                    error=describe(exc),
                )
            else:
                log.write(
                    op="invalidate",
                    prefix=args.invalidate,
                    start=start,
                    end=time.monotonic_ns(),
                    generation=generation,
                )
            ops += 1
            continue
        key = rnd.choice(KEYS)
        start = time.monotonic_ns()
        try:
            got = c.get(key)
        except Exception as exc:
            log.write(op="get", key=key, start=start, end=time.monotonic_ns(), error=describe(exc))
        else:
            record_get(log, key, start, time.monotonic_ns(), got)
        ops += 1
    return ops


def record_get(log: Any, key: str, start: int, end: int, got: np.ndarray | None) -> None:
    """Log a get that returned: a miss, or the (writer, seq) and checksum of what it read."""
    if got is None:
        log.write(op="get", key=key, start=start, end=end, found=False)
        return
    writer, seq = identify(got)
    log.write(
        op="get",
        key=key,
        start=start,
        end=end,
        found=True,
        writer=writer,
        seq=seq,
        checksum=checksum(got),
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--router", required=True)
    p.add_argument("--role", choices=("writer", "reader"), required=True)
    p.add_argument("--id", type=int, required=True, help="worker id (writer ids name puts)")
    p.add_argument("--out", required=True, help="history file (JSON lines, appended)")
    p.add_argument("--seconds", type=float, default=25.0)
    p.add_argument("--max-ops", type=int, default=50_000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--invalidate", default="", help="reader: invalidate this prefix now and then")
    p.add_argument("--invalidate-every", type=float, default=4.0)
    p.add_argument("--near-cache", default=None, help='reader: a near-cache ("16MiB")')
    p.add_argument(
        "--near-cache-mode",
        choices=("strict", "watch"),
        default="strict",
        help="watch: may serve stale values (bounded delay): the checker must then fail",
    )
    args = p.parse_args(argv)
    name = f"{args.role}-{args.id}"
    c = connect(args.router, 30.0, args.near_cache, args.near_cache_mode)
    with open(args.out, "a", encoding="utf-8") as out, c:
        log = Log(out, name)
        run = run_writer if args.role == "writer" else run_reader
        ops = run(c, log, args)
    print(json.dumps({"worker": name, "ops": ops, "metrics": c.metrics()}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
