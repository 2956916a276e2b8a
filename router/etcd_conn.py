"""One etcd client on its own event loop, and the one place etcd errors are mapped.

aetcd is asyncio; one event loop runs in a daemon thread owned by an
``EtcdConnection``. gRPC handler threads ``submit`` coroutines to it with a
timeout; a timeout or connection failure becomes ``Unavailable("etcd URL
unreachable: ...")`` and is recorded in the membership's health. Coroutines
read ``client`` when they run: the watch loop replaces a broken client with
a fresh one (``reconnect``), and what was in flight on the old one fails.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import math
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar
from urllib.parse import urlsplit

import aetcd
import aetcd.client
import aetcd.exceptions
import aetcd.rpc
import aetcd.watcher
import grpc

from tensorcache.errors import Unavailable
from tensorcache.router.etcd_auth import EtcdAuth
from tensorcache.router.etcd_health import EtcdHealth

T = TypeVar("T")

# Reconnect to a restarted etcd quickly (gRPC's default backs off to 120 s,
# far longer than a lease).
_CHANNEL_OPTIONS = {
    "grpc.initial_reconnect_backoff_ms": 100,
    "grpc.max_reconnect_backoff_ms": 1000,
}


def parse_endpoint(url: str) -> tuple[str, int]:
    """``http://host:port``, ``https://host:port`` (or ``host:port``) -> (host, port)."""
    parts = urlsplit(url if "://" in url else f"http://{url}")
    if parts.scheme not in ("http", "https"):
        raise ValueError(f"etcd URL {url!r}: only http:// and https:// are supported")
    if not parts.hostname or parts.port is None:
        raise ValueError(f"etcd URL {url!r} must be http(s)://host:port")
    return parts.hostname, parts.port


