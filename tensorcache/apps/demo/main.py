"""``tensorcache demo``: worker processes share one model's weights through a local cluster.

What it shows
-------------
The cold-start story of the mission: N inference workers need the same
weights. Without a shared cache every worker reads the whole model from
storage itself. With tensorcache the first worker reads each tensor once and
fills the cluster (read-through: get → miss → load → put); every later worker
streams the tensors from the cluster's RAM, striped over all nodes.

What it runs
------------
1. A transformer-shaped model (float32 embedding and norms, float16
   attention and MLP matrices) generated once with a seeded RNG into
   ``<dir>/model-<size>mib/`` as one ``.npy`` file per tensor plus a
   ``manifest.json`` with every tensor's dtype, shape and CRC32C. It is
   written into a temporary directory and renamed, and reused while the
   manifest matches.
2. A local cluster (router + ``--nodes`` nodes, child processes).
3. Worker 0 in its own process: every tensor misses and is read from its
   file and put. Then workers 1..N-1, concurrently, each in its own process:
   every tensor should hit; a miss falls back to the file and puts
   (read-through), and is counted. Workers fetch a layer at a time with one
   ``get_many``, as a loader would, so a layer's tensors come from all
   nodes in parallel.
4. Every worker checks every tensor it obtained (dtype, shape, CRC32C of all
   its bytes) against the manifest; the exit code is 1 if any check failed.
5. Rollover: the model's namespace is invalidated (``Client.invalidate``,
   one record whatever the key count) and the demo checks that no tensor of
   the old revision is visible to any worker afterwards.

Timing is honest rather than flattering: the disk figure is worker 0's time
inside ``np.load`` alone, with the files most likely in the OS page cache
(they were just written or read), so it is the *best* case for disk. The
cache figures include gRPC, checksums and copies, with the router, the nodes
and every worker sharing this machine's cores.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import multiprocessing as mp
import os
import queue
import shutil
import signal
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from multiprocessing.context import SpawnContext, SpawnProcess
from multiprocessing.queues import Queue
from multiprocessing.synchronize import Event
from pathlib import Path
from typing import Any

import numpy as np

from tensorcache import codec
from tensorcache.apps import parentdeath
from tensorcache.apps.cluster import LocalCluster
from tensorcache.apps.statview import stat_table
from tensorcache.client.api import connect
from tensorcache.errors import TensorCacheError
from tensorcache.sizes import format_size

__all__ = ["run"]

MiB = 1024 * 1024
GiB = 1024 * MiB
FORMAT = 1
SEED = 0
PHASE_TIMEOUT_S = 600.0


# ------------------------------------------------------------------ the model
@dataclass(frozen=True)
class TensorSpec:
    """One tensor of the model: its name, file, layout and checksum."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    nbytes: int
    crc32c: int = 0
    file_bytes: int = 0

    @property
    def file(self) -> str:
        return f"{self.name}.npy"


@dataclass(frozen=True)
class Model:
    """A model on disk: its directory and tensors, in load order."""

    path: Path
    revision: str
    tensors: tuple[TensorSpec, ...]

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)

    def groups(self) -> Iterator[list[TensorSpec]]:
        """Tensors in the units a loader fetches together: one layer, or one top-level tensor."""
        group: list[TensorSpec] = []
        for t in self.tensors:
            if group and _unit(t.name) != _unit(group[0].name):
                yield group
                group = []
            group.append(t)
        if group:
            yield group

    def key(self, t: TensorSpec) -> str:
        # Deterministic across processes: the revision hashes the content.
        return f"demo/{self.revision}/{t.name}"


def _unit(name: str) -> str:
    return ".".join(name.split(".")[:2]) if name.startswith("layers.") else name


