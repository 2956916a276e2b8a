"""Client settings and the per-node statistics record (public, re-exported)."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from tensorcache import wire
from tensorcache.auth import TOKEN_ENV
from tensorcache.client.compress import check_defaults
from tensorcache.errors import InvalidArgument
from tensorcache.sizes import parse_size
from tensorcache.tls import TLSFiles


@dataclass(frozen=True)
class ClientConfig:
    """Client settings; every default is chosen for a local or in-cluster network."""

    #: Stripe tensors larger than this (bytes). None: the router's cluster default.
    stripe_size: int | None = None
    #: Largest payload message sent (2-4 MiB measured best for gRPC here).
    chunk_size: int = 4 * 1024 * 1024
    #: One RPC carries at most this many payload bytes / keys; larger work is
    #: split so several streams per node run in parallel.
    batch_bytes: int = 64 * 1024 * 1024
    batch_keys: int = 4096
    #: Threads for parallel RPCs (stripes, batches, stats).
    parallelism: int = 8
    #: Base deadline of an RPC; bulk RPCs add nbytes / min_throughput.
    timeout_s: float = 30.0
    min_throughput: float = 50e6
    #: Attempts after a stale epoch or an unreachable node (ring refreshed each time).
    retries: int = 5
    retry_backoff_s: float = 0.2
    #: "auto": bulk data over each node's TCP data channel when it has one
    #: (fastest: no gRPC copies), else gRPC streams; "grpc": gRPC streams only.
    transport: str = "auto"
    #: Copy entries of nodes on this host straight out of their memory
    #: (process_vm_readv, tensorcache/localread.py) when allowed; else network.
    local_fastpath: bool = True
    #: Bytes of hot tensors to keep in this process (0: off). Strict mode:
    #: every hit is revalidated with the owner by version, no bytes moved.
    near_cache_bytes: int = 0
    #: "strict": revalidate every near-cache hit with the owner (exact).
    #: "watch": serve hits with no call while the router's event stream is
    #: live; staleness bounded by the push delay (docs/consistency.md).
    near_cache_mode: str = "strict"
    #: Also checksum bytes copied from a co-located node. Off by default: the
    #: node verified them on arrival, stored bytes never change, and no wire
    #: lies between; the check would halve the speed of this path.
    verify_local_checksums: bool = False
    #: Per-namespace compression defaults: key prefix -> "lz4", "zstd" or
    #: "none"; the longest matching prefix wins, a put's own ``compression=``
    #: overrides it (client/compress.py). Empty: nothing is compressed.
    compression: Mapping[str, str] = field(default_factory=dict)
    #: Presented on every call to nodes and the router (docs/security.md);
    #: never shown in a repr or a log.
    token: str | None = field(default=None, repr=False)
    #: Time get/put calls for Prometheus (client/metrics.py: serve_metrics).
    #: Off by default: a worker that does not export them pays nothing.
    metrics: bool = False
    #: Mutual TLS on every channel to nodes and the router (docs/security.md).
    tls: TLSFiles | None = None

    def __post_init__(self) -> None:
        if self.stripe_size is not None and self.stripe_size < 4096:
            raise ValueError(f"stripe_size must be >= 4096 bytes, got {self.stripe_size}")
        if not 4096 <= self.chunk_size <= 16 * 1024 * 1024:
            raise ValueError(f"chunk_size must be 4 KiB..16 MiB, got {self.chunk_size}")
        if self.batch_bytes < self.chunk_size or self.batch_keys < 1:
            raise ValueError("batch_bytes must be >= chunk_size and batch_keys >= 1")
        if self.transport not in ("auto", "grpc"):
            raise ValueError(f"transport must be 'auto' or 'grpc', got {self.transport!r}")
        if self.near_cache_mode not in ("strict", "watch"):
            raise ValueError(
                f"near_cache_mode must be 'strict' or 'watch', got {self.near_cache_mode!r}"
            )
        check_defaults(self.compression)
        if self.parallelism < 1 or self.retries < 0 or self.timeout_s <= 0:
            raise ValueError("parallelism >= 1, retries >= 0 and timeout_s > 0 are required")


# Node statistics are a wire record (tensorcache/wire.py); the client's name for it.
NodeStats = wire.NodeStats


def connect_config(
    router: object,
    *,
    stripe_size: int | str | None,
    near_cache: int | str | None,
    near_cache_mode: str | None,
    config: ClientConfig | None,
    token: str | None,
    tls: TLSFiles | None,
    options: dict[str, Any],
) -> ClientConfig:
    """The ``ClientConfig`` that ``connect`` (client/api.py) builds from its arguments.

    The options are checked first, then ``router``: a bad option is reported
    before a bad address, as it always was. An explicit ``config`` takes the
    token and TLS files (given or from the environment) only where it has none.
    """
    token = token if token is not None else os.environ.get(TOKEN_ENV) or None
    tls = tls if tls is not None else TLSFiles.from_env()
    if config is None:
        options["token"] = token
        options["tls"] = tls
        if stripe_size is not None:
            options["stripe_size"] = parse_size(stripe_size)
        if near_cache is not None:
            options["near_cache_bytes"] = parse_size(near_cache)
        if near_cache_mode is not None:
            options["near_cache_mode"] = near_cache_mode
        try:
            config = ClientConfig(**options)
        except TypeError as exc:
            raise InvalidArgument(f"connect: {exc}") from exc
    if not isinstance(router, str) or ":" not in router:
        raise InvalidArgument(f"router must be 'host:port', got {router!r}")
    if token is not None and config.token is None:
        config = dataclasses.replace(config, token=token)
    if tls is not None and config.tls is None:
        config = dataclasses.replace(config, tls=tls)
    return config
