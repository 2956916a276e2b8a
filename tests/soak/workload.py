"""One client process of the soak: a writer, a reader or a loader.

Run as ``python -m tests.soak.workload --router HOST:PORT --role writer
--id 0 --out FILE ...`` from the repository root. It loops until
``--seconds`` pass or ``--max-ops`` operations are done and appends each
operation to FILE as a JSON line in checker_history's format, flushed as it
goes (tests/integration/checker_worker.py: values name their own put, so a
read can be traced to the put it returned).

* writer: puts to the checker's shared keys (``ns-a/``, ``ns-b/``: small
  values and one striped key per prefix) and, one put in four, to a key of
  its own that is written once and never overwritten (``keep/<id>/<seq>``,
  one in 40 of them striped): those are what a lost put cannot hide behind
  a later overwrite. One op in ten re-reads one of its acknowledged keep
  keys, so a loss shows during the run, near the fault that caused it;
* reader: gets shared keys; with ``--invalidate P`` it also invalidates P
  every ``--invalidate-every`` seconds;
* loader: ``get_or_load`` on shared keys; the loader records a put (writer
  = its id) when it is called, and the value returned is recorded as a get.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
import zlib
from typing import Any

import numpy as np

import tensorcache
from tests.integration import checker_worker as cw

KEEP_PREFIX = "keep/"
#: Client settings, and the deadline they imply (run.py checks every op against it).
TIMEOUT_S = 3.0
RETRIES = 6
LOAD_TIMEOUT_S = 30.0
#: Longest an op may take: (RETRIES + 1) attempts of up to two RPCs (a miss at the
#: primary is confirmed at the next replica) of TIMEOUT_S each, plus the backoffs
#: (0.2 s doubling, capped at 3.2 s: 9.4 s for 6 retries), plus ring refreshes;
#: rounded up. get_or_load may wait LOAD_TIMEOUT_S for another filler on top.
OP_DEADLINE_S = 60.0 + LOAD_TIMEOUT_S


def keep_value(key: str, writer: int, seq: int) -> np.ndarray:
    """A write-once value: 2-8 KiB, or 256 KiB (striped) for one seq in 40."""
    rng = np.random.default_rng((writer << 32) | seq | (1 << 62))
    n = cw.LARGE_ELEMENTS if seq % 40 == 39 else int(rng.integers(256, 1024))
    out = rng.integers(0, 2**64 - 1, size=n, dtype=np.uint64, endpoint=True)
    out[:4] = [cw.MAGIC, writer, seq, zlib.crc32(key.encode())]
    return out


def value_for(key: str, writer: int, seq: int) -> np.ndarray:
    return (
        keep_value(key, writer, seq)
        if key.startswith(KEEP_PREFIX)
        else cw.make_value(key, writer, seq)
    )


def connect(router: str, seconds: float) -> tensorcache.Client:
    """Connect, retrying while the cluster settles (bounded by ``seconds``)."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            return tensorcache.connect(
                router, stripe_size=cw.STRIPE_SIZE, retries=RETRIES, timeout_s=TIMEOUT_S
            )
        except tensorcache.TensorCacheError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def _get(c: tensorcache.Client, log: cw.Log, key: str) -> None:
    start = time.monotonic_ns()
    try:
        got = c.get(key)
    except Exception as exc:
        log.write(op="get", key=key, start=start, end=time.monotonic_ns(), error=cw.describe(exc))
    else:
        cw.record_get(log, key, start, time.monotonic_ns(), got)


def put(c: tensorcache.Client, log: cw.Log, key: str, writer: int, seq: int) -> bool:
    """One recorded put; True if it was acknowledged."""
    value = value_for(key, writer, seq)
    log.write(
        op="put",
        phase="begin",
        writer=writer,
        seq=seq,
        key=key,
        checksum=cw.checksum(value),
        start=time.monotonic_ns(),
    )
    try:
        version = c.put(key, value)
    except Exception as exc:
        log.write(op="put", phase="end", seq=seq, end=time.monotonic_ns(), error=cw.describe(exc))
        return False
    log.write(op="put", phase="end", seq=seq, end=time.monotonic_ns(), version=version)
    return True


