"""The demo's worker processes: each loads every tensor through the cache and verifies it.

A phase starts its workers (spawned processes), releases them together once
all have connected, and collects one ``WorkerResult`` from each; a worker
that dies without a word is reported as failed, and every worker process is
joined (or terminated) on the way out.
"""

from __future__ import annotations

import contextlib
import queue
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from multiprocessing.context import SpawnContext, SpawnProcess
from multiprocessing.queues import Queue
from multiprocessing.synchronize import Event
from typing import Any

import numpy as np

from tensorcache import codec
from tensorcache.apps import parentdeath
from tensorcache.apps.demo.model import Model
from tensorcache.client.api import connect

PHASE_TIMEOUT_S = 600.0


@dataclass
class WorkerResult:
    """What one worker process reports back."""

    worker: int
    role: str  # "disk": fills the cache; "cache": reads through it
    tensors: int = 0
    nbytes: int = 0
    seconds: float = 0.0
    hits: int = 0
    misses: int = 0
    get_seconds: float = 0.0  # inside get_many (hits and the look-ups that missed)
    fill_seconds: float = 0.0  # misses: np.load + put_many
    disk_seconds: float = 0.0  # inside np.load
    disk_bytes: int = 0
    verified: int = 0
    started: float = 0.0  # time.monotonic(): one clock for all processes on Linux
    finished: float = 0.0
    bad: list[str] = field(default_factory=list)
    error: str | None = None

    @property
    def ok(self) -> bool:
        return (
            self.error is None
            and not self.bad
            and self.tensors > 0
            and self.verified == self.tensors
        )


def _worker(wid: int, role: str, router: str, model: Model, go: Event, msgs: Queue[Any]) -> None:
    """One worker process: connect, wait for the start signal, load every tensor, verify."""
    parentdeath.arm()
    result = WorkerResult(wid, role)
    try:
        with connect(router) as client:
            msgs.put(("ready", wid))
            go.wait()
            arrays: dict[str, np.ndarray] = {}
            result.started = time.monotonic()
            start = time.perf_counter()
            for group in model.groups():
                t0 = time.perf_counter()
                got = client.get_many([model.key(t) for t in group])
                t1 = time.perf_counter()
                result.get_seconds += t1 - t0
                fill: dict[str, np.ndarray] = {}
                for t in group:
                    arr = got[model.key(t)]
                    if arr is None:  # read-through: load from the backing store, then fill
                        result.misses += 1
                        t0 = time.perf_counter()
                        arr = np.load(model.path / t.file, mmap_mode=None, allow_pickle=False)
                        result.disk_seconds += time.perf_counter() - t0
                        result.disk_bytes += arr.nbytes
                        fill[model.key(t)] = arr
                    else:
                        result.hits += 1
                    arrays[t.name] = arr
                    result.tensors += 1
                    result.nbytes += arr.nbytes
                if fill:
                    client.put_many(fill)
                    result.fill_seconds += time.perf_counter() - t1
            result.seconds = time.perf_counter() - start
            result.finished = time.monotonic()
        # Outside the timed part: every byte against the manifest's checksum.
        for t in model.tensors:
            arr = arrays[t.name]
            good = (
                arr.dtype.str == t.dtype
                and arr.shape == t.shape
                and codec.crc32c(arr.reshape(-1).view(np.uint8)) == t.crc32c
            )
            if good:
                result.verified += 1
            else:
                result.bad.append(t.name)
    except KeyboardInterrupt:
        return  # the parent stops everything and says so
    except Exception as exc:
        result.error = f"{type(exc).__name__}: {exc}"
    msgs.put(("result", result))


def run_phase(
    ctx: SpawnContext, ids: list[int], role: str, router: str, model: Model
) -> list[WorkerResult]:
    """Start workers ``ids``, release them together once all connected, collect results."""
    go = ctx.Event()
    msgs: Queue[Any] = ctx.Queue()
    procs: dict[int, SpawnProcess] = {
        wid: ctx.Process(
            target=_worker, args=(wid, role, router, model, go, msgs), name=f"demo-worker-{wid}"
        )
        for wid in ids
    }
    results: dict[int, WorkerResult] = {}
    with _reaped(procs.values()):
        for p in procs.values():
            p.start()
        ready: set[int] = set()
        for kind, payload in _messages(msgs, procs, results, role):
            if kind == "ready":
                ready.add(payload)
            else:
                results[payload.worker] = payload
            # Start the clock for all at once; one that failed to connect
            # reports a result instead of "ready" and must not hold back the rest.
            if not go.is_set() and ready | results.keys() == set(ids):
                go.set()
            if len(results) == len(ids):
                break
    return [results[w] for w in ids]


def _messages(
    msgs: Queue[Any], procs: dict[int, SpawnProcess], results: dict[int, WorkerResult], role: str
) -> Iterator[tuple[str, Any]]:
    """Messages from the workers; a worker that dies silently yields a failed result."""
    deadline = time.monotonic() + PHASE_TIMEOUT_S
    gone_since: dict[int, float] = {}
    while True:
        try:
            yield msgs.get(timeout=0.2)
            continue
        except queue.Empty:
            pass
        now = time.monotonic()
        for wid, p in procs.items():
            if wid in results or p.exitcode is None:
                continue
            # Its last message may still be in the pipe: give it a moment.
            if now - gone_since.setdefault(wid, now) > 2.0:
                yield (
                    "result",
                    WorkerResult(
                        wid, role, error=f"worker process exited with code {p.exitcode}, no result"
                    ),
                )
        if now > deadline:
            raise TimeoutError(f"demo workers did not finish within {PHASE_TIMEOUT_S:.0f} s")


@contextlib.contextmanager
def _reaped(procs: Iterable[SpawnProcess]) -> Iterator[None]:
    """Join the worker processes on the way out.

    After an error or an interrupt they are terminated at once (SIGTERM,
    then SIGKILL): their results would not be read.
    """
    grace = 5.0
    try:
        yield
    except BaseException:
        grace = 0.0
        raise
    finally:
        started = [p for p in procs if p.pid is not None]
        for p in started:
            p.join(grace)
        for p in started:
            if p.exitcode is None:
                p.terminate()
                p.join(5.0)
            if p.exitcode is None:
                p.kill()
                p.join()
