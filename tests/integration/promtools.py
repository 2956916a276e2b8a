"""Prometheus's own tools for the tests: promtool and a real Prometheus server.

Both come from Debian's ``prometheus`` package (.ci/run installs it). A
missing binary skips the test with the reason, except under CI, where these
checks must run, so it fails (as the etcd tests do).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import urllib.request
from pathlib import Path

import pytest

from tensorcache.apps import promserver
from tensorcache.apps.promserver import PromServer

__all__ = ["PromServer", "promtool", "require", "scrape", "start_prometheus"]

ROOT = Path(__file__).resolve().parents[2]
MONITORING = ROOT / "k8s" / "monitoring"
DASHBOARD = MONITORING / "dashboard.json"
PROMETHEUS_RULE = MONITORING / "prometheusrule.yaml"
RULES_TEST = MONITORING / "rules_test.yaml"


def rule_file(path: Path) -> Path:
    """Write the PrometheusRule's spec to ``path``: it is a plain Prometheus rule file."""
    import yaml

    spec = yaml.safe_load(PROMETHEUS_RULE.read_text())["spec"]
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def dashboard_queries() -> list[tuple[str, str]]:
    """(panel title, PromQL) of every query of the Grafana dashboard."""
    dash = json.loads(DASHBOARD.read_text())
    return [
        (p["title"], t["expr"]) for p in dash["panels"] if p["type"] != "row" for t in p["targets"]
    ]


def alert_expressions() -> dict[str, str]:
    import yaml

    spec = yaml.safe_load(PROMETHEUS_RULE.read_text())["spec"]
    return {r["alert"]: r["expr"] for g in spec["groups"] for r in g["rules"]}


def require(binary: str) -> str:
    """Path of ``binary``; skip without it (fail under CI)."""
    path = shutil.which(binary)
    if path is None:
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(f"CI is set but {binary} is missing: install Debian's prometheus package")
        pytest.skip(f"{binary} is missing (apt-get install prometheus)")
    return path


def promtool(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [require("promtool"), *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def scrape(address: str) -> str:
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as r:
        body: bytes = r.read()
    return body.decode()


def start_prometheus(
    tmp: Path,
    jobs: dict[str, list[str]],
    *,
    rules: Path | None = None,
    interval_s: float = 0.5,
) -> PromServer:
    """A private Prometheus (tensorcache/apps/promserver.py) with data in ``tmp``."""
    return promserver.start_prometheus(
        require("prometheus"), tmp, jobs, rules=rules, interval_s=interval_s
    )