def model_layout(model_mib: int) -> list[TensorSpec]:
    """A llama-shaped set of tensors of about ``model_mib`` MiB (no checksums yet)."""
    if model_mib < 1:
        raise ValueError(f"model size must be >= 1 MiB, got {model_mib}")
    d = 1024 if model_mib >= 128 else 512 if model_mib >= 32 else 256
    vocab = 8 * d
    ffn = 256 * math.ceil(8 * d / 3 / 256)
    f16, f32 = np.dtype(np.float16), np.dtype(np.float32)

    def spec(name: str, shape: tuple[int, ...], dtype: np.dtype) -> TensorSpec:
        return TensorSpec(name, shape, dtype.str, math.prod(shape) * dtype.itemsize)

    head = [spec("embed_tokens", (vocab, d), f32)]
    tail = [spec("norm", (d,), f32), spec("lm_head", (vocab, d), f16)]

    def layer(i: int) -> list[TensorSpec]:
        p = f"layers.{i:02d}"
        return [
            spec(f"{p}.input_layernorm", (d,), f32),
            *(spec(f"{p}.attn.{m}_proj", (d, d), f16) for m in "qkvo"),
            spec(f"{p}.post_attention_layernorm", (d,), f32),
            spec(f"{p}.mlp.gate_proj", (ffn, d), f16),
            spec(f"{p}.mlp.up_proj", (ffn, d), f16),
            spec(f"{p}.mlp.down_proj", (d, ffn), f16),
        ]

    fixed = sum(t.nbytes for t in head + tail)
    per_layer = sum(t.nbytes for t in layer(0))
    n_layers = max(1, round((model_mib * MiB - fixed) / per_layer))
    return head + [t for i in range(n_layers) for t in layer(i)] + tail


def _generate(spec: TensorSpec, rng: np.random.Generator) -> np.ndarray:
    if len(spec.shape) == 1:  # a norm's scale: around 1
        return (1.0 + 0.1 * rng.standard_normal(spec.shape, dtype=np.float32)).astype(spec.dtype)
    scale = np.float32(1.0 / math.sqrt(spec.shape[-1]))
    return (rng.standard_normal(spec.shape, dtype=np.float32) * scale).astype(spec.dtype)


def _revision(tensors: list[TensorSpec]) -> str:
    text = json.dumps([[t.name, t.dtype, list(t.shape), t.crc32c] for t in tensors])
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def _read_manifest(path: Path, layout: list[TensorSpec]) -> Model | None:
    """The model in ``path`` if its manifest matches ``layout`` and its files are whole."""
    try:
        doc = json.loads((path / "manifest.json").read_text())
        if doc.get("format") != FORMAT or doc.get("seed") != SEED:
            return None
        tensors = [
            TensorSpec(
                t["name"], tuple(t["shape"]), t["dtype"], t["nbytes"], t["crc32c"], t["file_bytes"]
            )
            for t in doc["tensors"]
        ]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    same = [(t.name, t.shape, t.dtype, t.nbytes) for t in tensors] == [
        (t.name, t.shape, t.dtype, t.nbytes) for t in layout
    ]
    if not same or doc.get("revision") != _revision(tensors):
        return None
    for t in tensors:
        try:
            if (path / t.file).stat().st_size != t.file_bytes:
                return None
        except OSError:
            return None
    return Model(path, doc["revision"], tuple(tensors))


