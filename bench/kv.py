"""``python -m bench.kv``: prefix KV-cache reuse, time to first token and KV GB/s.

Part 1, time to first token (TTFT) of a prompt whose long prefix (a system
prompt, a document) another worker already computed: a randomly initialised
Llama built from a config (nothing downloaded) on this machine's CPU, a
3-node ``LocalCluster`` on loopback. Two ways to the first token, measured
in the same run on the same prompt:

* **recompute**: one forward over the whole prompt (what a worker without a
  shared cache does);
* **cached**: ``kv.match`` (one batched head per node), ``kv.get_prefix``
  (the prefix's chunks from the nodes, into per-layer tensors), a fresh
  ``DynamicCache``, then a forward over the suffix only
  (``tensorcache.kv.hf.prefill(..., store=False)``), split into its parts.

Both end with the logits of the last prompt token (argmax = first token);
the cached run's are checked against the recompute's (max abs difference
printed). Part 2, KV put/get GB/s: ``put_prefix`` of new chunks and
``get_prefix`` of stored ones, next to the client's plain ``put_many`` /
``get_many`` of the same chunk tensors in the same run (the ratio is what
the KV layer costs on top of moving the bytes).

Figures are medians over repetitions bounded in count and time
(bench/measure.py). Prints two tables; writes ``bench/results/kv-<UTC>.json``.
``--quick``: the test's tiny model and a few small chunks (CI smoke).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import tensorcache
from bench.measure import Budget, loadavg, progress, repeat
from tensorcache.apps.cluster import LocalCluster
from tensorcache.kv import KVLayout, hf

RESULTS_DIR = Path(__file__).resolve().parent / "results"
GB = 1e9


@dataclass(frozen=True)
class Model:
    name: str
    config: dict[str, int]
    prefix: int  # tokens another worker computed
    suffix: int  # this request's own tokens
    chunk: int


QUICK_MODEL = Model(
    "tiny (2 layers, d=64)",
    {
        "vocab_size": 512,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 1024,
    },
    prefix=256,
    suffix=16,
    chunk=64,
)
FULL_MODEL = Model(
    "small (8 layers, d=512)",
    {
        "vocab_size": 8192,
        "hidden_size": 512,
        "intermediate_size": 1536,
        "num_hidden_layers": 8,
        "num_attention_heads": 8,
        "num_key_value_heads": 4,
        "max_position_embeddings": 4096,
    },
    prefix=2048,
    suffix=32,
    chunk=256,
)


def median(times: list[float]) -> float:
    return statistics.median(times)


def ttft(client: Any, spec: Model, budget: Budget) -> dict[str, Any]:
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**spec.config)).eval()
    kv = client.kv(
        hf.layout_for(model, model_id="bench/llama", revision="seed-0", chunk_tokens=spec.chunk)
    )
    g = torch.Generator().manual_seed(1)
    vocab = spec.config["vocab_size"]
    prompt = torch.randint(0, vocab, (1, spec.prefix + spec.suffix), generator=g)
    # Another worker computed and stored the prefix (untimed).
    hf.prefill(model, kv, prompt[:, : spec.prefix + 1])
    assert kv.match(prompt[0]) == spec.prefix

    results: dict[str, Any] = {}

    def recompute() -> None:
        results["recompute"] = hf.continue_from(model, [], 0, prompt).logits[0, -1]

    def cached() -> None:
        step = hf.prefill(model, kv, prompt, store=False)
        assert step.reused == spec.prefix
        results["cached"] = step.logits[0, -1]

    with torch.no_grad():
        progress(f"TTFT: {spec.name}, {spec.prefix}-token prefix + {spec.suffix}")
        rec = repeat(recompute, budget)
        hit = repeat(cached, budget)
        # The cached path's parts, each timed on its own.
        t_match = repeat(lambda: kv.match(prompt[0]), budget)
        t_get = repeat(lambda: kv.get_prefix(prompt[0], spec.prefix), budget)
        layers = kv.get_prefix(prompt[0], spec.prefix).layers
        t_fwd = repeat(lambda: hf.continue_from(model, layers, spec.prefix, prompt), budget)
    diff = float((results["recompute"] - results["cached"]).abs().max())
    same_token = int(results["recompute"].argmax()) == int(results["cached"].argmax())
    return {
        "model": spec.name,
        "params": sum(p.numel() for p in model.parameters()),
        "prefix": spec.prefix,
        "suffix": spec.suffix,
        "chunk_tokens": spec.chunk,
        "kv_bytes": kv.layout.chunk_nbytes * (spec.prefix // spec.chunk),
        "recompute_s": median(rec),
        "cached_s": median(hit),
        "match_s": median(t_match),
        "get_prefix_s": median(t_get),
        "suffix_forward_s": median(t_fwd),
        "speedup": median(rec) / median(hit),
        "max_abs_logit_diff": diff,
        "same_first_token": same_token,
        "repeats": [len(rec), len(hit)],
    }


def gbs(nbytes: int, times: list[float]) -> float:
    return nbytes / median(times) / GB


def throughput(client: Any, quick: bool, budget: Budget) -> dict[str, Any]:
    # A Llama-3-8B-like slice (8 KV heads x 128, bf16) with fewer layers, so a
    # chunk is 4 MiB (full) or 128 KiB (quick).
    layout = KVLayout(
        "bench/kv-throughput",
        "r0",
        num_layers=2 if quick else 8,
        num_kv_heads=8,
        head_dim=128,
        dtype="bfloat16",
        chunk_tokens=32 if quick else 256,
    )
    chunks = 4 if quick else 32
    tokens = layout.chunk_tokens * chunks
    nbytes = layout.chunk_nbytes * chunks
    kv = client.kv(layout)
    shape = (1, layout.num_kv_heads, tokens, layout.head_dim)
    layers = [
        (torch.randn(shape).to(torch.bfloat16), torch.randn(shape).to(torch.bfloat16))
        for _ in range(layout.num_layers)
    ]
    seq = iter(range(10**9))
    progress(f"KV GB/s: {chunks} chunks of {layout.chunk_nbytes / 2**20:.2f} MiB")

    def fresh_tokens() -> list[int]:
        n = next(seq)
        return [n] * tokens  # a new prompt each time: every chunk is new

    pending: list[list[int]] = []
    put_times = repeat(
        lambda: kv.put_prefix(pending[-1], layers),
        budget,
        setup=lambda: pending.append(fresh_tokens()),
    )
    stored = pending[-1]
    assert kv.match(stored) == tokens
    get_times = repeat(lambda: kv.get_prefix(stored), budget)
    out = [
        (torch.empty(shape[1:], dtype=torch.bfloat16), torch.empty(shape[1:], dtype=torch.bfloat16))
        for _ in layers
    ]
    get_out_times = repeat(lambda: kv.get_prefix(stored, out=out), budget)
    # Baseline: the same chunk tensors through the plain client API.
    chunk_tensors = {
        f"bench/kv-plain/{i}": torch.randn(layout.chunk_shape).to(torch.bfloat16)
        for i in range(chunks)
    }
    plain_put = repeat(lambda: client.put_many(chunk_tensors), budget)
    plain_get = repeat(lambda: client.get_many(list(chunk_tensors), as_="torch"), budget)
    return {
        "chunk_bytes": layout.chunk_nbytes,
        "chunks": chunks,
        "bytes": nbytes,
        "put_prefix_gbs": gbs(nbytes, put_times),
        "get_prefix_gbs": gbs(nbytes, get_times),
        "get_prefix_out_gbs": gbs(nbytes, get_out_times),
        "put_many_gbs": gbs(nbytes, plain_put),
        "get_many_gbs": gbs(nbytes, plain_get),
    }


def fmt_table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    line = lambda r: "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True))  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths]), *(line(r) for r in rows)])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.kv", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="the tiny model, small chunks (smoke)")
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch intra-op threads (default: torch's; 1 is steadier on a busy machine, where "
        "spinning worker threads make every copy and matmul several times slower)",
    )
    args = p.parse_args(argv)
    budget = (
        Budget(seconds=0.0, min_repeats=1, max_repeats=2, max_seconds=5.0)
        if args.quick
        else Budget(seconds=3.0, min_repeats=5, max_repeats=50, max_seconds=30.0)
    )
    spec = QUICK_MODEL if args.quick else FULL_MODEL
    started = datetime.now(UTC)
    load_before = loadavg()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    with (
        tempfile.TemporaryDirectory(prefix="bench-kv-") as tmp,
        LocalCluster(3, capacity="1GiB", log_dir=Path(tmp)) as cluster,
        tensorcache.connect(cluster.router_address) as client,
    ):
        t = ttft(client, spec, budget)
        io = throughput(client, args.quick, budget)
    ms = lambda s: f"{s * 1e3:.1f}"  # noqa: E731
    print()
    print(
        f"Time to first token, {t['model']} ({t['params'] / 1e6:.1f} M params), CPU, "
        f"{t['prefix']}-token cached prefix ({t['kv_bytes'] / 2**20:.1f} MiB of KV) + "
        f"{t['suffix']} new tokens"
    )
    print(
        fmt_table(
            ["path", "TTFT ms", "vs recompute"],
            [
                ["recompute (full prefill)", ms(t["recompute_s"]), "1.00x"],
                [
                    "cached prefix (match+get+suffix)",
                    ms(t["cached_s"]),
                    f"{t['speedup']:.2f}x faster",
                ],
                ["  of which match", ms(t["match_s"]), ""],
                ["  of which get_prefix", ms(t["get_prefix_s"]), ""],
                ["  of which suffix forward", ms(t["suffix_forward_s"]), ""],
            ],
        )
    )
    print(
        f"max |logit diff| cached vs recompute: {t['max_abs_logit_diff']:.2e}; "
        f"same first token: {t['same_first_token']}"
    )
    print()
    print(
        f"KV put/get, {io['chunks']} chunks of {io['chunk_bytes'] / 2**20:.2f} MiB (bf16), "
        "3 nodes on loopback, one client"
    )
    print(
        fmt_table(
            ["operation", "GB/s", "vs plain client"],
            [
                [
                    "put_prefix (new chunks)",
                    f"{io['put_prefix_gbs']:.2f}",
                    f"{io['put_prefix_gbs'] / io['put_many_gbs']:.2f}x of put_many",
                ],
                [
                    "get_prefix (new tensors)",
                    f"{io['get_prefix_gbs']:.2f}",
                    f"{io['get_prefix_gbs'] / io['get_many_gbs']:.2f}x of get_many",
                ],
                [
                    "get_prefix (out= buffers)",
                    f"{io['get_prefix_out_gbs']:.2f}",
                    f"{io['get_prefix_out_gbs'] / io['get_many_gbs']:.2f}x of get_many",
                ],
                ["put_many (same chunks)", f"{io['put_many_gbs']:.2f}", "1.00x"],
                ["get_many (same chunks)", f"{io['get_many_gbs']:.2f}", "1.00x"],
            ],
        )
    )
    print(
        f"torch threads: {torch.get_num_threads()}; "
        f"load average before/after: {load_before:.2f} / {loadavg():.2f}"
    )
    RESULTS_DIR.mkdir(exist_ok=True)
    out = RESULTS_DIR / f"kv-{started:%Y%m%dT%H%M%SZ}.json"
    doc = {
        "started": started.isoformat(),
        "quick": args.quick,
        "torch_threads": torch.get_num_threads(),
        "load_before": load_before,
        "load_after": loadavg(),
        "ttft": t,
        "throughput": io,
    }
    out.write_text(json.dumps(doc, indent=2))
    print(f"wrote {out}")
    return 0 if t["same_first_token"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