def run_writer(c: tensorcache.Client, log: cw.Log, args: argparse.Namespace) -> int:
    rnd = random.Random(args.seed)
    deadline = time.monotonic() + args.seconds
    kept: list[str] = []
    ops = 0
    for seq in range(args.max_ops):
        if time.monotonic() > deadline:
            break
        ops += 1
        roll = rnd.random()
        if roll < 0.1 and kept:
            _get(c, log, rnd.choice(kept))
            continue
        if roll < 0.35:
            key = f"{KEEP_PREFIX}{args.id}/{seq}"
            if put(c, log, key, args.id, seq):
                kept.append(key)
        else:
            put(c, log, rnd.choice(cw.KEYS), args.id, seq)
    return ops


def run_reader(c: tensorcache.Client, log: cw.Log, args: argparse.Namespace) -> int:
    rnd = random.Random(args.seed)
    deadline = time.monotonic() + args.seconds
    next_inv = time.monotonic() + args.invalidate_every if args.invalidate else float("inf")
    ops = 0
    while ops < args.max_ops and time.monotonic() <= deadline:
        ops += 1
        if time.monotonic() >= next_inv:
            next_inv = time.monotonic() + args.invalidate_every
            start = time.monotonic_ns()
            try:
                generation = c.invalidate(args.invalidate)
            except Exception as exc:
                log.write(
                    op="invalidate",
                    prefix=args.invalidate,
                    start=start,
                    end=time.monotonic_ns(),
                    error=cw.describe(exc),
                )
            else:
                log.write(
                    op="invalidate",
                    prefix=args.invalidate,
                    start=start,
                    end=time.monotonic_ns(),
                    generation=generation,
                )
            continue
        _get(c, log, rnd.choice(cw.KEYS))
    return ops


def run_loader(c: tensorcache.Client, log: cw.Log, args: argparse.Namespace) -> int:
    rnd = random.Random(args.seed)
    deadline = time.monotonic() + args.seconds
    ops = 0
    for seq in range(args.max_ops):
        if time.monotonic() > deadline:
            break
        ops += 1
        key = rnd.choice(cw.KEYS)
        loaded: list[bool] = []

        def load(key: str = key, seq: int = seq, loaded: list[bool] = loaded) -> np.ndarray:
            value = value_for(key, args.id, seq)
            log.write(
                op="put",
                phase="begin",
                writer=args.id,
                seq=seq,
                key=key,
                checksum=cw.checksum(value),
                start=time.monotonic_ns(),
                load=True,
            )
            loaded.append(True)
            return value

        start = time.monotonic_ns()
        try:
            got = c.get_or_load(key, load, timeout_s=LOAD_TIMEOUT_S)
        except Exception as exc:
            end = time.monotonic_ns()
            if loaded:
                log.write(op="put", phase="end", seq=seq, end=end, error=cw.describe(exc))
            log.write(op="get", key=key, start=start, end=end, error=cw.describe(exc))
            continue
        end = time.monotonic_ns()
        if loaded:
            # get_or_load returns no version: the put may be read (it is a put
            # for the torn-value check) but it is never "completed".
            log.write(op="put", phase="end", seq=seq, end=end, loaded=True)
        cw.record_get(log, key, start, end, got)
    return ops


ROLES = {"writer": run_writer, "reader": run_reader, "loader": run_loader}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--router", required=True)
    p.add_argument("--role", choices=sorted(ROLES), required=True)
    p.add_argument("--id", type=int, required=True, help="worker id (writer/loader ids name puts)")
    p.add_argument("--out", required=True, help="history file (JSON lines, appended)")
    p.add_argument("--seconds", type=float, default=60.0)
    p.add_argument("--max-ops", type=int, default=10_000_000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--invalidate", default="", help="reader: invalidate this prefix now and then")
    p.add_argument("--invalidate-every", type=float, default=4.0)
    args = p.parse_args(argv)
    name = f"{args.role}-{args.id}"
    c = connect(args.router, 60.0)
    with open(args.out, "a", encoding="utf-8") as out, c:
        ops = ROLES[args.role](c, cw.Log(out, name), args)
    report: dict[str, Any] = {"worker": name, "ops": ops, "metrics": c.metrics()}
    print(json.dumps(report), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
