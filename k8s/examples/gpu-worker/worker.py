"""Example GPU worker: read a model's weights through tensorcache, then serve.

Every tensor is read with ``get_or_load``: across all workers, the first one
to miss a tensor loads it from MODEL_DIR (one ``.npy`` file per tensor) and
puts it; every other worker streams it from the cache nodes' RAM. Keys carry
the model revision (MODEL_PREFIX), so publishing a new revision is a new
prefix, and ``invalidate(old prefix)`` retires the old one everywhere.

Environment: TC_ROUTER (host:port of the router Service), MODEL_DIR,
MODEL_PREFIX; WORKER_EXIT=1 exits after loading instead of serving.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

import numpy as np

import tensorcache


def load_weights(client: tensorcache.Client, model_dir: Path, prefix: str) -> dict:
    weights: dict[str, np.ndarray] = {}
    loaded = 0
    for path in sorted(model_dir.rglob("*.npy")):
        key = prefix + path.relative_to(model_dir).as_posix()

        def load(path: Path = path) -> np.ndarray:
            nonlocal loaded
            loaded += 1
            return np.load(path)

        weights[key] = client.get_or_load(key, load)
    print(f"worker: {len(weights)} tensors, {loaded} loaded from {model_dir}", flush=True)
    return weights


def to_gpu(weights: dict) -> dict:
    """Move the weights to the GPU when torch and CUDA are there (the real worker's job)."""
    try:
        import torch
    except ImportError:
        return weights
    if not torch.cuda.is_available():
        return weights
    return {k: torch.from_numpy(v).to("cuda", non_blocking=True) for k, v in weights.items()}


def main() -> int:
    router = os.environ["TC_ROUTER"]
    model_dir = Path(os.environ["MODEL_DIR"])
    prefix = os.environ["MODEL_PREFIX"]
    start = time.monotonic()
    with tensorcache.connect(router) as client:
        weights = to_gpu(load_weights(client, model_dir, prefix))
    print(f"worker: weights ready in {time.monotonic() - start:.1f}s", flush=True)
    if os.environ.get("WORKER_EXIT") == "1":
        return 0
    # A real worker serves inference here; this one idles until SIGTERM.
    signal.sigwait({signal.SIGTERM, signal.SIGINT})
    del weights
    return 0


if __name__ == "__main__":
    sys.exit(main())
