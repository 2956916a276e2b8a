"""``python -m bench.torchget``: torch gets against numpy gets of the same bytes.

Part 1 (any host): for each size, one float32 tensor is put twice, once as
a numpy array and once as a torch tensor (the same bytes), and read back by
``get`` (a new array / tensor each time) and by ``get(out=...)`` (into one
reused destination), over the co-located path and over the data channel.
Repetitions of the numpy and the torch get alternate, so load on the
machine hits both alike; the ratio is torch / numpy throughput (the goal:
>= 0.95, i.e. the torch path adds nothing measurable).

Part 2 (CUDA hosts only): ``get(key, device="cuda")`` (through the pinned
staging ring, client/staging.py) against the same get into host memory, and
a pinned-host to device copy of the same size as the limit a staged get
could reach if the network were free.

Every figure is a median over repetitions bounded in count and time
(bench/measure.py). Prints the tables; writes ``bench/results/torchget-<UTC>.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

import tensorcache
from bench.measure import KIB, MIB, Budget, loadavg, progress
from tensorcache.apps.cluster import LocalCluster

RESULTS_DIR = Path(__file__).resolve().parent / "results"
GB = 1e9
SIZES = [4 * KIB, 64 * KIB, MIB, 16 * MIB, 256 * MIB]
QUICK_SIZES = [4 * KIB, 64 * KIB, MIB]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.torchget", description=__doc__)
    p.add_argument("--quick", action="store_true", help="tiny sizes, few repetitions (smoke run)")
    p.add_argument(
        "--nodes", type=int, default=1, help="1: both keys on one node (no placement skew)"
    )
    return p.parse_args(argv)


def alternate(
    fns: dict[str, Callable[[], object]], budget: Budget, nbytes: int
) -> dict[str, float]:
    """Median GB/s of each function, their repetitions interleaved."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    spent = 0.0
    done = 0
    while budget.more(done, spent):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            dt = time.perf_counter() - t0
            times[name].append(dt)
            spent += dt
        done += 1
    return {name: nbytes / statistics.median(ts) / GB for name, ts in times.items()}


def size_label(n: int) -> str:
    return f"{n // MIB} MiB" if n >= MIB else f"{n // KIB} KiB"


def budget_for(nbytes: int, quick: bool) -> Budget:
    if quick:
        return Budget(seconds=0.05, min_repeats=3, max_repeats=20, max_seconds=0.5)
    if nbytes >= 64 * MIB:
        return Budget(seconds=2.0, min_repeats=5, max_repeats=40, max_seconds=6.0)
    return Budget(seconds=0.6, min_repeats=20, max_repeats=5000, max_seconds=2.0)


