"""``tensorcache demo``: worker processes share one model's weights through a local cluster.

What it shows
-------------
The cold-start story of the mission: N inference workers need the same
weights. Without a shared cache every worker reads the whole checkpoint from
storage itself. With tensorcache the first worker reads the file once and
fills the cluster (read-through); every later worker streams the weights
from the cluster's RAM, striped over all nodes, and the model it runs is
bit for bit the model in the file.

What it runs
------------
1. A small llama-shaped transformer built with torch from a seeded RNG (no
   download), written once as ``<dir>/model-<size>mib/model.safetensors``
   (bfloat16) with ``reference.json``: its shape and the SHA-256 of its
   output on fixed tokens (model.py).
2. A local cluster (router + ``--nodes`` nodes, child processes).
3. Worker 0 in its own process: ``tensorcache.torch.load_safetensors``
   misses, so it reads the file (its pages evicted from the page cache
   first: an honest disk read) and fills the cluster as revision
   ``demo/<file sha>/``. Then workers 1..N-1, concurrently: the same call
   reads every tensor from the cluster. Each worker builds the model, loads
   the weights, runs a forward pass and checks that its output is
   bit-identical to the reference (workers.py).
4. Rollover: the revision's namespace is invalidated (``Client.invalidate``,
   one record whatever the key count) and the demo checks that no tensor of
   the old revision is visible to any worker afterwards.

The exit code is 1 unless every worker's output matched and the rollover
left nothing visible. Where: ``model.py``, ``workers.py``, ``report.py``
(what is printed), this module (the run and the rollover).
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
from tensorcache.apps.demo.model import GiB, ModelFiles, ensure_model
from tensorcache.apps.demo.workers import run_phase
from tensorcache.client.api import connect
from tensorcache.errors import TensorCacheError
from tensorcache.sizes import format_size

__all__ = ["run"]


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _rollover(router: str, files: ModelFiles) -> bool:
    """Publish a "new revision": invalidate the model's namespace, prove nothing old is left."""
    from tensorcache.torch import read_manifest, read_state_dict

    prefix = files.prefix
    try:
        with connect(router) as c:
            manifest = read_manifest(c, prefix)
            keys = list(manifest.keys().values()) if manifest is not None else []
            t0 = time.perf_counter()
            generation = c.invalidate(prefix)
            took = time.perf_counter() - t0
            visible = sum(a is not None for a in c.get_many(keys).values())
            gone = read_state_dict(c, prefix) is None
    except TensorCacheError as exc:
        print(f"rollover failed: {exc}", file=sys.stderr)
        return False
    print(
        f"rollover: invalidate({prefix!r}) -> generation {generation} in {took * 1000:.0f} ms "
        f"(one record, whatever the key count); old tensors still visible to any worker: "
        f"{visible} of {len(keys)}; revision readable: {'no' if gone else 'YES'}",
        flush=True,
    )
    return bool(keys) and visible == 0 and gone


def run(args: argparse.Namespace) -> int:
    """``tensorcache demo``: 0 when every worker ran the model bit-identically, 1 otherwise."""
    if args.workers < 2:
        raise ValueError(f"--workers must be >= 2 (one fills, the rest read), got {args.workers}")
    if args.nodes < 1:
        raise ValueError(f"--nodes must be >= 1, got {args.nodes}")
    started = time.perf_counter()

    t0 = time.perf_counter()
    model, created = ensure_model(Path(args.dir), args.model_mb)
    print(
        f"model {model.path}: a {model.shape.layers}-layer transformer, {model.tensors} "
        f"tensors, {format_size(model.nbytes)} bfloat16, revision {model.revision} "
        + (f"(built and written in {time.perf_counter() - t0:.1f} s)" if created else "(reused)"),
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
            print("worker 0: cold start, the checkpoint read through from disk ...", flush=True)
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
                elif not r.output_ok:
                    print(f"worker {r.worker}: output differs from the reference", file=sys.stderr)
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
        f"{'every worker ran the model bit-identically' if ok else 'VERIFICATION FAILED'}; "
        f"demo took {time.perf_counter() - started:.1f} s",
        flush=True,
    )
    return 0 if ok else 1