def ensure_model(root: Path, model_mib: int) -> tuple[Model, bool]:
    """The demo model under ``root``, written first if missing; returns (model, created)."""
    layout = model_layout(model_mib)
    path = root / f"model-{model_mib}mib"
    found = _read_manifest(path, layout)
    if found is not None:
        return found, False
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".{path.name}.{os.getpid()}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        rng = np.random.default_rng(SEED)
        tensors: list[TensorSpec] = []
        for t in layout:
            arr = _generate(t, rng)
            np.save(tmp / t.file, arr, allow_pickle=False)
            tensors.append(
                TensorSpec(
                    t.name,
                    t.shape,
                    t.dtype,
                    t.nbytes,
                    codec.crc32c(arr.reshape(-1).view(np.uint8)),
                    (tmp / t.file).stat().st_size,
                )
            )
        revision = _revision(tensors)
        doc = {
            "format": FORMAT,
            "seed": SEED,
            "revision": revision,
            "nbytes": sum(t.nbytes for t in tensors),
            "tensors": [
                {
                    "name": t.name,
                    "shape": list(t.shape),
                    "dtype": t.dtype,
                    "nbytes": t.nbytes,
                    "crc32c": t.crc32c,
                    "file_bytes": t.file_bytes,
                }
                for t in tensors
            ],
        }
        (tmp / "manifest.json").write_text(json.dumps(doc, indent=1) + "\n")
        # A stale or partial model of this size is replaced; the rename is
        # the commit point, so a reader never sees a half-written model.
        if path.exists():
            shutil.rmtree(path)
        os.rename(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return Model(path, revision, tuple(tensors)), True


# ------------------------------------------------------------------ workers
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


def _run_phase(
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


# ------------------------------------------------------------------ report
def _rate(nbytes: float, seconds: float) -> float:
    return nbytes / seconds / GiB if seconds > 0 else 0.0


def _who(ids: list[int]) -> str:
    return f"worker {ids[0]}" if len(ids) == 1 else f"workers {ids[0]}-{ids[-1]}"


def _worker_table(results: list[WorkerResult]) -> str:
    rows = [
        ("worker", "source", "tensors", "size", "seconds", "GiB/s", "hits", "misses", "verified")
    ]
    for r in results:
        if r.error is not None:
            rows.append((str(r.worker), r.role, "-", "-", "-", "-", "-", "-", "FAILED"))
            continue
        source = "cache" if r.misses == 0 else "disk" if r.hits == 0 else "cache+disk"
        verified = f"{r.verified}/{r.tensors} OK" if r.ok else f"{r.verified}/{r.tensors} BAD"
        rows.append(
            (
                str(r.worker),
                source,
                str(r.tensors),
                format_size(r.nbytes),
                f"{r.seconds:.2f}",
                f"{_rate(r.nbytes, r.seconds):.2f}",
                str(r.hits),
                str(r.misses),
                verified,
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows
    )


def _print_cluster(router: str, results: list[WorkerResult]) -> None:
    try:
        with connect(router) as client:
            stats = client.stats()
    except TensorCacheError as exc:
        print(f"\ncluster statistics unavailable: {exc}", file=sys.stderr)
        return
    print("\ncluster after the run (node counters count stripes and manifests as entries):")
    print(stat_table(stats))
    live = [s for s in stats if s.reachable]
    hits, misses = sum(s.hits for s in live), sum(s.misses for s in live)
    used, cap = sum(s.bytes_used for s in live), sum(s.capacity for s in live)
    evictions = sum(s.evictions for s in live)
    node_rate = hits / (hits + misses) if hits + misses else 0.0
    print(
        f"nodes: entry hit rate {node_rate:.1%} ({hits} hits, {misses} misses), "
        f"{evictions} evictions, space {format_size(used)} of {format_size(cap)} "
        f"({used / cap if cap else 0:.1%} used)"
    )
    good = [r for r in results if r.error is None]
    t_hits, t_misses = sum(r.hits for r in good), sum(r.misses for r in good)
    if t_hits + t_misses:
        hit_rate = t_hits / (t_hits + t_misses)
        print(
            f"workers: tensor hit rate {hit_rate:.1%} ({t_hits} hits, {t_misses} misses "
            "filled from disk)"
        )


def _summary(model: Model, disk: WorkerResult, cache: list[WorkerResult]) -> str:
    disk_rate = _rate(disk.disk_bytes, disk.disk_seconds)
    fill_rate = _rate(disk.nbytes, disk.seconds)
    lines = [
        f"worker 0 read {format_size(disk.disk_bytes)} from disk in {disk.disk_seconds:.2f} s "
        f"({disk_rate:.2f} GiB/s inside np.load; the files are likely in the OS page cache, "
        "so this is the best case for disk) and filled the cache: "
        f"{disk.seconds:.2f} s in all ({fill_rate:.2f} GiB/s)"
    ]
    good = [r for r in cache if r.error is None and r.seconds > 0]
    if not good:
        return "\n".join(lines)
    ids = [r.worker for r in good]
    who = _who(ids)
    per_worker = sum(_rate(r.nbytes, r.seconds) for r in good) / len(good)
    span = max(r.finished for r in good) - min(r.started for r in good)
    together = _rate(sum(r.nbytes for r in good), span)
    # Compare what the cluster delivered (all readers at once) with what one
    # reader got from the page-cached file alone: per-worker figures would
    # charge the cache for N workers sharing this machine's few cores.
    if together >= disk_rate:
        verdict = f"{together / disk_rate:.1f}x the disk rate" if disk_rate else "faster"
    else:
        verdict = (
            f"{disk_rate / together:.1f}x slower than page-cached disk on this "
            f"{os.cpu_count()}-core machine, where router, nodes and workers share the cores"
        )
    c_hits, c_misses = sum(r.hits for r in good), sum(r.misses for r in good)
    source = (
        "from the cache"
        if c_misses == 0
        else f"through the cache ({c_hits} hits, {c_misses} misses read through from disk)"
    )
    lines.append(
        f"{who} loaded {format_size(model.nbytes)} each {source}, {len(good)} at once: "
        f"{together:.2f} GiB/s together ({per_worker:.2f} GiB/s each) vs {disk_rate:.2f} GiB/s "
        f"for one reader of the file ({verdict}; {os.cpu_count()} cores shared by all processes)"
    )
    everyone = [disk, *good]
    hits, misses = sum(r.hits for r in everyone), sum(r.misses for r in everyone)
    if hits and misses:
        # The design documents' metric: hit time x hit rate + miss time x miss rate.
        t_hit = sum(r.get_seconds for r in everyone) / hits
        t_miss = sum(r.fill_seconds for r in everyone) / misses
        h = hits / (hits + misses)
        lines.append(
            f"average access time per tensor: {t_hit * 1e3:.1f} ms per hit (get), "
            f"{t_miss * 1e3:.1f} ms per miss (load + put) -> "
            f"{1e3 * (h * t_hit + (1 - h) * t_miss):.1f} ms at a {h:.1%} hit rate"
        )
    return "\n".join(lines)


# ------------------------------------------------------------------ entry point
def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _rollover(router: str, model: Model) -> bool:
    """Publish a "new revision": invalidate the model's namespace, prove nothing old is left."""
    prefix = f"demo/{model.revision}/"
    keys = [model.key(t) for t in model.tensors]
    try:
        with connect(router) as c:
            t0 = time.perf_counter()
            generation = c.invalidate(prefix)
            took = time.perf_counter() - t0
            visible = sum(a is not None for a in c.get_many(keys).values())
    except TensorCacheError as exc:
        print(f"rollover failed: {exc}", file=sys.stderr)
        return False
    print(
        f"rollover: invalidate({prefix!r}) -> generation {generation} in {took * 1000:.0f} ms "
        f"(one record, whatever the key count); old tensors still visible to any worker: "
        f"{visible} of {len(keys)}",
        flush=True,
    )
    return visible == 0


def run(args: argparse.Namespace) -> int:
    """``tensorcache demo``: 0 when every worker verified every tensor, 1 otherwise."""
    if args.workers < 2:
        raise ValueError(f"--workers must be >= 2 (one fills, the rest read), got {args.workers}")
    if args.nodes < 1:
        raise ValueError(f"--nodes must be >= 1, got {args.nodes}")
    started = time.perf_counter()

    t0 = time.perf_counter()
    model, created = ensure_model(Path(args.dir), args.model_mb)
    print(
        f"model {model.path}: {len(model.tensors)} tensors, {format_size(model.nbytes)}, "
        f"revision {model.revision} "
        + (f"(created in {time.perf_counter() - t0:.1f} s)" if created else "(reused)"),
        flush=True,
    )

    capacity = max(GiB, math.ceil(2 * model.nbytes / args.nodes))
    ctx = mp.get_context("spawn")
    # SIGTERM (kill, a CI timeout) unwinds like Ctrl-C, so the cluster and the
    # workers are stopped by the context managers below rather than orphaned.
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        with LocalCluster(args.nodes, capacity=capacity) as cluster:
            router = cluster.router_address
            print(
                f"cluster: router {router}, {args.nodes} nodes of {format_size(capacity)}",
                flush=True,
            )
            print("worker 0: cold start, reading through to disk ...", flush=True)
            disk = _run_phase(ctx, [0], "disk", router, model)
            rest = list(range(1, args.workers))
            print(f"{_who(rest)}: warm start from the cache ...", flush=True)
            cache = _run_phase(ctx, rest, "cache", router, model)
            results = disk + cache
            print()
            print(_worker_table(results), flush=True)
            for r in results:
                if r.error is not None:
                    print(f"worker {r.worker} failed: {r.error}", file=sys.stderr)
                elif r.bad:
                    print(
                        f"worker {r.worker}: {len(r.bad)} tensors failed verification: "
                        f"{', '.join(r.bad[:5])}",
                        file=sys.stderr,
                    )
            _print_cluster(router, results)
            print()
            if disk[0].error is None:
                print(_summary(model, disk[0], cache))
            rolled = _rollover(router, model)
    except KeyboardInterrupt:
        print("\ninterrupted; cluster stopped", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)
    ok = all(r.ok for r in results) and rolled
    print(
        f"{'all workers verified every tensor' if ok else 'VERIFICATION FAILED'}; "
        f"demo took {time.perf_counter() - started:.1f} s",
        flush=True,
    )
    return 0 if ok else 1
