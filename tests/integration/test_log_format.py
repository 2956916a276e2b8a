"""``--log-format json``: every line a node and a router log is one JSON object."""

from __future__ import annotations

import json
from collections.abc import Callable

import pytest

from tensorcache.apps.cluster import LocalCluster

pytestmark = pytest.mark.integration


def test_json_logs_of_node_and_router(make_cluster: Callable[..., LocalCluster]) -> None:
    c = make_cluster(1, router_args=["--log-format", "json"], node_args=["--log-format", "json"])
    logs = {name: p.log_path for name, p in c.nodes.items()}
    assert c.router is not None
    logs["router"] = c.router.log_path
    c.stop()  # a graceful stop logs the drain too
    for name, path in logs.items():
        lines = [line for line in path.read_text().splitlines() if line.strip()]
        assert lines, f"{name} logged nothing"
        for line in lines:
            record = json.loads(line)  # fails on any line that is not one object
            assert set(record) >= {"ts", "level", "logger", "msg", "pid"}, record
            assert record["ts"].endswith("Z") and record["logger"].startswith("tensorcache")
    node_msgs = [json.loads(line)["msg"] for line in logs["node-0"].read_text().splitlines()]
    assert any("registered with router" in m for m in node_msgs)
