"""Processes for test_weights_torch.py (a module of its own: spawned children import it cheaply)."""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path
from typing import Any

import torch

import tensorcache
from tensorcache.client.api import Client
from tensorcache.torch import Memo, get_or_load_state_dict, load_safetensors, put_state_dict
from tensorcache.torch.tensors import raw_bytes

from .torchmodels import model


def digest(sd: dict[str, Any]) -> str:
    h = hashlib.sha256()
    for name in sorted(sd):
        t = sd[name]
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(raw_bytes(t).tobytes())
    return h.hexdigest()


def fill_state_dict(router: str, prefix: str, log: str) -> str:
    def loader() -> dict[str, Any]:
        with open(log, "a") as f:
            f.write(f"{os.getpid()}\n")
        time.sleep(0.5)  # the load itself (object storage), not synchronization
        return model(7).state_dict()

    with tensorcache.connect(router) as c:
        return digest(get_or_load_state_dict(c, prefix, loader))


def read_safetensors(router: str, path: str, prefix: str) -> tuple[str, int]:
    with tensorcache.connect(router) as c:
        sd = load_safetensors(c, path, prefix)
        return digest(sd), c.metrics().get("loads", 0)


def slow_embed(x: torch.Tensor) -> torch.Tensor:
    time.sleep(0.5)  # an expensive encoder
    return (x.float() * 2).sin()


def memo_call(router: str, namespace: str) -> tuple[str, int, str]:
    from tensorcache.torch import input_key

    x = torch.arange(1000, dtype=torch.float16).reshape(10, 100)
    with tensorcache.connect(router) as c:
        memo = Memo(c, namespace, slow_embed)
        out = memo(x)
        return digest({"out": out}), memo.calls, input_key(namespace, (x,), {})


def write_until_manifest(router: str, prefix: str, ready: str) -> None:
    """put_state_dict, held just before its manifest's put (the parent then kills us).

    Tensors go through ``put_many``; the manifest alone through ``put``: it
    is held there, with every tensor already in the cluster.
    """

    def hold(*_args: Any, **_kwargs: Any) -> int:
        Path(ready).touch()
        time.sleep(600)
        raise AssertionError("not killed")

    Client.put = hold  # type: ignore[method-assign]
    with tensorcache.connect(router) as c:
        put_state_dict(c, prefix, model(3).state_dict())
