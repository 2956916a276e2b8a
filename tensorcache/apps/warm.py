"""``tensorcache hot`` and ``tensorcache warm``: carry a cluster's hot set to another.

A new cluster (a migration, a second region, a fresh one after an outage of
the old) starts cold. ``hot`` exports the old cluster's most recently used
keys (each node ranks its own, ``Client.hot_keys`` merges them) as JSON
lines, hottest first; ``warm --keys FILE --from-cluster OLD`` copies those
keys, in that order, from the old cluster into the new one, in batches of
bounded bytes, so the hottest are there first if it is cut short. Keys the
old cluster no longer holds are skipped and counted. Checkpoint files go in
with ``tensorcache load``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from tensorcache.errors import InvalidArgument

BATCH_BYTES = 256 * 1024 * 1024


def write_keys(hot: list[tuple[str, int]], path: str) -> None:
    lines = [json.dumps({"key": k, "nbytes": n}) for k, n in hot]
    text = "\n".join(lines) + ("\n" if lines else "")
    if path == "-":
        sys.stdout.write(text)
    else:
        Path(path).write_text(text, encoding="utf-8")


def read_keys(path: str) -> list[tuple[str, int]]:
    """The (key, nbytes) lines of an export, in order; InvalidArgument naming a bad line."""
    out: list[tuple[str, int]] = []
    text = sys.stdin.read() if path == "-" else Path(path).read_text(encoding="utf-8")
    for i, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            key, nbytes = rec["key"], int(rec.get("nbytes", 0))
        except (ValueError, KeyError, TypeError) as exc:
            raise InvalidArgument(f"{path}:{i}: not a key line ({exc}): {line[:80]!r}") from exc
        if not isinstance(key, str):
            raise InvalidArgument(f"{path}:{i}: key must be a string")
        out.append((key, nbytes))
    return out


def batches(keys: list[tuple[str, int]], max_bytes: int) -> Iterator[list[str]]:
    batch: list[str] = []
    size = 0
    for key, nbytes in keys:
        if batch and size + nbytes > max_bytes:
            yield batch
            batch, size = [], 0
        batch.append(key)
        size += nbytes
    if batch:
        yield batch


def copy_keys(src: object, dst: object, keys: list[tuple[str, int]]) -> tuple[int, int, int]:
    """Copy ``keys`` from client ``src`` to client ``dst``: (copied, missing, bytes)."""
    copied = missing = nbytes = 0
    for batch in batches(keys, BATCH_BYTES):
        got = src.get_many(batch)  # type: ignore[attr-defined]
        present = {k: v for k, v in got.items() if v is not None}
        missing += len(batch) - len(present)
        if present:
            dst.put_many(present)  # type: ignore[attr-defined]
            copied += len(present)
            nbytes += sum(v.nbytes for v in present.values())
    return copied, missing, nbytes


def run_hot(args: argparse.Namespace) -> int:
    from tensorcache.client.api import connect

    with connect(args.router, timeout_s=args.timeout) as c:
        hot = c.hot_keys(args.top)
    write_keys(hot, args.out)
    if args.out != "-":
        print(f"{len(hot)} keys ({sum(n for _, n in hot)} bytes) written to {args.out}")
    return 0


def run_warm(args: argparse.Namespace) -> int:
    from tensorcache.client.api import connect

    keys = read_keys(args.keys)
    start = time.monotonic()
    with (
        connect(args.from_cluster, timeout_s=args.timeout) as src,
        connect(args.router, timeout_s=args.timeout) as dst,
    ):
        copied, missing, nbytes = copy_keys(src, dst, keys)
    secs = time.monotonic() - start
    print(
        f"warmed {copied} keys ({nbytes} bytes) in {secs:.2f}s from {args.from_cluster}; "
        f"{missing} no longer there"
    )
    return 0


def add_arguments(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    hot = sub.add_parser("hot", help="export the cluster's most recently used keys (JSON lines)")
    hot.add_argument("--router", default="127.0.0.1:7070", help="router host:port")
    hot.add_argument("--top", type=int, default=1000, help="how many keys (default 1000)")
    hot.add_argument("--out", default="-", help="file to write (default: standard output)")
    hot.add_argument("--timeout", type=float, default=30.0, help="seconds per RPC")
    hot.set_defaults(fn=run_hot)

    warm = sub.add_parser(
        "warm", help="load the keys of a `tensorcache hot` export from another cluster"
    )
    warm.add_argument("--router", default="127.0.0.1:7070", help="the cluster to warm")
    warm.add_argument("--keys", required=True, help="a `tensorcache hot` export ('-': stdin)")
    warm.add_argument(
        "--from-cluster", required=True, help="router host:port of the cluster holding them"
    )
    warm.add_argument("--timeout", type=float, default=60.0, help="seconds per RPC")
    warm.set_defaults(fn=run_warm)
