"""The demo's worker processes: each builds the model, loads its weights, runs it, checks it.

Every worker calls ``tensorcache.torch.load_safetensors`` (read-through):
worker 0 runs alone first, misses, reads the checkpoint file (its pages
evicted from the OS page cache first, ``posix_fadvise(DONTNEED)``, so the
disk figure is a disk read) and fills the cluster; the others then start
together and read every tensor from the cluster. Each loads the weights
into a freshly built model, runs a forward pass, and compares the output's
SHA-256 with the reference computed when the checkpoint was written.

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
from dataclasses import dataclass
from multiprocessing.context import SpawnContext, SpawnProcess
from multiprocessing.queues import Queue
from multiprocessing.synchronize import Event
from typing import Any

from tensorcache.apps import parentdeath
from tensorcache.apps.demo.model import ModelFiles, build, forward_digest
from tensorcache.client.api import connect

PHASE_TIMEOUT_S = 600.0


@dataclass
class WorkerResult:
    """What one worker process reports back."""

    worker: int
    role: str  # "disk": reads the file and fills the cluster; "cache": reads the cluster
    tensors: int = 0
    nbytes: int = 0
    seconds: float = 0.0  # load_safetensors: the weights, from wherever they came
    hits: int = 0  # tensors read from the cluster
    misses: int = 0  # tensors read from the file
    filled: bool = False  # this worker read the file and filled the cluster
    evicted: bool = False  # the file's pages were dropped from the page cache first
    output_ok: bool = False  # forward output bit-identical to the reference
    started: float = 0.0  # time.monotonic(): one clock for all processes on Linux
    finished: float = 0.0
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and self.tensors > 0 and self.output_ok


def _evict(path: Any) -> bool:
    from tensorcache.torch.checkpoint import evict_page_cache

    try:
        evict_page_cache(path)
        return True
    except OSError:
        return False


def _worker(
    wid: int, role: str, router: str, files: ModelFiles, go: Event, msgs: Queue[Any]
) -> None:
    """One worker process: connect, wait for the start signal, load, run, check."""
    parentdeath.arm()
    result = WorkerResult(wid, role)
    try:
        import torch

        from tensorcache.torch import load_safetensors

        torch.set_num_threads(1)
        model = build(files.shape, seed=None)  # random weights until loaded
        with connect(router) as client:
            if role == "disk":
                result.evicted = _evict(files.path)
            msgs.put(("ready", wid))
            go.wait()
            result.started = time.monotonic()
            start = time.perf_counter()
            sd = load_safetensors(client, files.path, files.prefix)
            result.seconds = time.perf_counter() - start
            result.finished = time.monotonic()
            m = client.metrics()
            result.filled = m.get("loads", 0) > 0
        result.tensors = len(sd)
        result.nbytes = sum(t.numel() * t.element_size() for t in sd.values())
        result.misses = len(sd) if result.filled else 0
        result.hits = len(sd) - result.misses
        model.load_state_dict(sd, strict=True)
        result.output_ok = forward_digest(model) == files.digest
    except KeyboardInterrupt:
        return  # the parent stops everything and says so
    except Exception as exc:
        result.error = f"{type(exc).__name__}: {exc}"
    msgs.put(("result", result))


def run_phase(
    ctx: SpawnContext, ids: list[int], role: str, router: str, model: ModelFiles
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