class _SecureClient(aetcd.Client):  # type: ignore[misc]  # aetcd is untyped
    """aetcd's client over a TLS channel.

    aetcd (1.x) only opens plaintext channels; its ``connect`` is repeated
    here with ``secure_channel`` in place of ``insecure_channel`` (the one
    difference; pinned by aetcd<2 in pyproject.toml). Everything else --
    stubs, auth token metadata, the watcher -- is aetcd's own.
    """

    def __init__(self, *args: Any, credentials: grpc.ChannelCredentials, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._credentials = credentials

    @aetcd.client._handle_errors  # type: ignore[untyped-decorator]
    async def connect(self) -> None:
        if self._connected.is_set():
            return
        if self._is_connecting:  # type: ignore[has-type]  # set by aetcd.Client
            await asyncio.wait_for(self._connected.wait(), self._connect_wait_timeout)
            return
        rpc = aetcd.rpc
        try:
            self._is_connecting = True
            target = f"{self._host}:{self._port}"
            self.channel = rpc.secure_channel(
                target, self._credentials, options=self._options.items()
            )
            if self._username is not None and self._password is not None:
                self.auth_stub = rpc.AuthStub(self.channel)
                resp = await self.auth_stub.Authenticate(
                    rpc.AuthenticateRequest(name=self._username, password=self._password),
                    timeout=self._timeout,
                )
                self.metadata = (("token", resp.token),)
            self.kvstub = rpc.KVStub(self.channel)
            self.clusterstub = rpc.ClusterStub(self.channel)
            self.leasestub = rpc.LeaseStub(self.channel)
            self.maintenancestub = rpc.MaintenanceStub(self.channel)
            self._watcher = aetcd.watcher.Watcher(
                rpc.WatchStub(self.channel), timeout=self._timeout, metadata=self.metadata
            )
            self._connected.set()
        finally:
            self._is_connecting = False


def lease_seconds(ttl_s: float) -> int:
    """etcd leases are whole seconds (and etcd raises tiny ones to its minimum)."""
    return max(1, math.ceil(ttl_s))


class EtcdConnection:
    def __init__(
        self, url: str, *, timeout_s: float, health: EtcdHealth, auth: EtcdAuth | None = None
    ) -> None:
        self._host, self._port = parse_endpoint(url)
        self._auth = auth or EtcdAuth()
        self._https = url.startswith("https://")
        if self._https and self._auth.tls is None:
            raise ValueError(f"etcd URL {url!r} is https: give the etcd CA (--etcd-ca)")
        self.url = url
        self.timeout_s = timeout_s
        self._health = health
        self._tasks: list[asyncio.Task[None]] = []
        self._closed = False
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="etcd-membership", daemon=True
        )
        self._thread.start()
        self._client: aetcd.Client = self.submit(self._make_client(), "connect")

    @property
    def client(self) -> aetcd.Client:
        """The current client; read it on the loop thread, when the call is made."""
        return self._client

    async def _make_client(self) -> aetcd.Client:
        common: dict[str, Any] = {
            "host": self._host,
            "port": self._port,
            "timeout": self.timeout_s,
            "options": _CHANNEL_OPTIONS,
            "username": self._auth.user,
            "password": self._auth.password,
        }
        if self._https and self._auth.tls is not None:
            creds = self._auth.tls.channel_credentials()  # files read now: rotation applies
            return _SecureClient(credentials=creds, **common)
        return aetcd.Client(**common)

    def submit(self, coro: Coroutine[Any, Any, T], what: str, timeout: float | None = None) -> T:
        """Run ``coro`` on the loop thread and wait for it; etcd errors become Unavailable."""
        timeout = self.timeout_s if timeout is None else timeout
        future = asyncio.run_coroutine_threadsafe(asyncio.wait_for(coro, timeout), self._loop)
        try:
            result = future.result(timeout + 1.0)
        except (TimeoutError, concurrent.futures.TimeoutError) as exc:
            future.cancel()
            raise self._failed(f"unreachable: {what} timed out") from exc
        except (
            aetcd.exceptions.ConnectionFailedError,
            aetcd.exceptions.ConnectionTimeoutError,
        ) as exc:
            raise self._failed(f"unreachable: {what}: {exc}") from exc
        except aetcd.exceptions.ClientError as exc:
            raise self._failed(f"failed {what}: {exc!r}") from exc
        except (concurrent.futures.CancelledError, asyncio.CancelledError, grpc.RpcError) as exc:
            # The watch loop replaced a broken client under this call (its
            # channel's close cancels what is in flight), or gRPC answered a
            # code aetcd does not map.
            raise self._failed(f"unreachable: {what}: {exc!r}") from exc
        self._health.call_ok()
        return result

    def _failed(self, what: str) -> Unavailable:
        return self._health.call_failed(f"etcd {self.url} {what}")

    def spawn(self, coro: Coroutine[Any, Any, None], what: str) -> None:
        """Run ``coro`` as a task on the loop until ``close`` (which cancels it first)."""

        async def start() -> asyncio.Task[None]:
            return asyncio.get_running_loop().create_task(coro)

        self._tasks.append(self.submit(start(), what))

    async def reconnect(self) -> None:
        """A fresh client: whatever state the old channel and watcher were left in goes."""
        old, self._client = self._client, await self._make_client()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(old.close(), 1.0)

    async def revoke(self, lease_id: int) -> None:
        """Revoke a lease that may already have expired (then there is nothing to do)."""
        try:
            await self._client.revoke_lease(lease_id)
        except aetcd.exceptions.ClientError as exc:
            if "not found" not in str(exc):
                raise

    def close(self) -> None:
        """Cancel the spawned tasks, close the client, stop the loop's thread."""
        if self._closed:
            return
        self._closed = True

        async def shutdown() -> None:
            for task in self._tasks:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
            client = getattr(self, "_client", None)
            if client is not None:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(client.close(), self.timeout_s)
            # grpc.aio leaves per-call tasks behind; finish them before the loop closes.
            others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in others:
                task.cancel()
            if others:
                await asyncio.wait(others, timeout=1.0)

        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(shutdown(), self._loop).result(self.timeout_s + 1)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)
        if not self._thread.is_alive():
            self._loop.close()
