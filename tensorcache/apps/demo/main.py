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

Where: ``model.py`` (the model files and their manifest), ``workers.py``
(the worker processes and a phase of them), ``report.py`` (what is
printed), this module (the run and the rollover).
"""

from __future__ import annotations

import argparse
import math
import multiprocessing as mp
import signal
import sys
import time
from pathlib import Path

from tensorcache.apps.cluster import LocalCluster
from tensorcache.apps.demo import report
from tensorcache.apps.demo.model import GiB, Model, ensure_model
from tensorcache.apps.demo.workers import run_phase
from tensorcache.client.api import connect
from tensorcache.errors import TensorCacheError
from tensorcache.sizes import format_size

__all__ = ["run"]


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
            disk = run_phase(ctx, [0], "disk", router, model)
            rest = list(range(1, args.workers))
            print(f"{report.who(rest)}: warm start from the cache ...", flush=True)
            cache = run_phase(ctx, rest, "cache", router, model)
            results = disk + cache
            print()
            print(report.worker_table(results), flush=True)
            for r in results:
                if r.error is not None:
                    print(f"worker {r.worker} failed: {r.error}", file=sys.stderr)
                elif r.bad:
                    print(
                        f"worker {r.worker}: {len(r.bad)} tensors failed verification: "
                        f"{', '.join(r.bad[:5])}",
                        file=sys.stderr,
                    )
            report.print_cluster(router, results)
            print()
            if disk[0].error is None:
                print(report.summary(model, disk[0], cache))
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
