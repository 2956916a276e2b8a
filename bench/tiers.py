"""``python -m bench.tiers``: compression per tensor kind, and the disk tier's reads.

Part 1, compression (client/compress.py) on tensors that look like the real
thing: the weights of a randomly initialised small transformer (torch when
installed, else normal(0, 0.02) halves), its bf16 cast, fp32 activations
(GELU outputs of a random MLP layer), a KV-cache from a tiny transformers
model (a random-init GPT-2 run over random tokens; numpy stand-in without
transformers), a 95 %-sparse matrix and int8-quantized weights. For each
codec: ratio, compress and decompress GB/s (of uncompressed bytes), and the
*break-even link*: compression pays on links slower than
``(1 - 1/ratio) / (1/c + 1/d)`` GB/s (one transfer, compressing and
decompressing on one core each side, no overlap). Then put + get GB/s
end to end through a 1-node local cluster with each codec: on one host the
"network" is a memory copy, so this is the cost side only.

Part 2, the disk tier: get GB/s from a node whose entries are in RAM, from
a node whose RAM is too small so that every get is served from its disk
tier (keys read in order through an LRU smaller than the set: each read
misses RAM), and re-reading the tensors from the original safetensors file
(numpy .npy files without safetensors). The files are in the page cache
(dropping it would disturb everything else on the machine), so "disk"
here is the tier's overhead over memory, not an SSD's speed.

Every figure is a median over repetitions bounded in count and time
(bench/measure.py). Prints two tables; writes ``bench/results/tiers-<UTC>.json``.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

import tensorcache
from bench.measure import MIB, Budget, loadavg, progress, repeat
from tensorcache.apps.cluster import LocalCluster
from tensorcache.client import compress

RESULTS_DIR = Path(__file__).resolve().parent / "results"
GB = 1e9


# -- tensors that look like the real thing -----------------------------------------------
def transformer_weights(quick: bool) -> tuple[np.ndarray, str]:
    """fp16 weights of a randomly initialised transformer layer stack, flattened."""
    d = 128 if quick else 512
    try:
        import torch

        torch.manual_seed(0)
        layers = torch.nn.TransformerEncoder(
            torch.nn.TransformerEncoderLayer(d, 8, 4 * d, batch_first=True), 2 if quick else 4
        )
        flat = torch.cat([p.detach().reshape(-1) for p in layers.parameters()])
        return flat.half().numpy(), "torch TransformerEncoder init"
    except ImportError:
        rng = np.random.default_rng(0)
        n = (2 if quick else 4) * 12 * d * d
        return (rng.standard_normal(n) * 0.02).astype(np.float16), "normal(0, 0.02)"


def bf16(weights: np.ndarray) -> np.ndarray:
    """bf16 bit patterns (as uint16): the top half of each float32."""
    return (weights.astype(np.float32).view(np.uint32) >> 16).astype(np.uint16)


def activations(quick: bool) -> np.ndarray:
    """fp32 GELU outputs of a random linear layer over random inputs."""
    rng = np.random.default_rng(1)
    tokens, d = (256, 256) if quick else (2048, 1024)
    x = rng.standard_normal((tokens, d), dtype=np.float32)
    w = rng.standard_normal((d, d), dtype=np.float32) / np.sqrt(d)
    h = x @ w
    return (0.5 * h * (1 + np.tanh(0.7978845608 * (h + 0.044715 * h**3)))).astype(np.float32)


def kv_cache(quick: bool) -> tuple[np.ndarray, str]:
    """The past key/values of a tiny random-init GPT-2 over random tokens (fp16)."""
    try:
        import torch
        from transformers import GPT2Config, GPT2LMHeadModel

        torch.manual_seed(0)
        cfg = GPT2Config(n_layer=4, n_head=4, n_embd=256, vocab_size=1000, n_positions=1024)
        model = GPT2LMHeadModel(cfg).eval()
        ids = torch.randint(0, 1000, (1, 128 if quick else 1024))
        with torch.no_grad():
            out = model(ids, use_cache=True)
        cache = out.get("cache") or out.get("past_key_values")  # renamed in transformers 5
        if hasattr(cache, "layers"):
            parts = [t for layer in cache.layers for t in (layer.keys, layer.values)]
        else:  # legacy tuples of (key, value)
            parts = [t for kv in cache for t in kv]
        flat = torch.cat([t.reshape(-1) for t in parts])
        return flat.half().numpy(), "GPT-2 (random init, 4 layers) past_key_values"
    except Exception:  # no torch/transformers, or an API change: a labelled stand-in
        rng = np.random.default_rng(2)
        n = 2 * 2 * 4 * (128 if quick else 1024) * 32
        return rng.standard_normal(n).astype(np.float16), "normal fp16 stand-in"


def sparse(quick: bool) -> np.ndarray:
    rng = np.random.default_rng(3)
    shape = (512, 512) if quick else (2048, 2048)
    mask = rng.random(shape) < 0.05
    return np.where(mask, rng.standard_normal(shape), 0).astype(np.float32)


def quantized(weights: np.ndarray) -> np.ndarray:
    """int8 symmetric quantization of ``weights`` (per-tensor scale)."""
    w = weights.astype(np.float32)
    scale = np.abs(w).max() / 127
    return np.clip(np.round(w / scale), -127, 127).astype(np.int8)


def samples(quick: bool) -> list[tuple[str, np.ndarray, str]]:
    w, wsrc = transformer_weights(quick)
    kv, kvsrc = kv_cache(quick)
    return [
        ("fp16 weights", w, wsrc),
        ("bf16 weights", bf16(w), "the same, bf16 bits"),
        ("fp32 activations", activations(quick), "GELU of a random layer"),
        ("fp16 KV-cache", kv, kvsrc),
        ("fp32 95% sparse", sparse(quick), "5% nonzero normals"),
        ("int8 quantized", quantized(w), "the fp16 weights, per-tensor scale"),
    ]


# -- measuring -------------------------------------------------------------------------
def median_s(fn: Callable[[], object], budget: Budget) -> float:
    times = repeat(fn, budget)
    return float(np.median(times))


def compression_rows(quick: bool, budget: Budget) -> list[dict[str, Any]]:
    rows = []
    for name, value, source in samples(quick):
        progress(f"compression: {name} ({value.nbytes / MIB:.1f} MiB, {source})")
        for codec in ("lz4", "zstd"):
            got = compress.pack(value, codec)
            if got is None:
                rows.append(
                    {
                        "tensor": name,
                        "source": source,
                        "codec": codec,
                        "ratio": 1.0,
                        "stored_as_is": True,
                        "nbytes": value.nbytes,
                    }
                )
                continue
            payload, info = got
            c_s = median_s(lambda: compress.pack(value, codec), budget)  # noqa: B023
            out = np.empty_like(value)
            d_s = median_s(lambda: compress.unpack(info, payload, out), budget)  # noqa: B023
            assert out.tobytes() == value.tobytes()
            ratio = value.nbytes / payload.nbytes
            c, d = value.nbytes / c_s / GB, value.nbytes / d_s / GB
            breakeven = (1 - 1 / ratio) / (1 / c + 1 / d) if ratio > 1 else 0.0
            rows.append(
                {
                    "tensor": name,
                    "source": source,
                    "codec": codec,
                    "ratio": ratio,
                    "compress_gbs": c,
                    "decompress_gbs": d,
                    "breakeven_gbs": breakeven,
                    "stored_as_is": False,
                    "nbytes": value.nbytes,
                }
            )
    return rows


def end_to_end_rows(quick: bool, budget: Budget, log_dir: Path) -> list[dict[str, Any]]:
    """put + get GB/s of each tensor kind with each codec, one local node."""
    rows = []
    with (
        LocalCluster(1, capacity="2GiB", log_dir=log_dir / "e2e") as cl,
        tensorcache.connect(cl.router_address) as c,
    ):
        for name, value, _ in samples(quick):
            for codec in ("none", "lz4", "zstd"):
                key = f"e2e/{name}/{codec}"
                put_s = median_s(lambda: c.put(key, value, compression=codec), budget)  # noqa: B023
                out = np.empty_like(value)
                get_s = median_s(lambda: c.get(key, out=out), budget)  # noqa: B023
                assert out.tobytes() == value.tobytes()
                rows.append(
                    {
                        "tensor": name,
                        "codec": codec,
                        "put_gbs": value.nbytes / put_s / GB,
                        "get_gbs": value.nbytes / get_s / GB,
                    }
                )
    return rows


def disk_rows(quick: bool, budget: Budget, log_dir: Path) -> list[dict[str, Any]]:
    """get GB/s: entries in RAM vs served by the disk tier vs re-read from the file."""
    n, size = (12, 1 * MIB) if quick else (24, 16 * MIB)
    rng = np.random.default_rng(4)
    tensors = {
        f"t{i}": (rng.standard_normal(size // 2) * 0.02).astype(np.float16) for i in range(n)
    }
    total = n * size
    rows = []
    work = log_dir / "files"
    work.mkdir(parents=True, exist_ok=True)
    try:
        from safetensors.numpy import load_file, save_file

        path = work / "model.safetensors"
        save_file(tensors, str(path))

        def reread() -> None:
            load_file(str(path))

        source = "safetensors load_file"
    except ImportError:
        for k, v in tensors.items():
            np.save(work / f"{k}.npy", v)

        def reread() -> None:
            for k in tensors:
                np.load(work / f"{k}.npy")

        source = "np.load of .npy files"
    reread()  # warm the page cache, as for the tier's files
    rows.append(
        {"path": f"re-read the file ({source})", "get_gbs": total / median_s(reread, budget) / GB}
    )

    # RAM: everything fits. Disk: RAM holds about a third of the set, so
    # reading keys in order through LRU misses RAM every time.
    ram_only = {"capacity": f"{4 * total // MIB}MiB"}
    # The write queue takes the whole set, so no eviction is dropped while
    # the puts outrun the writer (a real node spills as RAM fills, slower).
    small = {
        "capacity": f"{(total // 3 + 2 * size + total) // MIB}MiB",
        "node_args": ["--disk-queue", f"{total // MIB}MiB"],
        "disk_path": log_dir / "disk",
        "disk_capacity": f"{4 * total // MIB}MiB",
    }
    for label, opts in (("node RAM", ram_only), ("node disk tier", small)):
        cluster = LocalCluster(1, log_dir=log_dir / label.replace(" ", "-"), **opts)  # type: ignore[arg-type]
        with cluster as cl, tensorcache.connect(cl.router_address) as c:
            for k, v in tensors.items():
                c.put(k, v)
            if "disk" in label:
                deadline = time.monotonic() + 60
                while time.monotonic() < deadline:
                    s = c.stats()[0]
                    if s.disk_spills >= n and s.disk_files >= n - 4:
                        break
                    time.sleep(0.1)
            outs = {k: np.empty_like(v) for k, v in tensors.items()}

            def read_all() -> None:
                for k in tensors:
                    if c.get(k, out=outs[k]) is None:  # noqa: B023
                        raise RuntimeError(f"{k} missed")

            before = c.stats()[0]
            secs = median_s(read_all, budget)
            after = c.stats()[0]
            for k, v in tensors.items():
                assert outs[k].tobytes() == v.tobytes()
            rows.append(
                {
                    "path": label,
                    "get_gbs": total / secs / GB,
                    "disk_hits": after.disk_hits - before.disk_hits,
                    "gets": after.hits - before.hits,
                }
            )
    return rows


def fmt_table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    line = lambda r: "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True))  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths]), *(line(r) for r in rows)])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.tiers", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny tensors, few repetitions (smoke)")
    p.add_argument("--skip-disk", action="store_true")
    args = p.parse_args(argv)
    budget = (
        Budget(seconds=0.0, min_repeats=1, max_repeats=2, max_seconds=5.0)
        if args.quick
        else Budget(seconds=1.5, min_repeats=3, max_repeats=30, max_seconds=20.0)
    )
    started = datetime.now(UTC)
    load_before = loadavg()
    with tempfile.TemporaryDirectory(prefix="bench-tiers-") as tmp:
        comp = compression_rows(args.quick, budget)
        progress("end to end: put + get through a local node")
        e2e = end_to_end_rows(args.quick, budget, Path(tmp))
        disk = [] if args.skip_disk else disk_rows(args.quick, budget, Path(tmp))
    print()
    print("Compression (client/compress.py; GB/s of uncompressed bytes, one client process)")
    print(
        fmt_table(
            ["tensor", "MiB", "codec", "ratio", "compress", "decompress", "pays below"],
            [
                [
                    r["tensor"],
                    f"{r['nbytes'] / MIB:.1f}",
                    r["codec"],
                    f"{r['ratio']:.2f}",
                    *(
                        ["stored as is", "-", "-"]
                        if r["stored_as_is"]
                        else [
                            f"{r['compress_gbs']:.2f}",
                            f"{r['decompress_gbs']:.2f}",
                            f"{r['breakeven_gbs']:.2f} GB/s",
                        ]
                    ),
                ]
                for r in comp
            ],
        )
    )
    print()
    print("End to end, 1 local node (co-located: the link is a memory copy)")
    print(
        fmt_table(
            ["tensor", "codec", "put GB/s", "get GB/s"],
            [[r["tensor"], r["codec"], f"{r['put_gbs']:.2f}", f"{r['get_gbs']:.2f}"] for r in e2e],
        )
    )
    if disk:
        ram = next(r["get_gbs"] for r in disk if r["path"] == "node RAM")
        print()
        print("Reads: RAM vs the disk tier vs the original file (page cache warm)")
        print(
            fmt_table(
                ["path", "get GB/s", "vs node RAM", "disk reads / gets"],
                [
                    [
                        r["path"],
                        f"{r['get_gbs']:.2f}",
                        f"{r['get_gbs'] / ram:.2f}x",
                        f"{r['disk_hits']}/{r['gets']}" if "gets" in r else "-",
                    ]
                    for r in disk
                ],
            )
        )
    load_after = loadavg()
    print(
        f"\nload average {load_before:.1f} -> {load_after:.1f}; "
        f"{'quick' if args.quick else 'full'} run"
    )
    RESULTS_DIR.mkdir(exist_ok=True)
    out = RESULTS_DIR / f"tiers-{started:%Y%m%dT%H%M%SZ}.json"
    if not args.quick:
        out.write_text(
            json.dumps(
                {
                    "started": started.isoformat(),
                    "compression": comp,
                    "end_to_end": e2e,
                    "disk": disk,
                    "load": [load_before, load_after],
                },
                indent=1,
            )
        )
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