def cpu_part(router: str, sizes: list[int], quick: bool) -> list[dict[str, Any]]:
    import torch

    rows: list[dict[str, Any]] = []
    for path, opts in (("co-located", {}), ("data channel", {"local_fastpath": False})):
        with tensorcache.connect(router, **opts) as c:
            for n in sizes:
                a = np.random.default_rng(n).standard_normal(n // 4).astype(np.float32)
                t = torch.from_numpy(a.copy())
                c.put_many({"bench/np": a, "bench/torch": t})
                got = c.get("bench/torch")
                assert isinstance(got, torch.Tensor) and torch.equal(got, t)
                # Both destinations are numpy-allocated: where a destination's pages
                # lie relative to the node's buffer changes copy speed by ~10 %
                # at 1 MiB whichever library allocated it (measured), so the
                # ratio compares the torch path's own cost, not two allocators.
                np_out, t_out = np.empty_like(a), torch.from_numpy(np.empty_like(a))
                progress(f"torch vs numpy get, {path}, {size_label(n)}")
                r = alternate(
                    {
                        "numpy": lambda c=c: c.get("bench/np"),
                        "torch": lambda c=c: c.get("bench/torch"),
                        "numpy out=": lambda c=c, o=np_out: c.get("bench/np", out=o),
                        "torch out=": lambda c=c, o=t_out: c.get("bench/torch", out=o),
                    },
                    budget_for(n, quick),
                    n,
                )
                rows.append(
                    {
                        "path": path,
                        "size": n,
                        **{f"{k} GB/s": v for k, v in r.items()},
                        "ratio": r["torch"] / r["numpy"],
                        "ratio out=": r["torch out="] / r["numpy out="],
                    }
                )
                c.delete("bench/np")
                c.delete("bench/torch")
    return rows


def cuda_part(router: str, sizes: list[int], quick: bool) -> list[dict[str, Any]]:
    import torch

    rows: list[dict[str, Any]] = []
    with tensorcache.connect(router) as c:
        for n in sizes:
            t = torch.from_numpy(
                np.random.default_rng(n).standard_normal(n // 4).astype(np.float32)
            )
            c.put("bench/cuda", t)
            dev_out = torch.empty_like(t, device="cuda")
            pinned = t.pin_memory()
            got = c.get("bench/cuda", device="cuda")
            assert torch.equal(got.cpu(), t)

            def to_cuda(c: Any = c) -> None:
                c.get("bench/cuda", device="cuda")
                torch.cuda.synchronize()

            def into_cuda(c: Any = c, o: Any = dev_out) -> None:
                c.get("bench/cuda", out=o)
                torch.cuda.synchronize()

            def h2d(p: Any = pinned, o: Any = dev_out) -> None:
                o.copy_(p, non_blocking=True)
                torch.cuda.synchronize()

            progress(f"CUDA get vs host get, {size_label(n)}")
            r = alternate(
                {
                    "host get": lambda c=c: c.get("bench/cuda"),
                    "cuda get": to_cuda,
                    "cuda out=": into_cuda,
                    "pinned H2D": h2d,
                },
                budget_for(n, quick),
                n,
            )
            rows.append(
                {
                    "size": n,
                    **{f"{k} GB/s": v for k, v in r.items()},
                    "cuda/host": r["cuda get"] / r["host get"],
                    "cuda/H2D": r["cuda get"] / r["pinned H2D"],
                }
            )
            c.delete("bench/cuda")
    return rows


def table(rows: list[dict[str, Any]], cols: list[str], lead: list[str]) -> str:
    head = [*lead, *cols]
    lines = [" | ".join(head), " | ".join("---" for _ in head)]
    for r in rows:
        cells = [r["path"] if k == "path" else size_label(r["size"]) for k in lead]
        cells += [f"{r[k]:.2f}" + ("x" if not k.endswith("GB/s") else "") for k in cols]
        lines.append(" | ".join(cells))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        import torch
    except ImportError:
        print("bench.torchget: torch is not installed (pip install 'tensorcache[torch]')")
        return 0
    sizes = QUICK_SIZES if args.quick else SIZES
    started = datetime.now(UTC)
    load0 = loadavg()
    cuda = torch.cuda.is_available()
    capacity = "64MiB" if args.quick else "1GiB"
    with contextlib.ExitStack() as stack:
        progress(f"starting a local cluster: {args.nodes} nodes x {capacity}")
        cluster = stack.enter_context(LocalCluster(args.nodes, capacity=capacity))
        cpu_rows = cpu_part(cluster.router_address, sizes, args.quick)
        cuda_rows = cuda_part(cluster.router_address, sizes, args.quick) if cuda else []
    print(
        f"torch get vs numpy get {started:%Y-%m-%d %H:%M}Z — torch {torch.__version__}, "
        f"{args.nodes} local nodes, load {load0:.1f} → {loadavg():.1f}"
        + (" — QUICK" if args.quick else "")
    )
    print("float32, the same bytes stored from numpy and from torch; GB/s = 1e9 B/s, medians")
    cols = ["numpy GB/s", "torch GB/s", "ratio", "numpy out= GB/s", "torch out= GB/s", "ratio out="]
    print(table(cpu_rows, cols, ["path", "size"]))
    worst = min(min(r["ratio"], r["ratio out="]) for r in cpu_rows)
    print(f"worst torch/numpy ratio: {worst:.2f}x (goal >= 0.95x)")
    if cuda_rows:
        print(f"\nCUDA ({torch.cuda.get_device_name()}): get(device='cuda') vs get to host")
        cols = ["host get GB/s", "cuda get GB/s", "cuda out= GB/s", "pinned H2D GB/s"]
        print(table(cuda_rows, [*cols, "cuda/host", "cuda/H2D"], ["size"]))
    else:
        print("\nCUDA: not available on this host; the device section was skipped")
    RESULTS_DIR.mkdir(exist_ok=True)
    path = RESULTS_DIR / f"torchget-{started:%Y%m%dT%H%M%SZ}.json"
    path.write_text(json.dumps({"cpu": cpu_rows, "cuda": cuda_rows, "quick": args.quick}, indent=1))
    progress(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
