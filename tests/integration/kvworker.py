"""A worker process for test_kv_transformers.py: a tiny Llama and a cluster client.

Run as ``python -m tests.integration.kvworker ROUTER OUTDIR [near-cache options]``;
it reads one JSON command per stdin line and answers one JSON line on stdout
(tensors go to files under OUTDIR: exact comparison needs the bits). The
model is a tiny ``LlamaForCausalLM`` built from a config with a fixed seed:
every process has the same weights, nothing is downloaded.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import tensorcache
from tensorcache.kv import KVLayout, hf

CHUNK = 16
CONFIG = {
    "vocab_size": 512,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 512,
}


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**CONFIG)).eval()


def layout(model: LlamaForCausalLM, revision: str = "seed-0", **change: Any) -> KVLayout:
    fields: dict[str, Any] = {
        "model_id": "test/tiny-llama",
        "revision": revision,
        "chunk_tokens": CHUNK,
    }
    fields.update(change)
    return hf.layout_for(model, **fields)


class Worker:
    def __init__(self, router: str, outdir: Path, near_cache_mode: str | None) -> None:
        options: dict[str, Any] = {}
        if near_cache_mode:
            options = {"near_cache": "64MiB", "near_cache_mode": near_cache_mode}
        self.client = tensorcache.connect(router, **options)
        self.model = tiny_llama()
        self.kv = self.client.kv(layout(self.model))
        self.outdir = outdir

    def save(self, name: str, t: torch.Tensor) -> str:
        path = self.outdir / f"{name}.pt"
        torch.save(t.detach().cpu().clone(), path)
        return str(path)

    def store(self, prompt: list[int]) -> dict[str, Any]:
        """Compute the prompt's KV here and put it (process A)."""
        step = hf.prefill(self.model, self.kv, torch.tensor([prompt]))
        assert step.stored is not None
        return {"reused": step.reused, "stored": step.stored.stored, "chunks": step.stored.chunks}

    def from_cluster(self, prompt: list[int], name: str) -> dict[str, Any]:
        """Continue from the cluster's prefix (process B); also one full forward."""
        ids = torch.tensor([prompt])
        step = hf.prefill(self.model, self.kv, ids, store=False)
        greedy = hf.generate(
            self.model, self.kv, ids, store=False, max_new_tokens=8, do_sample=False
        )
        with torch.no_grad():
            full = self.model(ids).logits
        return {
            "reused": step.reused,
            "logits": self.save(f"{name}-logits", step.logits),
            "full": self.save(f"{name}-full", full[:, step.reused :]),
            "greedy": greedy[0, len(prompt) :].tolist(),
        }

    def recompute(self, prompt: list[int], prefix_len: int, name: str) -> dict[str, Any]:
        """Compute the prefix here, then continue exactly as B does (process C)."""
        ids = torch.tensor([prompt])
        with torch.no_grad():
            own = self.model(ids[:, :prefix_len], use_cache=True).cache
        layers = [(k.clone(), v.clone()) for k, v in hf.cache_layers(own)]
        out = hf.continue_from(self.model, layers, prefix_len, ids)
        with torch.no_grad():
            greedy = self.model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                cache=hf.dynamic_cache(layers, self.model.config),  # fresh: generate grows it
                max_new_tokens=8,
                do_sample=False,
            )
        return {
            "logits": self.save(f"{name}-logits", out.logits),
            "greedy": greedy[0, len(prompt) :].tolist(),
        }

    def probe(self, prompt: list[int]) -> dict[str, Any]:
        """What this process sees of the prompt: match, a read, the first chunk via get()
        (the near-cache path when one is configured), and other layouts' matches."""
        first = self.kv.keys(prompt)[0]
        return {
            "match": self.kv.match(prompt),
            "read": self.kv.get_prefix(prompt).tokens,
            "chunk_get": self.client.get(first) is not None,
            "near_hits": self.client.metrics().get("near_hits", 0),
            "other_revision": self.client.kv(layout(self.model, "seed-1")).match(prompt),
            "other_chunking": self.client.kv(layout(self.model, chunk_tokens=8)).match(prompt),
            "other_dtype": self.client.kv(layout(self.model, dtype=torch.bfloat16)).match(prompt),
            "other_tp": self.client.kv(layout(self.model, tp_size=2, tp_rank=0)).match(prompt),
        }

    def invalidate(self) -> dict[str, Any]:
        return {"generation": self.kv.invalidate()}


def main(argv: list[str]) -> None:
    router, outdir = argv[0], Path(argv[1])
    replies, sys.stdout = sys.stdout, sys.stderr  # stray prints must not break the protocol
    worker = Worker(router, outdir, argv[2] if len(argv) > 2 else None)
    print(json.dumps({"ready": True}), file=replies, flush=True)
    for line in sys.stdin:
        cmd = json.loads(line)
        op = cmd.pop("op")
        if op == "exit":
            break
        try:
            reply = getattr(worker, op)(**cmd)
        except Exception as exc:  # reported to the test, which fails with it
            reply = {"error": f"{type(exc).__name__}: {exc}"}
        print(json.dumps(reply), file=replies, flush=True)
    worker.client.close()


if __name__ == "__main__":
    main(sys.argv[1:])
