"""``python -m bench.weights``: a safetensors checkpoint into CPU tensors, cluster vs disk.

One checkpoint (bfloat16 and float32 tensors, llama-like sizes), one host,
one run, three ways to the same ``dict[str, torch.Tensor]`` on the CPU:

* **cluster**: ``tensorcache.torch.read_state_dict`` from a local 3-node
  cluster (loaded first with ``load_checkpoint``, i.e. ``tensorcache load``);
* **disk, cold**: ``safetensors.torch.load_file`` (the reference reader)
  right after ``posix_fadvise(DONTNEED)`` dropped the file from the page
  cache: what a worker pays on a cold start from local disk;
* **disk, warm**: the same reader with the file in the page cache: the best
  case for disk, a file read by the same host moments ago.

``load_file`` maps the file: its tensors are views of the page cache, read
lazily. Each disk run therefore touches one byte of every 4 KiB page of
every tensor, so the bytes are really read (from the disk when cold); a warm
run then costs page faults and no copy at all, which no path that copies
(the cluster's included) can match.

Ratios are against the cluster, measured in the same run. Every figure is a
median over repetitions bounded in count and time (bench/measure.py). The
cluster's nodes share this host's cores with the reader, and a worker on
another host reads the cluster over the network (docs/performance.md).
Prints a table; writes ``bench/results/weights-<UTC>.json``.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import tensorcache
from bench.measure import MIB, Budget, loadavg, progress, rates, repeat
from tensorcache.apps.cluster import LocalCluster
from tensorcache.torch import load_checkpoint, read_state_dict
from tensorcache.torch.checkpoint import evict_page_cache

RESULTS_DIR = Path(__file__).resolve().parent / "results"
GB = 1e9


def write_checkpoint(path: Path, nbytes: int) -> tuple[int, int]:
    """A llama-like checkpoint of about ``nbytes``; returns (tensors, bytes)."""
    import torch
    from safetensors.torch import save_file

    d = 1024 if nbytes >= 256 * MIB else 256
    ffn = 11 * d // 4
    per_layer = 2 * (4 * d * d + 3 * d * ffn) + 2 * 4 * d
    layers = max(1, nbytes // per_layer)
    g = torch.Generator().manual_seed(0)
    sd: dict[str, Any] = {}
    for i in range(layers):
        p = f"layers.{i}."
        for m in ("q", "k", "v", "o"):
            sd[p + f"{m}_proj.weight"] = torch.randn(d, d, generator=g).to(torch.bfloat16)
        sd[p + "gate_proj.weight"] = torch.randn(ffn, d, generator=g).to(torch.bfloat16)
        sd[p + "up_proj.weight"] = torch.randn(ffn, d, generator=g).to(torch.bfloat16)
        sd[p + "down_proj.weight"] = torch.randn(d, ffn, generator=g).to(torch.bfloat16)
        sd[p + "input_norm.weight"] = torch.ones(d)
        sd[p + "post_norm.weight"] = torch.ones(d)
    save_file(sd, str(path))
    return len(sd), sum(t.numel() * t.element_size() for t in sd.values())


def touched(sd: dict[str, Any]) -> int:
    """Read one byte of every 4 KiB page of every tensor (mapped tensors load lazily)."""
    import torch

    n = 0
    for t in sd.values():
        flat = t.reshape(-1).view(torch.uint8)
        n += int(flat[::4096].sum()) if flat.numel() else 0
    return n


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smoke run: tiny sizes, 1 repetition")
    ap.add_argument("--size-mib", type=int, default=None, help="checkpoint size (default 512)")
    args = ap.parse_args(argv)
    size = (args.size_mib or (16 if args.quick else 512)) * MIB
    budget = (
        Budget(0.0, 1, 1, 60.0)
        if args.quick
        else Budget(seconds=4.0, min_repeats=3, max_repeats=7, max_seconds=60.0)
    )
    from safetensors.torch import load_file

    with tempfile.TemporaryDirectory(prefix="bench-weights-", dir=Path.cwd()) as tmp:
        path = Path(tmp) / "model.safetensors"
        progress(f"writing a ~{size // MIB} MiB checkpoint")
        tensors, nbytes = write_checkpoint(path, size)
        with (
            LocalCluster(3, capacity=max(256 * MIB, nbytes)) as cl,
            tensorcache.connect(cl.router_address) as c,
        ):
            t0 = time.perf_counter()
            load_checkpoint(c, path, "bench/weights/", verify=False)
            fill_s = time.perf_counter() - t0
            assert read_state_dict(c, "bench/weights/") is not None  # warm the connections
            progress("cluster -> CPU tensors")
            cluster = repeat(lambda: read_state_dict(c, "bench/weights/"), budget)
            progress("disk, page cache evicted -> CPU tensors")
            cold = repeat(
                lambda: load_file(str(path)), budget, setup=lambda: evict_page_cache(path)
            )
            progress("disk, page cache warm -> CPU tensors")
            load_file(str(path))
            warm = repeat(lambda: load_file(str(path)), budget)
    rows = {"cluster": cluster, "disk (page cache evicted)": cold, "disk (page cache warm)": warm}
    base = rates(nbytes, cluster)[0]
    print(
        f"\nsafetensors -> CPU torch tensors: {tensors} tensors, {nbytes / MIB:.0f} MiB "
        f"(bfloat16 + float32); one host, load average {loadavg():.1f}"
    )
    print(f"{'path':<28}{'median GB/s':>12}{'best GB/s':>11}{'reps':>6}{'vs cluster':>12}")
    out: dict[str, Any] = {}
    for name, times in rows.items():
        med, best = rates(nbytes, times)
        print(f"{name:<28}{med / GB:>12.2f}{best / GB:>11.2f}{len(times):>6}{med / base:>11.2f}x")
        out[name] = {"median_gbps": med / GB, "best_gbps": best / GB, "reps": len(times)}
    print(
        f"(filling the cluster, tensorcache load without read-back: "
        f"{nbytes / fill_s / GB:.2f} GB/s; "
        f"cluster vs cold disk: {base / rates(nbytes, cold)[0]:.2f}x)"
    )
    RESULTS_DIR.mkdir(exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    (RESULTS_DIR / f"weights-{stamp}.json").write_text(
        json.dumps(
            {"bytes": nbytes, "tensors": tensors, "quick": args.quick, "paths": out}, indent=1
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
