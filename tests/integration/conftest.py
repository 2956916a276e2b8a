"""Fixtures: real clusters (router + nodes as child processes) and clients.

A cluster is started once per module where the tests in it can share one
(each test uses its own key prefix); tests that change membership or need
special capacities start their own with ``make_cluster``. Logs go under
pytest's tmp dir so a failing run can be read afterwards.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import tensorcache
from tensorcache.apps.cluster import LocalCluster
from tensorcache.apps.etcdserver import find_etcd

from .etcdprocs import Procs
from .helpers import TRANSPORTS


def _start(log_dir: Path, nodes: int, **kwargs: Any) -> LocalCluster:
    return LocalCluster(nodes, log_dir=log_dir, **kwargs).start()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    """Three nodes of 1 GiB, LRU, 8 MiB cluster stripe size; shared by a module."""
    c = _start(tmp_path_factory.mktemp("cluster"), 3, capacity="1GiB")
    try:
        yield c
    finally:
        c.stop()


@pytest.fixture
def make_cluster(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Callable[..., LocalCluster]]:
    """Start a cluster of one's own: ``make_cluster(nodes, capacity=..., policy=...)``."""
    started: list[LocalCluster] = []

    def make(nodes: int = 3, **kwargs: Any) -> LocalCluster:
        c = _start(tmp_path_factory.mktemp("cluster"), nodes, **kwargs)
        started.append(c)
        return c

    try:
        yield make
    finally:
        for c in started:
            c.stop()


@pytest.fixture
def client(cluster: LocalCluster) -> Iterator[Any]:
    with tensorcache.connect(cluster.router_address) as c:
        yield c


@pytest.fixture(params=list(TRANSPORTS))
def transport(request: pytest.FixtureRequest) -> dict[str, object]:
    """connect() options selecting one bulk path (see helpers.TRANSPORTS)."""
    return TRANSPORTS[request.param]


@pytest.fixture
def prefix(request: pytest.FixtureRequest) -> str:
    """A key prefix unique to the running test (its name, parameters included)."""
    return re.sub(r"\s+", "_", request.node.name) + "/"


@pytest.fixture(scope="session")
def etcd_binary() -> str:
    """The etcd binary. Missing: skip, except under CI (``CI`` set), where the
    etcd tests must run, so it fails."""
    binary = find_etcd()
    if binary is None:
        if os.environ.get("CI"):
            pytest.fail("CI is set but no etcd binary was found: the etcd tests must run in CI")
        pytest.skip("no etcd binary (install etcd, or put it on PATH)")
    return binary


@pytest.fixture
def procs(etcd: Any, tmp_path: Path) -> Iterator[Procs]:
    """Router and node processes over the requesting module's ``etcd`` fixture."""
    p = Procs(etcd.url, tmp_path)
    try:
        yield p
    finally:
        p.stop()
