"""Prometheus's own tools for the tests: promtool and a real Prometheus server.

Both come from Debian's ``prometheus`` package (.ci/run installs it). A
missing binary skips the test with the reason, except under CI, where these
checks must run, so it fails (as the etcd tests do).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


@dataclass
class PromServer:
    """A real Prometheus on 127.0.0.1 scraping the given targets."""

    proc: subprocess.Popen[bytes]
    url: str
    log: Path

    def api(self, path: str, **params: str) -> Any:
        query = urllib.parse.urlencode(params)
        with urllib.request.urlopen(f"{self.url}/api/v1/{path}?{query}", timeout=30) as r:
            body = json.loads(r.read())
        if body.get("status") != "success":
            raise AssertionError(f"{path} {params}: {body}")
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        data = self.api("query", query=expr)
        result: list[dict[str, Any]] = data["result"]
        return result

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def start_prometheus(
    tmp: Path,
    jobs: dict[str, list[str]],
    *,
    rules: Path | None = None,
    interval_s: float = 0.5,
    timeout_s: float = 60.0,
) -> PromServer:
    """Start Prometheus with one scrape job per entry of ``jobs`` (name -> targets).

    Readiness is polled on /-/ready; the data directory is ``tmp``'s.
    """
    binary = require("prometheus")
    port = free_port()
    interval = f"{int(interval_s * 1000)}ms"
    config = {
        "global": {"scrape_interval": interval, "evaluation_interval": interval},
        "scrape_configs": [
            {"job_name": job, "static_configs": [{"targets": targets}]}
            for job, targets in jobs.items()
        ],
    }
    if rules is not None:
        config["rule_files"] = [str(rules)]
    cfg = tmp / "prometheus.yml"
    cfg.write_text(json.dumps(config))  # JSON is YAML
    log = tmp / "prometheus.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [
                binary,
                f"--config.file={cfg}",
                f"--storage.tsdb.path={tmp / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}",
                "--web.enable-lifecycle",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    server = PromServer(proc, f"http://127.0.0.1:{port}", log)
    deadline = time.monotonic() + timeout_s
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"prometheus exited {proc.returncode}: {log.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(f"{server.url}/-/ready", timeout=2) as r:
                if r.status == 200:
                    return server
        except (urllib.error.URLError, ConnectionError):
            pass
        if time.monotonic() > deadline:
            server.stop()
            raise RuntimeError(f"prometheus not ready in {timeout_s}s: {log.read_text()[-2000:]}")
        time.sleep(0.1)
