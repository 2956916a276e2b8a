"""Shared activations: a function's outputs keyed by a content hash of its inputs.

``Memo(client, "act/clip-vit-l/rev3/", encoder)`` is called like
``encoder``; each call hashes its inputs and looks the result up in the
cluster under ``<namespace><hash>``. On a miss exactly one worker in the
cluster computes it (``Client.get_or_load``: one fill per miss) and the
others, and every later caller with the same inputs, read it.

The key is deterministic across processes and hosts: SHA-256 over every
input's kind, dtype, shape and bytes (C order, on the CPU), never Python's
``hash()`` (salted per process). Two inputs equal in value but different in
dtype or shape get different keys. The namespace must name what computes
the output (model and revision): a new revision is a new namespace, and the
old one goes with ``Client.invalidate``.

The wrapped function must return one tensor (numpy or torch).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from tensorcache.client.api import Client
from tensorcache.errors import InvalidArgument
from tensorcache.torch.tensors import dtype_name, is_torch, raw_bytes


def _feed(h: Any, value: Any) -> None:
    if is_torch(value) or (type(value).__module__ == "numpy" and hasattr(value, "dtype")):
        shape = ",".join(str(int(d)) for d in value.shape)
        h.update(f"T{dtype_name(value)}[{shape}]".encode())
        data = raw_bytes(value)
        h.update(len(data).to_bytes(8, "little"))
        h.update(memoryview(data))
    elif isinstance(value, bool | int | float | str | bytes) or value is None:
        r = repr(value).encode()
        h.update(f"S{type(value).__name__}:{len(r)}:".encode() + r)
    elif isinstance(value, Mapping):
        h.update(f"M{len(value)}:".encode())
        for k in sorted(value, key=repr):
            _feed(h, k)
            _feed(h, value[k])
    elif isinstance(value, Sequence):
        h.update(f"L{type(value).__name__}{len(value)}:".encode())
        for v in value:
            _feed(h, v)
    else:
        raise InvalidArgument(
            f"cannot hash an input of type {type(value).__name__}: use tensors, arrays, "
            "numbers, strings, or lists and dicts of them"
        )


def input_key(namespace: str, args: Sequence[Any], kwargs: Mapping[str, Any]) -> str:
    """``namespace`` + the SHA-256 of the inputs (hex)."""
    h = hashlib.sha256(b"tensorcache.memo/1")
    _feed(h, list(args))
    _feed(h, dict(kwargs))
    return namespace + h.hexdigest()


class Memo:
    """``fn`` memoized in the cluster, shared by every worker (see the module doc)."""

    def __init__(
        self,
        client: Client,
        namespace: str,
        fn: Callable[..., Any],
        *,
        device: Any = None,
        lease_s: float = 2.0,
        timeout_s: float = 600.0,
    ) -> None:
        if not isinstance(namespace, str) or not namespace.endswith("/"):
            raise InvalidArgument(f"namespace must be a str ending with '/', got {namespace!r}")
        self.client = client
        self.namespace = namespace
        self.fn = fn
        self.device = device
        self.lease_s = lease_s
        self.timeout_s = timeout_s
        self.calls = 0  # how often fn ran in this process (misses it filled)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        key = input_key(self.namespace, args, kwargs)

        def compute() -> Any:
            self.calls += 1
            out = self.fn(*args, **kwargs)
            return out.detach() if is_torch(out) else out

        value = self.client.get_or_load(
            key, compute, lease_s=self.lease_s, timeout_s=self.timeout_s
        )
        if self.device is not None:
            import torch

            t = value if isinstance(value, torch.Tensor) else torch.from_numpy(value)
            return t.to(self.device)
        return value


def memoize(client: Client, namespace: str, **options: Any) -> Callable[[Callable[..., Any]], Memo]:
    """Decorator form of ``Memo``."""
    return lambda fn: Memo(client, namespace, fn, **options)
