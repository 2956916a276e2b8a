"""KV-cache sharing end to end: a real model, real node processes, three workers.

Process A computes a prompt prefix's KV with a tiny randomly initialised
LlamaForCausalLM and stores it; process B (another PYTHONHASHSEED, a
strict near-cache) loads it from the cluster and continues; process C
(another seed, a watch-mode near-cache) recomputes the prefix itself and
continues. Then a "weights update" (``kv.invalidate()``) and what every
process sees after it. tests/integration/kvworker.py is the worker.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from .helpers import poll, read_line  # noqa: E402

# Three processes each import torch and transformers and build a model: on a
# busy 2-core CI machine that alone can take minutes, past the default 300 s.
pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]

ROOT = Path(__file__).resolve().parents[2]
STARTUP_S = 180.0  # importing torch + transformers on a loaded 2-core machine
STEP_S = 120.0


class Proc:
    """One worker process, driven one JSON command at a time."""

    def __init__(self, router: str, outdir: Path, seed: str, near: str | None) -> None:
        outdir.mkdir(parents=True, exist_ok=True)
        args = [sys.executable, "-m", "tests.integration.kvworker", router, str(outdir)]
        self.stderr = open(outdir / "stderr.log", "wb")  # noqa: SIM115 (closed in close())
        self.proc = subprocess.Popen(
            [*args, *([near] if near else [])],
            cwd=ROOT,
            env={**os.environ, "PYTHONHASHSEED": seed},
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.stderr,
        )

    def ready(self) -> None:
        assert json.loads(read_line(self.proc, STARTUP_S)) == {"ready": True}

    def call(self, op: str, **args: Any) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write((json.dumps({"op": op, **args}) + "\n").encode())
        self.proc.stdin.flush()
        reply: dict[str, Any] = json.loads(read_line(self.proc, STEP_S))
        assert "error" not in reply, reply["error"]
        return reply

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.call_exit()
                self.proc.wait(timeout=30)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait(timeout=30)
        self.stderr.close()

    def call_exit(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(b'{"op": "exit"}\n')
        self.proc.stdin.close()


@pytest.fixture
def workers(cluster: Any, tmp_path: Path) -> Iterator[dict[str, Proc]]:
    procs = {
        "A": Proc(cluster.router_address, tmp_path / "A", "1", None),
        "B": Proc(cluster.router_address, tmp_path / "B", "2", "strict"),
        "C": Proc(cluster.router_address, tmp_path / "C", "3", "watch"),
    }
    try:
        for p in procs.values():
            p.ready()
        yield procs
    finally:
        for p in procs.values():
            p.close()


def load(path: str) -> Any:
    return torch.load(path, weights_only=True)


def test_prefix_kv_shared_between_processes_gives_exact_logits(workers: dict[str, Proc]) -> None:
    a, b, c = workers["A"], workers["B"], workers["C"]
    g = torch.Generator().manual_seed(7)
    prefix = torch.randint(0, 512, (64,), generator=g).tolist()  # 4 chunks of 16
    prompt = prefix + torch.randint(0, 512, (11,), generator=g).tolist()

    stored = a.call("store", prompt=prefix)
    assert stored == {"reused": 0, "stored": 4, "chunks": 4}

    got_b = b.call("from_cluster", prompt=prompt, name="B")
    assert got_b["reused"] == 64  # the whole prefix came from the cluster
    got_c = c.call("recompute", prompt=prompt, prefix_len=64, name="C")

    logits_b, logits_c = load(got_b["logits"]), load(got_c["logits"])
    assert logits_b.shape == (1, 11, 512)
    assert torch.equal(logits_b, logits_c)  # bit-identical: the same KV bytes, the same path
    assert got_b["greedy"] == got_c["greedy"] and len(got_b["greedy"]) == 8
    full = load(got_b["full"])  # one forward over the whole prompt, no cache
    assert torch.allclose(logits_b, full, atol=1e-5, rtol=0)

    # Every process sees the prefix; other revisions and layouts miss.
    for p in (a, b, c):
        seen = p.call("probe", prompt=prompt)
        assert (seen["match"], seen["read"], seen["chunk_get"]) == (64, 64, True)
        assert seen["other_revision"] == seen["other_chunking"] == 0
        assert seen["other_dtype"] == seen["other_tp"] == 0
    again = b.call("probe", prompt=prompt)  # B's near-cache now holds the first chunk
    assert again["near_hits"] >= 1

    # A "weights update": A invalidates; no process sees the old KV, near-caches included.
    a.call("invalidate")
    for p in (a, b):  # A dropped its own near-cache state; B's strict one revalidates
        seen = p.call("probe", prompt=prompt)
        assert (seen["match"], seen["read"], seen["chunk_get"]) == (0, 0, False), seen
    # C's watch-mode near-cache serves hits without asking: the invalidation
    # reaches it by push, within the push delay (docs/consistency.md).
    seen = poll(
        lambda: (s := c.call("probe", prompt=prompt))["chunk_get"] is False and s,
        timeout=30,
        what="C's watch-mode near-cache to drop the invalidated chunk",
    )
    assert (seen["match"], seen["read"]) == (0, 0), seen

    # Stored again after the update: shared again.
    assert a.call("store", prompt=prefix)["stored"] == 4
    assert b.call("from_cluster", prompt=prompt, name="B2")["reused"] == 64
